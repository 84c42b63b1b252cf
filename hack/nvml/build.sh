#!/usr/bin/env bash
# Builds the fake libnvidia-ml.so.1 (fake_nvml.c) into ~/.cache/toposerve/nvml/<hash>/ with the
# machine's cc and prints that directory; use it as LD_LIBRARY_PATH. See docs/health.md.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PY=${PY:-$ROOT/.venv/bin/python}
PYTHONPATH=$ROOT/operator${PYTHONPATH:+:$PYTHONPATH} exec "$PY" -m toposerve.dev.fakenvml
