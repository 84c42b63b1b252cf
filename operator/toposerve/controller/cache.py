"""The GPU inventory kept current by watches, so a reconcile never lists the cluster.

Before this, every reconcile re-listed every Node and Pod cluster-wide once a 5 s cache expired:
on a big cluster that is megabytes per list, repeated by every operator replica. Now two watches
feed a store, and a reconcile reads an ``Inventory`` built from memory (rebuilt only after a
change; the same as ``inventory_from_nodes(nodes, catalog, schemes, usage_by_node(pods))`` over
the listed objects, which the unit tests check):

* **Nodes**, cluster-wide. Each node is kept slimmed to what ``inventory_from_nodes`` reads (name,
  labels, taints, unschedulable, allocatable/capacity, the Ready condition's status, the health
  agent's GPUHealthy status and message); heartbeats
  and image lists are dropped, so a node event that changes nothing the planner sees is no change.
* **Bound, unfinished pods**, cluster-wide, with the *server-side* field selector
  ``spec.nodeName!=,status.phase!=Succeeded,status.phase!=Failed``: pending pods never reach us,
  and a pod that finishes leaves the selection, which the API server reports as DELETED. Every
  namespace matters (other workloads use GPUs too), but only a pod's ``Usage`` (three numbers
  and its node) is kept, and only for pods that request something, never the pod body.

Why our own watches and not kopf's: kopf runs one watch stream per resource, in the operator's
namespaces, with one set of server-side selectors (``settings.watching.label_selectors``). The
operator already uses kopf's pod stream for *its* pods (label selector ``toposerve.io/deployment``,
server-side, pending ones included, in the watched namespaces); usage needs every namespace and
a different selector. Both watches here list in chunks, watch from the list's resourceVersion with
bookmarks and server/read timeouts, and re-list after ``410 Gone`` or any error.

Pure core, thin shell: ``InventoryStore`` takes events and answers inventories (unit-tested
without a cluster); ``Reflector`` is the thread that feeds it from the API.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from kubernetes.client.exceptions import ApiException

from toposerve.api.gpus import GPUCatalog
from toposerve.api.nodelabels import DEFAULT_SCHEMES, LabelSchemes
from toposerve.controller.kube import Kube
from toposerve.planner.inventory import (
    GPU_HEALTH_CONDITION,
    Inventory,
    NodeInfo,
    Usage,
    node_info,
    pod_requests,
)

log = logging.getLogger("toposerve.cache")

BOUND_PODS = "spec.nodeName!=,status.phase!=Succeeded,status.phase!=Failed"


def slim_node(node: Mapping[str, Any]) -> dict[str, Any]:
    """What the inventory reads of a node, and nothing else (no heartbeats, images, addresses)."""
    meta = node.get("metadata") or {}
    spec = node.get("spec") or {}
    status = node.get("status") or {}
    # Ready's status, and the health agent's GPUHealthy (status and message: Events quote it);
    # never heartbeat or transition times, so a heartbeat is no change.
    kept = {"Ready": ("status",), GPU_HEALTH_CONDITION: ("status", "message")}
    conditions = [
        {"type": c.get("type"), **{k: c.get(k) for k in kept[c.get("type")]}}
        for c in status.get("conditions") or []
        if c.get("type") in kept
    ]
    return {
        "metadata": {"name": meta.get("name", ""), "labels": dict(meta.get("labels") or {})},
        "spec": {"taints": list(spec.get("taints") or []), "unschedulable": bool(spec.get("unschedulable"))},
        "status": {
            "allocatable": dict(status.get("allocatable") or {}),
            "capacity": dict(status.get("capacity") or {}),
            "conditions": conditions,
        },
    }


@dataclass(frozen=True)
class PodUse:
    node: str
    usage: Usage


def pod_use(pod: Mapping[str, Any]) -> PodUse | None:
    """A pod's claim on its node; None when it is not bound, has finished, or requests nothing."""
    node = (pod.get("spec") or {}).get("nodeName")
    phase = (pod.get("status") or {}).get("phase")
    if not node or phase in ("Succeeded", "Failed"):
        return None
    usage = pod_requests(pod)
    return PodUse(str(node), usage) if usage != Usage() else None


def waits_for_capacity(llmd: Mapping[str, Any]) -> bool:
    """Whether an LLMDeployment's status says free capacity could change its placement: in GPU
    fallback, replicas pending or unschedulable, a pool that does not fit, or a spec not yet
    reconciled. The others only need a reconcile when the set of GPU types changes."""
    meta = llmd.get("metadata") or {}
    status = llmd.get("status") or {}
    if status.get("observedGeneration") != meta.get("generation"):
        return True
    if any(p.get("pendingReason") or not p.get("fits", True) for p in status.get("pools") or []):
        return True
    for c in status.get("conditions") or []:
        kind, value = c.get("type"), c.get("status")
        if (kind == "Degraded" and value == "True") or (kind == "Schedulable" and value == "False"):
            return True
        if kind == "Ready" and value == "False" and c.get("reason") in ("DoesNotFit", "InvalidSpec"):
            return True
    return False


