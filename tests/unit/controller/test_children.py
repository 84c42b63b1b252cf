"""The watch-fed children of each deployment equal what a label-selected list would return, our own
writes are not undone by older events, and only pod changes and lost children wake a deployment."""

from __future__ import annotations

import random
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from kubernetes.client.exceptions import ApiException

from toposerve.controller.cache import Reflector
from toposerve.controller.children import ChildCache, ObjectStore, resource_version
from toposerve.controller.kube import CHILD_KINDS
from toposerve.controller.reconcile import Context

LABEL = "toposerve.io/deployment"


def obj(name: str, ns: str = "team", dep: str | None = "a", rv: int = 1, **extra: Any) -> dict[str, Any]:
    labels = {LABEL: dep} if dep else {"other": "x"}
    meta = {"name": name, "namespace": ns, "labels": labels, "resourceVersion": str(rv)}
    meta["managedFields"] = [{"manager": "kubectl"}]
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": dict(extra)}


def names(objs: list[dict[str, Any]]) -> list[str]:
    return [o["metadata"]["name"] for o in objs]


def listed(model: dict[tuple[str, str], dict[str, Any]], ns: str, dep: str) -> list[str]:
    """What `GET .../namespaces/ns/services?labelSelector=LABEL=dep` would return."""
    return sorted(
        o["metadata"]["name"]
        for (n, _), o in model.items()
        if n == ns and (o["metadata"].get("labels") or {}).get(LABEL) == dep
    )


