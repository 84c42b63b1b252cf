"""On-demand cover for spot replicas under a termination notice (planner/spotcover.py): the pure
rule, its rendering into the pool's on-demand workload, and the reconcile that counts the pods."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from tests.unit.conftest import make_spec
from tests.unit.controller.test_pool_scaling import FakeKube, node
from toposerve.api.config import OperatorConfig
from toposerve.controller.reconcile import Context, reconcile
from toposerve.planner.plan import plan_deployment
from toposerve.planner.spotcover import SpotPod, cover, spot_desired
from toposerve.render.objects import render_deployment, render_pool

L8 = "meta-llama/Llama-3.1-8B-Instruct"
NOTICE = "cloud.google.com/impending-node-termination"

pods_st = st.lists(
    st.builds(
        SpotPod,
        ready=st.booleans(),
        on_demand=st.booleans(),
        interrupted=st.booleans(),
        leaving=st.booleans(),
    ),
    max_size=12,
)


def _spot(ready: int = 0, interrupted: int = 0, loading: int = 0) -> list[SpotPod]:
    return (
        [SpotPod(ready=True, on_demand=False, interrupted=False)] * ready
        + [SpotPod(ready=True, on_demand=False, interrupted=True)] * interrupted
        + [SpotPod(ready=False, on_demand=False, interrupted=False)] * loading
    )


def test_a_notice_starts_a_cover_that_holds_until_the_spot_side_is_ready_again() -> None:
    # 3 spot replicas, one node gets a notice: its pod is marked, the ReplicaSet starts a replacement
    assert cover(_spot(ready=2, interrupted=1, loading=1), 3, 0, previous=0) == 1
    # the node went: the replacement is still loading, the cover stays
    assert cover(_spot(ready=2, loading=1), 3, 0, previous=1) == 1
    # the replacement is ready: the cover ends
    assert cover(_spot(ready=3), 3, 0, previous=1) == 0
    # a plain scale-up (no notice, no cover in force) is not covered on demand
    assert cover(_spot(ready=1, loading=2), 3, 0, previous=0) == 0
    # the baseline's own pods are never counted as spot, interrupted or not
    od = [SpotPod(ready=True, on_demand=True, interrupted=True)]
    assert cover(od + _spot(ready=2), 3, 1, previous=0) == 0


@given(pods_st, st.integers(0, 12), st.integers(0, 4), st.integers(0, 12))
def test_the_cover_is_bounded_by_what_is_at_risk_and_what_was_in_force(
    pods: list[SpotPod], replicas: int, baseline: int, previous: int
) -> None:
    c = cover(pods, replicas, baseline, previous)
    at_risk = sum(1 for p in pods if p.interrupted and not p.on_demand)
    assert at_risk <= c <= max(at_risk, previous)
    # never more than the spot side is missing, once nothing is at risk any more
    if at_risk == 0:
        assert c <= spot_desired(replicas, baseline)
    # without a notice and without a cover in force there is never a cover
    if at_risk == 0 and previous == 0:
        assert c == 0


def _workloads(objs: list[dict[str, Any]]) -> dict[str, int]:
    return {o["metadata"]["name"]: o["spec"]["replicas"] for o in objs if o["kind"] == "Deployment"}


def test_the_cover_goes_to_the_pools_on_demand_workload_even_without_a_baseline() -> None:
    s = make_spec(L8, 8192, ["H100"], replicas=3, placement={"spot": {"enabled": True}, "tier": "throughput"})
    dplan = plan_deployment("d", s)
    (p,) = dplan.pools
    covered = render_pool(
        "d", "ns", s, dplan, p.model_copy(update={"replicas": 3, "on_demand_cover": 1}), OperatorConfig()
    )
    assert _workloads(covered) == {"d-default-h100": 3, "d-default-h100-od": 1}
    assert _workloads(
        render_pool("d", "ns", s, dplan, p.model_copy(update={"replicas": 3}), OperatorConfig())
    ) == {"d-default-h100": 3}
    s = make_spec(
        L8,
        8192,
        ["H100"],
        replicas=3,
        placement={"spot": {"enabled": True, "onDemandBaseline": 1}, "tier": "throughput"},
    )
    dplan = plan_deployment("d", s)
    (p,) = dplan.pools
    got = render_pool(
        "d", "ns", s, dplan, p.model_copy(update={"replicas": 3, "on_demand_cover": 2}), OperatorConfig()
    )
    assert _workloads(got) == {"d-default-h100": 2, "d-default-h100-od": 3}  # baseline 1 + cover 2
    assert {
        k: v for k, v in _workloads(render_deployment("d", "ns", s, dplan)).items() if "router" not in k
    } == {
        "d-default-h100": 2,
        "d-default-h100-od": 1,
    }


# --- the reconcile: counting the pods, status, Events ------------------------------------------------


def _body() -> dict[str, Any]:
    return {
        "apiVersion": "toposerve.io/v1alpha1", "kind": "LLMDeployment",
        "metadata": {"name": "llm", "namespace": "ns", "uid": "u", "generation": 1},
        "spec": {"model": {"name": L8, "maxContextLength": 8192}, "engine": "vllm", "replicas": 2,
                 "routing": {"enabled": False},
                 "placement": {"tier": "throughput", "gpuTypes": ["H100"], "spot": {"enabled": True}}},
    }  # fmt: skip


def _node(name: str, spot: bool, notice: bool = False) -> dict[str, Any]:
    n = node(name, "NVIDIA-H100-80GB-HBM3", 8)
    n["metadata"]["labels"]["karpenter.sh/capacity-type"] = "spot" if spot else "on-demand"
    if notice:
        n["spec"]["taints"] = [{"key": NOTICE, "value": "true", "effect": "NoSchedule"}]
    return n


def _pod(name: str, node_name: str, ready: bool, interrupted: bool = False) -> dict[str, Any]:
    labels = {
        "toposerve.io/deployment": "llm",
        "toposerve.io/gpu-type": "H100",
        "app.kubernetes.io/component": "engine",
    }
    notes: dict[str, str] = {}
    if interrupted:  # as evacuation.decide leaves a marked pod: out of its pool's selector, reason noted
        notes = {"toposerve.io/evacuation": "NodeInterrupted", "toposerve.io/evacuated-pool": "default",
                 "toposerve.io/evacuation-started": datetime.now(UTC).isoformat()}  # fmt: skip
    else:
        labels["toposerve.io/pool"] = "default"
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "ns", "uid": name, "labels": labels, "annotations": notes,
                     "ownerReferences": [{"uid": "u"}]},
        "spec": {"nodeName": node_name, "containers": [{"name": "engine", "resources": {
            "requests": {"nvidia.com/gpu": "1"}, "limits": {"nvidia.com/gpu": "1"}}}]},
        "status": {"phase": "Running", "podIP": "10.0.0.1",
                   "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
    }  # fmt: skip


def _deployments(kube: FakeKube) -> dict[str, int]:
    return {n: o["spec"]["replicas"] for (k, n), o in kube.objects.items() if k == "Deployment"}


def test_the_reconcile_covers_a_noticed_spot_replica_on_demand_until_its_replacement_is_ready() -> None:
    kube = FakeKube(_body(), [_node("s1", True, notice=True), _node("s2", True), _node("o1", False)])
    kube.objects[("Pod", "a")] = _pod("a", "s1", ready=True, interrupted=True)
    kube.objects[("Pod", "b")] = _pod("b", "s2", ready=True)
    kube.objects[("Pod", "c")] = _pod("c", "s2", ready=False)  # the ReplicaSet's replacement, loading
    ctx = Context(kube=kube, config=OperatorConfig(), engine_in_flight=lambda ip: 1)  # type: ignore[arg-type]
    reconcile(ctx, "ns", "llm")
    assert _deployments(kube) == {"llm-default-h100": 2, "llm-default-h100-od": 1}
    (pool,) = kube.body["status"]["pools"]
    assert pool["onDemandCover"] == 1
    (ev,) = [e for e in kube.events if e[0] == "SpotCover"]
    assert "1 x H100" in ev[1] and ev[2]  # a Warning: capacity is about to go

    # the noticed node went with its pod; the replacement still loads: the cover holds, said once
    kube.nodes = [_node("s2", True), _node("o1", False)]
    del kube.objects[("Pod", "a")]
    ctx._inventory = None
    reconcile(ctx, "ns", "llm")
    assert _deployments(kube)["llm-default-h100-od"] == 1
    assert kube.body["status"]["pools"][0]["onDemandCover"] == 1
    assert len([e for e in kube.events if e[0] == "SpotCover"]) == 1

    # the replacement is ready: the on-demand cover goes (no baseline: its workload is pruned)
    kube.objects[("Pod", "c")] = _pod("c", "s2", ready=True)
    reconcile(ctx, "ns", "llm")
    assert _deployments(kube) == {"llm-default-h100": 2}
    assert "onDemandCover" not in kube.body["status"]["pools"][0]
    assert [e[0] for e in kube.events].count("SpotCoverEnded") == 1


def test_the_cover_can_be_turned_off() -> None:
    kube = FakeKube(_body(), [_node("s1", True, notice=True), _node("s2", True), _node("o1", False)])
    kube.objects[("Pod", "a")] = _pod("a", "s1", ready=True, interrupted=True)
    kube.objects[("Pod", "b")] = _pod("b", "s2", ready=True)
    config = OperatorConfig.model_validate({"evacuation": {"onDemandCover": False}})
    reconcile(Context(kube=kube, config=config, engine_in_flight=lambda ip: 1), "ns", "llm")  # type: ignore[arg-type]
    assert _deployments(kube) == {"llm-default-h100": 2}
    assert not [e for e in kube.events if e[0] == "SpotCover"] and copy.deepcopy(kube.body["status"]["pools"])
