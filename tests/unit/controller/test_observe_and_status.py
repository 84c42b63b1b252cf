"""Pod facts and the status/conditions computed from them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from toposerve.controller.conditions import Observation, PlacementObs, PoolObs, compute_status
from toposerve.controller.observe import summarize

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


def pod(
    gpu: str, ready: bool = False, node: str | None = "n1", unsched_for: float | None = None, **extra: Any
) -> dict[str, Any]:
    conds: list[dict[str, Any]] = [{"type": "Ready", "status": "True" if ready else "False"}]
    if unsched_for is not None:
        t = (NOW - timedelta(seconds=unsched_for)).strftime("%Y-%m-%dT%H:%M:%SZ")
        conds.append({"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                      "message": "0/9 nodes are available: 9 Insufficient nvidia.com/gpu.", "lastTransitionTime": t})  # fmt: skip
    labels = {
        "toposerve.io/pool": "default",
        "toposerve.io/gpu-type": gpu,
        "app.kubernetes.io/component": "engine",
    }
    return {"metadata": {"name": f"p-{id(conds)}", "labels": labels, **extra}, "spec": {"nodeName": node},
            "status": {"conditions": conds}}  # fmt: skip


def test_summarize_counts_ready_pending_and_stuck() -> None:
    pods = [
        pod("H100", ready=True),
        pod("H100", node=None, unsched_for=120),
        pod("H100", node=None, unsched_for=5),
        pod("A100-80GB", ready=True),
        pod("H100", ready=True, deletionTimestamp="2026-11-28T11:59:00Z"),  # terminating: ignored
    ]
    facts = summarize(pods, NOW, patience_seconds=60)
    h = facts[("default", "H100")]
    assert (h.pods, h.ready, h.pending, h.stuck) == (3, 1, 2, 1)
    assert "Insufficient nvidia.com/gpu" in h.messages[0]
    assert facts[("default", "A100-80GB")].ready == 1


def placement(gpu: str, replicas: int, ready: int) -> PlacementObs:
    return PlacementObs(gpu, replicas, ready, 4, 1, 1, 4, 1, 10.0)


def obs(**kw: Any) -> Observation:
    base: dict[str, Any] = dict(
        generation=3, replicas=2, selector="s", endpoint="http://e", engine="vllm", engine_reason="r"
    )
    base.update(kw)
    return Observation(**base)


def cond(status: Any, kind: str) -> dict[str, Any]:
    return next(c for c in status.model_dump(by_alias=True)["conditions"] if c["type"] == kind)


def test_all_ready_is_ready_and_not_degraded() -> None:
    s = compute_status(obs(pools=[PoolObs("default", True, placements=[placement("H100", 2, 2)])]), [], "T0")
    assert cond(s, "Ready")["status"] == "True" and cond(s, "Ready")["reason"] == "AllReplicasReady"
    assert cond(s, "Degraded")["status"] == "False" and cond(s, "Schedulable")["status"] == "True"
    assert cond(s, "Ready")["observedGeneration"] == 3 and s.observed_generation == 3
    assert (s.gpu_types, s.parallelism, s.ready_replicas, s.cost_per_hour) == ("H100", "4/1", 2, 20.0)


def test_fallback_is_degraded_and_lists_both_types() -> None:
    pools = [PoolObs("default", True, placements=[placement("H100", 1, 1), placement("A100-80GB", 1, 0)])]
    s = compute_status(obs(pools=pools), [], "T0")
    assert cond(s, "Degraded")["reason"] == "FallbackActive"
    assert s.gpu_types == "H100,A100-80GB" and cond(s, "Progressing")["reason"] == "ReplicasStarting"


def test_unschedulable_and_invalid_and_unfit() -> None:
    pools = [
        PoolObs("default", True, placements=[placement("H100", 2, 0)], unschedulable=["0/9 nodes"], stuck=2)
    ]
    s = compute_status(obs(pools=pools), [], "T0")
    assert cond(s, "Schedulable")["status"] == "False" and cond(s, "Progressing")["reason"] == "Unschedulable"
    bad = compute_status(obs(invalid="spec.parallelism.tensor: 3 does not divide"), [], "T0")
    assert (
        cond(bad, "Ready")["reason"] == "InvalidSpec"
        and "spec.parallelism.tensor" in cond(bad, "Ready")["message"]
    )
    unfit = compute_status(obs(pools=[PoolObs("default", False, reason="too big")]), [], "T0")
    assert cond(unfit, "Ready")["reason"] == "DoesNotFit" and unfit.pools[0].pending_reason == "too big"


def test_transition_time_moves_only_when_status_flips() -> None:
    ready = [PoolObs("default", True, placements=[placement("H100", 2, 2)])]
    first = compute_status(obs(pools=ready), [], "T0").model_dump(by_alias=True)["conditions"]
    again = compute_status(obs(pools=ready), first, "T1")
    assert cond(again, "Ready")["lastTransitionTime"] == "T0"
    down = [PoolObs("default", True, placements=[placement("H100", 2, 1)])]
    flipped = compute_status(obs(pools=down), first, "T2")
    assert cond(flipped, "Ready")["lastTransitionTime"] == "T2"


def test_status_round_trip_through_the_api_server_is_not_a_change() -> None:
    from toposerve.controller.reconcile import status_changed, strip_none

    pools = [PoolObs("default", True, placements=[placement("H100", 2, 2)])]
    new = compute_status(obs(pools=pools), [], "T0").model_dump(by_alias=True, mode="json", exclude={"kopf"})
    assert new["pools"][0]["pendingReason"] is None  # a nested null...
    stored = strip_none(new)  # ...which the API server drops when it stores the merge patch
    assert not status_changed(new, stored)
    stored["readyReplicas"] = 1
    assert status_changed(new, stored)
