"""The watch-fed inventory equals the listed one, counts only what the scheduler counts, and says
when a change matters (capacity) and when it matters to everyone (the set of GPU types)."""

from __future__ import annotations

import copy
import random
from typing import Any

from toposerve.api.gpus import DEFAULT_CATALOG
from toposerve.controller.cache import (
    BOUND_PODS,
    Change,
    InventoryStore,
    Reflector,
    pod_use,
    slim_node,
    waits_for_capacity,
)
from toposerve.planner.inventory import inventory_from_nodes, usage_by_node

H100 = "NVIDIA-H100-80GB-HBM3"
A100 = "NVIDIA-A100-SXM4-80GB"


def node(name: str, product: str | None = H100, gpus: int = 8, ready: str = "True") -> dict[str, Any]:
    labels = {"kubernetes.io/hostname": name}
    if product:
        labels |= {"nvidia.com/gpu.product": product, "nvidia.com/gpu.count": str(gpus)}
    return {
        "metadata": {"name": name, "labels": labels, "resourceVersion": "1"},
        "spec": {"taints": [{"key": "nvidia.com/gpu", "effect": "NoSchedule"}]},
        "status": {
            "allocatable": {"nvidia.com/gpu": str(gpus), "cpu": "64", "memory": "512Gi"},
            "capacity": {"nvidia.com/gpu": str(gpus), "cpu": "64", "memory": "512Gi"},
            "conditions": [
                {"type": "Ready", "status": ready, "lastHeartbeatTime": "2026-12-01T10:00:00Z"},
                {"type": "MemoryPressure", "status": "False"},
            ],
            "images": [{"names": ["x"], "sizeBytes": 1}],
        },
    }


def pod(
    name: str, on: str | None, gpus: int = 0, cpu: str = "1", phase: str = "Running", ns: str = "team"
) -> dict[str, Any]:
    req: dict[str, str] = {"cpu": cpu, "memory": "1Gi"}
    if gpus:
        req["nvidia.com/gpu"] = str(gpus)
    spec: dict[str, Any] = {"containers": [{"name": "c", "resources": {"requests": req}}]}
    if on:
        spec["nodeName"] = on
    return {"metadata": {"name": name, "namespace": ns}, "spec": spec, "status": {"phase": phase}}


def store() -> InventoryStore:
    return InventoryStore(DEFAULT_CATALOG)


def test_the_watched_inventory_is_the_listed_one_after_any_sequence_of_events() -> None:
    rng = random.Random(7)
    nodes = {f"n{i}": node(f"n{i}", [H100, A100, None][i % 3]) for i in range(6)}
    pods: dict[str, dict[str, Any]] = {}
    s = store()
    s.replace_nodes(list(nodes.values()))
    s.replace_pods([])
    for step in range(300):
        r = rng.random()
        if r < 0.6:  # a pod is created, bound, finishes or changes
            name = f"p{rng.randrange(40)}"
            p = pod(
                name,
                rng.choice([None, *nodes]),
                gpus=rng.choice([0, 1, 2, 8]),
                cpu=rng.choice(["0", "500m", "2"]),
                phase=rng.choice(["Pending", "Running", "Running", "Succeeded", "Failed"]),
                ns=rng.choice(["a", "b"]),
            )
            pods[f"{p['metadata']['namespace']}/{name}"] = p
            s.pod_event("MODIFIED", p)
        elif r < 0.8 and pods:
            key = rng.choice(sorted(pods))
            s.pod_event("DELETED", pods.pop(key))
        else:  # a node changes allocatable or readiness, disappears or comes (back)
            name = f"n{rng.randrange(8)}"
            if name in nodes and rng.random() < 0.3:
                s.node_event("DELETED", nodes.pop(name))
            else:
                n = node(
                    name, rng.choice([H100, A100, None]), rng.choice([4, 8]), rng.choice(["True", "False"])
                )
                nodes[name] = n
                s.node_event("ADDED", n)
        listed = inventory_from_nodes(
            sorted(nodes.values(), key=lambda n: n["metadata"]["name"]),
            DEFAULT_CATALOG,
            used=usage_by_node(pods.values()),
        )
        watched = sorted(s.inventory().nodes, key=lambda n: n.name)
        assert watched == list(listed.nodes), f"step {step}"


