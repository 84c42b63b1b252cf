"""Vendor the Prometheus Operator's PodMonitor and ServiceMonitor CRDs, which the unit suite validates
the rendered PodMonitors (render/monitoring.py) and the chart's own monitors against, and which the
cluster test installs (tests/cluster/test_monitoring.py).

From the Go module proxy's copy of the upstream source (``go mod download``), so no cluster and no
network beyond the module proxy is needed: ``example/prometheus-operator-crd/`` of
``github.com/prometheus-operator/prometheus-operator@v0.89.0`` (the newest version the proxy
served on 2026-12-07; v0.90.0 was not available there).

usage: python hack/vendor_monitoring_schemas.py   (writes tests/unit/schemas/)
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

MODULE = ("github.com/prometheus-operator/prometheus-operator", "v0.89.0")
KINDS = ("podmonitors", "servicemonitors")
OUT = Path(__file__).resolve().parents[1] / "tests/unit/schemas"


def module_dir(path: str, version: str) -> Path:
    out = subprocess.run(
        ["go", "mod", "download", "-json", f"{path}@{version}"], check=True, capture_output=True, text=True
    ).stdout
    return Path(json.loads(out)["Dir"])


def main() -> int:
    today = datetime.now(UTC).date().isoformat()
    src = module_dir(*MODULE)
    for plural in KINDS:
        crd = f"example/prometheus-operator-crd/monitoring.coreos.com_{plural}.yaml"
        header = (
            f"# Vendored {today} by hack/vendor_monitoring_schemas.py from {MODULE[0]}@{MODULE[1]} {crd}\n"
            "# (Go module proxy). The unit suite validates rendered monitors against it; the cluster\n"
            "# test installs it.\n"
        )
        (OUT / f"prometheus-operator-{MODULE[1]}-{plural}.yaml").write_text(header + (src / crd).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
