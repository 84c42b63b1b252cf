"""Vendor the Gateway API Inference Extension's InferencePool CRD (``inference.networking.k8s.io/v1``),
which the unit suite validates rendered InferencePools (render/inferencepool.py) against and the
cluster tests install (tests/cluster/test_inferencepool.py).

From the Go module proxy's copy of the upstream source (``go mod download``), so no network beyond
the module proxy is needed: ``config/crd/bases/inference.networking.k8s.io_inferencepools.yaml`` of
``sigs.k8s.io/gateway-api-inference-extension@v1.6.2``, byte for byte after a provenance header.

usage: python hack/vendor_gie_schemas.py   (writes tests/unit/schemas/; refresh: change MODULE's
version, run it, rerun tests/unit/test_inferencepool.py and tests/cluster/test_inferencepool.py)
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

MODULE = ("sigs.k8s.io/gateway-api-inference-extension", "v1.6.2")
CRD = "config/crd/bases/inference.networking.k8s.io_inferencepools.yaml"
OUT = Path(__file__).resolve().parents[1] / "tests/unit/schemas"
TARGET = OUT / f"gie-{MODULE[1]}-inferencepools.yaml"


def module_dir(path: str, version: str) -> Path:
    # A throwaway module: `go mod download` of a module@version needs no go.mod of ours, but some Go
    # versions refuse to run outside one.
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["go", "mod", "init", "vendor.tmp"], cwd=tmp, check=True, capture_output=True)
        out = subprocess.run(
            ["go", "mod", "download", "-json", f"{path}@{version}"],
            cwd=tmp,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    return Path(json.loads(out)["Dir"])


def main() -> int:
    today = datetime.now(UTC).date().isoformat()
    src = module_dir(*MODULE)
    header = (
        f"# Vendored {today} by hack/vendor_gie_schemas.py from {MODULE[0]}@{MODULE[1]} {CRD}\n"
        "# (Go module proxy). The unit suite validates rendered InferencePools against it; the cluster\n"
        "# tests install it.\n"
    )
    TARGET.write_text(header + (src / CRD).read_text())
    print(TARGET)
    return 0


if __name__ == "__main__":
    sys.exit(main())
