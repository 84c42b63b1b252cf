"""`toposerve run`: the kopf operator process.

kopf provides the watches (with timeouts, so a silent watch cannot stall), logging and the
process lifecycle. The handlers only *enqueue* the LLMDeployment that an event concerns; a few
workers drain the queue with the level-triggered ``reconcile``. There are no create/update
handlers, so kopf keeps no progress or diff-base annotations on users' objects and adds no
finalizers: deletion is plain garbage collection through owner references, and an operator that
is down never blocks it. A deployment in GPU fallback requeues itself to look for capacity coming
back; a slow periodic resync is only a safety net. With ``--leader-elect`` several replicas can
run and exactly one, the holder of a coordination.k8s.io Lease, reconciles; the others watch and
wait.

What a reconcile reads comes from memory: the inventory from cluster-wide watches of nodes and
bound pods (``controller/cache.py``), the serving pods and children of each deployment from
label-filtered watches (``controller/children.py``), and the LLMDeployment itself as kopf's watch
last delivered it. Those watches are our own, not kopf's: kopf runs one stream per resource with
one set of selectors, and its ``labels=`` filters client-side. A change of a deployment's pods or
the disappearance of one of its children wakes it (as a pod handler did before).
Our own status writes come back as events; they carry nothing new and do not enqueue.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException
from prometheus_client import start_http_server

from toposerve import API_GROUP, API_VERSION
from toposerve.controller import autoscaler as autoscale_loop
from toposerve.controller import gateway_status, metrics
from toposerve.controller.cache import Change, InventoryCache, waits_for_capacity
from toposerve.controller.children import ChildCache, Key
from toposerve.controller.kube import Kube
from toposerve.controller.queue import WorkQueue
from toposerve.controller.reconcile import Context, reconcile
from toposerve.render.objects import LABEL_DEPLOYMENT

log = logging.getLogger("toposerve.operator")
API = f"{API_GROUP}/{API_VERSION}"


@dataclass
class Runtime:
    ctx: Context
    namespaces: list[str]
    workers: int = 4
    leader_elect: bool = False
    lease_namespace: str = "default"
    lease_name: str = "toposerve-operator"
    identity: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    queue: WorkQueue = field(default_factory=WorkQueue)
    leader: bool = False
    leading: asyncio.Event = field(default_factory=asyncio.Event)  # set while leader: workers run
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    # Every LLMDeployment seen: what of it triggers a reconcile, and whether it waits for capacity.
    known: dict[tuple[str, str], Known] = field(default_factory=dict)
    waiting: set[tuple[str, str]] = field(default_factory=set)  # those of ``known`` waiting for capacity


@dataclass(frozen=True)
class Known:
    trigger: tuple[Any, ...]
    waits: bool


RUNTIME: Runtime | None = None


def _rt() -> Runtime:
    assert RUNTIME is not None, "toposerve operator runtime not configured"
    return RUNTIME


# ---- leader election (coordination.k8s.io/v1 Lease) --------------------------------------------

LEASE_SECONDS = 15


def _micro(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Elector:
    """Acquire or renew a Lease; a held Lease counts as expired only by this process's own clock.

    Another holder's ``renewTime`` is its wall clock, and clocks skew: comparing it with ours could
    steal a live lease (our clock ahead) or wait forever on a dead one (theirs ahead). Like
    client-go, we remember when *we* last saw the record change (holder, renew time, transitions)
    on our monotonic clock, and take over only after ``leaseDurationSeconds`` without a change.
    A process that has just started therefore waits one full lease duration before taking over a
    lease somebody holds, however old its ``renewTime`` reads.
    """

    def __init__(
        self, kube: Kube, namespace: str, name: str, me: str, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.kube, self.namespace, self.name, self.me = kube, namespace, name, me
        self.clock = clock
        self._observed: tuple[Any, ...] | None = None
        self._observed_at = 0.0

    def _observe(self, spec: Mapping[str, Any]) -> float:
        """Seconds since the lease record last changed, by our clock."""
        record = (spec.get("holderIdentity"), spec.get("renewTime"), spec.get("leaseTransitions"))
        now = self.clock()
        if record != self._observed:
            self._observed, self._observed_at = record, now
        return now - self._observed_at

    def try_lead(self) -> bool:
        """Acquire or renew the Lease; True while this process holds it."""
        now = datetime.now(UTC)  # written for people and tools to read; never compared
        spec: dict[str, Any] = {
            "holderIdentity": self.me,
            "leaseDurationSeconds": LEASE_SECONDS,
            "renewTime": _micro(now),
        }
        url = f"/apis/coordination.k8s.io/v1/namespaces/{self.namespace}/leases"
        lease = self.kube.get("coordination.k8s.io/v1", "Lease", self.namespace, self.name)
        try:
            if lease is None:
                body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                        "metadata": {"name": self.name, "namespace": self.namespace},
                        "spec": {**spec, "acquireTime": _micro(now)}}  # fmt: skip
                self.kube.request("POST", url, body=body)
                return True
            cur = lease.get("spec") or {}
            holder = cur.get("holderIdentity")
            unchanged_for = self._observe(cur)
            duration = int(cur.get("leaseDurationSeconds") or LEASE_SECONDS)
            if holder and holder != self.me and unchanged_for < duration:
                return False
            if holder != self.me:
                spec["acquireTime"] = _micro(now)
                spec["leaseTransitions"] = int(cur.get("leaseTransitions") or 0) + 1
            lease["spec"] = {**cur, **spec}
            # resourceVersion in the body: optimistic concurrency against a rival taking it too
            self.kube.request("PUT", f"{url}/{self.name}", body=lease)
            self._observe(lease["spec"])
            return True
        except ApiException as e:
            if e.status == 409:
                return False
            raise


async def _lead_loop(rt: Runtime) -> None:
    elector = Elector(rt.ctx.kube, rt.lease_namespace, rt.lease_name, rt.identity)
    while True:
        try:
            leading = await asyncio.to_thread(elector.try_lead)
        except Exception as e:  # keep trying: a blip must not kill the operator
            log.warning("lease renewal failed: %s", e)
            leading = False
        if leading and not rt.leader:
            log.info("became leader (%s)", rt.identity)
            await _resync_once(rt)
        if not leading and rt.leader:
            log.warning("lost leadership (%s)", rt.identity)
        _set_leader(rt, leading)
        await asyncio.sleep(LEASE_SECONDS / 3)


def _set_leader(rt: Runtime, leading: bool) -> None:
    rt.leader = leading
    if leading:
        rt.leading.set()
    else:
        rt.leading.clear()
    metrics.LEADER.set(1 if leading else 0)


# ---- workers and resync ----------------------------------------------------------------------


async def _worker(rt: Runtime) -> None:
    while True:
        await rt.leading.wait()  # a standby replica keeps its queue and does no work
        key = await rt.queue.get()
        metrics.QUEUE_DEPTH.set(len(rt.queue))
        if not rt.leader:  # lost the lease while waiting: put it back for whoever leads next
            rt.queue.done(key)
            rt.queue.add(key)
            continue
        assert isinstance(key, tuple)
        namespace, name = str(key[0]), str(key[1])
        start = time.perf_counter()
        requeue: float | None = None
        try:
            result = await asyncio.to_thread(reconcile, rt.ctx, namespace, name)
            requeue = result.requeue_after
            rt.queue.forget(key)
            metrics.RECONCILES.labels("ok").inc()
        except Exception as e:
            metrics.RECONCILES.labels("error").inc()
            rt.queue.done(key)
            delay = rt.queue.add_rate_limited(key)
            log.warning("reconcile %s/%s failed (retry in %.0fs): %s", namespace, name, delay, e)
            continue
        finally:
            metrics.RECONCILE_SECONDS.observe(time.perf_counter() - start)
        rt.queue.done(key)
        if requeue is not None:
            rt.queue.add(key, requeue)


async def _resync_once(rt: Runtime) -> None:
    kube = rt.ctx.kube
    targets: list[str | None] = list(rt.namespaces) if rt.namespaces else [None]
    for ns in targets:
        try:
            items = await asyncio.to_thread(kube.list, API, "LLMDeployment", ns)
        except Exception as e:
            log.warning("resync list failed: %s", e)
            continue
        for item in items:
            meta = item["metadata"]
            rt.queue.add((meta["namespace"], meta["name"]))


async def _resync_loop(rt: Runtime) -> None:
    while True:
        await asyncio.sleep(rt.ctx.settings.resync_seconds)
        await _resync_once(rt)


# ---- kopf handlers -----------------------------------------------------------------------------


def _on_inventory(rt: Runtime, change: Change) -> None:
    """Nodes or bound pods changed: wake the deployments that may care (in the event loop).

    A new or vanished GPU type can change any plan (and ``engine: auto``), so everyone is requeued;
    a change in free capacity only concerns the deployments waiting for it (in fallback, pending,
    or not fitting). The short delay coalesces a burst of events into one reconcile each. A node
    turning GPU-unhealthy, getting a termination notice or being cordoned (a drain) wakes the
    deployments with pods on it at once (controller/evacuation.py).
    """
    for key in rt.known if change.types else rt.waiting:
        rt.queue.add(key, INVENTORY_COALESCE_SECONDS)
    if change.troubled and rt.ctx.children is not None:
        # GPUs turned unhealthy or a termination notice arrived: move the pods there now.
        for key in rt.ctx.children.deployments_on(change.troubled):
            rt.queue.add(key)
    metrics.QUEUE_DEPTH.set(len(rt.queue))


INVENTORY_COALESCE_SECONDS = 1.0


def _wake(rt: Runtime, keys: set[Key]) -> None:
    """Pods of these deployments changed, or one of their children vanished (in the event loop)."""
    for key in keys:
        rt.queue.add(key)
    metrics.QUEUE_DEPTH.set(len(rt.queue))


@kopf.on.startup()
async def _startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    rt = _rt()
    settings.watching.server_timeout = 60
    settings.watching.client_timeout = 90
    settings.watching.connect_timeout = 10
    settings.posting.level = logging.WARNING
    # No create/update handlers exist, but pin kopf's bookkeeping to our own prefix all the same.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="toposerve.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="toposerve.io")
    loop = asyncio.get_running_loop()

    def changed(change: Change) -> None:  # called in a watch thread
        loop.call_soon_threadsafe(_on_inventory, rt, change)

    def wake(keys: set[Key]) -> None:  # called in a watch thread
        loop.call_soon_threadsafe(_wake, rt, keys)

    ctx = rt.ctx
    # What this API server serves, said once at start (and looked up again by reconciles): its
    # version, against which specs are checked (api/kubeversion.py), and the PodMonitor kind.
    await asyncio.to_thread(ctx.server_version)
    if ctx.config.prometheus_operator == "auto":
        await asyncio.to_thread(ctx.has_pod_monitors)
    ctx.cache = InventoryCache(ctx.kube, ctx.config.catalog(), ctx.config.label_schemes, changed)
    ctx.cache.start()
    ctx.children = ChildCache(ctx.kube, LABEL_DEPLOYMENT, rt.namespaces, wake)
    ctx.children.start()
    bodies: dict[tuple[str, str], dict[str, Any]] = {}
    ctx.bodies = bodies
    _set_leader(rt, not rt.leader_elect)
    rt.tasks = [asyncio.create_task(_worker(rt)) for _ in range(rt.workers)]
    rt.tasks.append(asyncio.create_task(_resync_loop(rt)))
    # The builtin autoscaler (controller/autoscaler.py): leader only, like the workers; it reads the same
    # watch caches as the reconciles.

    def pods_of(namespace: str, name: str) -> list[dict[str, Any]]:
        return ctx.owned("v1", "Pod", namespace, name)

    scaler = autoscale_loop.Autoscaler(
        ctx.kube, ctx.config, bodies=lambda: list(bodies.values()), pods_of=pods_of
    )
    rt.tasks.append(asyncio.create_task(autoscale_loop.run(scaler, rt.leading, rt.namespaces)))
    # status.gateway from the chart's gateway (controller/gateway_status.py): leader only too.
    rt.tasks.append(
        asyncio.create_task(
            gateway_status.run(
                ctx.kube,
                lambda: list(bodies.values()),
                ctx.config.gateway_selector,
                ctx.config.gateway_namespace,
                rt.leading,
            )
        )
    )
    if rt.leader_elect:
        rt.tasks.append(asyncio.create_task(_lead_loop(rt)))


@kopf.on.cleanup()
async def _cleanup(**_: Any) -> None:
    rt = _rt()
    for t in rt.tasks:
        t.cancel()
    if rt.ctx.cache is not None:
        rt.ctx.cache.stop()
    if rt.ctx.children is not None:
        rt.ctx.children.stop()


def trigger(body: Mapping[str, Any]) -> tuple[Any, ...]:
    """What of an LLMDeployment, when it changes, calls for a reconcile: the generation (the spec),
    labels, annotations and deletion. A change of status alone (our own write, coming back as an
    event) carries nothing new, so it is not one (controller-runtime's GenerationChangedPredicate,
    widened to metadata), except the builtin autoscaler's metricsAvailable flipping (the reconcile
    turns it into the ScalingActive condition) and an adapter's load error in status.gateway
    (AdaptersLoaded)."""
    meta = body.get("metadata") or {}
    auto = (body.get("status") or {}).get("autoscaling") or {}
    return (
        meta.get("generation"),
        hash(json.dumps(meta.get("labels") or {}, sort_keys=True)),
        hash(json.dumps(meta.get("annotations") or {}, sort_keys=True)),
        meta.get("deletionTimestamp"),
        auto.get("mode"),
        auto.get("metricsAvailable"),
        # status.gateway's adapter load errors: the reconcile turns them into AdaptersLoaded
        tuple(
            (a.get("name"), a.get("lastError"))
            for a in ((body.get("status") or {}).get("gateway") or {}).get("adapters") or []
            if isinstance(a, dict)
        ),
    )


@kopf.on.event(API_GROUP, API_VERSION, "llmdeployments")
def _on_llmdeployment(
    event: kopf.RawEvent, body: kopf.Body, name: str, namespace: str | None, **_: Any
) -> None:
    rt = _rt()
    key = (namespace or "", name)
    if event.get("type") == "DELETED":
        if rt.ctx.bodies is not None:
            rt.ctx.bodies.pop(key, None)
        rt.known.pop(key, None)
        rt.waiting.discard(key)
        rt.queue.forget(key)
        return
    raw = event.get("object")
    if rt.ctx.bodies is not None and isinstance(raw, dict):
        rt.ctx.remember(dict(raw))
    previous = rt.known.get(key)
    now = Known(trigger(body), waits_for_capacity(body))
    rt.known[key] = now
    if now.waits:
        rt.waiting.add(key)
    else:
        rt.waiting.discard(key)
    if previous is None or previous.trigger != now.trigger:
        rt.queue.add(key)


def run(rt: Runtime, metrics_port: int | None, liveness: str | None = None, log_level: str = "info") -> None:
    """Run the operator until interrupted."""
    global RUNTIME
    RUNTIME = rt
    if metrics_port:
        start_http_server(metrics_port)
    kopf.configure(verbose=False, debug=log_level == "debug", log_format=kopf.LogFormat.JSON)
    # kopf.configure sets up the root logger; the level is ours to choose.
    logging.getLogger().setLevel(log_level.upper())
    kopf.run(
        clusterwide=not rt.namespaces,
        namespaces=rt.namespaces,
        standalone=True,
        liveness_endpoint=liveness,
    )
