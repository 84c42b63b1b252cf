#!/usr/bin/env bash
# Build (once) a private venv holding vLLM's own `vllm serve` argument parser, for
# tests/vllm: it checks every command line toposerve renders against the pinned vLLM.
#
# vLLM's wheel depends on CUDA torch, flashinfer, cutlass, numba, ... (well over 10 GB).
# Parsing arguments needs none of the kernels, so this installs the smallest honest set:
#   1. vllm, torch and xgrammar with --no-deps (exact versions, vLLM's own pins);
#   2. torch's declared dependencies minus triton: `import torch` dlopens the CUDA runtime
#      libraries (cuBLAS, cuDNN, NCCL, ...) even on a CPU-only machine, so they must be there;
#      triton is only used to compile kernels;
#   3. those of vLLM's declared dependencies that importing the `vllm serve` subcommand
#      (vllm.entrypoints.cli.serve) really needs, with vLLM's own version specifiers.
# Nothing is stubbed. The platform is forced to CPU at run time (VLLM_TARGET_DEVICE=cpu, see
# hack/vllm/check_args.py). Refresh for a new vLLM: see docs/vllm.md.
#
# Idempotent: a stamp file that records the recipe makes a warm run return at once.
# Prints the venv's python on stdout (everything else goes to stderr).
set -euo pipefail

VLLM_VERSION="${VLLM_VERSION:-0.33.0}"
CACHE="${TOPOSERVE_CACHE:-$HOME/.cache/toposerve}"
ROOT="$CACHE/vllm-$VLLM_VERSION"
VENV="$ROOT/venv"
STAMP="$VENV/.toposerve-stamp"
PYTHON="${PYTHON:-python3}"

# vLLM's requirements that importing vllm.entrypoints.cli.serve (the `vllm serve` subcommand and
# its parser) really needs: found by importing it in a venv that had only the wheels above and
# adding, one by one, the distributions its ImportErrors named.
PARSER_DEPS=(
  regex pyyaml pydantic numpy psutil cbor2 pyzmq transformers aiohttp requests oss-harmony
  openai msgspec cloudpickle pillow pybase64 cachetools py-cpuinfo fastapi prometheus_client
  partial-json-parser llguidance apache-tvm-ffi orjson
)
RECIPE="vllm=$VLLM_VERSION no-deps: vllm torch xgrammar; torch deps minus triton; vllm deps: ${PARSER_DEPS[*]}"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$RECIPE" ]]; then
  echo "$VENV/bin/python"
  exit 0
fi

log() { echo "venv.sh: $*" >&2; }
mkdir -p "$ROOT"
# One builder at a time (two pytest runs may start together); the loser finds the stamp.
exec 9>"$ROOT/.lock"
flock 9
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$RECIPE" ]]; then
  echo "$VENV/bin/python"
  exit 0
fi
start=$(date +%s)
rm -rf "$VENV"
log "creating $VENV (vllm==$VLLM_VERSION, parser only; a few GB, a few minutes)"
"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${PIP[@]}" install -U pip >&2

# 1. vllm itself, then torch and xgrammar at vLLM's pins: their full dependency trees are the
#    GPU stack, so none of the three brings its requirements along.
"${PIP[@]}" install --no-deps "vllm==$VLLM_VERSION" >&2
"${PIP[@]}" install packaging >&2

# `reqs DIST only|except NAME...`: DIST's declared requirements (markers evaluated for this
# machine, no extras), restricted to the NAMEs (only) or to all but them (except).
reqs() {
  "$VENV/bin/python" - "$@" <<'PY'
import sys
from importlib.metadata import requires

from packaging.requirements import Requirement

dist, mode, names = sys.argv[1], sys.argv[2], {n.lower().replace("_", "-") for n in sys.argv[3:]}
for line in requires(dist) or []:
    req = Requirement(line)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    name = req.name.lower().replace("_", "-")
    if (name in names) == (mode == "only"):
        req.marker = None
        print(req)
PY
}
mapfile -t pinned < <(reqs vllm only torch xgrammar)
"${PIP[@]}" install --no-deps "${pinned[@]}" >&2
# 2. torch's own dependencies (CUDA runtime libraries included), minus triton.
mapfile -t torch_deps < <(reqs torch except triton)
# 3. What the serve subcommand (vllm.entrypoints.cli.serve) imports, at vLLM's versions, and
#    xgrammar's own requirements but torch and triton.
mapfile -t vllm_deps < <(reqs vllm only "${PARSER_DEPS[@]}")
mapfile -t xgr_deps < <(reqs xgrammar except torch triton)
log "pip will report vllm's and torch's unmet requirements below: expected, they are left out on purpose"
"${PIP[@]}" install "${torch_deps[@]}" "${vllm_deps[@]}" "${xgr_deps[@]}" >&2

# Fail here, not in a test, when the recipe no longer suffices.
VLLM_TARGET_DEVICE=cpu "$VENV/bin/python" -c \
  'import vllm.entrypoints.cli.serve' >&2
echo "$RECIPE" > "$STAMP"
log "done in $(( $(date +%s) - start ))s; $(du -sh "$VENV" | cut -f1) in $VENV"
echo "$VENV/bin/python"
