"""One level-triggered, idempotent reconcile of one LLMDeployment.

read the world -> plan (pure) -> allocate replicas over GPU types (pure) -> render (pure)
-> server-side apply every child, delete children no longer wanted -> compute status (pure)
-> write status only when it changed, Events only for transitions.

Safe to run any number of times, from any state, after any crash: every decision is recomputed
from the spec and the observed children (the current fallback split is read back from the
workloads' replica counts), and the operator never writes the spec.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from kubernetes.client.exceptions import ApiException

from toposerve import API_GROUP, API_VERSION
from toposerve.api import kubeversion
from toposerve.api.config import OperatorConfig
from toposerve.api.errors import SpecError
from toposerve.api.manifest import parse_spec
from toposerve.api.spec import LLMDeploymentSpec
from toposerve.api.status import WRITTEN_ELSEWHERE
from toposerve.autoscale import startup
from toposerve.controller import engineprobe, evacuation, metrics
from toposerve.controller.allocation import TypeState, allocate
from toposerve.controller.cache import InventoryCache
from toposerve.controller.children import ChildCache, resource_version
from toposerve.controller.conditions import (
    UNSUPPORTED,
    Observation,
    PlacementObs,
    PoolObs,
    compute_status,
)
from toposerve.controller.kube import CHILD_KINDS, LWS_CRD, PLURALS, Kube
from toposerve.controller.observe import (
    LABEL_GPU_TYPE,
    PodFacts,
    bound_replicas,
    parse_time,
    router_readiness,
    summarize,
)
from toposerve.controller.pool_signals import PoolSignalsSource, PrometheusPoolSignals
from toposerve.controller.throughput import ThroughputSource, deployment_cost
from toposerve.planner import costorder, poolorder, spotcover
from toposerve.planner.inventory import Inventory, PodShape, inventory_from_nodes, usage_by_node
from toposerve.planner.memory import GIB
from toposerve.planner.plan import DeploymentPlan, PoolPlan, assign_replicas, plan_deployment
from toposerve.render.autoscaling import render_autoscaler
from toposerve.render.disruption import disruption_note, in_place_outage
from toposerve.render.fabric import fabric_for
from toposerve.render.inferencepool import INFERENCE_POOL, INFERENCE_POOL_PLURAL, render_inference_pool
from toposerve.render.monitoring import POD_MONITOR, POD_MONITOR_PLURAL, render_monitors
from toposerve.render.objects import (
    LABEL_CAPACITY,
    LABEL_COMPONENT,
    LABEL_DEPLOYMENT,
    LABEL_EVACUATING,
    LABEL_POOL,
    Owner,
    endpoint_url,
    gpu_backed,
    pod_tolerations,
    render_deployment,
    render_pool,
    selector_string,
    workload_name,
)

log = logging.getLogger("toposerve.reconcile")
API = f"{API_GROUP}/{API_VERSION}"


@dataclass
class Settings:
    """Operator knobs that are not part of any spec."""

    fallback_after_seconds: float = 60.0  # patience before unschedulable replicas move to the next GPU type
    inventory_ttl_seconds: float = 5.0
    settle_requeue_seconds: float = 5.0
    resync_seconds: float = 300.0  # safety net only: events drive reconciles
    fallback_recheck_seconds: float = 15.0  # how often a pool in fallback looks for capacity to return
    return_cooldown_seconds: float = 120.0  # no move back this soon after a fallback (anti-flap)
    # How often a serving deployment's observed cost is refreshed when nothing else wakes it
    # (throughput moves without any Kubernetes event).
    cost_refresh_seconds: float = 30.0


@dataclass
class Context:
    kube: Kube
    config: OperatorConfig = field(default_factory=OperatorConfig)
    settings: Settings = field(default_factory=Settings)
    cache: InventoryCache | None = None  # watch-fed when the operator runs (controller/cache.py)
    children: ChildCache | None = None  # pods and children, watch-fed (controller/children.py)
    # The newest LLMDeployment bodies from the operator's watch; without one, a reconcile GETs.
    bodies: dict[tuple[str, str], dict[str, Any]] | None = None
    throughput: ThroughputSource | None = None  # observed tokens/s (config prometheusUrl); None: unknown
    # Per-pool TTFT and busy throughput for poolOrder cost; built from config prometheusUrl on first
    # use (pool_signals_source); None without a Prometheus: every pool ranks on the estimate.
    pool_signals: PoolSignalsSource | None = None
    # Requests an engine (by pod IP) has running or waiting; None: could not ask. Draining pods only.
    engine_in_flight: Callable[[str], int | None] = engineprobe.in_flight
    _inventory: tuple[float, Inventory] | None = None
    _lws: tuple[float, bool] | None = None
    # API discovery per (apiVersion, plural): (when asked, served)
    _served: dict[tuple[str, str], tuple[float, bool]] = field(default_factory=dict)
    # The API server's version (read at start, again every VERSION_TTL: control planes get upgraded
    # under a running operator); None inside: could not be read, so nothing is refused for it.
    _version: tuple[float, tuple[kubeversion.Version, str] | None] | None = None

    def inventory(self) -> Inventory:
        """Nodes plus what bound pods request: from the watch-fed cache once it has synced, else
        (no watches: tests, a CLI, the first seconds) listed and kept for a few seconds."""
        if self.cache is not None and self.cache.synced:
            return self.cache.inventory()
        now = time.monotonic()
        if self._inventory and now - self._inventory[0] < self.settings.inventory_ttl_seconds:
            return self._inventory[1]
        nodes = self.kube.list("v1", "Node", None)
        pods = self.kube.list("v1", "Pod", None, fields="status.phase!=Succeeded,status.phase!=Failed")
        inv = inventory_from_nodes(
            nodes, self.config.catalog(), self.config.label_schemes, usage_by_node(pods)
        )
        self._inventory = (now, inv)
        return inv

    def pool_signals_source(self) -> PoolSignalsSource | None:
        if self.pool_signals is None and self.config.prometheus_url:
            self.pool_signals = PrometheusPoolSignals(
                self.config.prometheus_url,
                self.config.prometheus_selector,
                self.config.prometheus_timeout_seconds,
            )
        return self.pool_signals

    def invalidate_inventory(self) -> None:
        """Forget the listed inventory (the watch-fed one is never stale for longer than an event)."""
        self._inventory = None

    def llmdeployment(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The object as the watch last delivered it, else (no watch, or not seen yet) from the API."""
        body = self.bodies.get((namespace, name)) if self.bodies is not None else None
        return body if body is not None else self.kube.get(API, "LLMDeployment", namespace, name)

    def remember(self, body: dict[str, Any]) -> None:
        """Keep ``body`` as the newest known copy, unless a newer one is held (our own status write
        may get here before the watch's older event does)."""
        if self.bodies is None:
            return
        meta = body.get("metadata") or {}
        key = (str(meta.get("namespace") or ""), str(meta.get("name") or ""))
        held = self.bodies.get(key)
        have, got = resource_version(held), resource_version(body)
        if have is None or got is None or got >= have:
            self.bodies[key] = body

    def owned(self, api_version: str, kind: str, namespace: str, name: str) -> list[dict[str, Any]]:
        """The objects of ``kind`` labelled for deployment ``name``: from the watches once they have
        synced, else listed. A kind the watch found unserved is listed once the API serves it."""
        c = self.children
        unserved = c is not None and not c.served(api_version, kind)
        unserved_but_now_there = unserved and (
            self.has_lws()
            if kind == "LeaderWorkerSet"
            else self.serves(api_version, PLURALS[(api_version, kind)])
        )
        if c is not None and c.synced and not unserved_but_now_there:
            return c.objects(api_version, kind, namespace, name)
        return self.kube.list(api_version, kind, namespace, selector=f"{LABEL_DEPLOYMENT}={name}")

    def has_lws(self) -> bool:
        now = time.monotonic()
        if self._lws and now - self._lws[0] < 60:
            return self._lws[1]
        present = self.kube.has_crd(LWS_CRD)
        self._lws = (now, present)
        return present

    def serves(self, api_version: str, plural: str) -> bool:
        """Whether the API serves ``plural`` in ``api_version`` (API discovery, asked again every
        minute): a CRD installed (the Prometheus Operator's, NVIDIA's DRA driver's, KEDA's) after the
        operator started is found without a restart."""
        now = time.monotonic()
        held = self._served.get((api_version, plural))
        if held and now - held[0] < 60:
            return held[1]
        try:
            present = self.kube.serves(api_version, plural)
        except Exception as e:  # discovery failing must not stop serving: taken as not served this time
            log.warning("API discovery of %s failed: %s", api_version, e)
            present = False
        if held is None or held[1] != present:
            log.info("%s %s served: %s", api_version, plural, present)
        self._served[(api_version, plural)] = (now, present)
        return present

    def has_pod_monitors(self) -> bool:
        """Whether the API serves the Prometheus Operator's PodMonitor."""
        return self.serves(POD_MONITOR[0], POD_MONITOR_PLURAL)

    def server_version(self) -> tuple[kubeversion.Version, str] | None:
        """The API server's (major, minor) and gitVersion; None when it could not be read."""
        now = time.monotonic()
        if self._version and now - self._version[0] < VERSION_TTL:
            return self._version[1]
        try:
            got: tuple[kubeversion.Version, str] | None = kubeversion.server_version(
                self.kube.server_version()
            )
        except Exception as e:  # unknown: refuse nothing for it (the API server still validates)
            log.warning("reading the API server's version failed: %s", e)
            got = None
        if got is not None and (self._version is None or self._version[1] != got):
            log.info("API server version %s", got[1])
        self._version = (now, got)
        return got


