"""`toposerve run`: the kopf operator process.

kopf provides the watches (with timeouts, so a silent watch cannot stall), logging and the
process lifecycle. The handlers only *enqueue* the LLMDeployment that an event concerns; a few
workers drain the queue with the level-triggered ``reconcile``. There are no create/update
handlers, so kopf keeps no progress or diff-base annotations on users' objects and adds no
finalizers: deletion is plain garbage collection through owner references, and an operator that
is down never blocks it. A deployment in GPU fallback requeues itself to look for capacity coming
back; a slow periodic resync is only a safety net. With ``--leader-elect`` several replicas can run and exactly one, the
holder of a coordination.k8s.io Lease, reconciles; the others watch and wait.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Hashable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException
from prometheus_client import start_http_server

from toposerve import API_GROUP, API_VERSION
from toposerve.controller import metrics
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
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


RUNTIME: Runtime | None = None


def _rt() -> Runtime:
    assert RUNTIME is not None, "toposerve operator runtime not configured"
    return RUNTIME


# ---- leader election (coordination.k8s.io/v1 Lease) --------------------------------------------

LEASE_SECONDS = 15


def _micro(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def try_lead(kube: Kube, namespace: str, name: str, me: str) -> bool:
    """Acquire or renew the Lease; True while this process holds it."""
    now = datetime.now(UTC)
    spec = {"holderIdentity": me, "leaseDurationSeconds": LEASE_SECONDS, "renewTime": _micro(now)}
    lease = kube.get("coordination.k8s.io/v1", "Lease", namespace, name)
    try:
        if lease is None:
            body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": name, "namespace": namespace},
                    "spec": {**spec, "acquireTime": _micro(now)}}  # fmt: skip
            kube.request("POST", f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases", body=body)
            return True
        cur = lease.get("spec") or {}
        renew = cur.get("renewTime")
        expired = True
        if renew:
            then = datetime.fromisoformat(renew.replace("Z", "+00:00"))
            expired = then + timedelta(seconds=int(cur.get("leaseDurationSeconds") or LEASE_SECONDS)) < now
        if cur.get("holderIdentity") != me and not expired:
            return False
        if cur.get("holderIdentity") != me:
            spec["acquireTime"] = _micro(now)
            spec["leaseTransitions"] = int(cur.get("leaseTransitions") or 0) + 1
        lease["spec"] = {**cur, **spec}
        url = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases/{name}"
        kube.request("PUT", url, body=lease)  # resourceVersion in the body: optimistic concurrency
        return True
    except ApiException as e:
        if e.status == 409:
            return False
        raise


async def _lead_loop(rt: Runtime) -> None:
    while True:
        try:
            leading = await asyncio.to_thread(
                try_lead, rt.ctx.kube, rt.lease_namespace, rt.lease_name, rt.identity
            )
        except Exception as e:  # keep trying: a blip must not kill the operator
            log.warning("lease renewal failed: %s", e)
            leading = False
        if leading and not rt.leader:
            log.info("became leader (%s)", rt.identity)
            await _resync_once(rt)
        if not leading and rt.leader:
            log.warning("lost leadership (%s)", rt.identity)
        rt.leader = leading
        metrics.LEADER.set(1 if leading else 0)
        await asyncio.sleep(LEASE_SECONDS / 3)


# ---- workers and resync ----------------------------------------------------------------------


async def _worker(rt: Runtime) -> None:
    backoff: dict[Hashable, float] = {}
    while True:
        key = await rt.queue.get()
        metrics.QUEUE_DEPTH.set(len(rt.queue))
        if not rt.leader:
            rt.queue.done(key)
            rt.queue.add(key, 2.0)
            await asyncio.sleep(0.5)
            continue
        assert isinstance(key, tuple)
        namespace, name = str(key[0]), str(key[1])
        start = time.perf_counter()
        requeue: float | None = None
        try:
            result = await asyncio.to_thread(reconcile, rt.ctx, namespace, name)
            requeue = result.requeue_after
            backoff.pop(key, None)
            metrics.RECONCILES.labels("ok").inc()
        except Exception as e:
            delay = min(60.0, backoff.get(key, 0.5) * 2)
            backoff[key] = delay
            requeue = delay
            metrics.RECONCILES.labels("error").inc()
            log.warning("reconcile %s/%s failed (retry in %.0fs): %s", namespace, name, delay, e)
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
    rt.leader = not rt.leader_elect
    metrics.LEADER.set(1 if rt.leader else 0)
    rt.tasks = [asyncio.create_task(_worker(rt)) for _ in range(rt.workers)]
    rt.tasks.append(asyncio.create_task(_resync_loop(rt)))
    if rt.leader_elect:
        rt.tasks.append(asyncio.create_task(_lead_loop(rt)))


@kopf.on.cleanup()
async def _cleanup(**_: Any) -> None:
    for t in _rt().tasks:
        t.cancel()


@kopf.on.event(API_GROUP, API_VERSION, "llmdeployments")
def _on_llmdeployment(event: kopf.RawEvent, name: str, namespace: str | None, **_: Any) -> None:
    if event.get("type") != "DELETED":
        _rt().queue.add((namespace, name))


@kopf.on.event("", "v1", "pods", labels={LABEL_DEPLOYMENT: kopf.PRESENT})
def _on_pod(labels: kopf.Labels, namespace: str | None, **_: Any) -> None:
    _rt().queue.add((namespace, labels[LABEL_DEPLOYMENT]))


def run(rt: Runtime, metrics_port: int | None, liveness: str | None = None) -> None:
    """Run the operator until interrupted."""
    global RUNTIME
    RUNTIME = rt
    if metrics_port:
        start_http_server(metrics_port)
    kopf.configure(verbose=False, log_format=kopf.LogFormat.JSON)
    kopf.run(
        clusterwide=not rt.namespaces,
        namespaces=rt.namespaces,
        standalone=True,
        liveness_endpoint=liveness,
    )
