"""Status that cannot lie: the router counts for Ready, unschedulable LWS workers count as stuck
replicas (once per group), a refused apply is a condition, a gated model without a token is said."""

from __future__ import annotations

from typing import Any

from toposerve.controller.conditions import PoolObs, compute_status
from toposerve.controller.observe import router_readiness, summarize

from .test_observe_and_status import NOW, cond, obs, placement, pod


def worker(gpu: str, group: str, unsched_for: float | None = None, node: str | None = None) -> dict[str, Any]:
    p = pod(gpu, node=node, unsched_for=unsched_for)
    p["metadata"]["labels"] |= {
        "app.kubernetes.io/component": "worker",
        "leaderworkerset.sigs.k8s.io/name": "llm-default-h100",
        "leaderworkerset.sigs.k8s.io/group-index": group,
    }
    return p


def leader(gpu: str, group: str, **kw: Any) -> dict[str, Any]:
    p = pod(gpu, **kw)
    p["metadata"]["labels"] |= {
        "leaderworkerset.sigs.k8s.io/name": "llm-default-h100",
        "leaderworkerset.sigs.k8s.io/group-index": group,
    }
    return p


def test_an_unschedulable_worker_makes_its_group_a_stuck_replica_once() -> None:
    pods = [
        leader("H100", "0", node="n1"),
        worker("H100", "0", unsched_for=120),
        worker("H100", "0", unsched_for=120),  # second worker of the same group: still one replica
        leader("H100", "1", ready=True),
        worker("H100", "1", node="n2"),
    ]
    f = summarize(pods, NOW, patience_seconds=60)[("default", "H100")]
    assert (f.pods, f.ready, f.pending, f.stuck) == (2, 1, 1, 1)
    assert f.messages  # the scheduler's words reach status


def test_ready_needs_a_ready_router() -> None:
    pools = [PoolObs("default", True, placements=[placement("H100", 2, 2)])]
    down = compute_status(obs(pools=pools, router=(2, 0)), [], "t")
    assert cond(down, "Ready")["status"] == "False" and cond(down, "Ready")["reason"] == "RouterNotReady"
    up = compute_status(obs(pools=pools, router=(2, 1)), [], "t")
    assert cond(up, "Ready")["status"] == "True"
    no_router = compute_status(obs(pools=pools, router=None), [], "t")
    assert cond(no_router, "Ready")["status"] == "True"
    router_pod = pod("H100", ready=True)
    router_pod["metadata"]["labels"]["app.kubernetes.io/component"] = "router"
    assert router_readiness([router_pod, pod("H100", ready=True)]) == (1, 1)


def test_a_refused_apply_is_a_condition_with_the_generation() -> None:
    pools = [PoolObs("default", True, placements=[placement("H100", 2, 2)])]
    s = compute_status(obs(pools=pools, apply_error="applying Deployment x failed: 422 bad"), [], "t")
    prog, deg = cond(s, "Progressing"), cond(s, "Degraded")
    assert (prog["status"], prog["reason"], prog["observedGeneration"]) == ("False", "ApplyFailed", 3)
    assert deg["status"] == "True" and deg["reason"] == "ApplyFailed" and "422" in deg["message"]


def test_scaling_active_says_whether_the_builtin_autoscaler_has_metrics() -> None:
    pools = [PoolObs("default", True, placements=[placement("H100", 2, 2)])]
    src = "prometheus http://p:9090 (unavailable: TimeoutError: no answer within the 5 s deadline)"
    down = {"mode": "builtin", "metricsAvailable": False, "source": src}
    s = compute_status(obs(pools=pools, autoscaling_mode="builtin", autoscaling=down), [], "t1")
    c = cond(s, "ScalingActive")
    assert (c["status"], c["reason"], c["observedGeneration"]) == ("False", "MetricsUnavailable", 3)
    assert "5 s deadline" in c["message"] and "holding spec.replicas" in c["message"]
    assert cond(s, "Ready")["status"] == "True"  # serving is not the autoscaler's trouble
    up = {**down, "metricsAvailable": True, "source": "prometheus http://p:9090"}
    s2 = compute_status(obs(pools=pools, autoscaling_mode="builtin", autoscaling=up), [c], "t2")
    c2 = cond(s2, "ScalingActive")
    assert (c2["status"], c2["reason"], c2["lastTransitionTime"]) == ("True", "MetricsAvailable", "t2")
    again = compute_status(obs(pools=pools, autoscaling_mode="builtin", autoscaling=up), [c2], "t3")
    assert cond(again, "ScalingActive")["lastTransitionTime"] == "t2"  # moves only on a flip
    first = compute_status(obs(pools=pools, autoscaling_mode="builtin"), [], "t")
    assert (cond(first, "ScalingActive")["status"], cond(first, "ScalingActive")["reason"]) == (
        "Unknown", "NoDecisionYet",
    )  # fmt: skip
    for mode in ("off", "hpa", "keda"):  # no claim: an HPA reports on its own object
        other = compute_status(obs(pools=pools, autoscaling_mode=mode, autoscaling=down), [], "t")
        assert "ScalingActive" not in {x["type"] for x in other.model_dump(by_alias=True)["conditions"]}


