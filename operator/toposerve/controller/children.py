"""The serving pods and child objects of every LLMDeployment, kept current by watches.

A reconcile used to read its world with nine API calls: a GET of the LLMDeployment, a list of its
pods and one list per child kind (seven). With 200 deployments created at once that was 1,800
requests, most of the API server's work in the burst (docs/benchmarks.md, "200 created at
once"), and each list of a kind by label selector scans every object of that kind in the
namespace. Like controller-runtime's informer cache, one list-then-watch per kind, filtered
server-side by the ``toposerve.io/deployment`` label, now feeds a store indexed by
(namespace, deployment), and a reconcile reads from memory.

Reads from a watch lag the API by an event. That is the usual trade of level-triggered
controllers: a reconcile that saw a slightly old world is followed by another one (every pod
event, every deletion of a child, and every requeue wakes the deployment again). To keep the
lag from reaching our own writes, what an apply returns and what a delete removes go into the
store at once (an event older than what the store holds is then ignored).

Pure core, thin shell: ``ObjectStore`` takes lists and events (unit-tested without a cluster);
``ChildCache`` wires a ``Reflector`` (controller/cache.py) per kind and namespace to it.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from toposerve.controller.cache import Reflector
from toposerve.controller.kube import CHILD_KINDS, Kube

log = logging.getLogger("toposerve.children")

Key = tuple[str, str]  # (namespace, name)


def _ident(obj: Mapping[str, Any]) -> Key:
    meta = obj.get("metadata") or {}
    return str(meta.get("namespace") or ""), str(meta.get("name") or "")


def resource_version(obj: Mapping[str, Any] | None) -> int | None:
    """The object's resourceVersion as a number when it is one (etcd revisions are), else None."""
    rv = ((obj or {}).get("metadata") or {}).get("resourceVersion")
    try:
        return int(str(rv))
    except (TypeError, ValueError):
        return None


def slim(obj: Mapping[str, Any]) -> dict[str, Any]:
    """The object without managedFields (often half its size, never read by the operator)."""
    meta = dict(obj.get("metadata") or {})
    meta.pop("managedFields", None)
    return {**obj, "metadata": meta}


class ObjectStore:
    """The objects of one kind that carry ``label``, indexed by (namespace, value of the label).

    Thread-safe: watch threads write, reconcile threads read. ``replace`` and ``event`` return the
    deployments whose objects changed (for pods: any change; callers decide what wakes whom) and,
    separately, those that lost an object.
    """

    def __init__(self, label: str) -> None:
        self.label = label
        self._lock = threading.Lock()
        self._objs: dict[Key, dict[str, Any]] = {}
        self._owner_of: dict[Key, Key] = {}
        self._by_owner: dict[Key, set[Key]] = {}
        self._synced: set[str | None] = set()  # namespaces (None: all) whose list has arrived
        self.served = True  # False after the API answered 404 (e.g. no LeaderWorkerSet CRD)

    def synced(self, namespaces: Iterable[str | None]) -> bool:
        with self._lock:
            return all(ns in self._synced for ns in namespaces)

    def _owner(self, obj: Mapping[str, Any]) -> Key | None:
        value = ((obj.get("metadata") or {}).get("labels") or {}).get(self.label)
        return (_ident(obj)[0], str(value)) if value else None

    def _put(self, obj: Mapping[str, Any]) -> set[Key]:
        """(Under the lock.) Store ``obj``; the deployments it belonged to before and belongs to now."""
        ident = _ident(obj)
        touched = self._drop(ident)
        owner = self._owner(obj)
        if owner is not None:
            self._objs[ident] = slim(obj)
            self._owner_of[ident] = owner
            self._by_owner.setdefault(owner, set()).add(ident)
            touched.add(owner)
        return touched

    def _drop(self, ident: Key) -> set[Key]:
        owner = self._owner_of.pop(ident, None)
        if owner is None:
            return set()
        self._objs.pop(ident, None)
        members = self._by_owner.get(owner)
        if members is not None:
            members.discard(ident)
            if not members:
                del self._by_owner[owner]
        return {owner}

    def replace(
        self, items: Iterable[Mapping[str, Any]], namespace: str | None = None
    ) -> tuple[set[Key], set[Key]]:
        """A full list of ``namespace`` (None: every namespace): (changed, lost) deployments."""
        with self._lock:
            self.served = True
            old = {i: o for i, o in self._objs.items() if namespace is None or i[0] == namespace}
            new = {_ident(o): o for o in items if self._owner(o) is not None}
            changed: set[Key] = set()
            lost: set[Key] = set()
            for ident in old.keys() - new.keys():
                lost |= self._drop(ident)
            for ident, obj in new.items():
                if ident not in old or old[ident] != slim(obj):
                    changed |= self._put(obj)
            self._synced.add(namespace)
            return changed | lost, lost

    def unserved(self, namespace: str | None = None) -> None:
        """The kind is not served: nothing of it exists, and the store says so (synced, empty)."""
        with self._lock:
            self.served = False
            for ident in [i for i in self._objs if namespace is None or i[0] == namespace]:
                self._drop(ident)
            self._synced.add(namespace)

    def event(self, kind: str, obj: Mapping[str, Any]) -> tuple[set[Key], set[Key]]:
        """A watch event: (changed, lost) deployments. An event older than what is stored (our own
        write got there first) changes nothing."""
        ident = _ident(obj)
        with self._lock:
            if kind == "DELETED":
                lost = self._drop(ident)
                return lost, lost
            have, got = resource_version(self._objs.get(ident)), resource_version(obj)
            if have is not None and got is not None and got < have:
                return set(), set()
            before = self._owner_of.get(ident)
            touched = self._put(obj)
            owner = self._owner(obj)
            return touched, ({before} if before is not None and before != owner else set())

    def wrote(self, obj: Mapping[str, Any]) -> None:
        """Our own apply's answer: newer than anything the watch has said (or will say before it)."""
        self.event("MODIFIED", obj)

    def deleted(self, namespace: str, name: str) -> None:
        with self._lock:
            self._drop((namespace, name))

    def of(self, namespace: str, deployment: str) -> list[dict[str, Any]]:
        """The stored objects of one deployment (shared: callers must not mutate them)."""
        with self._lock:
            return [self._objs[i] for i in sorted(self._by_owner.get((namespace, deployment), ()))]

    def owners_on(self, nodes: Iterable[str]) -> set[Key]:
        """The deployments with an object bound to one of ``nodes`` (pods: ``spec.nodeName``)."""
        wanted = set(nodes)
        with self._lock:
            return {
                self._owner_of[i]
                for i, o in self._objs.items()
                if (o.get("spec") or {}).get("nodeName") in wanted
            }

    def __len__(self) -> int:
        return len(self._objs)


