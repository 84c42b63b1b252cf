"""The autoscaling decision: plain data in, a replica count and its reasons out (pure).

It follows the Kubernetes HorizontalPodAutoscaler so that the three modes (builtin, hpa, keda)
mean the same thing, read from Kubernetes v1.35.4's ``pkg/controller/podautoscaler``:

* ``replica_calculator.go`` ``calcPlainMetricReplicas``: ratio = mean(metric) / target; inside
  the tolerance band nothing changes; else ceil(ratio x replicas with metrics). On a scale-up,
  replicas that are not ready yet count with usage 0 (capacity on the way) and replicas without
  metrics count with 0; a recount that flips the direction keeps the current count.
* ``horizontal.go`` ``reconcileAutoscaler``: below the floor -> the floor, above max -> max,
  at zero -> stay (the HPA disables itself at zero); the largest proposal over metrics wins.
* ``stabilizeRecommendationWithBehaviors``: scale up to the *lowest* recommendation of the
  scale-up window, down to the *highest* of the scale-down window (the most conservative one).
* ``convertDesiredReplicasWithBehaviorRate`` / ``calculateScale{Up,Down}Limit...``: each policy
  allows Pods or Percent of the replicas at the start of its period (replicas now minus changes
  made within the period); selectPolicy Max takes the most permissive, Min the least, Disabled
  forbids the direction. Empty policies mean the API's defaults (``apis/autoscaling/v2/defaults.go``).

Where toposerve departs, on purpose and said in docs/autoscaling.md: a replica with missing or
stale metrics forbids a scale-down (the HPA would assume it sits at target) and adds nothing to a
scale-up; no fresh metric at all holds the current count; a replica not ready past
``startupGraceSeconds`` is ignored rather than counted as capacity; the floor is
max(minReplicas, open schedule windows, forecast) and recommendations are recorded clamped to
[floor, max], so the end of a schedule window scales down through the down window, not at once;
the history (recommendations, scale events) is plain data the caller persists in status, so an
operator restart neither forgets a scale-down window nor lets replicas jump. Opt-in
(``burstHeadroom``, 0 by default): the KV proposal is square-root staffed, ceil(R + beta x
sqrt(R)) instead of ceil(R) (``staffed``), so small fleets get proportionally more room for
Poisson bursts than big ones.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from toposerve.api.spec import AutoscalingSpec, ScalingRules
from toposerve.autoscale.queueing import Demand, Proposal, demand_replicas
from toposerve.autoscale.queueing import staffed as staffed  # re-exported: forecast and tests use it here

PolicyKind = Literal["Pods", "Percent"]
ROUTER_ARRIVALS = "router arrivals"  # the metric name of the demand proposal (status, Events)
Select = Literal["Max", "Min", "Disabled"]


@dataclass(frozen=True)
class Policy:
    kind: PolicyKind
    value: int
    period: float  # seconds


@dataclass(frozen=True)
class Rules:
    window: float  # stabilization window, seconds
    policies: tuple[Policy, ...]
    select: Select = "Max"


# Kubernetes' defaults when a direction has no policies (apis/autoscaling/v2/defaults.go).
DEFAULT_UP_POLICIES = (Policy("Pods", 4, 15), Policy("Percent", 100, 15))
DEFAULT_DOWN_POLICIES = (Policy("Percent", 100, 15),)


def rules_from_spec(r: ScalingRules, up: bool) -> Rules:
    policies = tuple(Policy(p.type, p.value, float(p.period_seconds)) for p in r.policies)
    if not policies:
        policies = DEFAULT_UP_POLICIES if up else DEFAULT_DOWN_POLICIES
    return Rules(float(r.stabilization_window_seconds), policies, r.select_policy)


@dataclass(frozen=True)
class Config:
    """What the decision needs from spec.autoscaling."""

    min_replicas: int
    max_replicas: int
    target_kv: float
    target_waiting: float
    tolerance: float
    up: Rules
    down: Rules
    startup_grace: float
    warm_standby: int = 0
    ttft_slo: float | None = None  # seconds the TTFT quantile must stay under; None: no TTFT input
    ttft_quantile: float = 0.95
    burst_headroom: float = 0.0  # beta of square-root staffing on the KV proposal; 0: the HPA's rule
    # beta of the router-arrivals proposal (Inputs.demand, queueing.demand_replicas); None: burst_headroom.
    # Unused without a demand input.
    demand_headroom: float | None = None

    @classmethod
    def from_spec(cls, a: AutoscalingSpec) -> Config:
        return cls(
            ttft_slo=a.ttft_slo.seconds if a.ttft_slo else None,
            ttft_quantile=a.ttft_slo.quantile if a.ttft_slo else 0.95,
            min_replicas=a.min_replicas,
            max_replicas=a.max_replicas,
            target_kv=a.target_kv_cache_utilization,
            target_waiting=a.target_waiting_requests,
            tolerance=a.tolerance,
            up=rules_from_spec(a.scale_up, up=True),
            down=rules_from_spec(a.scale_down, up=False),
            startup_grace=float(a.startup_grace_seconds),
            warm_standby=a.warm_standby,
            burst_headroom=a.burst_headroom,
        )


@dataclass(frozen=True)
class Replica:
    """One serving replica as seen now; metric values are None when missing or stale."""

    name: str
    ready: bool
    age: float  # seconds since it was created
    kv: float | None = None  # vllm:kv_cache_usage_perc, 0..1
    waiting: float | None = None  # vllm:num_requests_waiting
    running: float | None = None  # vllm:num_requests_running (reported, not decided on)


@dataclass(frozen=True)
class Inputs:
    now: float  # seconds (any epoch; the history uses the same clock)
    current: int  # spec.replicas (the scale subresource)
    replicas: tuple[Replica, ...] = ()  # serving replicas that exist (standby excluded)
    source_ok: bool = True  # the metrics source answered at all
    standby_ready: int = 0  # warm standby replicas loaded and ready to promote
    held_requests: int = 0  # requests the router holds for a deployment at zero replicas
    schedule_floor: int = 0
    schedule_name: str = ""
    forecast_floor: int = 0
    # The TTFT quantile over the serving replicas in the metrics window (seconds); None: unknown.
    ttft: float | None = None
    ttft_idle: bool = False  # fresh data, but no request started in the window: TTFT says nothing
    # What the routers see (arrivals, in flight, learned service rate): the leading signal. None:
    # decide on the engines' metrics alone, exactly as before.
    demand: Demand | None = None


@dataclass(frozen=True)
class History:
    """What the HPA keeps in memory, kept by the caller (status) so a restart loses nothing."""

    recommendations: tuple[tuple[float, int], ...] = ()  # (time, recommended replicas)
    scale_ups: tuple[tuple[float, int], ...] = ()  # (time, replicas added)
    scale_downs: tuple[tuple[float, int], ...] = ()  # (time, replicas removed)


@dataclass(frozen=True)
class Decision:
    desired: int
    reason: str  # CamelCase, for status and Events
    message: str
    proposal: int  # what the metrics alone asked for (before floor, stabilization, rate limits)
    floor: int
    floor_source: str  # minReplicas, schedule/<name> or forecast
    metrics_ok: bool  # every serving replica had fresh metrics
    kv: float | None  # mean KV usage over replicas with fresh metrics
    waiting: float | None  # mean waiting requests over the same
    running: float | None
    ready: int
    starting: int  # not ready, within startupGraceSeconds (or requested, no pod yet)
    stuck: int  # not ready past startupGraceSeconds: ignored
    missing: int  # ready, no fresh metrics
    current: int  # spec.replicas the decision started from
    promote: int = 0  # warm standby replicas to put into rotation now
    ttft: float | None = None  # the TTFT quantile decided on (None: no SLO, idle or unknown)
    ttft_missing: bool = False  # an SLO is set and no fresh TTFT came: no scale-down
    kv_load: float | None = None  # total KV load in replicas at target (sum of fresh kv / target)
    headroom: float = 0.0  # replicas of burst headroom on top of kv_load (beta x sqrt(kv_load))
    limited: str = ""  # ScaleUpLimit, ScaleDownLimit, TooManyReplicas... when a limit bit
    history: History = field(default_factory=History)
    signal: str = ""  # the metric whose proposal won ("kv-cache", "router arrivals", ...); "" if none
    demand: Proposal | None = None  # the router-arrivals proposal (None: no demand input, or unusable)


# ---- replica calculator -----------------------------------------------------------------------


def _ceil(x: float) -> int:
    """ceil, blind to float noise (the HPA counts in integer milli-units: 21/22/0.7*22 is 30)."""
    return math.ceil(round(x, 9))


def _within(ratio: float, tolerance: float) -> bool:
    return (1.0 - tolerance) <= ratio <= (1.0 + tolerance)


def _with_headroom(ratio: float, n: int, beta: float) -> float:
    """A mean/target ratio over ``n`` samples -> the ratio that sizes the fleet by ``staffed``
    (load = ratio x n). beta 0 returns ``ratio`` itself, so the HPA's rule is untouched."""
    if beta <= 0 or ratio <= 0 or n <= 0:
        return ratio
    return staffed(ratio * n, beta) / n


