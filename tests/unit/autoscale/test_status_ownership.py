"""status.autoscaling belongs to the autoscaler: the reconcile's status writes neither clear it
(a merge patch with a null would) nor count it as a change (an idle object costs no writes)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from toposerve.controller.conditions import Observation
from toposerve.controller.reconcile import Context, _write_status


class FakeKube:
    def __init__(self) -> None:
        self.patches: list[dict[str, Any]] = []

    def patch_status(self, api_version: str, kind: str, ns: str, name: str, status: dict[str, Any]) -> None:
        self.patches.append(status)

    def event(self, *a: Any, **kw: Any) -> None:
        pass


BODY = {"apiVersion": "toposerve.io/v1alpha1", "kind": "LLMDeployment",
        "metadata": {"name": "llm", "namespace": "ns", "uid": "u"}}  # fmt: skip
OBS = Observation(1, 0, "sel", None, "mock", "test")
NOW = datetime(2026, 12, 1, tzinfo=UTC)
AUTO = {"mode": "builtin", "desiredReplicas": 3, "reason": "ScaleUp"}


def test_reconcile_status_write_leaves_status_autoscaling_alone() -> None:
    kube = FakeKube()
    ctx = Context(kube=kube)  # type: ignore[arg-type]
    first = _write_status(ctx, BODY, OBS, {"autoscaling": AUTO}, NOW)
    assert "autoscaling" not in first
    assert kube.patches and all("autoscaling" not in p for p in kube.patches)
    # The same status again, with the autoscaler's part beside it: nothing to write.
    _write_status(ctx, BODY, OBS, {**first, "autoscaling": AUTO}, NOW)
    assert len(kube.patches) == 1


def test_reconcile_status_write_leaves_status_gateway_alone() -> None:
    """status.gateway is the gateway-status loop's (controller/gateway_status.py): a reconcile's
    merge patch with `gateway: null` deleted it after every spec change (seen on the local cluster)."""
    kube = FakeKube()
    ctx = Context(kube=kube)  # type: ignore[arg-type]
    gw = {"routed": True, "models": ["m"], "adapters": [{"name": "a", "replicas": 0, "lastError": "404 x"}]}
    first = _write_status(ctx, BODY, OBS, {"gateway": gw}, NOW)
    assert "gateway" not in first
    assert kube.patches and all("gateway" not in p for p in kube.patches)
    _write_status(ctx, BODY, OBS, {**first, "gateway": gw}, NOW)
    assert len(kube.patches) == 1
