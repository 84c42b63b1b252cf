"""Moving pods off bad nodes: the pure decision (evacuation.decide), what it reads of pods and nodes,
and the reconcile shell's writes (a fake API records them)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from toposerve.api.config import OperatorConfig
from toposerve.api.spec import LLMDeploymentSpec
from toposerve.controller import evacuation as ev
from toposerve.controller.engineprobe import parse_in_flight
from toposerve.controller.observe import summarize
from toposerve.controller.reconcile import Context, _evacuate
from toposerve.planner.inventory import Inventory, NodeInfo, node_info
from toposerve.render.objects import Owner

T0 = datetime(2026, 12, 1, 12, 0, 0, tzinfo=UTC)
TIMING = {
    ev.REASON_UNHEALTHY: ev.Timing(drain_after=600, drain_timeout=120),
    ev.REASON_INTERRUPTED: ev.Timing(drain_after=60, drain_timeout=45),
}
BAD = {"bad": ev.Trouble(ev.REASON_UNHEALTHY, "GPUs unhealthy (GPU 1: 7 uncorrected ECC errors)")}
GOING = {"bad": ev.Trouble(ev.REASON_INTERRUPTED, "termination notice (taint x)")}


def view(name: str, node: str = "ok", ready: bool = True, **kw: Any) -> ev.PodView:
    return ev.PodView(name=name, node=node, pool=kw.pop("pool", "default"), ready=ready, ip="10.0.0.1", **kw)


def marked(name: str, reason: str = ev.REASON_UNHEALTHY, at: datetime = T0, **kw: Any) -> ev.PodView:
    return view(name, node="bad", reason=reason, marked_at=at, **kw)


def decide(pods: list[ev.PodView], troubles: dict[str, ev.Trouble] | None = None, desired: int = 2,
           in_flight: dict[str, int | None] | None = None, now: datetime = T0) -> ev.Decision:  # fmt: skip
    return ev.decide(pods, troubles or {}, {"default": desired}, in_flight or {}, now, TIMING)


# ---- the decision ------------------------------------------------------------------------------


def test_nothing_wrong_nothing_done() -> None:
    assert decide([view("a"), view("b")], BAD) == ev.Decision()


def test_a_pod_on_a_bad_node_is_marked_and_keeps_serving_while_the_pool_is_short() -> None:
    d = decide([view("a"), view("b", node="bad")], BAD)
    assert d.mark == [ev.Mark("b", "default", "bad", BAD["bad"])]
    assert d.drain == [] and d.delete == []
    assert d.requeue_after == 600  # the drain deadline, unless a pod event comes first


def test_it_drains_once_the_replacement_is_ready() -> None:
    d = decide([view("a"), view("replacement"), marked("b")])
    assert d.mark == [] and d.drain == [ev.Drain("b", "ReplacementReady")]
    assert d.requeue_after == 5  # ask the engine again after the minimum drain time


def test_a_replacement_not_yet_ready_does_not_count() -> None:
    d = decide([view("a"), view("replacement", ready=False), marked("b")])
    assert d.drain == []


def test_it_drains_at_the_deadline_without_a_replacement() -> None:
    early = decide([view("a"), marked("b")], now=T0 + timedelta(seconds=599))
    assert early.drain == [] and early.requeue_after == 1
    late = decide([view("a"), marked("b")], now=T0 + timedelta(seconds=600))
    assert late.drain == [ev.Drain("b", "Deadline")]


def test_interruptions_have_their_own_shorter_deadline() -> None:
    pods = [view("a"), marked("b", reason=ev.REASON_INTERRUPTED)]
    assert decide(pods, now=T0 + timedelta(seconds=60)).drain == [ev.Drain("b", "Deadline")]


def test_a_marked_pod_that_is_not_ready_drains_at_once_and_goes_next() -> None:
    d = decide([view("a"), view("b", node="bad", ready=False)], BAD)
    assert d.mark and d.drain == [ev.Drain("b", "NotServing")]
    gone = decide([view("a"), marked("b", ready=False, draining_at=T0)])
    assert gone.delete == [ev.Delete("b", "NotServing")]


def test_a_drained_engine_goes_after_the_minimum_drain_time() -> None:
    pods = [view("a"), view("c"), marked("b", draining_at=T0)]
    assert decide(pods, in_flight={"b": 0}, now=T0 + timedelta(seconds=4)).delete == []
    assert decide(pods, in_flight={"b": 0}, now=T0 + timedelta(seconds=5)).delete == [
        ev.Delete("b", "Drained")
    ]


def test_requests_in_flight_hold_the_pod_until_the_drain_deadline() -> None:
    pods = [view("a"), view("c"), marked("b", draining_at=T0)]
    busy = decide(pods, in_flight={"b": 3}, now=T0 + timedelta(seconds=30))
    assert busy.delete == [] and busy.requeue_after == 2  # poll the engine
    unknown = decide(pods, in_flight={"b": None}, now=T0 + timedelta(seconds=119))
    assert unknown.delete == [] and unknown.requeue_after == 1
    late = decide(pods, in_flight={"b": 3}, now=T0 + timedelta(seconds=120))
    assert late.delete == [ev.Delete("b", "Deadline")]


def test_only_as_many_evacuees_serve_as_the_pool_is_short_oldest_mark_drains_first() -> None:
    pods = [view("a"), marked("b", at=T0), marked("c", at=T0 + timedelta(seconds=1))]
    d = decide(pods, desired=2)  # one healthy ready pod: one evacuee keeps serving
    assert d.drain == [ev.Drain("b", "ReplacementReady")]
    assert decide(pods, desired=3).drain == []
    assert {x.pod for x in decide(pods, desired=1).drain} == {"b", "c"}


def test_a_pool_scaled_away_drains_its_evacuees() -> None:
    assert decide([marked("b")], desired=0).drain == [ev.Drain("b", "ReplacementReady")]


def test_pools_are_counted_apart() -> None:
    pods = [view("a", pool="other"), view("x", pool="other"), marked("b")]
    d = ev.decide(pods, {}, {"default": 1, "other": 2}, {}, T0, TIMING)
    assert d.drain == []  # "default" has no ready replica of its own yet


def test_terminating_and_multi_node_pods_are_left_alone() -> None:
    d = decide([view("a", node="bad", terminating=True), view("b", node="bad", multi_node=True)], BAD)
    assert d == ev.Decision()


def test_a_node_that_recovers_does_not_undo_an_evacuation() -> None:
    # The replacement already exists; taking the pod back would only make the ReplicaSet delete one.
    d = decide([view("a"), view("r"), marked("b")], troubles={})
    assert d.drain == [ev.Drain("b", "ReplacementReady")]


@pytest.mark.parametrize("seed", range(200))
def test_properties_over_random_worlds(seed: int) -> None:
    """Whatever the world: a pod is acted on at most once per decision, only evacuees drain or go,
    a serving evacuee drains only once the pool has its replicas or its deadline passed, and a busy
    draining engine goes only at its deadline."""
    import random

    rnd = random.Random(seed)
    pods = []
    for i in range(rnd.randint(0, 6)):
        state = rnd.choice(["healthy", "on-bad", "marked", "draining"])
        ready = rnd.random() < 0.8
        at = T0 - timedelta(seconds=rnd.choice([0, 30, 70, 200, 700]))
        if state == "healthy":
            pods.append(view(f"p{i}", ready=ready))
        elif state == "on-bad":
            pods.append(view(f"p{i}", node="bad", ready=ready))
        else:
            reason = rnd.choice([ev.REASON_UNHEALTHY, ev.REASON_INTERRUPTED])
            drain = at + timedelta(seconds=rnd.choice([0, 3, 10, 50])) if state == "draining" else None
            pods.append(marked(f"p{i}", reason=reason, at=at, ready=ready, draining_at=drain))
    desired = rnd.randint(0, 4)
    flights = {p.name: rnd.choice([0, 2, None]) for p in pods}
    troubles = rnd.choice([BAD, GOING, {}])
    d = decide(pods, troubles, desired, flights)
    by_name = {p.name: p for p in pods}
    acted = [m.pod for m in d.mark] + [x.pod for x in d.drain] + [x.pod for x in d.delete]
    assert len({x.pod for x in d.drain} | {x.pod for x in d.delete}) == len(d.drain) + len(d.delete)
    assert all(by_name[n].node == "bad" for n in acted)
    assert {m.pod for m in d.mark} == {p.name for p in pods if p.reason is None and p.node in troubles}
    evacuees = [p for p in pods if p.reason is not None or p.node in troubles]
    healthy_ready = sum(1 for p in pods if p not in evacuees and p.ready)
    keep = max(0, desired - healthy_ready)
    serving = [p for p in evacuees if p.ready and p.draining_at is None]
    drained = {x.pod: x.why for x in d.drain}
    kept = [p for p in serving if p.name not in drained]
    # Evacuees keep serving only while the pool is short, and none drains early unless it must.
    assert len(kept) <= keep
    assert len(kept) + sum(1 for p in serving if drained.get(p.name) == "Deadline") >= min(len(serving), keep)
    for x in d.drain:
        p = by_name[x.pod]
        assert p.draining_at is None and (x.why == "NotServing") == (not p.ready)
        if x.why == "Deadline":
            assert p.marked_at is not None
            assert (T0 - p.marked_at).total_seconds() >= TIMING[p.reason or ""].drain_after
    for y in d.delete:
        p = by_name[y.pod]
        assert p.draining_at is not None
        if flights[p.name] != 0 and p.ready:
            assert y.why == "Deadline"
            assert (T0 - p.draining_at).total_seconds() >= TIMING[p.reason or ""].drain_timeout
    # Whatever is still on its way out is looked at again.
    left = [p for p in evacuees if p.name not in {x.pod for x in d.delete}]
    assert (d.requeue_after is not None and d.requeue_after > 0) == bool(left)


# ---- reading pods and nodes ----------------------------------------------------------------------


def pod(name: str, node: str = "n1", ready: bool = True, labels: dict[str, str] | None = None,
        annotations: dict[str, str] | None = None) -> dict[str, Any]:  # fmt: skip
    return {
        "metadata": {
            "name": name,
            "uid": f"uid-{name}",
            "labels": {
                "toposerve.io/deployment": "llm",
                "toposerve.io/pool": "default",
                "toposerve.io/gpu-type": "H100",
                "app.kubernetes.io/component": "engine",
                **(labels or {}),
            },
            "annotations": annotations or {},
        },
        "spec": {"nodeName": node},
        "status": {"podIP": "10.1.2.3", "conditions": [{"type": "Ready", "status": str(ready)}]},
    }


def test_pod_view_reads_engine_pods_and_evacuees_only() -> None:
    v = ev.pod_view(pod("a"))
    assert v == ev.PodView("a", "n1", "default", True, "10.1.2.3")
    assert ev.pod_view(pod("r", labels={"app.kubernetes.io/component": "router"})) is None
    assert ev.pod_view(pod("w", labels={"app.kubernetes.io/component": "worker"})) is None
    # Someone else's "draining" pod without our annotation is not ours to delete.
    assert ev.pod_view(pod("d", labels={"app.kubernetes.io/component": "draining"})) is None
    notes = {ev.ANNOTATION_REASON: ev.REASON_INTERRUPTED, ev.ANNOTATION_POOL: "fast",
             ev.ANNOTATION_MARKED: "2026-12-01T12:00:00Z", ev.ANNOTATION_DRAINING: "2026-12-01T12:01:00Z"}  # fmt: skip
    d = ev.pod_view(pod("d", labels={"app.kubernetes.io/component": "draining"}, annotations=notes))
    assert d is not None and (d.pool, d.reason, d.marked_at) == ("fast", ev.REASON_INTERRUPTED, T0)
    assert d.draining_at == T0 + timedelta(minutes=1)
    # Marked but not draining yet: the drain annotation alone does not make it draining.
    m = ev.pod_view(pod("m", annotations=notes))
    assert m is not None and m.draining_at is None and m.reason == ev.REASON_INTERRUPTED
    lws = ev.pod_view(pod("l", labels={"leaderworkerset.sigs.k8s.io/name": "x"}))
    assert lws is not None and lws.multi_node


def test_evacuees_are_not_counted_as_the_pools_replicas() -> None:
    notes = {ev.ANNOTATION_REASON: ev.REASON_UNHEALTHY}
    facts = summarize([pod("a"), pod("b", annotations=notes)], T0, 60)
    assert facts[("default", "H100")].ready == 1 and facts[("default", "H100")].pods == 1


def test_node_troubles_prefer_the_interruption() -> None:
    t = ev.node_troubles([("a", True, "GPU 0: 92 C", None), ("b", True, "", "cloud.google.com/impending-node-termination"),
                          ("c", False, "", None)])  # fmt: skip
    assert t == {
        "a": ev.Trouble(ev.REASON_UNHEALTHY, "GPUs unhealthy (GPU 0: 92 C)"),
        "b": ev.Trouble(ev.REASON_INTERRUPTED, "termination notice (taint cloud.google.com/impending-node-termination)"),
    }  # fmt: skip


def test_a_cordon_is_a_trouble_that_the_others_outrank() -> None:
    t = ev.node_troubles(
        [("a", True, "GPU 0: 92 C", None), ("b", False, "", None), ("c", False, "", None)],
        cordoned=["a", "b"],
    )
    assert t == {
        "a": ev.Trouble(ev.REASON_UNHEALTHY, "GPUs unhealthy (GPU 0: 92 C)"),
        "b": ev.Trouble(ev.REASON_DRAINED, "node cordoned (kubectl drain or cordon)"),
    }
    cordoned = node_info({**_node([{"type": "Ready", "status": "True"}]), "spec": {"unschedulable": True}},
                         __import__("toposerve.api.gpus", fromlist=["DEFAULT_CATALOG"]).DEFAULT_CATALOG)  # fmt: skip
    assert cordoned.cordoned and not cordoned.schedulable


def _node(conditions: list[dict[str, str]], taints: list[dict[str, str]] | None = None) -> dict[str, Any]:
    return {"metadata": {"name": "n", "labels": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}},
            "spec": {"taints": taints or []},
            "status": {"allocatable": {"nvidia.com/gpu": "8"}, "conditions": conditions}}  # fmt: skip


def test_unhealthy_gpus_take_a_nodes_capacity_by_condition_or_taint() -> None:
    from toposerve.api.gpus import DEFAULT_CATALOG

    ok = node_info(
        _node([{"type": "Ready", "status": "True"}, {"type": "GPUHealthy", "status": "True"}]),
        DEFAULT_CATALOG,
    )
    assert not ok.gpu_unhealthy and ok.free_gpus == 8
    sick = node_info(
        _node([{"type": "GPUHealthy", "status": "False", "message": "GPU 1: ECC"}]), DEFAULT_CATALOG
    )
    assert sick.gpu_unhealthy and sick.health_message == "GPU 1: ECC" and sick.free_gpus == 0
    tainted = node_info(
        _node([], [{"key": "toposerve.io/gpu-unhealthy", "effect": "NoSchedule"}]), DEFAULT_CATALOG
    )
    assert tainted.gpu_unhealthy and tainted.free_gpus == 0
    # A node whose only condition is GPUHealthy still counts as Ready (no Ready condition: unknown).
    assert node_info(_node([{"type": "GPUHealthy", "status": "True"}]), DEFAULT_CATALOG).free_gpus == 8
    assert not node_info(_node([{"type": "Ready", "status": "False"}]), DEFAULT_CATALOG).schedulable


def test_parse_in_flight() -> None:
    page = (
        "# HELP vllm:num_requests_running x\n"
        'vllm:num_requests_running{model_name="m"} 2.0\n'
        'vllm:num_requests_waiting{model_name="m"} 1.0\n'
        'vllm:num_requests_running_total{model_name="m"} 9.0\n'
    )
    assert parse_in_flight(page) == 3
    assert parse_in_flight('vllm:num_requests_running{model_name="m"} 0.0\n') == 0
    assert parse_in_flight("other 1\n") is None
    assert parse_in_flight("vllm:num_requests_running garbage\n") is None


# ---- the reconcile shell ------------------------------------------------------------------------


class FakeKube:
    def __init__(self, pods: list[dict[str, Any]]) -> None:
        self.pods = {p["metadata"]["name"]: p for p in pods}
        self.calls: list[tuple[str, ...]] = []
        self.patches: dict[str, dict[str, Any]] = {}
        self.events: list[tuple[str, str, bool]] = []

    def patch(
        self, api_version: str, kind: str, namespace: str, name: str, body: dict[str, Any]
    ) -> dict[str, Any]:
        self.calls.append(("patch", name))
        self.patches[name] = body
        p = self.pods[name]
        meta = body["metadata"]
        labels = {**p["metadata"]["labels"], **meta.get("labels", {})}
        p["metadata"]["labels"] = {k: v for k, v in labels.items() if v is not None}
        p["metadata"]["annotations"] = {**p["metadata"]["annotations"], **meta.get("annotations", {})}
        return p

    def delete(self, api_version: str, kind: str, namespace: str | None, name: str) -> None:
        self.calls.append(("delete", name))
        self.pods.pop(name)

    def event(self, involved: dict[str, Any], reason: str, message: str, warning: bool = False) -> None:
        self.events.append((reason, message, warning))


class _Plan:
    def __init__(self, replicas: int) -> None:
        self.pools = [
            type("P", (), {"name": "default", "replicas": replicas, "serving_replicas": replicas})()
        ]


SPEC = LLMDeploymentSpec.model_validate({"model": {"name": "meta-llama/Llama-3.1-8B-Instruct"}})
BODY = {"apiVersion": "toposerve.io/v1alpha1", "kind": "LLMDeployment",
        "metadata": {"name": "llm", "namespace": "ns", "uid": "u1"}}  # fmt: skip
SICK = NodeInfo(name="bad", gpu_type="H100", gpu_count=8, allocatable_gpus=8, gpu_unhealthy=True,
                health_message="GPU 1: 7 uncorrected ECC errors")  # fmt: skip


def run(kube: FakeKube, now: datetime, flights: int | None = 0) -> float | None:
    ctx = Context(kube=kube, config=OperatorConfig(), engine_in_flight=lambda ip: flights)  # type: ignore[arg-type]
    plan: Any = _Plan(2)
    _, again = _evacuate(
        ctx, BODY, SPEC, Owner("llm", "u1"), plan, Inventory((SICK,)), list(kube.pods.values()), now
    )
    return again


def test_the_shell_marks_drains_and_deletes_through_the_api() -> None:
    kube = FakeKube([pod("a"), pod("b", node="bad")])
    assert run(kube, T0) == 600
    meta = kube.patches["b"]["metadata"]
    # out of the ReplicaSet (it starts a replacement) and of the pool's budget, into the evacuation budget
    assert meta["labels"] == {"toposerve.io/pool": None, "toposerve.io/evacuating": "true"}
    assert meta["ownerReferences"] == [{"apiVersion": "toposerve.io/v1alpha1", "kind": "LLMDeployment",
                                        "name": "llm", "uid": "u1", "controller": True, "blockOwnerDeletion": False}]  # fmt: skip
    assert meta["annotations"][ev.ANNOTATION_POOL] == "default"
    assert kube.events == [("Evacuating", "pod b on node bad: GPUs unhealthy (GPU 1: 7 uncorrected ECC errors); "
                            "starting a replacement elsewhere (the pod serves until it is Ready)", True)]  # fmt: skip
    # Nothing new: nothing written.
    kube.calls.clear()
    run(kube, T0 + timedelta(seconds=1))
    assert kube.calls == []
    # The replacement is Ready: drain (out of every Service).
    kube.pods["r"] = pod("r", node="n2")
    run(kube, T0 + timedelta(seconds=30))
    assert kube.pods["b"]["metadata"]["labels"]["app.kubernetes.io/component"] == "draining"
    assert kube.events[-1][0] == "Draining"
    # Engine idle after the minimum drain time: deleted.
    run(kube, T0 + timedelta(seconds=36))
    assert "b" not in kube.pods and kube.events[-1] == (
        "Evacuated",
        "pod b deleted: its engine has no requests left",
        False,
    )


def test_the_shell_does_nothing_without_troubles() -> None:
    kube = FakeKube([pod("a"), pod("b")])
    ctx = Context(kube=kube, config=OperatorConfig())  # type: ignore[arg-type]
    pods = list(kube.pods.values())
    assert _evacuate(ctx, BODY, SPEC, Owner("llm", "u1"), _Plan(2), Inventory(), pods, T0) == (pods, None)  # type: ignore[arg-type]
    assert kube.calls == []


def test_warm_standby_pods_do_not_count_as_replicas_the_pool_needs_in_rotation() -> None:
    """With 2 replicas + 1 warm standby the workload runs 3 pods but only 2 serve: once the
    replacement is Ready, 2 engines serve and the evacuee drains (not at the 600 s deadline)."""
    from toposerve.api.spec import LLMDeploymentSpec
    from toposerve.planner.plan import plan_deployment

    spec = LLMDeploymentSpec.model_validate(
        {"model": {"name": "Qwen/Qwen2.5-7B-Instruct"}, "engine": "mock", "replicas": 2,
         "autoscaling": {"enabled": True, "warmStandby": 1, "maxReplicas": 4}}
    )  # fmt: skip
    plan = plan_deployment("llm", spec)
    assert [(p.replicas, p.serving_replicas) for p in plan.pools] == [(3, 2)]
    kube = FakeKube(
        [pod("a"), pod("b", node="bad"), pod("s", labels={"app.kubernetes.io/component": "standby"})]
    )
    ctx = Context(kube=kube, config=OperatorConfig(), engine_in_flight=lambda ip: 0)  # type: ignore[arg-type]

    def step(at: datetime) -> None:
        _evacuate(ctx, BODY, SPEC, Owner("llm", "u1"), plan, Inventory((SICK,)), list(kube.pods.values()), at)

    step(T0)
    assert kube.events[-1][0] == "Evacuating"
    kube.pods["r"] = pod("r", node="n2")  # the replacement, Ready
    step(T0 + timedelta(seconds=30))
    assert kube.events[-1][0] == "Draining" and "replacement is Ready" in kube.events[-1][1]