def metric_replicas(
    values: Sequence[float],
    target: float,
    current: int,
    starting: int,
    missing: int,
    tolerance: float,
    headroom: float = 0.0,
) -> int:
    """calcPlainMetricReplicas, except that missing metrics never allow a scale-down.

    ``values``: the metric of each ready replica with fresh data; ``starting``: replicas not
    ready yet (usage 0 on a scale-up); ``missing``: ready replicas without fresh data;
    ``headroom``: square-root staffing's beta (``staffed``): every ratio below, and so the
    tolerance band and the direction of the signal, is that of load + beta x sqrt(load) to the
    replicas, instead of load to the replicas.
    """
    if not values:
        return current
    ratio = _with_headroom(sum(values) / len(values) / target, len(values), headroom)
    up_with_unready = starting > 0 and ratio > 1.0
    if not up_with_unready and missing == 0:
        if _within(ratio, tolerance):
            return current
        # toposerve: never against the signal (ignored, stuck replicas make len(values) < current)
        new = _ceil(ratio * len(values))
        return max(new, current) if ratio > 1.0 else min(new, current)
    if ratio < 1.0 and missing:
        return current  # toposerve: no scale-down on partial data
    samples = list(values)
    if ratio > 1.0:
        samples += [0.0] * missing
    if up_with_unready:
        samples += [0.0] * starting
    new_ratio = _with_headroom(sum(samples) / len(samples) / target, len(samples), headroom)
    if _within(new_ratio, tolerance) or (ratio < 1.0 < new_ratio) or (ratio > 1.0 > new_ratio):
        return current
    new = _ceil(new_ratio * len(samples))
    if (new_ratio < 1.0 and new > current) or (new_ratio > 1.0 and new < current):
        return current
    return new