def _key(obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    return f"{meta.get('namespace') or ''}/{meta.get('name', '')}"


@dataclass(frozen=True)
class Change:
    """What an event changed: ``types`` when the set of GPU types in the cluster moved (plans may
    change for everyone), ``capacity`` when free capacity did (those waiting for it may care),
    ``troubled`` the nodes whose GPUs turned unhealthy or that got a termination notice (the
    deployments with pods there must move them)."""

    capacity: bool = False
    types: bool = False
    troubled: frozenset[str] = frozenset()

    def __bool__(self) -> bool:
        return self.capacity or self.types or bool(self.troubled)

    def __or__(self, other: Change) -> Change:
        return Change(
            self.capacity or other.capacity, self.types or other.types, self.troubled | other.troubled
        )


class InventoryStore:
    """Nodes and pod usage from events; thread-safe (watch threads write, reconcile threads read).

    Per node it keeps the usage of each pod bound there and a memo of the node's ``NodeInfo``, so an
    event costs work for its own node only, and a read after a change rebuilds the inventory from
    the memos (no pass over every pod).
    """

    def __init__(self, catalog: GPUCatalog, schemes: LabelSchemes = DEFAULT_SCHEMES) -> None:
        self.catalog, self.schemes = catalog, schemes
        self._lock = threading.Lock()
        self._nodes: dict[str, dict[str, Any]] = {}
        self._pods: dict[str, PodUse] = {}
        self._on_node: dict[str, dict[str, Usage]] = {}
        self._infos: dict[str, NodeInfo] = {}
        self._inventory: Inventory | None = None
        self._types: frozenset[str] = frozenset()
        self.nodes_synced = False
        self.pods_synced = False

    @property
    def synced(self) -> bool:
        """Both watches have delivered a full list: until then the inventory would be partial."""
        return self.nodes_synced and self.pods_synced

    def pod_count(self) -> int:
        return len(self._pods)

    # -- nodes

    def _troubled(self, slim: Mapping[str, Any] | None) -> bool:
        if slim is None:
            return False
        info = node_info(slim, self.catalog, self.schemes)
        return info.gpu_unhealthy or info.interrupted or info.cordoned  # cordoned: a drain began

    def replace_nodes(self, nodes: Iterable[Mapping[str, Any]]) -> Change:
        with self._lock:
            new = {n["metadata"]["name"]: n for n in map(slim_node, nodes)}
            changed = new != self._nodes
            troubled = frozenset(
                name
                for name, n in new.items()
                if self._troubled(n) and not self._troubled(self._nodes.get(name))
            )
            self._nodes = new
            self._infos.clear()
            self.nodes_synced = True
            return self._node_change(changed, troubled)

    def node_event(self, kind: str, node: Mapping[str, Any]) -> Change:
        slim = slim_node(node)
        name = slim["metadata"]["name"]
        with self._lock:
            before = self._nodes.get(name)
            troubled: frozenset[str] = frozenset()
            if kind == "DELETED":
                changed = self._nodes.pop(name, None) is not None
            else:
                changed = before != slim
                self._nodes[name] = slim
                if changed and self._troubled(slim) and not self._troubled(before):
                    troubled = frozenset({name})
            if changed:
                self._infos.pop(name, None)
            return self._node_change(changed, troubled)

    def _node_change(self, changed: bool, troubled: frozenset[str] = frozenset()) -> Change:
        if not changed:
            return Change()
        self._inventory = None
        types = frozenset(self._build().gpu_types())
        moved, self._types = types != self._types, types
        return Change(capacity=True, types=moved, troubled=troubled)

    # -- pods

    def replace_pods(self, pods: Iterable[Mapping[str, Any]]) -> Change:
        with self._lock:
            new = {_key(p): u for p in pods if (u := pod_use(p)) is not None}
            changed = new != self._pods
            self._pods = new
            self._on_node = {}
            for key, u in new.items():
                self._on_node.setdefault(u.node, {})[key] = u.usage
            self._infos.clear()
            self._inventory = None
            self.pods_synced = True
            return Change(capacity=changed)

    def pod_event(self, kind: str, pod: Mapping[str, Any]) -> Change:
        key = _key(pod)
        use = None if kind == "DELETED" else pod_use(pod)
        with self._lock:
            old = self._pods.get(key)
            if old == use:
                return Change()
            if old is not None:
                del self._pods[key]
                on = self._on_node.get(old.node, {})
                on.pop(key, None)
                if not on:
                    self._on_node.pop(old.node, None)
                self._infos.pop(old.node, None)
            if use is not None:
                self._pods[key] = use
                self._on_node.setdefault(use.node, {})[key] = use.usage
                self._infos.pop(use.node, None)
            self._inventory = None
            return Change(capacity=True)

    # -- reading

    def _build(self) -> Inventory:
        """(Under the lock.) The inventory, from the per-node memos, recomputing missing ones."""
        if self._inventory is None:
            infos = []
            for name, node in self._nodes.items():
                info = self._infos.get(name)
                if info is None:
                    used = sum(self._on_node.get(name, {}).values(), Usage())
                    info = self._infos[name] = node_info(node, self.catalog, self.schemes, used)
                infos.append(info)
            self._inventory = Inventory(tuple(infos))
        return self._inventory

    def inventory(self) -> Inventory:
        """The current inventory; the same object until something changes."""
        with self._lock:
            return self._build()


C = TypeVar("C")  # what a store says an event changed; falsy: nothing


class Reflector(Generic[C]):
    """A thread that lists, then watches, one kind into a store, and re-lists after any break.

    A thread, not a task: the API client is synchronous, and a long watch must not hold one of the
    default executor's few threads that reconciles run in. A kind the API does not serve (404 on
    the list: a CRD not installed) is reported through ``on_missing`` and looked for again every
    ``missing_recheck_seconds``.
    """

    def __init__(
        self,
        kube: Kube,
        api_version: str,
        kind: str,
        replace: Callable[[list[dict[str, Any]]], C],
        event: Callable[[str, dict[str, Any]], C],
        on_change: Callable[[C], None],
        fields: str | None = None,
        server_timeout: int = 60,
        min_watch_seconds: float = 1.0,
        selector: str | None = None,
        namespace: str | None = None,
        on_missing: Callable[[], None] | None = None,
        missing_recheck_seconds: float = 60.0,
    ) -> None:
        self.kube, self.api_version, self.kind, self.fields = kube, api_version, kind, fields
        self.selector, self.namespace = selector, namespace
        self.on_missing, self.missing_recheck_seconds = on_missing, missing_recheck_seconds
        self.min_watch_seconds = min_watch_seconds  # a watch ending sooner backs off before the next
        self.replace, self.event, self.on_change = replace, event, on_change
        self.server_timeout = server_timeout
        self.stop = threading.Event()
        where = f"-{namespace}" if namespace else ""
        self.thread = threading.Thread(target=self._run, name=f"watch-{kind}{where}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        rv: str | None = None
        backoff = 1.0
        while not self.stop.is_set():
            try:
                if rv is None:
                    try:
                        items, rv = self.kube.list_all(
                            self.api_version,
                            self.kind,
                            self.namespace,
                            selector=self.selector,
                            fields=self.fields,
                        )
                    except ApiException as e:
                        if e.status != 404 or self.on_missing is None:
                            raise
                        self.on_missing()
                        self.stop.wait(self.missing_recheck_seconds)
                        continue
                    self._notify(self.replace(items))
                started = time.monotonic()
                for ev in self.kube.watch(
                    self.api_version,
                    self.kind,
                    self.namespace,
                    rv,
                    selector=self.selector,
                    fields=self.fields,
                    server_timeout=self.server_timeout,
                ):
                    if self.stop.is_set():
                        return
                    kind, obj = ev.get("type", ""), ev.get("object") or {}
                    if kind == "ERROR":  # 410 Gone: our resourceVersion is too old, list again
                        log.info("%s watch: %s; re-listing", self.kind, obj.get("message"))
                        rv = None
                        break
                    rv = (obj.get("metadata") or {}).get("resourceVersion") or rv
                    if kind in ("ADDED", "MODIFIED", "DELETED"):
                        self._notify(self.event(kind, obj))
                if time.monotonic() - started < self.min_watch_seconds:  # do not hammer the server
                    self.stop.wait(backoff)
                    backoff = min(30.0, backoff * 2)
                else:
                    backoff = 1.0
            except ApiException as e:
                rv = None if e.status == 410 else rv
                log.warning("%s watch failed (%s); retrying in %.0fs", self.kind, e.status, backoff)
                self.stop.wait(backoff)
                backoff = min(30.0, backoff * 2)
            except Exception as e:  # a network blip must not end the watch for good
                log.warning("%s watch failed: %s; re-listing in %.0fs", self.kind, e, backoff)
                rv = None
                self.stop.wait(backoff)
                backoff = min(30.0, backoff * 2)

    def _notify(self, change: C) -> None:
        if change:
            self.on_change(change)


class InventoryCache:
    """The store plus the two watches that feed it; ``on_change`` is called from watch threads."""

    def __init__(
        self,
        kube: Kube,
        catalog: GPUCatalog,
        schemes: LabelSchemes = DEFAULT_SCHEMES,
        on_change: Callable[[Change], None] = lambda _: None,
    ) -> None:
        self.store = InventoryStore(catalog, schemes)
        self._said_synced = False
        self.reflectors = [
            Reflector(kube, "v1", "Node", self.store.replace_nodes, self.store.node_event, on_change),
            Reflector(
                kube, "v1", "Pod", self.store.replace_pods, self.store.pod_event, on_change, fields=BOUND_PODS
            ),
        ]

    @property
    def synced(self) -> bool:
        if self.store.synced and not self._said_synced:
            self._said_synced = True
            inv = self.store.inventory()
            log.info(
                "inventory from watches: %d nodes, %d pods with requests",
                len(inv.nodes),
                self.store.pod_count(),
            )
        return self.store.synced

    def inventory(self) -> Inventory:
        return self.store.inventory()

    def start(self) -> None:
        for r in self.reflectors:
            r.start()

    def stop(self) -> None:
        for r in self.reflectors:
            r.stop.set()
