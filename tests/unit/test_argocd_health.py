"""The Argo CD health check (deploy/argocd/.../health.lua) run with a real Lua (lupa) against
statuses computed by the operator's own status function, in Argo CD's resource_customizations
format (testdata + health_test.yaml, which this test also keeps from drifting).

`TOPOSERVE_WRITE_TESTDATA=1 pytest tests/unit/test_argocd_health.py` rewrites the testdata.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from toposerve.controller.conditions import Observation, PlacementObs, PoolObs, compute_status
from toposerve.controller.reconcile import strip_none

# Argo CD evaluates health checks with gopher-lua, a Lua 5.1: run them on Lua 5.1 here too.
lua51 = pytest.importorskip("lupa.lua51", reason="lupa missing: pip install -e '.[dev]'")

ROOT = Path(__file__).resolve().parents[2]
ARGOCD = ROOT / "deploy" / "argocd"
CHECK = ARGOCD / "resource_customizations" / "toposerve.io" / "LLMDeployment"
NOW = "2026-12-01T10:00:00Z"
SELECTOR = "toposerve.io/deployment=quickstart,app.kubernetes.io/component=engine"
UNSCHED = "0/18 nodes are available: 8 Insufficient nvidia.com/gpu."


def _pl(gpu: str, replicas: int, ready: int) -> PlacementObs:
    return PlacementObs(gpu, replicas, ready, 1, 1, 1, 1, 1, 1.5)


def _obs(replicas: int, *placements: PlacementObs, **kw: Any) -> Observation:
    pool = PoolObs("default", True, placements=placements, **kw.pop("pool", {}))
    return Observation(
        generation=kw.pop("generation", 1), replicas=replicas, selector=SELECTOR,
        endpoint="http://quickstart.default.svc:8000/v1", engine="vllm", engine_reason="GPU nodes present",
        pools=[pool], **kw,
    )  # fmt: skip


# name -> (observation or None for no status, metadata.generation, expected status, message part)
SCENARIOS: dict[str, tuple[Observation | None, int, str, str]] = {
    "no-status": (None, 1, "Progressing", "Waiting for the operator to reconcile"),
    "healthy": (_obs(2, _pl("L4", 2, 2)), 1, "Healthy", "AllReplicasReady: 2/2 replicas ready"),
    "starting": (_obs(2, _pl("L4", 2, 0)), 1, "Progressing", "ReplicasStarting"),
    "scaled-to-zero": (_obs(0, _pl("L4", 0, 0)), 1, "Suspended", "Scaled to zero"),
    "fallback": (_obs(2, _pl("H100", 1, 1), _pl("A100-80GB", 1, 1)), 1, "Degraded", "FallbackActive"),
    "invalid-spec": (
        _obs(2, invalid="spec.model.name: unknown model 'x'; give spec.model.architecture"),
        1, "Degraded", "InvalidSpec: spec.model.name",
    ),
    "does-not-fit": (
        Observation(1, 2, SELECTOR, None, "vllm", "", [PoolObs("default", False, "no GPU type fits 405B")]),
        1, "Degraded", "DoesNotFit",
    ),
    "unschedulable": (
        _obs(2, _pl("H100", 2, 1), pool={"unschedulable": [UNSCHED], "stuck": 1}),
        1, "Progressing", "Unschedulable: " + UNSCHED,
    ),
    "old-generation": (_obs(2, _pl("L4", 2, 2)), 2, "Progressing", "observe generation 2"),
    "metrics-unavailable": (
        _obs(2, _pl("L4", 2, 2), autoscaling_mode="builtin",
             autoscaling={"mode": "builtin", "metricsAvailable": False, "source": "prometheus http://p (unavailable: x)"}),
        1, "Healthy", "AllReplicasReady: 2/2 replicas ready; autoscaling: MetricsUnavailable: no metrics from prometheus",
    ),
}  # fmt: skip


def sample(name: str) -> dict[str, Any]:
    obs, generation, _, _ = SCENARIOS[name]
    obj: dict[str, Any] = {
        "apiVersion": "toposerve.io/v1alpha1",
        "kind": "LLMDeployment",
        "metadata": {"name": "quickstart", "namespace": "default", "generation": generation},
        "spec": {"model": {"name": "Qwen/Qwen2.5-0.5B-Instruct"}, "replicas": obs.replicas if obs else 2},
    }
    if obs is not None:
        status = compute_status(obs, [], NOW).model_dump(by_alias=True, mode="json", exclude={"kopf"})
        obj["status"] = strip_none(status)  # what the API server stores (the operator strips nulls)
    return obj


def run_health(obj: dict[str, Any]) -> dict[str, str]:
    """Evaluate health.lua the way Argo CD does: a global `obj`, the chunk returns a table."""
    lua = lua51.LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = lua.table_from(obj, recursive=True)
    result = lua.execute((CHECK / "health.lua").read_text())
    return {str(k): str(v) for k, v in result.items()}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_health_of_operator_statuses(name: str) -> None:
    _, _, status, message = SCENARIOS[name]
    hs = run_health(sample(name))
    assert hs["status"] == status, hs
    assert message in hs["message"], hs


def test_testdata_and_health_test_table_match_the_operator(tmp_path: Path) -> None:
    """Argo CD's own test runner reads testdata/*.yaml and health_test.yaml: keep them current."""
    tests = []
    for name, (_, _, status, _) in SCENARIOS.items():
        obj = sample(name)
        path = CHECK / "testdata" / f"{name}.yaml"
        text = yaml.safe_dump(obj, sort_keys=False)
        if os.environ.get("TOPOSERVE_WRITE_TESTDATA"):
            path.write_text(text)
        assert path.read_text() == text, f"{path} drifted: TOPOSERVE_WRITE_TESTDATA=1 pytest {__file__}"
        health = {"status": status, "message": run_health(obj)["message"]}
        tests.append({"healthStatus": health, "inputPath": f"testdata/{name}.yaml"})
    table = yaml.safe_dump({"tests": tests}, sort_keys=False)
    if os.environ.get("TOPOSERVE_WRITE_TESTDATA"):
        (CHECK / "health_test.yaml").write_text(table)
    assert (CHECK / "health_test.yaml").read_text() == table


def test_argocd_cm_carries_the_same_lua() -> None:
    cm = yaml.safe_load((ARGOCD / "argocd-cm.yaml").read_text())
    key = "resource.customizations.health.toposerve.io_LLMDeployment"
    assert cm["data"][key] == (CHECK / "health.lua").read_text()


def test_application_ignores_only_replicas_and_respects_it() -> None:
    app = yaml.safe_load((ARGOCD / "application.yaml").read_text())
    spec = app["spec"]
    assert spec["ignoreDifferences"] == [
        {"group": "toposerve.io", "kind": "LLMDeployment", "jsonPointers": ["/spec/replicas"]}
    ]
    options = spec["syncPolicy"]["syncOptions"]
    assert "RespectIgnoreDifferences=true" in options and "ServerSideApply=true" in options
    kinds = {s.get("chart") or s.get("path") for s in spec["sources"]}
    assert kinds == {"toposerve", "deploy/argocd/llmdeployments"}
    for f in (ARGOCD / "llmdeployments").glob("*.yaml"):
        for doc in yaml.safe_load_all(f.read_text()):
            assert doc["kind"] == "LLMDeployment"
            # After the CRD (wave 0, and CRDs sort first within a wave) and the operator.
            assert int(doc["metadata"]["annotations"]["argocd.argoproj.io/sync-wave"]) > 0