def ttft_replicas(observed: float, slo: float, current: int, ready: int, tolerance: float) -> int:
    """The TTFT proposal: ceil(ready x observed / slo) outside the tolerance band.

    The quantile is one number for the whole deployment, measured on the ready replicas, so they
    are the base; replicas still starting are in ``current`` and count as capacity on the way (a
    scale-up that they already cover keeps the count). Never against the signal: a TTFT over the
    SLO never proposes fewer replicas than now, one under it never more.
    """
    ratio = observed / slo
    if _within(ratio, tolerance):
        return current
    new = _ceil(ratio * ready)
    return max(new, current) if ratio > 1.0 else min(new, current)


# ---- behaviour: stabilization and rate limits -------------------------------------------------


def stabilize(
    current: int, recommendation: int, recs: Sequence[tuple[float, int]], now: float, up: Rules, down: Rules
) -> int:
    """stabilizeRecommendationWithBehaviors: the most conservative recommendation in each window."""
    up_rec = down_rec = recommendation
    for t, r in recs:
        if t > now - up.window:
            up_rec = min(up_rec, r)
        if t > now - down.window:
            down_rec = max(down_rec, r)
    out = max(current, up_rec)
    return min(out, down_rec)


def _changed_within(period: float, events: Sequence[tuple[float, int]], now: float) -> int:
    return sum(n for t, n in events if t > now - period)