def test_measured_start_up_is_in_pool_status() -> None:
    from toposerve.autoscale.startup import StartupSample

    samples = [StartupSample("a", 90.0, 2.0, 28.0, 60.0), StartupSample("b", 30.0, 1.0)]
    pools = [
        PoolObs(
            "default",
            True,
            placements=[placement("H100", 2, 2)],
            startup=samples,
            kv_cache_tokens_per_replica=9000,
        )
    ]
    (p,) = compute_status(obs(pools=pools), [], "t").model_dump(by_alias=True, exclude_none=True)["pools"]
    assert p["kvCacheTokensPerReplica"] == 9000  # what the autoscaler's demand rule sizes against
    assert p["startup"] == {
        "samples": 2, "p50Seconds": 60.0, "p90Seconds": 84.0, "schedulingP50Seconds": 1.5,
        "pullingP50Seconds": 28.0, "loadingP50Seconds": 60.0,
        "recent": [{"pod": "a", "totalSeconds": 90.0, "schedulingSeconds": 2.0, "pullingSeconds": 28.0,
                    "loadingSeconds": 60.0}, {"pod": "b", "totalSeconds": 30.0, "schedulingSeconds": 1.0}],
    }  # fmt: skip
    empty = [PoolObs("default", True, placements=[placement("H100", 2, 2)])]
    (q,) = compute_status(obs(pools=empty), [], "t").model_dump(by_alias=True, exclude_none=True)["pools"]
    assert "startup" not in q


def test_notices_degrade_without_blocking() -> None:
    pools = [PoolObs("default", True, placements=[placement("H100", 2, 2)])]
    s = compute_status(
        obs(pools=pools, notices=[("HFTokenMissing", "set spec.serving.hfTokenSecret")]), [], "t"
    )
    assert cond(s, "Degraded")["reason"] == "HFTokenMissing" and cond(s, "Ready")["status"] == "True"


def test_topology_choice_is_in_pool_status() -> None:
    pools = [PoolObs("default", True, placements=[placement("H100", 1, 1)], topology_key="nvidia.com/gpu.clique",
                     topology_reason="H100 nodes carry nvidia.com/gpu.clique")]  # fmt: skip
    s = compute_status(obs(pools=pools, replicas=1), [], "t").model_dump(by_alias=True)
    assert s["pools"][0]["topologyKey"] == "nvidia.com/gpu.clique"


def test_a_multi_node_replica_is_ready_only_with_its_whole_group() -> None:
    def sized(p: dict[str, Any]) -> dict[str, Any]:
        p["metadata"]["annotations"] = {"leaderworkerset.sigs.k8s.io/size": "2"}
        return p

    alone = [sized(leader("H100", "0", ready=True))]  # the worker pod does not exist yet
    assert summarize(alone, NOW, 60)[("default", "H100")].ready == 0
    w = sized(worker("H100", "0", node="n2"))
    w["status"]["conditions"][0]["status"] = "True"
    assert summarize([*alone, w], NOW, 60)[("default", "H100")].ready == 1
    w2 = sized(worker("H100", "0", node="n2"))  # present but not ready
    assert summarize([*alone, w2], NOW, 60)[("default", "H100")].ready == 0
