"""poolOrder cost: the per-pool figures the cost order ranks by, and the split (pure).

``planner/poolorder.py`` ranks plain ``PoolView`` values; this module fills them for one
LLMDeployment from its plan and what Prometheus observed per pool, and spreads spec.replicas the
way ``plan.assign_replicas`` does for tier order:

* **Marginal price.** The next replica of a spot pool runs on spot (``cost_per_hour_per_replica``)
  once the pool holds its on-demand baseline and while free spot capacity can place it (or nodes
  are provisioned on demand); otherwise it is an on-demand replica
  (``on_demand_cost_per_hour_per_replica``). A pool without spot is priced on demand.
* **Throughput of one replica.** Observed where the pool's engines were *busy*: the mean output
  tokens/s of a pod over the minutes of the last ``BUSY_WINDOW`` in which requests waited in its
  queue (vLLM's scheduler then runs its full batch: the pod's capacity, not the offered load), once
  at least ``MIN_BUSY_MINUTES`` such pod-minutes were seen. Otherwise the planner's estimate
  (``poolorder.REFERENCE_BATCH`` sequences per estimated decode step). Status says which.
* **SLO.** The pool's own TTFT quantile (``spec.autoscaling.ttftSLO.quantile``) over the
  autoscaler's metrics window, from the engines' histogram summed per pool; a pool with no
  requests in the window has no reading and is not held against the SLO.

The series carry the pool as ``toposerve_io_pool``: the pods' ``toposerve.io/pool`` label mapped by
the usual kubernetes_sd ``labelmap`` relabelling, and copied by the PodMonitor's ``podTargetLabels``
(render/monitoring.py ``TARGET_LABELS``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from toposerve.api.gpus import GPUCatalog
from toposerve.api.spec import LLMDeploymentSpec
from toposerve.planner import poolorder
from toposerve.planner.plan import DeploymentPlan, PoolPlan, _pools, assign_replicas

POOL_LABEL = "toposerve_io_pool"
TTFT = "vllm:time_to_first_token_seconds"
GENERATED = "vllm:generation_tokens_total"
WAITING = "vllm:num_requests_waiting"
BUSY_WINDOW = "30m"  # how far back busy minutes are looked for
BUSY_STEP = "1m"  # one observation per pod per minute
MIN_BUSY_MINUTES = 10  # busy pod-minutes before the observed figure replaces the estimate


def ttft_query(sel: str, quantile: float, window_s: int) -> str:
    """Each pool's TTFT quantile over the window (every request once, whichever pod served it)."""
    return (
        f"histogram_quantile({quantile:g}, sum by (le, {POOL_LABEL}) "
        f"(rate({TTFT}_bucket{{{sel}}}[{window_s}s])))"
    )


def _busy_rates(sel: str) -> str:
    """Per pod and minute: output tokens/s, kept only where the pod had requests waiting."""
    return (
        f"(sum by (pod, {POOL_LABEL}) (rate({GENERATED}{{{sel}}}[{BUSY_STEP}])) "
        f"and on (pod) (sum by (pod) ({WAITING}{{{sel}}}) > 0))"
    )


def busy_sum_query(sel: str) -> str:
    """Per pool: the sum over busy pod-minutes of the pod's output tokens/s."""
    return f"sum by ({POOL_LABEL}) (sum_over_time({_busy_rates(sel)}[{BUSY_WINDOW}:{BUSY_STEP}]))"


def busy_count_query(sel: str) -> str:
    """Per pool: how many busy pod-minutes the window holds."""
    return f"sum by ({POOL_LABEL}) (count_over_time({_busy_rates(sel)}[{BUSY_WINDOW}:{BUSY_STEP}]))"