def _period_start(current: int, history: History, period: float, now: float) -> int:
    """Replicas when the policy's period began: now, less what was added, plus what was removed
    within it (periodStartReplicas, used by both limits)."""
    return (
        current
        - _changed_within(period, history.scale_ups, now)
        + _changed_within(period, history.scale_downs, now)
    )


def scale_up_limit(current: int, history: History, rules: Rules, now: float) -> int:
    """calculateScaleUpLimitWithScalingRules."""
    if rules.select == "Disabled":
        return current
    pick = min if rules.select == "Min" else max
    result: int | None = None
    for p in rules.policies:
        start = _period_start(current, history, p.period, now)
        proposed = start + p.value if p.kind == "Pods" else math.ceil(start * (1 + p.value / 100))
        result = proposed if result is None else pick(result, proposed)
    return current if result is None else result


def scale_down_limit(current: int, history: History, rules: Rules, now: float) -> int:
    """calculateScaleDownLimitWithBehaviors."""
    if rules.select == "Disabled":
        return current
    pick = max if rules.select == "Min" else min
    result: int | None = None
    for p in rules.policies:
        start = _period_start(current, history, p.period, now)
        proposed = start - p.value if p.kind == "Pods" else int(start * (1 - p.value / 100))
        result = proposed if result is None else pick(result, proposed)
    return current if result is None else result


def rate_limit(
    current: int, desired: int, lo: int, hi: int, history: History, cfg: Config, now: float
) -> tuple[int, str]:
    """convertDesiredReplicasWithBehaviorRate: (replicas, the limit that bit or '')."""
    if desired > current:
        limit = max(scale_up_limit(current, history, cfg.up, now), current)
        allowed, why = (limit, "ScaleUpLimit") if hi > limit else (hi, "TooManyReplicas")
        if desired > allowed:
            return allowed, why
    elif desired < current:
        limit = min(scale_down_limit(current, history, cfg.down, now), current)
        allowed, why = (limit, "ScaleDownLimit") if lo < limit else (lo, "TooFewReplicas")
        if desired < allowed:
            return allowed, why
    return desired, ""


def _prune(history: History, cfg: Config, now: float) -> History:
    """Forget what no window or period can see any more (bounded status)."""
    keep_recs = max(cfg.up.window, cfg.down.window)
    keep_up = max((p.period for p in cfg.up.policies), default=0.0)
    keep_down = max((p.period for p in cfg.down.policies), default=0.0)
    return History(
        recommendations=tuple((t, r) for t, r in history.recommendations if t > now - keep_recs),
        scale_ups=tuple((t, n) for t, n in history.scale_ups if t > now - keep_up),
        scale_downs=tuple((t, n) for t, n in history.scale_downs if t > now - keep_down),
    )


def remember(recs: Sequence[tuple[float, int]], now: float, rec: int) -> tuple[tuple[float, int], ...]:
    """Add a recommendation, keeping only the newest sample of each value: a window's min and max
    depend only on which values have a sample inside it, so this changes no decision and keeps the
    history (stored in status) as short as the number of distinct recent values."""
    return (*((t, r) for t, r in recs if r != rec), (now, rec))


def record_scale(history: History, now: float, before: int, after: int) -> History:
    """Remember a change of spec.replicas for the rate limits (storeScaleEvent)."""
    if after > before:
        return replace(history, scale_ups=(*history.scale_ups, (now, after - before)))
    if after < before:
        return replace(history, scale_downs=(*history.scale_downs, (now, before - after)))
    return history


# ---- the decision -----------------------------------------------------------------------------


