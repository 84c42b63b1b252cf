"""Pure core, thin shells: the pure packages import no I/O shell and no Kubernetes client.

The autoscaler's policy (decision, forecast, schedule, standby, the PromQL and the metric parsers)
lives in ``toposerve.autoscale`` below the controller and the renderer, which both use it; its
loop and metric sources (HTTP, Prometheus, the Kubernetes API) are shells in ``toposerve.controller``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).parents[2] / "operator" / "toposerve"

# package -> modules it must not import (a prefix matches submodules too)
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "autoscale": ("toposerve.controller", "toposerve.render", "toposerve.router", "kubernetes", "kopf",
                  "prometheus_api_client", "urllib.request", "requests"),
    "planner": ("toposerve.controller", "toposerve.render", "toposerve.autoscale", "kubernetes", "kopf"),
    "render": ("toposerve.controller", "kubernetes", "kopf", "prometheus_api_client"),
    "api": ("toposerve.controller", "toposerve.render", "toposerve.autoscale", "kubernetes", "kopf"),
}  # fmt: skip


def imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_pure_packages_import_no_shell(package: str) -> None:
    bad = [
        f"{path.relative_to(PKG)} imports {name}"
        for path in sorted((PKG / package).glob("*.py"))
        for name in sorted(imports(path))
        if any(name == f or name.startswith(f"{f}.") for f in FORBIDDEN[package])
    ]
    assert bad == []


def test_the_checker_sees_a_forbidden_import(tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_text("from toposerve.controller.kube import Kube\nimport kubernetes.client\n")
    assert {"toposerve.controller.kube", "kubernetes.client"} <= imports(f)
