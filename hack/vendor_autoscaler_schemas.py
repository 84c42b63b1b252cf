"""Vendor the real schemas the unit suite validates rendered HPAs and ScaledObjects against.

Both come from the Go module proxy's copies of the upstream sources (``go mod download``), so
no cluster and no network beyond the module proxy is needed:

* Kubernetes v1.35.4 (the local cluster's version): ``api/openapi-spec/v3/
  apis__autoscaling__v2_openapi.json`` of ``k8s.io/kubernetes@v1.35.4``, reduced to the
  components a HorizontalPodAutoscaler references.
* KEDA v2.21.0: ``config/crd/bases/keda.sh_scaledobjects.yaml`` of
  ``github.com/kedacore/keda/v2@v2.21.0``.

usage: python hack/vendor_autoscaler_schemas.py   (writes tests/unit/schemas/)
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

K8S = ("k8s.io/kubernetes", "v1.35.4")
KEDA = ("github.com/kedacore/keda/v2", "v2.21.0")
HPA = "io.k8s.api.autoscaling.v2.HorizontalPodAutoscaler"
OUT = Path(__file__).resolve().parents[1] / "tests/unit/schemas"


def module_dir(path: str, version: str) -> Path:
    out = subprocess.run(
        ["go", "mod", "download", "-json", f"{path}@{version}"], check=True, capture_output=True, text=True
    ).stdout
    return Path(json.loads(out)["Dir"])


def _refs(node: Any, out: set[str]) -> None:
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "$ref":
                out.add(v.rsplit("/", 1)[-1])
            else:
                _refs(v, out)
    elif isinstance(node, list):
        for v in node:
            _refs(v, out)


def main() -> int:
    today = datetime.now(UTC).date().isoformat()
    k8s = module_dir(*K8S)
    src = "api/openapi-spec/v3/apis__autoscaling__v2_openapi.json"
    schemas = json.loads((k8s / src).read_text())["components"]["schemas"]
    need: set[str] = set()
    todo = [HPA]
    while todo:
        name = todo.pop()
        if name not in need:
            need.add(name)
            found: set[str] = set()
            _refs(schemas[name], found)
            todo += sorted(found)
    doc = {
        "x-source": f"{K8S[0]}@{K8S[1]} {src} (Go module proxy), components reachable from {HPA}",
        "x-vendored": f"{today} by hack/vendor_autoscaler_schemas.py",
        "components": {"schemas": {k: schemas[k] for k in sorted(need)}},
    }
    (OUT / "autoscaling-v2-hpa.openapi.json").write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    keda = module_dir(*KEDA)
    crd = "config/crd/bases/keda.sh_scaledobjects.yaml"
    header = (
        f"# Vendored {today} by hack/vendor_autoscaler_schemas.py from {KEDA[0]}@{KEDA[1]} {crd}\n"
        "# (Go module proxy). The unit suite validates rendered ScaledObjects against it.\n"
    )
    (OUT / "keda-v2.21.0-scaledobjects.yaml").write_text(header + (keda / crd).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