def test_only_bound_unfinished_pods_that_request_something_are_kept() -> None:
    assert pod_use(pod("p", None, gpus=1)) is None  # pending: not the node's yet
    assert pod_use(pod("p", "n0", gpus=1, phase="Succeeded")) is None
    assert pod_use(pod("p", "n0", gpus=1, phase="Failed")) is None
    empty = pod("p", "n0")
    empty["spec"]["containers"][0]["resources"] = {}
    assert pod_use(empty) is None  # requests nothing: no entry, however many such pods exist
    use = pod_use(pod("p", "n0", gpus=2, cpu="500m"))
    assert use is not None and use.node == "n0" and use.usage.gpus == 2 and use.usage.cpu == 0.5


def test_a_pod_that_finishes_frees_its_gpus() -> None:
    s = store()
    s.replace_nodes([node("n0")])
    s.replace_pods([pod("p", "n0", gpus=8)])
    assert s.inventory().free_gpus("H100") == 0
    assert s.pod_event("MODIFIED", pod("p", "n0", gpus=8, phase="Succeeded"))
    assert s.inventory().free_gpus("H100") == 8


def test_usage_counts_pods_of_every_namespace() -> None:
    s = store()
    s.replace_nodes([node("n0")])
    s.replace_pods([pod("mine", "n0", gpus=2, ns="serving"), pod("theirs", "n0", gpus=4, ns="training")])
    assert s.inventory().free_gpus("H100") == 2


def test_heartbeats_and_status_noise_are_no_change() -> None:
    s = store()
    s.replace_nodes([node("n0")])
    s.replace_pods([pod("p", "n0", gpus=1)])
    before = s.inventory()
    beat = node("n0")
    beat["metadata"]["resourceVersion"] = "2"
    beat["status"]["conditions"][0]["lastHeartbeatTime"] = "2026-12-01T10:05:00Z"
    beat["status"]["images"].append({"names": ["y"], "sizeBytes": 2})
    assert not s.node_event("MODIFIED", beat)
    assert not s.pod_event("MODIFIED", pod("p", "n0", gpus=1))  # e.g. a readiness flip
    assert s.inventory() is before  # nothing rebuilt


def test_a_new_gpu_type_is_a_change_for_everyone_more_capacity_is_not() -> None:
    s = store()
    s.replace_nodes([node("h0")])
    s.replace_pods([])
    assert s.node_event("ADDED", node("h1")) == Change(capacity=True, types=False)
    assert s.node_event("ADDED", node("a0", A100)) == Change(capacity=True, types=True)
    assert s.node_event("ADDED", node("cpu0", None)) == Change(capacity=True, types=False)
    assert s.node_event("DELETED", node("a0", A100)) == Change(capacity=True, types=True)
    assert s.pod_event("ADDED", pod("p", "h0", gpus=1)) == Change(capacity=True, types=False)


def test_allocatable_dropping_is_a_capacity_change() -> None:
    s = store()
    s.replace_nodes([node("n0", gpus=8)])
    s.replace_pods([])
    shrunk = node("n0", gpus=8)
    shrunk["status"]["allocatable"]["nvidia.com/gpu"] = "4"  # a device plugin lost GPUs
    assert s.node_event("MODIFIED", shrunk) == Change(capacity=True)
    assert s.inventory().free_gpus("H100") == 4


def test_not_synced_until_both_lists_arrived() -> None:
    s = store()
    assert not s.synced
    s.replace_nodes([])
    assert not s.synced
    s.replace_pods([])
    assert s.synced


def test_a_relist_replaces_everything_seen_before() -> None:
    s = store()
    s.replace_nodes([node("old")])
    s.replace_pods([pod("gone", "old", gpus=8)])
    s.replace_nodes([node("new")])
    s.replace_pods([])
    inv = s.inventory()
    assert [n.name for n in inv.nodes] == ["new"] and inv.free_gpus("H100") == 8
    assert s.pod_count() == 0


def test_slim_node_keeps_what_the_inventory_reads() -> None:
    full = node("n0")
    slim = slim_node(copy.deepcopy(full))
    assert "images" not in slim["status"]
    assert slim["status"]["conditions"] == [{"type": "Ready", "status": "True"}]
    assert inventory_from_nodes([slim], DEFAULT_CATALOG) == inventory_from_nodes([full], DEFAULT_CATALOG)


def llmd(status: dict[str, Any] | None, generation: int = 1) -> dict[str, Any]:
    return {"metadata": {"name": "x", "generation": generation}, "status": status or {}}


def cond(kind: str, status: str, reason: str = "R") -> dict[str, Any]:
    return {"type": kind, "status": status, "reason": reason}