def floor_of(cfg: Config, inputs: Inputs) -> tuple[int, str]:
    """max(minReplicas, schedule, forecast), never above maxReplicas, and where it comes from."""
    floor, source = cfg.min_replicas, "minReplicas"
    if inputs.schedule_floor > floor:
        floor, source = inputs.schedule_floor, f"schedule/{inputs.schedule_name}"
    if inputs.forecast_floor > floor:
        floor, source = inputs.forecast_floor, "forecast"
    return min(floor, cfg.max_replicas), source


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def decide(cfg: Config, inputs: Inputs, history: History = History()) -> Decision:
    """How many serving replicas to have now, and why. ``history`` comes back updated."""
    now, current = inputs.now, inputs.current
    floor, floor_source = floor_of(cfg, inputs)
    ready = [r for r in inputs.replicas if r.ready]
    starting = sum(1 for r in inputs.replicas if not r.ready and r.age < cfg.startup_grace)
    stuck = sum(1 for r in inputs.replicas if not r.ready and r.age >= cfg.startup_grace)
    starting += max(0, current - len(inputs.replicas))  # requested, no pod yet: on the way
    fresh_kv = [r.kv for r in ready if r.kv is not None and math.isfinite(r.kv)]
    fresh_wait = [r.waiting for r in ready if r.waiting is not None and math.isfinite(r.waiting)]
    fresh_run = [r.running for r in ready if r.running is not None and math.isfinite(r.running)]
    missing = len(ready) - len(fresh_kv) if inputs.source_ok else len(ready)
    if not inputs.source_ok:
        fresh_kv, fresh_wait, fresh_run = [], [], []
    metrics_ok = inputs.source_ok and missing == 0
    ttft = (
        inputs.ttft if inputs.source_ok and inputs.ttft is not None and math.isfinite(inputs.ttft) else None
    )
    if ttft is not None and ttft < 0:
        ttft = None
    # An SLO without a fresh TTFT (and not merely idle) forbids a scale-down, as a missing KV sample does.
    ttft_missing = cfg.ttft_slo is not None and ttft is None and not (inputs.source_ok and inputs.ttft_idle)
    if cfg.ttft_slo is None:
        ttft = None

    kv_load = sum(fresh_kv) / cfg.target_kv if fresh_kv else None
    headroom = staffed(kv_load, cfg.burst_headroom) - kv_load if kv_load is not None else 0.0

    beta = cfg.burst_headroom if cfg.demand_headroom is None else cfg.demand_headroom
    demand = (
        demand_replicas(inputs.demand, cfg.target_kv, beta, cfg.max_replicas)
        if inputs.demand is not None
        else None
    )

    def done(
        desired: int,
        reason: str,
        message: str,
        proposal: int,
        hist: History,
        limited: str = "",
        signal: str = "",
    ) -> Decision:
        return Decision(
            desired=desired, reason=reason, message=message, proposal=proposal, floor=floor,
            floor_source=floor_source, metrics_ok=metrics_ok, kv=_mean(fresh_kv), waiting=_mean(fresh_wait),
            running=_mean(fresh_run), ready=len(ready), starting=starting, stuck=stuck, missing=missing,
            current=current, promote=min(max(0, desired - current), inputs.standby_ready), limited=limited,
            history=record_scale(_prune(hist, cfg, now), now, current, desired), ttft=ttft,
            ttft_missing=ttft_missing, kv_load=kv_load, headroom=headroom, signal=signal, demand=demand,
        )  # fmt: skip

    # reconcileAutoscaler's guards, with scale from zero on held requests added.
    if current == 0:
        if inputs.held_requests > 0:
            # the routers' demand may already say how many one replica will not serve
            asked = demand.replicas if demand is not None else 0
            want = min(max(1, floor, asked), cfg.max_replicas)
            msg = f"{inputs.held_requests} request(s) held at zero replicas"
            if demand is not None:
                msg += f"; {demand.explanation}"
            return done(want, "ScaleFromZero", msg, want, history, signal="held requests")
        if floor > 0:
            return done(
                floor, "BelowFloor", f"0 replicas is below the floor {floor} ({floor_source})", floor, history
            )
        return done(0, "ScaledToZero", "no replicas and no held requests", 0, history)
    if current > cfg.max_replicas:
        return done(
            cfg.max_replicas, "AboveMax", f"{current} replicas is above maxReplicas", current, history
        )
    if current < floor:
        return done(
            floor,
            "BelowFloor",
            f"{current} replicas is below the floor {floor} ({floor_source})",
            floor,
            history,
        )

    proposals: list[tuple[int, str]] = []
    if fresh_kv:
        n = metric_replicas(
            fresh_kv, cfg.target_kv, current, starting, missing, cfg.tolerance, cfg.burst_headroom
        )
        proposals.append((n, "kv-cache"))
    if fresh_wait:
        n = metric_replicas(fresh_wait, cfg.target_waiting, current, starting, missing, cfg.tolerance)
        proposals.append((n, "waiting requests"))
    if ttft is not None and cfg.ttft_slo is not None and ready:
        n = ttft_replicas(ttft, cfg.ttft_slo, current, len(ready), cfg.tolerance)
        proposals.append((n, f"TTFT p{cfg.ttft_quantile * 100:g}"))
    if demand is not None:
        # An absolute count (replicas starting are in ``current`` already: capacity on the way),
        # with the HPA's tolerance band on the staffed load over the current count.
        ratio = (demand.load + demand.headroom) / current
        proposals.append((current if _within(ratio, cfg.tolerance) else demand.replicas, ROUTER_ARRIVALS))
    if not proposals:
        why = "metrics source unavailable" if not inputs.source_ok else "no ready replica has fresh metrics"
        return done(current, "MetricsUnavailable", f"{why}: holding {current} replicas", current, history)
    proposal, metric = max(proposals)
    engines_say = any(m != ROUTER_ARRIVALS for _, m in proposals)
    if not metrics_ok or ttft_missing or not engines_say:
        # never scale down on partial data, nor on the router's word alone (no engine metric)
        proposal = max(proposal, current)
    recommendation = min(max(proposal, floor), cfg.max_replicas)
    # No history (a new deployment, or status lost): as if the current count was just recommended,
    # so a fresh loop waits a full window in either direction instead of acting on one sample.
    recs = history.recommendations or ((now, current),)
    stabilized = stabilize(current, recommendation, recs, now, cfg.up, cfg.down)
    hist = replace(history, recommendations=remember(recs, now, recommendation))
    desired, limited = rate_limit(current, stabilized, floor, cfg.max_replicas, hist, cfg, now)
    if desired > current:
        reason, msg = "ScaleUp", f"{metric} above target"
    elif desired < current:
        reason, msg = "ScaleDown", "all metrics below target"
    elif stabilized != recommendation:
        reason = "ScaleUpStabilized" if recommendation > current else "ScaleDownStabilized"
        msg = f"recommendation {recommendation} held back by the stabilization window"
    elif recommendation != current:
        reason, msg = (
            limited or "Limited",
            f"recommendation {recommendation} limited by {limited or 'policy'}",
        )
    elif proposal < recommendation:
        reason, msg = "AtFloor", f"metrics ask for {proposal}; the floor is {floor} ({floor_source})"
    elif proposal > recommendation:
        reason, msg = "AtMax", f"metrics ask for {proposal}; maxReplicas is {cfg.max_replicas}"
    else:
        reason, msg = "WithinTolerance", "metrics within tolerance of their targets"
    if not metrics_ok:
        msg += f"; {missing} ready replica(s) without fresh metrics: no scale-down"
    if ttft_missing:
        msg += "; no fresh TTFT for the SLO: no scale-down"
    if starting and desired >= current:
        msg += f"; {starting} replica(s) starting count as capacity on the way"
    if cfg.burst_headroom > 0 and kv_load is not None:
        msg += (
            f"; kv-cache load {kv_load:.2f} replicas + burst headroom {headroom:.2f} "
            f"(beta {cfg.burst_headroom:g} x sqrt(load))"
        )
    if demand is not None:
        msg += f"; {demand.explanation}"
    return done(desired, reason, msg, proposal, hist, limited, signal=metric)