WakeFn = Callable[[set[Key]], None]


class ChildCache:
    """Watches of the serving pods and of every child kind, in ``namespaces`` (empty: all).

    ``wake`` (called from watch threads) gets the deployments that need a reconcile: any change of
    one of their pods (as kopf's pod handler did before), and any child that disappeared (someone
    deleted the Service: put it back now, not at the next resync). Our own applies coming back are
    no trigger, so a reconcile does not cause another.
    """

    def __init__(self, kube: Kube, label: str, namespaces: list[str], wake: WakeFn = lambda _: None) -> None:
        self.namespaces: list[str | None] = list(namespaces) or [None]
        self.kinds: list[tuple[str, str]] = [("v1", "Pod"), *CHILD_KINDS]
        self.stores = {k: ObjectStore(label) for k in self.kinds}
        self._said_synced = False
        self.reflectors: list[Reflector[tuple[set[Key], set[Key]]]] = []
        for api_version, kind in self.kinds:
            store = self.stores[(api_version, kind)]
            every_change = kind == "Pod"

            def notify(result: tuple[set[Key], set[Key]], every_change: bool = every_change) -> None:
                changed, lost = result
                keys = changed if every_change else lost
                if keys:
                    wake(keys)

            for ns in self.namespaces:
                self.reflectors.append(
                    Reflector(
                        kube,
                        api_version,
                        kind,
                        functools.partial(store.replace, namespace=ns),
                        store.event,
                        notify,
                        selector=label,
                        namespace=ns,
                        on_missing=functools.partial(store.unserved, namespace=ns),
                    )
                )

    @property
    def synced(self) -> bool:
        """Every kind listed in every namespace: until then reconciles list for themselves."""
        ok = all(s.synced(self.namespaces) for s in self.stores.values())
        if ok and not self._said_synced:
            self._said_synced = True
            log.info("children from watches: %s", {k[1]: len(s) for k, s in self.stores.items()})
        return ok

    def objects(self, api_version: str, kind: str, namespace: str, deployment: str) -> list[dict[str, Any]]:
        return self.stores[(api_version, kind)].of(namespace, deployment)

    def deployments_on(self, nodes: Iterable[str]) -> set[Key]:
        """The deployments with a serving pod on one of ``nodes``."""
        return self.stores[("v1", "Pod")].owners_on(nodes)

    def served(self, api_version: str, kind: str) -> bool:
        return self.stores[(api_version, kind)].served

    def wrote(self, obj: Mapping[str, Any]) -> None:
        store = self.stores.get((str(obj.get("apiVersion")), str(obj.get("kind"))))
        if store is not None:
            store.wrote(obj)

    def deleted(self, api_version: str, kind: str, namespace: str, name: str) -> None:
        store = self.stores.get((api_version, kind))
        if store is not None:
            store.deleted(namespace, name)

    def start(self) -> None:
        for r in self.reflectors:
            r.start()

    def stop(self) -> None:
        for r in self.reflectors:
            r.stop.set()