def test_who_waits_for_capacity() -> None:
    settled = {
        "observedGeneration": 1,
        "pools": [{"name": "p", "fits": True}],
        "conditions": [cond("Ready", "True"), cond("Degraded", "False"), cond("Schedulable", "True")],
    }
    assert not waits_for_capacity(llmd(settled))
    assert waits_for_capacity(llmd(settled, generation=2))  # not reconciled yet
    assert waits_for_capacity(llmd(None))
    fallback = {**settled, "conditions": [cond("Degraded", "True", "FallbackActive")]}
    assert waits_for_capacity(llmd(fallback))
    assert waits_for_capacity(llmd({**settled, "conditions": [cond("Schedulable", "False")]}))
    assert waits_for_capacity(llmd({**settled, "conditions": [cond("Ready", "False", "DoesNotFit")]}))
    assert not waits_for_capacity(
        llmd({**settled, "conditions": [cond("Ready", "False", "ReplicasNotReady")]})
    )
    assert waits_for_capacity(llmd({**settled, "pools": [{"name": "p", "pendingReason": "no H100 free"}]}))


class ScriptedKube:
    """list_all/watch answers from a script; the reflector's loop runs in the test's own thread."""

    def __init__(self, lists: list[list[dict[str, Any]]], watches: list[list[dict[str, Any]]]) -> None:
        self.lists, self.watches = lists, watches
        self.calls: list[tuple[str, str | None]] = []
        self.reflector: Reflector | None = None

    def list_all(self, api_version: str, kind: str, namespace: str | None, **kw: Any) -> tuple[Any, str]:
        self.calls.append(("list", kw.get("fields")))
        return self.lists.pop(0), "10"

    def watch(self, api_version: str, kind: str, namespace: str | None, rv: str, **kw: Any) -> Any:
        self.calls.append(("watch", rv))
        if not self.watches:
            assert self.reflector is not None
            self.reflector.stop.set()
            return
        yield from self.watches.pop(0)


def test_the_reflector_lists_watches_and_relists_when_its_version_is_gone() -> None:
    s = store()
    s.replace_nodes([node("n0")])
    gone = {"type": "ERROR", "object": {"code": 410, "message": "too old resource version"}}
    bound = pod("p", "n0", gpus=8)
    bound["metadata"]["resourceVersion"] = "11"
    bookmark = {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "12"}}}
    kube = ScriptedKube(
        lists=[[], [pod("q", "n0", gpus=2)]],
        watches=[[{"type": "ADDED", "object": bound}, gone], [bookmark]],
    )
    changes: list[Change] = []
    r = Reflector(
        kube, "v1", "Pod", s.replace_pods, s.pod_event, changes.append, BOUND_PODS, min_watch_seconds=0
    )  # type: ignore[arg-type]
    kube.reflector = r
    r._run()
    # list, watch from the list's version, the pod arrives; 410: list again, watch from there; the
    # stream ends (server timeout): watch again from the bookmark, no list.
    assert kube.calls == [
        ("list", BOUND_PODS), ("watch", "10"), ("list", BOUND_PODS), ("watch", "10"), ("watch", "12")
    ]  # fmt: skip
    assert s.inventory().free_gpus("H100") == 6  # the relist replaced what the first watch said
    assert changes == [Change(capacity=True), Change(capacity=True)]


def test_inventory_changes_wake_who_may_care() -> None:
    from toposerve.controller import operator
    from toposerve.controller.reconcile import Context

    rt = operator.Runtime(ctx=Context(kube=None), namespaces=[])  # type: ignore[arg-type]
    operator.RUNTIME = rt
    settled = {"observedGeneration": 1, "conditions": [cond("Ready", "True")]}
    fallback = {"observedGeneration": 1, "conditions": [cond("Degraded", "True", "FallbackActive")]}

    def event(name: str, status: dict[str, Any], kind: str = "MODIFIED") -> None:
        body = {"metadata": {"name": name, "namespace": "ns", "generation": 1}, "status": status}
        operator._on_llmdeployment(event={"type": kind}, body=body, name=name, namespace="ns")  # type: ignore[arg-type]

    event("settled", settled)
    event("waiting", fallback)
    event("leaving", fallback)
    event("leaving", fallback, "DELETED")
    rt.queue._due.clear()
    event("settled", {**settled, "readyReplicas": 1})  # status only: no reconcile
    assert not rt.queue._due
    operator._on_inventory(rt, Change(capacity=True))
    assert set(rt.queue._due) == {("ns", "waiting")}
    event("waiting", settled)  # back on its preferred type: no longer waits
    rt.queue._due.clear()
    operator._on_inventory(rt, Change(capacity=True))
    assert not rt.queue._due
    operator._on_inventory(rt, Change(capacity=True, types=True))
    assert set(rt.queue._due) == {("ns", "waiting"), ("ns", "settled")}