VERSION_TTL = 300.0  # seconds; the resync (5 minutes) then retries a refused spec after an upgrade


def too_old(
    ctx: Context, spec: LLMDeploymentSpec, plan: DeploymentPlan, objects: list[dict[str, Any]]
) -> str | None:
    """Why the API server cannot serve what was rendered (api/kubeversion.py), or None."""
    server = ctx.server_version()
    if server is None:
        return None
    found = kubeversion.missing(
        server[0], spec, plan, objects, ctx.config.enabled_feature_gates, server_text=server[1]
    )
    return "; ".join(found) or None


def _now() -> datetime:
    return datetime.now(UTC)


def _rfc3339(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def _type_plans(
    name: str, spec: LLMDeploymentSpec, pool: PoolPlan, ctx: Context, inv: Inventory, engine: str
) -> list[PoolPlan]:
    """The plan for each acceptable type from the planner's choice onwards (fallback candidates)."""
    if not pool.fits or pool.gpu_type is None:
        return []
    plans = [pool]
    start = pool.candidates.index(pool.gpu_type) + 1
    for gpu in pool.candidates[start:]:
        alt = plan_deployment(
            name, spec, ctx.config, inv, pool_overrides={pool.name: [gpu]}, recorded_engine=engine
        )
        p = next(x for x in alt.pools if x.name == pool.name)
        if p.fits:
            plans.append(p)
    return plans


def _owned(obj: Mapping[str, Any], uid: str) -> bool:
    return any(r.get("uid") == uid for r in (obj.get("metadata") or {}).get("ownerReferences") or [])


def _status_view(status: Mapping[str, Any] | None) -> dict[str, Any]:
    return {k: v for k, v in (status or {}).items() if k not in WRITTEN_ELSEWHERE}


@dataclass
class Result:
    requeue_after: float | None = None
    applied: int = 0
    deleted: int = 0


def reconcile(ctx: Context, namespace: str, name: str) -> Result:
    """Reconcile one LLMDeployment; returns when to look again (None: on the next event/resync)."""
    kube = ctx.kube
    body = ctx.llmdeployment(namespace, name)
    if body is None or (body.get("metadata") or {}).get("deletionTimestamp"):
        metrics.forget_cost(namespace, name)
        return Result()  # garbage collection removes the children through their owner references
    meta = body["metadata"]
    uid, gen = meta["uid"], int(meta.get("generation") or 0)
    previous = body.get("status") or {}
    now = _now()
    raw_spec = body.get("spec") or {}
    selector = selector_string(name)
    replicas = int(raw_spec.get("replicas") or 0) if isinstance(raw_spec.get("replicas"), int) else 0
    try:
        spec = parse_spec(raw_spec)
        inv = ctx.inventory()
        # engine auto resolves once and is kept (status.engine): a GPU pool scaled to zero never
        # turns a vLLM deployment into the mock.
        dplan = plan_deployment(name, spec, ctx.config, inv, recorded_engine=previous.get("engine"))
    except SpecError as e:
        # Keep the children as they are: bad input never loses what is serving.
        obs = Observation(gen, replicas, selector, None, "", "", invalid=str(e))
        _write_status(ctx, body, obs, previous, now)
        return Result()
    result = Result()
    owner = Owner(name=name, uid=uid)
    pods = ctx.owned("v1", "Pod", namespace, name)
    pods, evacuate_again = _evacuate(ctx, body, spec, owner, dplan, inv, pods, now)
    facts = summarize(pods, now, ctx.settings.fallback_after_seconds)
    # The children as they are, listed once: the current fallback split is read from the workloads,
    # and whatever is no longer wanted is pruned from the same lists (anything this reconcile
    # creates is wanted by definition). A kind that is not served (no LWS CRD) lists as empty.
    existing = {
        (api_version, kind): ctx.owned(api_version, kind, namespace, name)
        for api_version, kind in CHILD_KINDS
    }
    current: dict[tuple[str, str], int] = {}
    for api_version, kind in CHILD_KINDS[:2]:
        for w in existing[(api_version, kind)]:
            labels = w["metadata"].get("labels") or {}
            key = (labels.get("toposerve.io/pool", ""), labels.get("toposerve.io/gpu-type", ""))
            current[key] = current.get(key, 0) + int((w.get("spec") or {}).get("replicas") or 0)
    desired: list[dict[str, Any]] = []
    pool_obs: list[PoolObs] = []
    events: list[tuple[str, str, bool]] = []
    lws_ok: bool | None = None
    returns_allowed = _cooled_down(previous, now, ctx.settings.return_cooldown_seconds)
    type_plans = {pool.name: _type_plans(name, spec, pool, ctx, inv, dplan.engine) for pool in dplan.pools}
    if not gpu_backed(dplan, ctx.config):
        # the mock engine needs no GPUs, so there is nothing to fall back from
        type_plans = {k: v[:1] for k, v in type_plans.items()}
    worlds = {
        pool.name: _world(pool.name, type_plans[pool.name], spec, dplan, ctx, inv, facts, current)
        for pool in dplan.pools
    }
    # Which pool grows or shrinks (planner/poolorder.py): from what each pool's workloads run now,
    # within the room free capacity gives it (unbounded without GPUs or with node provisioning).
    running = {p.name: sum(n for (pool, _), n in current.items() if pool == p.name) for p in dplan.pools}
    noticed = {n.name for n in inv.nodes if n.interruption}
    bounded = gpu_backed(dplan, ctx.config) and ctx.config.gpu_node_provisioning == "static"
    bound = bound_replicas(pods)
    rooms: dict[str, int | None] = {
        k: poolorder.room([(bound.get((k, gpu), 0), t.capacity) for gpu, t in w.items()]) if bounded else None
        for k, w in worlds.items()
    }
    figures: Mapping[str, poolorder.CostFigure] = {}
    if spec.autoscaling.effective_pool_order == "cost":
        dplan, figures = _assign_by_cost(
            ctx, namespace, name, spec, dplan, previous, running, rooms, worlds, bounded
        )
    else:
        dplan = assign_replicas(dplan, spec, ctx.config.catalog(), running, rooms)
    if any(running.values()) and (
        moved := poolorder.changes(running, {p.name: p.replicas for p in dplan.pools})
    ):
        events.append(("PoolsScaled", _pools_scaled(spec, dplan, moved, figures), False))
    for pool in dplan.pools:
        plans = type_plans[pool.name]
        if not plans:
            pool_obs.append(
                PoolObs(name=pool.name, fits=False, reason=pool.reason, max_replicas=pool.max_replicas)
            )
            continue
        order = [p.gpu_type or "" for p in plans]
        world = worlds[pool.name]
        alloc = allocate(order, pool.replicas, world, allow_return=returns_allowed)
        for mv in alloc.moves:
            if mv.reason == "NoCapacity":
                msg = (
                    f"pool {pool.name}: no free {mv.source} capacity for {mv.replicas} new replica(s); "
                    f"placing them on {mv.target}"
                )
                events.append(("GPUFallback", msg, True))
            elif mv.reason == "Unschedulable":
                msg = (
                    f"pool {pool.name}: {mv.replicas} replica(s) unschedulable on {mv.source} for "
                    f"{ctx.settings.fallback_after_seconds:.0f}s; moving them to {mv.target}"
                )
                events.append(("GPUFallback", msg, True))
            else:
                msg = f"pool {pool.name}: capacity returned on {mv.target}; moving 1 replica back from {mv.source}"
                events.append(("GPUFallbackReturn", msg, False))
        placements: list[PlacementObs] = []
        blocked = None
        messages: list[str] = []
        stuck = 0
        said: Mapping[str, Any] = next(
            (x for x in previous.get("pools") or [] if x.get("name") == pool.name), {}
        )
        covers = _spot_covers(
            ctx, pool, plans, alloc.replicas, pods, noticed, int(said.get("onDemandCover") or 0)
        )
        for p in plans:
            n = alloc.replicas.get(p.gpu_type or "", 0)
            f = facts.get((pool.name, p.gpu_type or ""))
            if f:
                messages += f.messages
                stuck += f.stuck
            multi = p.nodes_per_replica > 1 and dplan.engine == "vllm"
            keep = n > 0 or p is plans[0]  # the preferred type's workload stays, even scaled to zero
            if multi and keep:
                if lws_ok is None:
                    lws_ok = ctx.has_lws()
                if not lws_ok:
                    blocked = (
                        f"{p.gpu_type}: a replica spans {p.nodes_per_replica} nodes, which needs the "
                        f"LeaderWorkerSet controller ({LWS_CRD}); install it or choose a larger GPU"
                    )
                    continue
            if keep:
                cover = covers.get(p.gpu_type or "", 0)
                desired += render_pool(
                    name, namespace, spec, dplan, p.model_copy(update={"replicas": n, "on_demand_cover": cover}),
                    ctx.config, owner, inventory=inv,
                )  # fmt: skip
            placements.append(
                PlacementObs(
                    gpu_type=p.gpu_type or "",
                    replicas=n,
                    ready=f.ready if f else 0,
                    tensor_parallel=p.tensor_parallel,
                    pipeline_parallel=p.pipeline_parallel,
                    context_parallel=p.context_parallel,
                    gpus_per_replica=p.gpus_per_replica,
                    nodes_per_replica=p.nodes_per_replica,
                    cost_per_hour_per_replica=p.cost_per_hour_per_replica,
                )
            )
        # The multi-node interconnect of the preferred type (render/fabric.py); say so once when
        # there is none and the replicas' traffic crosses nodes over TCP.
        fabric = fabric_for(
            plans[0], dplan.engine, inv, ctx.config.catalog(), workload_name(name, pool.name, order[0])
        )
        covered, was = sum(covers.values()), int(said.get("onDemandCover") or 0)
        if covered > was:
            events.append(("SpotCover", _cover_message(pool.name, covers), True))
        elif was and not covered:
            events.append(("SpotCoverEnded", f"pool {pool.name}: spot replicas ready again; on-demand cover "
                           f"of {was} replica(s) removed", False))  # fmt: skip
        if fabric.over_tcp and said.get("fabric") != fabric.name:
            events.append(("MultiNodeOverTCP", f"pool {pool.name}: {fabric.reason}", True))
        # What a rollout or a drain does to the pool; an outage is said once, when it starts to be one.
        nodes = plans[0].nodes_per_replica or 1
        note = disruption_note(spec.disruption.strategy, pool.replicas, nodes)
        if note != said.get("disruption") and in_place_outage(spec.disruption.strategy, pool.replicas, nodes):
            events.append(("DisruptionOutage", f"pool {pool.name}: {note}", True))
        pool_obs.append(
            PoolObs(
                name=pool.name,
                fits=True,
                placements=placements,
                unschedulable=messages,
                stuck=stuck,
                blocked=blocked,
                topology_key=plans[0].topology_key,
                topology_reason=plans[0].topology_reason,
                fabric=fabric.name or None,
                fabric_reason=fabric.reason or None,
                disruption=note,
                order=pool.order,
                room=pool.room,
                max_replicas=pool.max_replicas,
                on_demand_cover=covered,
                decode_step_ms=pool.decode_step_ms,
                kv_cache_tokens_per_replica=plans[0].kv_cache_tokens_per_replica or None,
                startup=startup.merge(
                    ((said.get("startup") or {}).get("recent") or []),
                    (p for p in pods if _engine_of_pool(p, pool.name)),
                ),
            )
        )
    # The Service (and any other deployment-wide object) comes from the same renderer.
    desired += render_deployment(name, namespace, spec, _no_pools(dplan), ctx.config, owner)
    autoscaler, autoscaler_notices = render_autoscaler(name, namespace, spec, ctx.config, owner)
    desired += autoscaler  # hpa / keda modes: the one writer of spec.replicas (builtin: none)
    mode = ctx.config.prometheus_operator
    desired += render_monitors(
        name, namespace, spec, ctx.config, owner, served=mode == "auto" and ctx.has_pod_monitors()
    )
    # The Gateway API Inference Extension's InferencePool; without its CRD, said (Degraded, an Event)
    # instead of failing the apply of everything else.
    wants_pool = spec.routing.inference_pool_on(ctx.config.inference_pool.enabled)
    served = not wants_pool or ctx.serves(INFERENCE_POOL[0], INFERENCE_POOL_PLURAL)
    inference_pool, pool_notices = render_inference_pool(name, namespace, spec, ctx.config, owner, served)
    desired += inference_pool
    endpoint = endpoint_url(name, namespace, spec)
    refusal = too_old(ctx, spec, dplan, desired)
    if refusal is not None:
        # Like an invalid spec: say why (condition + Event) and touch nothing, so what serves keeps
        # serving; no apply, no prune, no fallback Events for moves that were not made.
        obs = Observation(
            gen,
            spec.effective_replicas,
            selector,
            endpoint,
            dplan.engine,
            dplan.engine_reason,
            unsupported=refusal,
        )
        _write_status(ctx, body, obs, previous, now)
        return Result()
    # gateway mode: no router pods of the deployment's own to count (the gateway reports its own health).
    router = router_readiness(pods) if spec.routing.dedicated_router else None
    notices = _notices(spec, dplan) + autoscaler_notices + pool_notices
    degraded: Mapping[str, Any] = next(
        (c for c in previous.get("conditions") or [] if c.get("type") == "Degraded"), {}
    )
    for reason, msg in pool_notices:  # once, when it starts (the condition keeps saying it)
        if msg not in str(degraded.get("message") or ""):
            events.append((reason, msg, True))
    for obj in desired:
        try:
            applied = kube.apply(obj)
        except ApiException as e:
            # Say so before retrying: a condition, an Event and the generation it concerns.
            what = f"{obj['kind']} {obj['metadata']['name']}"
            msg = f"applying {what} failed: {e.status} {_api_message(e)}"
            obs = Observation(
                gen, spec.effective_replicas, selector, endpoint, dplan.engine, dplan.engine_reason, pool_obs,
                router=router, apply_error=msg, notices=notices,
                pool_order=spec.autoscaling.effective_pool_order,
            )  # fmt: skip
            _write_status(ctx, body, obs, previous, now)
            if not _has_condition(previous, "Progressing", "ApplyFailed", msg):
                kube.event(body, "ApplyFailed", msg, warning=True)
            raise
        if ctx.children is not None:
            ctx.children.wrote(applied)
        metrics.CHILDREN_APPLIED.labels(obj["kind"]).inc()
        result.applied += 1
    wanted = {(o["apiVersion"], o["kind"], o["metadata"]["name"]) for o in desired}
    for (api_version, kind), children in existing.items():
        for child in children:
            ident = (api_version, kind, child["metadata"]["name"])
            if ident not in wanted and _owned(child, uid):
                kube.delete(api_version, kind, namespace, child["metadata"]["name"])
                if ctx.children is not None:
                    ctx.children.deleted(api_version, kind, namespace, child["metadata"]["name"])
                result.deleted += 1
    if result.deleted or events:
        ctx.invalidate_inventory()
    for reason, msg, warning in events:
        log.info("%s/%s: %s", namespace, name, msg)
        kube.event(body, reason, msg, warning)
    cost = deployment_cost(
        namespace, name, spec, pods, inv, ctx.config, ctx.throughput, [p.name for p in dplan.pools]
    )
    metrics.record_cost(cost)
    obs = Observation(
        generation=gen,
        replicas=spec.effective_replicas,
        selector=selector,
        endpoint=endpoint,
        engine=dplan.engine,
        engine_reason=dplan.engine_reason,
        pools=pool_obs,
        router=router,
        notices=notices,
        cost=cost,
        pool_order=spec.autoscaling.effective_pool_order,
        autoscaling=previous.get("autoscaling"),
        autoscaling_mode=spec.autoscaling.effective_mode,
        gateway=previous.get("gateway"),
        adapters=[a.name for a in spec.adapters],
    )
    status = _write_status(ctx, body, obs, previous, now, _cost_ranks(figures))
    pending = any(f.pending for f in facts.values())
    starting = status.get("readyReplicas", 0) < status.get("replicas", 0)
    fallback_active = any(sum(pl.replicas for pl in p.placements[1:]) > 0 for p in pool_obs)
    if pending:
        result.requeue_after = min(
            ctx.settings.settle_requeue_seconds * 2, ctx.settings.fallback_after_seconds / 2
        )
    elif starting:
        result.requeue_after = ctx.settings.settle_requeue_seconds
    elif fallback_active:
        result.requeue_after = ctx.settings.fallback_recheck_seconds
    if ctx.throughput is not None and any(p.gpus or p.output_tokens_per_second for p in cost.pools):
        refresh = ctx.settings.cost_refresh_seconds
        result.requeue_after = min(result.requeue_after or refresh, refresh)
    if evacuate_again is not None:
        result.requeue_after = min(result.requeue_after or evacuate_again, evacuate_again)
    return result


def _world(
    pool: str,
    plans: list[PoolPlan],
    spec: LLMDeploymentSpec,
    dplan: DeploymentPlan,
    ctx: Context,
    inv: Inventory,
    facts: Mapping[tuple[str, str], PodFacts],
    current: Mapping[tuple[str, str], int],
) -> dict[str, TypeState]:
    """What the cluster says about each GPU type of one pool: its workload's replicas, pending and
    stuck pods, and how many more replicas free capacity places."""
    world = {}
    for p in plans:
        f = facts.get((pool, p.gpu_type or ""))
        cap = inv.placeable_replicas(
            p.gpu_type or "",
            p.gpus_per_pod,
            p.nodes_per_replica,
            p.spot,
            spec.placement.node_selector,
            pod_tolerations(spec, p, ctx.config),
            shape=PodShape(
                p.gpus_per_pod, p.cpu_per_pod, p.memory_gib_per_pod * GIB, p.ephemeral_gib_per_pod * GIB
            ),
            topology_key=p.topology_key,
        )
        world[p.gpu_type or ""] = TypeState(
            replicas=current.get((pool, p.gpu_type or ""), 0),
            stuck=f.stuck if f else 0,
            pending=f.pending if f else 0,
            capacity=cap if gpu_backed(dplan, ctx.config) else 0,
        )
    return world


def _assign_by_cost(
    ctx: Context,
    namespace: str,
    name: str,
    spec: LLMDeploymentSpec,
    dplan: DeploymentPlan,
    previous: Mapping[str, Any],
    running: Mapping[str, int],
    rooms: Mapping[str, int | None],
    worlds: Mapping[str, Mapping[str, TypeState]],
    bounded: bool,
) -> tuple[DeploymentPlan, Mapping[str, poolorder.CostFigure]]:
    """poolOrder cost (planner/costorder.py): the pools' observed TTFT and busy throughput when
    Prometheus answers (None: estimates, never an error), the figures held in status for the dead
    band, and whether free spot capacity could place the next replica of each pool."""
    source = ctx.pool_signals_source()
    slo = spec.autoscaling.ttft_slo
    signals = (
        source(namespace, name, slo.quantile if slo else None, spec.autoscaling.metrics_window_seconds)
        if source is not None
        else None
    )
    spot_free = {k: not bounded or any(t.capacity > 0 for t in w.values()) for k, w in worlds.items()}
    held = costorder.held_figures(previous.get("pools") or [])
    out = costorder.assign_by_cost(
        dplan, spec, ctx.config.catalog(), running, rooms, signals, held, spot_free
    )
    return out.plan, out.figures


def _cost_ranks(figures: Mapping[str, poolorder.CostFigure]) -> dict[str, dict[str, Any]]:
    """status.pools[].costRank per pool (api/status.py CostRank), rounded so noise writes nothing:
    the held figure only moves beyond the dead band anyway."""

    def r(x: float | None, digits: int = 6) -> float | None:
        return None if x is None else float(f"{x:.{digits}g}")

    return {
        n: {
            "costPerMillionTokens": r(f.cost_per_million_tokens),
            "source": f.source,
            "meetsSLO": f.meets_slo,
            "marginalCostPerHour": r(f.marginal_cost_per_hour),
            "tokensPerSecondPerReplica": r(f.tokens_per_second, 4),
            "ttftSeconds": r(f.ttft_seconds, 2),
        }
        for n, f in figures.items()
    }


def _pools_scaled(
    spec: LLMDeploymentSpec,
    plan: DeploymentPlan,
    moved: list[tuple[str, int, int]],
    figures: Mapping[str, poolorder.CostFigure] | None = None,
) -> str:
    """The Event text for a change of the pools' replicas: which pools, and by which rule."""
    how = spec.autoscaling.effective_pool_order
    if how == "weight":
        rule = "split by pools[].weight"
    elif how == "cost":
        ranked = sorted((p for p in plan.pools if p.order is not None), key=lambda p: p.order or 0)
        said = []
        for p in ranked:
            f = (figures or {}).get(p.name)
            if f is None:
                said.append(p.name)
            elif not f.meets_slo:
                said.append(f"{p.name} (over the TTFT SLO)")
            elif f.cost_per_million_tokens is None:
                said.append(f"{p.name} (throughput unknown)")
            else:
                said.append(f"{p.name} ${f.cost_per_million_tokens:.3g}/M tokens {f.source}")
        rule = f"cost: cheapest per token meeting the SLO first: {', '.join(said)}"
    else:
        first = "fastest" if spec.placement.tier in poolorder.FASTEST_FIRST else "cheapest per token"
        ranked = sorted((p for p in plan.pools if p.order is not None), key=lambda p: p.order or 0)
        rule = f"tier order ({spec.placement.tier}: {first} first: {', '.join(p.name for p in ranked)})"
    parts = ", ".join(f"pool {n} {a} -> {b}" for n, a, b in moved)
    standby = sum(p.replicas - p.serving_replicas for p in plan.pools)
    extra = f" (+{standby} warm standby)" if standby else ""
    replicas = str(spec.replicas)
    if spec.effective_replicas != spec.replicas:
        a = spec.autoscaling
        replicas += f" (held to {spec.effective_replicas} by autoscaling {a.min_replicas}-{a.max_replicas})"
    return f"spec.replicas {replicas}{extra} over pools by {rule}: {parts}"


def _spot_covers(
    ctx: Context,
    pool: PoolPlan,
    plans: list[PoolPlan],
    replicas: Mapping[str, int],
    pods: list[dict[str, Any]],
    noticed: set[str],
    previous: int,
) -> dict[str, int]:
    """On-demand cover per GPU type of a spot pool (planner/spotcover.py): its engine pods under a
    termination notice (marked for it, or on a node with one) and how many of its spot replicas are
    ready. ``previous``: the pool's cover in force (status), shared out over its types in order."""
    if not ctx.config.evacuation.on_demand_cover:
        return {}
    out: dict[str, int] = {}
    left = previous
    for p in plans:
        if not p.spot:
            continue
        gpu = p.gpu_type or ""
        views: list[spotcover.SpotPod] = []
        for pod in pods:
            v = evacuation.pod_view(pod)
            labels = (pod.get("metadata") or {}).get("labels") or {}
            if v is None or v.pool != pool.name or labels.get(LABEL_GPU_TYPE) != gpu:
                continue
            interrupted = v.reason == evacuation.REASON_INTERRUPTED or (v.node in noticed and not v.reason)
            views.append(
                spotcover.SpotPod(
                    ready=v.ready,
                    on_demand=labels.get(LABEL_CAPACITY) == "on-demand",
                    interrupted=interrupted and not v.terminating,
                    leaving=v.terminating or (v.reason is not None and not interrupted),
                )
            )
        c = spotcover.cover(views, replicas.get(gpu, 0), p.on_demand_baseline, left)
        left -= min(left, c)
        if c:
            out[gpu] = c
    return out


def _cover_message(pool: str, covers: Mapping[str, int]) -> str:
    what = ", ".join(f"{n} x {gpu}" for gpu, n in covers.items())
    return (
        f"pool {pool}: spot replica(s) under a termination notice; starting on-demand cover ({what}) "
        "until the spot replicas are ready again"
    )


def _evacuate(
    ctx: Context,
    body: Mapping[str, Any],
    spec: LLMDeploymentSpec,
    owner: Owner,
    dplan: DeploymentPlan,
    inv: Inventory,
    pods: list[dict[str, Any]],
    now: datetime,
) -> tuple[list[dict[str, Any]], float | None]:
    """Move pods off nodes with unhealthy GPUs, a termination notice or a cordon (the decision is
    ``evacuation.decide``; this only writes it). Returns the pods as they now are, and when to look
    again."""
    surge = spec.disruption.strategy == "Surge"
    troubles = evacuation.node_troubles(
        ((n.name, n.gpu_unhealthy, n.health_message, n.interruption) for n in inv.nodes),
        cordoned=[n.name for n in inv.nodes if n.cordoned] if surge else (),
    )
    views = {v.name: v for p in pods if (v := evacuation.pod_view(p)) is not None}
    if not troubles and not any(v.reason for v in views.values()):
        return pods, None
    cfg = ctx.config.evacuation
    timing = {
        evacuation.REASON_UNHEALTHY: evacuation.Timing(
            cfg.gpu_unhealthy.drain_after_seconds, cfg.gpu_unhealthy.drain_timeout_seconds
        ),
        evacuation.REASON_INTERRUPTED: evacuation.Timing(
            cfg.interruption.drain_after_seconds, cfg.interruption.drain_timeout_seconds
        ),
        evacuation.REASON_DRAINED: evacuation.Timing(
            cfg.node_drain.drain_after_seconds, cfg.node_drain.drain_timeout_seconds
        ),
    }
    in_flight = {
        v.name: ctx.engine_in_flight(v.ip) if v.ip else None
        for v in views.values()
        if v.draining_at is not None and not v.terminating
    }
    # Ready replicas the pool needs in rotation: warm standby pods run but do not serve.
    desired = {p.name: p.serving_replicas for p in dplan.pools}
    decision = evacuation.decide(
        views.values(), troubles, desired, in_flight, now, timing, cfg.min_drain_seconds
    )
    namespace = str(body["metadata"]["namespace"])
    stamp = _rfc3339(now)
    patches: dict[str, dict[str, Any]] = {}
    notes: list[tuple[str, str, bool]] = []
    for m in decision.mark:
        ref = {**owner.reference(), "blockOwnerDeletion": False}
        patches[m.pod] = {
            # Out of the pool's budget, into the evacuation budget while it serves.
            "labels": {LABEL_POOL: None, LABEL_EVACUATING: "true"},
            "annotations": {
                evacuation.ANNOTATION_REASON: m.trouble.reason,
                evacuation.ANNOTATION_MESSAGE: m.trouble.detail,
                evacuation.ANNOTATION_POOL: m.pool,
                evacuation.ANNOTATION_MARKED: stamp,
            },
            # Out of its ReplicaSet (which starts a replacement now), owned by the LLMDeployment.
            "ownerReferences": [ref],
        }
        notes.append(
            (
                "Evacuating",
                f"pod {m.pod} on node {m.node}: {m.trouble.detail}; starting a replacement elsewhere "
                "(the pod serves until it is Ready)",
                True,
            )
        )
    for d in decision.drain:
        p = patches.setdefault(d.pod, {"labels": {}, "annotations": {}})
        p["labels"][LABEL_COMPONENT] = evacuation.COMPONENT_DRAINING  # out of the Services and budgets
        p["annotations"][evacuation.ANNOTATION_DRAINING] = stamp
        why = {
            "ReplacementReady": "its replacement is Ready",
            "Deadline": "no replacement Ready within the deadline",
            "NotServing": "it is not Ready",
        }[d.why]
        notes.append(("Draining", f"pod {d.pod}: {why}; the router sends it no new requests", False))
    changed: dict[str, dict[str, Any]] = {}
    for pod_name, meta in patches.items():
        obj = ctx.kube.patch("v1", "Pod", namespace, pod_name, {"metadata": meta})
        if ctx.children is not None:
            ctx.children.wrote(obj)
        changed[pod_name] = obj
    for x in decision.delete:
        ctx.kube.delete("v1", "Pod", namespace, x.pod)
        if ctx.children is not None:
            ctx.children.deleted("v1", "Pod", namespace, x.pod)
        why = {
            "Drained": "its engine has no requests left",
            "Deadline": "drain deadline reached",
            "NotServing": "it is not Ready",
        }[x.why]
        notes.append(("Evacuated", f"pod {x.pod} deleted: {why}", False))
    for reason, msg, warning in notes:  # said once it is done (a failed write is retried, not said twice)
        log.info("%s/%s: %s", namespace, body["metadata"]["name"], msg)
        ctx.kube.event(body, reason, msg, warning)
    gone = {x.pod for x in decision.delete}
    out = [changed.get(n, p) for p in pods if (n := str((p.get("metadata") or {}).get("name"))) not in gone]
    return out, decision.requeue_after


def _engine_of_pool(pod: Mapping[str, Any], pool: str) -> bool:
    """A serving (or warm standby) engine pod of the pool, the one a replica's start-up is read from."""
    labels = (pod.get("metadata") or {}).get("labels") or {}
    return labels.get(LABEL_POOL) == pool and labels.get(LABEL_COMPONENT) in ("engine", "standby")


def _notices(spec: LLMDeploymentSpec, plan: DeploymentPlan) -> list[tuple[str, str]]:
    """Problems that do not stop reconciling but will stop serving, said up front."""
    out: list[tuple[str, str]] = [
        ("SpotNotAllowed", f"pool {p.name}: {p.spot_note}") for p in plan.pools if p.spot_note
    ]
    if (
        plan.engine == "vllm"
        and plan.gated
        and not spec.serving.hf_token_secret
        and spec.model.cache.type != "image"
        and not (spec.model.checkpoint or any(p.checkpoint for p in spec.pools))
    ):
        out.append(
            (
                "HFTokenMissing",
                f"{spec.model.name} is gated on the Hugging Face hub: set spec.serving.hfTokenSecret to a "
                "Secret with key HF_TOKEN (or serve from a model image or a pre-filled cache)",
            )
        )
    return out


def _api_message(e: ApiException) -> str:
    try:
        return str(json.loads(e.body or "{}").get("message") or e.reason)
    except ValueError:
        return str(e.reason)


def _has_condition(status: Mapping[str, Any], kind: str, reason: str, message: str) -> bool:
    return any(
        c.get("type") == kind and c.get("reason") == reason and c.get("message") == message
        for c in status.get("conditions") or []
    )


def _cooled_down(previous: Mapping[str, Any], now: datetime, cooldown: float) -> bool:
    """False for ``cooldown`` seconds after the deployment went into fallback (Degraded/FallbackActive)."""
    for c in previous.get("conditions") or []:
        if c.get("type") == "Degraded" and c.get("status") == "True" and c.get("reason") == "FallbackActive":
            since = parse_time(c.get("lastTransitionTime"))
            return since is None or (now - since).total_seconds() >= cooldown
    return True


def _no_pools(plan: DeploymentPlan) -> DeploymentPlan:
    return plan.model_copy(update={"pools": []})


def strip_none(value: Any) -> Any:
    """``value`` without None anywhere: the API server drops nulls, so they must not count as changes."""
    if isinstance(value, dict):
        return {k: strip_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [strip_none(v) for v in value]
    return value


def status_changed(new: Mapping[str, Any], old: Mapping[str, Any]) -> bool:
    """Whether writing ``new`` would change the stored status (so an idle object costs no writes)."""
    return bool(strip_none(dict(new)) != strip_none(dict(old)))


def _write_status(
    ctx: Context,
    body: Mapping[str, Any],
    obs: Observation,
    previous: Mapping[str, Any],
    now: datetime,
    cost_ranks: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Write status only when it differs; emit an Event when Ready flips or its reason changes.

    ``cost_ranks``: status.pools[].costRank by pool (poolOrder cost); added here rather than in
    conditions.compute_status, which builds the rest of each pool's status."""
    meta = body["metadata"]
    status = compute_status(obs, previous.get("conditions") or [], _rfc3339(now))
    new = status.model_dump(by_alias=True, mode="json", exclude=set(WRITTEN_ELSEWHERE))
    for p in new.get("pools") or []:
        if cost_ranks and p.get("name") in cost_ranks:
            p["costRank"] = dict(cost_ranks[p["name"]])
    if status_changed(new, _status_view(previous)):
        # Top-level nulls delete fields in a merge patch; nested ones would only be noise.
        patch = {k: (strip_none(v) if v is not None else None) for k, v in new.items()}
        written = ctx.kube.patch_status(API, "LLMDeployment", meta["namespace"], meta["name"], patch)
        if written:
            ctx.remember(written)
        metrics.STATUS_WRITES.inc()
    prev_ready = next((c for c in previous.get("conditions") or [] if c.get("type") == "Ready"), None)
    ready = next(c for c in new["conditions"] if c["type"] == "Ready")
    if not prev_ready or (prev_ready.get("status"), prev_ready.get("reason"), prev_ready.get("message")) != (
        ready["status"],
        ready["reason"],
        ready["message"],
    ):
        if ready["reason"] in ("InvalidSpec", "DoesNotFit", "LeaderWorkerSetRequired", UNSUPPORTED):
            ctx.kube.event(body, ready["reason"], ready["message"], warning=True)
        elif ready["status"] == "True" and (not prev_ready or prev_ready.get("status") != "True"):
            ctx.kube.event(body, "Ready", ready["message"])
    return new
