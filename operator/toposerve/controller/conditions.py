"""Compute an LLMDeployment's status from what was planned and what was observed (pure).

Conditions follow the Kubernetes conventions: Ready, Progressing, Degraded, Schedulable, each with
a CamelCase reason, a human message and its own observedGeneration; lastTransitionTime only moves
when the status value flips, so writing the same status twice is a no-op for the API server.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from toposerve.api.status import (
    Condition,
    LLMDeploymentStatus,
    ObservedCost,
    Placement,
    PoolStatus,
    StartupRecord,
    StartupStatus,
)
from toposerve.autoscale import startup
from toposerve.autoscale.startup import StartupSample
from toposerve.planner.cost import DeploymentCost, PoolCost

# The reason of a refusal because the API server lacks a feature the spec needs.
UNSUPPORTED = "KubernetesVersionTooOld"


@dataclass(frozen=True)
class PlacementObs:
    gpu_type: str
    replicas: int
    ready: int
    tensor_parallel: int
    pipeline_parallel: int
    context_parallel: int
    gpus_per_replica: int
    nodes_per_replica: int
    cost_per_hour_per_replica: float


@dataclass(frozen=True)
class PoolObs:
    name: str
    fits: bool
    reason: str | None = None  # why it does not fit
    placements: Sequence[PlacementObs] = ()
    unschedulable: Sequence[str] = ()  # scheduler messages
    stuck: int = 0
    blocked: str | None = None  # e.g. LeaderWorkerSet missing
    topology_key: str | None = None  # multi-node pools: the label whose domain holds a replica
    topology_reason: str | None = None
    fabric: str | None = None  # multi-node vLLM pools: the interconnect (render/fabric.py)
    fabric_reason: str | None = None
    disruption: str | None = None  # what a rollout or drain does to it (render/disruption.py)
    order: int | None = None  # place in the growth order (poolOrder tier)
    room: int | None = None  # replicas free capacity lets it hold; None: unbounded
    max_replicas: int | None = None
    on_demand_cover: int = 0  # on-demand replicas covering spot ones under a notice (spotcover.py)
    decode_step_ms: float | None = None
    startup: Sequence[StartupSample] = ()  # measured start-ups, oldest first (autoscale/startup.py)
    kv_cache_tokens_per_replica: int | None = None  # the plan's, on the preferred GPU type


@dataclass(frozen=True)
class Observation:
    generation: int
    replicas: int
    selector: str
    endpoint: str | None
    engine: str
    engine_reason: str
    pools: Sequence[PoolObs] = ()
    invalid: str | None = None  # SpecError text
    # The API server is too old for a feature the spec needs (api/kubeversion.py): nothing applied.
    unsupported: str | None = None
    moves: Sequence[str] = field(default_factory=tuple)
    router: tuple[int, int] | None = None  # (router pods, ready ones); None when routing is off
    apply_error: str | None = None  # the API server refused a child: what and why
    notices: Sequence[tuple[str, str]] = ()  # (Reason, message) problems that do not stop serving
    cost: DeploymentCost | None = None  # observed cost and throughput (planner/cost.py)
    pool_order: str | None = None  # tier or weight
    # The builtin autoscaler's last status.autoscaling (it writes that part; the reconcile turns it
    # into the ScalingActive condition), and the spec's effective autoscaling mode.
    autoscaling: Mapping[str, Any] | None = None
    autoscaling_mode: str = "off"
    # status.gateway as the operator last wrote it from the gateway (gateway_status.py), and the
    # spec's adapter names: the reconcile turns it into the AdaptersLoaded condition.
    gateway: Mapping[str, Any] | None = None
    adapters: Sequence[str] = ()


def _sig(value: float | None, digits: int = 4) -> float | None:
    """Rounded to significant digits: a throughput that wobbles in the fifth digit is no status write."""
    return None if value is None else float(f"{value:.{digits}g}")


def observed(c: PoolCost | None) -> ObservedCost | None:
    if c is None:
        return None
    return ObservedCost(
        gpus=c.gpus,
        spot_gpus=c.spot_gpus,
        cost_per_hour=round(c.cost_per_hour, 4),
        output_tokens_per_second=_sig(c.output_tokens_per_second, 3),
        cost_per_million_output_tokens=_sig(c.cost_per_million_output_tokens),
    )


def _cond(
    kind: str, ok: bool, reason: str, message: str, gen: int, now: str, previous: dict[str, dict[str, Any]]
) -> Condition:
    return _condition(kind, "True" if ok else "False", reason, message, gen, now, previous)


def _condition(
    kind: str, status: str, reason: str, message: str, gen: int, now: str, previous: dict[str, dict[str, Any]]
) -> Condition:
    """A condition whose lastTransitionTime moves only when its status does."""
    prev = previous.get(kind)
    since = prev.get("lastTransitionTime") if prev and prev.get("status") == status else None
    return Condition(
        type=kind,
        status=status,
        reason=reason,
        message=message,
        last_transition_time=since or now,
        observed_generation=gen,
    )


def startup_status(samples: Sequence[StartupSample]) -> StartupStatus | None:
    summary = startup.summarize(samples)
    if summary is None:
        return None

    def r(x: float | None) -> float | None:
        return None if x is None else round(x, 1)

    return StartupStatus(
        samples=summary.samples,
        p50_seconds=round(summary.p50, 1),
        p90_seconds=round(summary.p90, 1),
        scheduling_p50_seconds=r(summary.scheduling_p50),
        pulling_p50_seconds=r(summary.pulling_p50),
        loading_p50_seconds=r(summary.loading_p50),
        recent=[StartupRecord.model_validate(s.to_status()) for s in samples],
    )


def scaling_active(
    mode: str, autoscaling: Mapping[str, Any] | None, gen: int, now: str, prev: dict[str, dict[str, Any]]
) -> Condition | None:
    """ScalingActive, as the HPA names it, for the builtin autoscaler: can it read the metrics it
    decides on? status.autoscaling says so in detail; a condition is what ``kubectl get``, ``kubectl
    wait`` and Argo CD read. None in the other modes: an HPA (or KEDA's) reports on its own object."""
    if mode != "builtin":
        return None
    auto = autoscaling or {}
    if auto.get("mode") != "builtin" or "metricsAvailable" not in auto:
        status, reason, msg = "Unknown", "NoDecisionYet", "the builtin autoscaler has not decided yet"
    elif auto.get("metricsAvailable"):
        status, reason = "True", "MetricsAvailable"
        msg = f"deciding on metrics from {auto.get('source')}"
    else:
        status, reason = "False", "MetricsUnavailable"
        msg = (
            f"no metrics from {auto.get('source')}: holding spec.replicas (no scale-down; scale-up only on "
            "what the replicas with metrics show)"
        )
    return _condition("ScalingActive", status, reason, msg[:32768], gen, now, prev)


def adapters_loaded(
    adapters: Sequence[str],
    gateway: Mapping[str, Any] | None,
    gen: int,
    now: str,
    prev: dict[str, dict[str, Any]],
) -> Condition | None:
    """AdaptersLoaded: every adapter of the spec loads where it is routed (status.gateway.adapters,
    from the gateway's own loads). False names each adapter whose last load failed and why; the
    base model and the other adapters keep serving (a failed adapter only fails its own requests).
    None without adapters."""
    if not adapters:
        return None
    seen = {str(a.get("name")): a for a in (gateway or {}).get("adapters") or [] if isinstance(a, Mapping)}
    failed = [f"{n}: {seen[n]['lastError']}" for n in adapters if n in seen and seen[n].get("lastError")]
    if failed:
        status, reason = "False", "AdapterLoadFailed"
        msg = "; ".join(failed) + " (the base model and the other adapters keep serving)"
    elif not seen:
        status, reason = "Unknown", "NotReported"
        msg = "no gateway reports this deployment's adapters (status.gateway)"
    else:
        status, reason = "True", "NoLoadFailed"
        msg = f"{len(adapters)} adapters, none failed to load (each is loaded where its requests go; status.gateway)"
    return _condition("AdaptersLoaded", status, reason, msg[:32768], gen, now, prev)


def compute_status(
    obs: Observation, previous_conditions: Sequence[dict[str, Any]], now: str
) -> LLMDeploymentStatus:
    """The full status for one observation; ``now`` is an RFC 3339 timestamp."""
    prev = {str(c.get("type")): dict(c) for c in previous_conditions}
    gen = obs.generation
    conds: list[Condition]
    if obs.invalid or obs.unsupported:
        if obs.invalid:
            msg, reason, todo = obs.invalid, "InvalidSpec", "fix the spec to continue"
        else:
            msg, reason = obs.unsupported or "", UNSUPPORTED
            todo = "upgrade the cluster or change the spec to continue; nothing was applied"
        conds = [
            _cond("Ready", False, reason, msg, gen, now, prev),
            _cond("Progressing", False, reason, todo, gen, now, prev),
            _cond("Degraded", True, reason, msg, gen, now, prev),
            _cond("Schedulable", False, reason, msg, gen, now, prev),
        ]
        return LLMDeploymentStatus(
            observed_generation=gen,
            conditions=conds,
            replicas=obs.replicas,
            ready_replicas=0,
            selector=obs.selector,
        )
    pools: list[PoolStatus] = []
    ready_total = 0
    costs = {c.name: c for c in obs.cost.pools} if obs.cost else {}
    for p in obs.pools:
        desired = sum(pl.replicas for pl in p.placements)
        ready = sum(min(pl.ready, pl.replicas) for pl in p.placements)
        ready_total += ready
        primary = next(
            (pl for pl in p.placements if pl.replicas > 0), p.placements[0] if p.placements else None
        )
        pending = None
        if p.blocked:
            pending = p.blocked
        elif not p.fits:
            pending = p.reason
        elif p.unschedulable:
            pending = p.unschedulable[0]
        pools.append(
            PoolStatus(
                name=p.name,
                gpu_type=primary.gpu_type if primary else None,
                fits=p.fits,
                tensor_parallel=primary.tensor_parallel if primary else None,
                pipeline_parallel=primary.pipeline_parallel if primary else None,
                context_parallel=primary.context_parallel if primary else None,
                gpus_per_replica=primary.gpus_per_replica if primary else None,
                nodes_per_replica=primary.nodes_per_replica if primary else None,
                replicas=desired,
                ready_replicas=ready,
                pending_reason=pending,
                topology_key=p.topology_key,
                topology_reason=p.topology_reason,
                fabric=p.fabric,
                fabric_reason=p.fabric_reason,
                disruption=p.disruption,
                order=p.order,
                room=p.room,
                max_replicas=p.max_replicas,
                on_demand_cover=p.on_demand_cover or None,
                decode_step_ms=p.decode_step_ms,
                startup=startup_status(p.startup),
                kv_cache_tokens_per_replica=p.kv_cache_tokens_per_replica,
                cost_per_hour=round(
                    sum(pl.cost_per_hour_per_replica * pl.replicas for pl in p.placements), 4
                ),
                placements=[
                    Placement(
                        gpu_type=pl.gpu_type, replicas=pl.replicas, ready_replicas=min(pl.ready, pl.replicas)
                    )
                    for pl in p.placements
                    if pl.replicas > 0 or pl.ready > 0
                ],
                observed_cost=observed(costs.get(p.name)),
            )
        )
    unfit = [p for p in obs.pools if not p.fits]
    blocked = [p for p in obs.pools if p.blocked]
    unsched = [m for p in obs.pools for m in p.unschedulable]
    fallback = [
        p.name
        for p in obs.pools
        if p.placements and p.placements[0].replicas < sum(x.replicas for x in p.placements)
    ]
    total = obs.replicas
    if unfit and len(unfit) == len(obs.pools):
        ready_c = _cond("Ready", False, "DoesNotFit", unfit[0].reason or "no GPU type fits", gen, now, prev)
    elif blocked and len(blocked) == len(obs.pools):
        ready_c = _cond("Ready", False, "LeaderWorkerSetRequired", blocked[0].blocked or "", gen, now, prev)
    elif total == 0:
        ready_c = _cond("Ready", True, "ScaledToZero", "spec.replicas is 0", gen, now, prev)
    elif ready_total >= total and obs.router is not None and obs.router[1] == 0:
        # status.endpoint is the router: engines alone do not make the deployment reachable.
        msg = (
            f"{ready_total}/{total} replicas ready but 0/{obs.router[0]} router pods ready (status.endpoint)"
        )
        ready_c = _cond("Ready", False, "RouterNotReady", msg, gen, now, prev)
    elif ready_total >= total:
        ready_c = _cond(
            "Ready", True, "AllReplicasReady", f"{ready_total}/{total} replicas ready", gen, now, prev
        )
    else:
        ready_c = _cond(
            "Ready", False, "ReplicasNotReady", f"{ready_total}/{total} replicas ready", gen, now, prev
        )
    settling = ready_total < total and not (unfit or blocked) and not any(p.stuck for p in obs.pools)
    if obs.apply_error:
        prog = _cond("Progressing", False, "ApplyFailed", obs.apply_error, gen, now, prev)
    elif settling:
        prog = _cond(
            "Progressing", True, "ReplicasStarting", f"{ready_total}/{total} replicas ready", gen, now, prev
        )
    elif unsched:
        prog = _cond("Progressing", False, "Unschedulable", unsched[0], gen, now, prev)
    else:
        prog = _cond("Progressing", False, "Reconciled", "children match the plan", gen, now, prev)
    problems = []
    if unfit:
        problems.append(("DoesNotFit", "; ".join(f"pool {p.name}: {p.reason}" for p in unfit)))
    if blocked:
        problems.append(
            ("LeaderWorkerSetRequired", "; ".join(f"pool {p.name}: {p.blocked}" for p in blocked))
        )
    if obs.apply_error:
        problems.insert(0, ("ApplyFailed", obs.apply_error))
    if fallback:
        problems.append(("FallbackActive", f"pools on a fallback GPU type: {', '.join(fallback)}"))
    problems += list(obs.notices)
    if problems:
        degraded = _cond("Degraded", True, problems[0][0], "; ".join(m for _, m in problems), gen, now, prev)
    else:
        degraded = _cond(
            "Degraded", False, "AsPlanned", "every pool runs on its preferred GPU type", gen, now, prev
        )
    if unsched:
        sched = _cond("Schedulable", False, "Unschedulable", unsched[0], gen, now, prev)
    else:
        sched = _cond(
            "Schedulable", True, "Scheduled", "no serving pod is waiting for capacity", gen, now, prev
        )
    placed = [pl for p in pools for pl in p.placements if pl.replicas > 0]
    gpu_types = ",".join(dict.fromkeys(pl.gpu_type for pl in placed)) or None
    first = next((p for p in pools if p.tensor_parallel), None)
    conditions = [ready_c, prog, degraded, sched]
    if (active := scaling_active(obs.autoscaling_mode, obs.autoscaling, gen, now, prev)) is not None:
        conditions.append(active)
    if (loaded := adapters_loaded(obs.adapters, obs.gateway, gen, now, prev)) is not None:
        conditions.append(loaded)
    return LLMDeploymentStatus(
        observed_generation=gen,
        conditions=conditions,
        replicas=total,
        ready_replicas=ready_total,
        selector=obs.selector,
        engine=obs.engine,
        engine_reason=obs.engine_reason,
        endpoint=obs.endpoint,
        gpu_types=gpu_types,
        parallelism=f"{first.tensor_parallel}/{first.pipeline_parallel}" if first else None,
        pools=pools,
        pool_order=obs.pool_order,
        cost_per_hour=round(sum(p.cost_per_hour or 0 for p in pools), 4),
        observed_cost=observed(obs.cost.total) if obs.cost else None,
    )