events = st.lists(
    st.tuples(
        st.sampled_from(["ADDED", "MODIFIED", "DELETED"]),
        st.sampled_from(["s0", "s1", "s2", "s3"]),
        st.sampled_from(["team", "prod"]),
        st.sampled_from(["a", "b", None]),
    ),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(initial=events, stream=events)
def test_the_store_answers_what_a_label_selected_list_would(initial: Any, stream: Any) -> None:
    model: dict[tuple[str, str], dict[str, Any]] = {}
    s = ObjectStore(LABEL)
    rv = 0
    first = [obj(n, ns, dep, rv := rv + 1) for _, n, ns, dep in initial]
    for o in first:
        model[(o["metadata"]["namespace"], o["metadata"]["name"])] = o
    s.replace(list(model.values()))
    for kind, n, ns, dep in stream:
        rv += 1
        o = obj(n, ns, dep, rv)
        if kind == "DELETED":
            model.pop((ns, n), None)
        else:
            model[(ns, n)] = o
        s.event(kind, o)
        for want_ns in ("team", "prod"):
            for want in ("a", "b"):
                assert names(s.of(want_ns, want)) == listed(model, want_ns, want)


def test_managed_fields_are_dropped_and_the_rest_kept() -> None:
    s = ObjectStore(LABEL)
    s.replace([obj("svc", port=80)])
    (kept,) = s.of("team", "a")
    assert "managedFields" not in kept["metadata"]
    assert kept["spec"] == {"port": 80} and kept["metadata"]["labels"] == {LABEL: "a"}


def test_our_own_write_is_not_undone_by_an_older_event() -> None:
    s = ObjectStore(LABEL)
    s.replace([obj("d", rv=5, replicas=1)])
    s.wrote(obj("d", rv=9, replicas=3))  # our apply's answer
    assert s.event("MODIFIED", obj("d", rv=7, replicas=1)) == (set(), set())  # written before ours
    assert s.of("team", "a")[0]["spec"] == {"replicas": 3}
    s.event("MODIFIED", obj("d", rv=10, replicas=2))  # written after ours: wins
    assert s.of("team", "a")[0]["spec"] == {"replicas": 2}
    s.deleted("team", "d")  # our delete: gone at once, before its event arrives
    assert s.of("team", "a") == []


def test_changes_and_losses_per_deployment() -> None:
    s = ObjectStore(LABEL)
    assert s.replace([obj("x"), obj("y", dep="b")]) == ({("team", "a"), ("team", "b")}, set())
    assert s.replace([obj("x"), obj("y", dep="b")]) == (set(), set())  # a relist that changed nothing
    assert s.event("MODIFIED", obj("y", dep="a", rv=2)) == ({("team", "a"), ("team", "b")}, {("team", "b")})
    assert s.event("DELETED", obj("x")) == ({("team", "a")}, {("team", "a")})
    assert s.replace([], namespace="prod") == (set(), set())  # another namespace's list keeps ours
    assert names(s.of("team", "a")) == ["y"]
    assert s.replace([], namespace="team") == ({("team", "a")}, {("team", "a")})


def test_synced_per_namespace_and_unserved_kinds_are_empty_and_synced() -> None:
    s = ObjectStore(LABEL)
    assert not s.synced(["team", "prod"])
    s.replace([], namespace="team")
    assert not s.synced(["team", "prod"])
    s.unserved("prod")
    assert s.synced(["team", "prod"]) and not s.served
    s.replace([obj("x", ns="prod")], namespace="prod")
    assert s.served and names(s.of("prod", "a")) == ["x"]


def test_resource_versions_that_are_not_numbers_never_block_an_update() -> None:
    assert resource_version({"metadata": {"resourceVersion": "abc"}}) is None
    s = ObjectStore(LABEL)
    a = obj("d", replicas=1)
    a["metadata"]["resourceVersion"] = "zzz"
    s.replace([a])
    s.event("MODIFIED", obj("d", rv=1, replicas=2))
    assert s.of("team", "a")[0]["spec"] == {"replicas": 2}


class ScriptedKube:
    """list_all/watch per (kind, namespace) from a script; records what was asked."""

    def __init__(
        self, lists: dict[tuple[str, str | None], Any], watches: dict[tuple[str, str | None], Any]
    ) -> None:
        self.lists, self.watches = lists, watches
        self.calls: list[tuple[str, str, str | None, str | None]] = []
        self.stop: list[Reflector[Any]] = []
        self.last: dict[tuple[str, str | None], Any] = {}

    def list_all(self, api_version: str, kind: str, namespace: str | None, **kw: Any) -> tuple[Any, str]:
        self.calls.append(("list", kind, namespace, kw.get("selector")))
        queued = self.lists[(kind, namespace)]
        if not queued:  # the script is over: end this reflector, the last answer stands
            self._stop(kind, namespace)
            answer = self.last.get((kind, namespace), [])
        else:
            answer = queued.pop(0)
        self.last[(kind, namespace)] = answer
        if isinstance(answer, Exception):
            raise answer
        return answer, "10"

    def watch(self, api_version: str, kind: str, namespace: str | None, rv: str, **kw: Any) -> Any:
        self.calls.append(("watch", kind, namespace, kw.get("selector")))
        queued = self.watches.get((kind, namespace)) or []
        if not queued:
            self._stop(kind, namespace)
            return
        yield from queued.pop(0)

    def _stop(self, kind: str, namespace: str | None) -> None:
        for r in self.stop:
            if r.kind == kind and r.namespace == namespace:
                r.stop.set()


def run_all(cache: ChildCache, kube: ScriptedKube) -> None:
    kube.stop = cache.reflectors
    for r in cache.reflectors:
        r.missing_recheck_seconds = 0
        r.min_watch_seconds = 0
        r._run()


def test_the_cache_watches_every_kind_in_every_namespace_by_label_and_wakes_who_it_should() -> None:
    kinds = [("v1", "Pod"), *CHILD_KINDS]
    lists: dict[tuple[str, str | None], Any] = {(k, ns): [[]] for _, k in kinds for ns in ("team", "prod")}
    watches: dict[tuple[str, str | None], Any] = {}
    pod = {**obj("p0"), "kind": "Pod"}
    lists[("Pod", "team")] = [[pod]]
    modified = {**obj("p0", rv=2), "kind": "Pod"}
    watches[("Pod", "team")] = [[{"type": "MODIFIED", "object": modified}]]
    svc = obj("a-svc")
    lists[("Service", "team")] = [[svc]]
    watches[("Service", "team")] = [[{"type": "MODIFIED", "object": obj("a-svc", rv=3, port=1)},
                                     {"type": "DELETED", "object": obj("a-svc", rv=4)}]]  # fmt: skip
    no_crd = ApiException(status=404, reason="Not Found")
    lists[("LeaderWorkerSet", "prod")] = [no_crd, []]
    woken: list[set[tuple[str, str]]] = []
    kube = ScriptedKube(lists, watches)
    cache = ChildCache(kube, LABEL, ["team", "prod"], woken.append)  # type: ignore[arg-type]
    assert not cache.synced
    run_all(cache, kube)
    assert cache.synced
    assert {(c[1], c[2]) for c in kube.calls if c[0] == "list"} == {
        (k, ns) for _, k in kinds for ns in ("team", "prod")
    }
    assert {c[3] for c in kube.calls} == {LABEL}
    # pods: the list and the modification both wake "a"; the Service: only its deletion does
    assert woken == [{("team", "a")}, {("team", "a")}, {("team", "a")}]
    assert names(cache.objects("v1", "Pod", "team", "a")) == ["p0"]
    assert cache.objects("v1", "Service", "team", "a") == []
    # the LeaderWorkerSet kind 404'd, then was served on the next look
    assert cache.served("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet")


class CountingKube:
    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []
        self.lws = False

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any]:
        self.calls.append(("get", kind, name))
        return {"metadata": {"name": name, "namespace": namespace, "resourceVersion": "1"}}

    def list(self, api_version: str, kind: str, namespace: str, selector: str | None = None) -> list[Any]:
        self.calls.append(("list", kind, str(selector)))
        return []

    def has_crd(self, name: str) -> bool:
        return self.lws