def by_pool(result: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """An instant-vector answer (Prometheus HTTP API) as pool -> value; series without the pool
    label, NaN (no request in the window) and infinities are left out."""
    out: dict[str, float] = {}
    for s in result:
        pool = (s.get("metric") or {}).get(POOL_LABEL)
        value = s.get("value") or []
        if not pool or len(value) != 2:
            continue
        try:
            v = float(value[1])
        except (TypeError, ValueError):
            continue
        if v == v and v not in (float("inf"), float("-inf")):
            out[str(pool)] = v
    return out


@dataclass(frozen=True)
class PoolSignals:
    """What Prometheus said per pool (absent pools: no reading)."""

    ttft_seconds: Mapping[str, float] = field(default_factory=dict)
    busy_tokens_per_second_sum: Mapping[str, float] = field(default_factory=dict)
    busy_minutes: Mapping[str, float] = field(default_factory=dict)

    def tokens_per_second(self, pool: str) -> float | None:
        """One replica's observed output tokens/s when busy, once there are enough observations."""
        n = self.busy_minutes.get(pool, 0.0)
        total = self.busy_tokens_per_second_sum.get(pool, 0.0)
        if n < MIN_BUSY_MINUTES or total <= 0:
            return None
        return total / n


@dataclass(frozen=True)
class Held:
    """What a pool was ranked by last time (status.pools[].costRank)."""

    cost: float | None
    source: str | None
    meets_slo: bool | None


def held_figures(previous_pools: Iterable[Mapping[str, Any]]) -> dict[str, Held]:
    """The figure and SLO verdict each pool ranked by last time, from status.pools[].costRank."""
    out: dict[str, Held] = {}
    for p in previous_pools:
        rank = p.get("costRank") or {}
        if not rank or not p.get("name"):
            continue
        c, src, meets = rank.get("costPerMillionTokens"), rank.get("source"), rank.get("meetsSLO")
        out[str(p["name"])] = Held(
            float(c) if isinstance(c, int | float) else None,
            str(src) if src in ("observed", "estimated") else None,
            meets if isinstance(meets, bool) else None,
        )
    return out


def marginal_price(p: PoolPlan, current: int, spot_free: bool) -> float:
    """USD/h of one more replica of the pool (see the module doc)."""
    on_demand = p.on_demand_cost_per_hour_per_replica or p.cost_per_hour_per_replica
    if p.spot and current >= p.on_demand_baseline and spot_free:
        return p.cost_per_hour_per_replica
    return on_demand


def views(
    plan: DeploymentPlan,
    spec: LLMDeploymentSpec,
    catalog: GPUCatalog,
    current: Mapping[str, int],
    room: Mapping[str, int | None],
    signals: PoolSignals | None,
    held: Mapping[str, Held],
    spot_free: Mapping[str, bool],
) -> list[poolorder.PoolView]:
    """The cost order's view of each pool; ``signals`` None (no Prometheus, or it failed): every
    figure is the estimate and no pool is held against the SLO."""
    specs = {s.name: s for s in _pools(spec)}
    slo = spec.autoscaling.ttft_slo
    out = []
    for p in plan.pools:
        tps = signals.tokens_per_second(p.name) if signals is not None else None
        h = held.get(p.name)
        out.append(
            poolorder.PoolView(
                name=p.name,
                fits=p.fits,
                step_ms=p.decode_step_ms,
                generation=catalog.get(p.gpu_type).generation if p.gpu_type and p.gpu_type in catalog else 0,
                cost_per_hour=marginal_price(p, current.get(p.name, 0), spot_free.get(p.name, True)),
                weight=specs[p.name].weight,
                max_replicas=specs[p.name].max_replicas,
                room=room.get(p.name),
                current=current.get(p.name, 0),
                tokens_per_second=tps or 0.0,
                throughput_source="observed" if tps else "estimated",
                ttft_seconds=signals.ttft_seconds.get(p.name) if signals is not None else None,
                slo_seconds=slo.seconds if slo is not None else None,
                held_cost=h.cost if h and h.source else None,
                held_source="observed"
                if h and h.source == "observed"
                else ("estimated" if h and h.source else None),
                held_meets_slo=h.meets_slo if h else None,
                on_demand_baseline=p.on_demand_baseline if p.spot else 0,
            )
        )
    return out


@dataclass(frozen=True)
class CostSplit:
    plan: DeploymentPlan
    figures: Mapping[str, poolorder.CostFigure]
    order: list[str]


def assign_by_cost(
    plan: DeploymentPlan,
    spec: LLMDeploymentSpec,
    catalog: GPUCatalog,
    current: Mapping[str, int] | None = None,
    room: Mapping[str, int | None] | None = None,
    signals: PoolSignals | None = None,
    held: Mapping[str, Held] | None = None,
    spot_free: Mapping[str, bool] | None = None,
) -> CostSplit:
    """``plan.assign_replicas`` for poolOrder cost: spec.replicas (plus warm standby) over the pools
    in cost order, incremental from ``current``; the serving share fills the same order within each
    pool's total."""
    current, room = current or {}, room or {}
    vs = views(plan, spec, catalog, current, room, signals, held or {}, spot_free or {})
    split = assign_replicas(plan, spec, catalog, current, room, views=vs)
    return CostSplit(split, poolorder.cost_figures(vs), poolorder.rank(spec.placement.tier, vs, "cost"))