def test_our_own_status_write_coming_back_is_no_trigger() -> None:
    from toposerve.controller.operator import trigger

    body: dict[str, Any] = {"metadata": {"generation": 3, "labels": {"a": "1"}}, "status": {}}
    written = copy.deepcopy(body)
    written["status"] = {"observedGeneration": 3}
    written["metadata"]["resourceVersion"] = "99"
    assert trigger(written) == trigger(body)
    for change in ({"generation": 4}, {"labels": {"a": "2"}}, {"annotations": {"x": "y"}},
                   {"deletionTimestamp": "2026-12-01T10:00:00Z"}):  # fmt: skip
        edited = copy.deepcopy(body)
        edited["metadata"].update(change)
        assert trigger(edited) != trigger(body), change


def test_the_autoscalers_metrics_flipping_is_a_trigger_its_every_decision_is_not() -> None:
    """The reconcile turns status.autoscaling.metricsAvailable into the ScalingActive condition, so
    a flip must reconcile; the autoscaler's other writes (one per sync period) must not."""
    from toposerve.controller.operator import trigger

    def body(**auto: Any) -> dict[str, Any]:
        return {"metadata": {"generation": 3}, "status": {"autoscaling": {"mode": "builtin", **auto}}}

    ok = body(metricsAvailable=True, desiredReplicas=2, lastDecisionTime="2026-12-01T10:00:00Z")
    assert trigger(ok) == trigger(body(metricsAvailable=True, desiredReplicas=3, lastDecisionTime="x"))
    assert trigger(ok) != trigger(body(metricsAvailable=False, desiredReplicas=2))


def _health(
    n: dict[str, Any], status: str, message: str = "", hb: str = "2026-12-01T10:00:00Z"
) -> dict[str, Any]:
    n = copy.deepcopy(n)
    n["status"]["conditions"].append(
        {"type": "GPUHealthy", "status": status, "reason": "x", "message": message, "lastHeartbeatTime": hb}
    )
    return n


def test_a_node_turning_troubled_is_named_once_and_its_heartbeats_are_no_change() -> None:
    s = store()
    s.replace_nodes([node("a"), node("b")])
    sick = _health(node("a"), "False", "GPU 1: 7 uncorrected ECC errors")
    change = s.node_event("MODIFIED", sick)
    assert change.troubled == frozenset({"a"}) and change.capacity
    (info,) = [n for n in s.inventory().nodes if n.name == "a"]
    assert (
        info.gpu_unhealthy
        and info.health_message == "GPU 1: 7 uncorrected ECC errors"
        and info.free_gpus == 0
    )
    assert (
        s.node_event("MODIFIED", _health(node("a"), "False", "GPU 1: 7 uncorrected ECC errors", hb="later"))
        == Change()
    )
    assert s.node_event("MODIFIED", sick | {}).troubled == frozenset()  # still troubled: no news
    # An interruption taint on another node; then recovery is a capacity change, not trouble.
    going = node("b")
    going["spec"]["taints"].append(
        {"key": "cloud.google.com/impending-node-termination", "effect": "NoSchedule"}
    )
    assert s.node_event("MODIFIED", going).troubled == frozenset({"b"})
    healed = s.node_event("MODIFIED", _health(node("a"), "True"))
    assert healed.capacity and not healed.troubled
    # A re-list names the nodes that turned troubled meanwhile.
    assert s.replace_nodes([sick, going]).troubled == frozenset({"a"})
    assert s.replace_nodes([sick, going]).troubled == frozenset()


def test_slim_node_keeps_gpu_health_and_the_inventory_matches_the_listed_one() -> None:
    nodes = [_health(node("a"), "False", "hot"), node("b")]
    s = store()
    s.replace_nodes(nodes)
    s.replace_pods([])
    assert s.inventory() == inventory_from_nodes(nodes, DEFAULT_CATALOG)
    kept = slim_node(nodes[0])["status"]["conditions"]
    assert kept == [
        {"type": "Ready", "status": "True"},
        {"type": "GPUHealthy", "status": "False", "message": "hot"},
    ]