def test_reconcile_reads_come_from_the_watches_once_synced_and_from_the_api_before() -> None:
    kube = CountingKube()
    ctx = Context(kube=kube)  # type: ignore[arg-type]
    assert ctx.llmdeployment("team", "a") is not None and ctx.owned("v1", "Pod", "team", "a") == []
    assert kube.calls == [("get", "LLMDeployment", "a"), ("list", "Pod", f"{LABEL}=a")]
    kube.calls.clear()
    ctx.bodies = {}
    ctx.remember({"metadata": {"name": "a", "namespace": "team", "resourceVersion": "7"}, "spec": {"v": 2}})
    ctx.remember({"metadata": {"name": "a", "namespace": "team", "resourceVersion": "6"}, "spec": {"v": 1}})
    assert ctx.llmdeployment("team", "a") == {
        "metadata": {"name": "a", "namespace": "team", "resourceVersion": "7"}, "spec": {"v": 2}
    }  # fmt: skip
    lists = {(k, "team"): [[]] for _, k in [("v1", "Pod"), *CHILD_KINDS]}
    lists[("Pod", "team")] = [[{**obj("p0"), "kind": "Pod"}]]
    lists[("LeaderWorkerSet", "team")] = [
        ApiException(status=404, reason="Not Found"),
        ApiException(status=404),
    ]
    scripted = ScriptedKube(lists, {})
    ctx.children = ChildCache(scripted, LABEL, ["team"])  # type: ignore[arg-type]
    run_all(ctx.children, scripted)
    assert names(ctx.owned("v1", "Pod", "team", "a")) == ["p0"]
    assert ctx.owned("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet", "team", "a") == []
    assert kube.calls == []  # nothing asked of the API
    kube.lws = True  # the CRD was installed since the watch last looked: list until it catches up
    ctx._lws = None
    ctx.owned("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet", "team", "a")
    assert kube.calls == [("list", "LeaderWorkerSet", f"{LABEL}=a")]


def test_a_relist_after_random_events_equals_the_watch_view() -> None:
    rng = random.Random(7)
    watched, relisted = ObjectStore(LABEL), ObjectStore(LABEL)
    model: dict[tuple[str, str], dict[str, Any]] = {}
    for rv in range(1, 300):
        n, dep = f"o{rng.randrange(20)}", rng.choice(["a", "b", None])
        o = obj(n, dep=dep, rv=rv)
        if rng.random() < 0.3:
            model.pop(("team", n), None)
            watched.event("DELETED", o)
        else:
            model[("team", n)] = o
            watched.event("MODIFIED", o)
    relisted.replace(list(model.values()))
    for dep in ("a", "b"):
        assert watched.of("team", dep) == relisted.of("team", dep)


def test_deployments_with_pods_on_nodes() -> None:
    s = ObjectStore("toposerve.io/deployment")
    s.replace([obj("p1", dep="a", nodeName="n1"), obj("p2", dep="b", nodeName="n2"),
               obj("p3", dep="c"), obj("p4", ns="other", dep="a", nodeName="n1")])  # fmt: skip
    assert s.owners_on(["n1"]) == {("team", "a"), ("other", "a")}
    assert s.owners_on(["n2", "n3"]) == {("team", "b")}
    assert s.owners_on([]) == set()
