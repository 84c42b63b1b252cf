"""Which pool grows and which shrinks when spec.replicas changes (pure).

A deployment with several pools (say H100 bf16 beside A100-40GB int4) has one replica count, the
scale subresource's. ``poolOrder: weight`` splits it by ``pools[].weight`` as before;
``poolOrder: tier`` ranks the pools for the placement tier and fills them in that order:

* latency-critical and long-context: the fastest pool first, by the estimated decode step time
  (one step streams each GPU's share of the weights once, and pipeline stages run one after the
  other: ``weights per GPU x pipeline stages / memory bandwidth``), ties to the newer generation;
* throughput and batch: the lowest cost per token first, by ``USD/h per replica x step time``
  (cost per token at an equal batch size), ties to the faster pool.

Remaining ties go to the pool listed first in the spec. Filling is incremental from what the pools
run now: growth adds to the first pools in the order that have room (free placeable capacity and
``maxReplicas``) and never removes from any pool; shrinking removes from the end of the order. A
change of order (prices, poolOrder) therefore moves nothing until the next scale. Replicas no pool
has inventory room for go to the first pools in the order up to their ``maxReplicas`` (they wait
for capacity there, where the GPU fallback and node provisioning act); ``maxReplicas`` is never
exceeded, so the total falls short of the request only when every pool is at its maximum.

``poolOrder: cost`` (issue 25, part 3: the cheapest GPU type that meets the SLO) ranks by what the
next replica of each pool costs per token, on figures the controller observes where it can:

* the pools whose observed TTFT quantile (per pool, over the autoscaler's window) is within
  ``spec.autoscaling.ttftSLO`` come first, or all pools when no SLO is set or a pool has no reading
  (no evidence against it); among them the lowest **marginal cost per million output tokens**
  first: USD/h of one more replica (the spot price where the pool runs spot, is above its
  on-demand baseline and free spot capacity holds another replica; the on-demand price otherwise)
  over that replica's output tokens/s at a busy batch, observed where the pool's engines were
  busy often enough (``throughput_source`` observed), else estimated from the decode step
  (``REFERENCE_BATCH`` sequences per step, ``estimated``). Ties go to the faster pool, then spec order.
* pools over the SLO come after them, fastest first (more of a pool that misses is the worst buy).

Shrinking removes from the end of that order (the most expensive per token first), and keeps each
pool's on-demand baseline while the total allows: the excess is first taken from what pools run
above their baseline, and only a total below the sum of baselines takes from the baselines.

Flapping: observed throughput moves with the traffic mix, so the raw figure of two pools priced
within a few percent swaps their order from one reconcile to the next. Since filling is
incremental a swap moves nothing by itself, but the next scale-up and scale-down would then pick
opposite ends, adding to one pool and removing from the other: churn with start-ups of minutes.
So each pool ranks by a *held* figure (kept in status.pools[].costRank): a new figure replaces the
held one only when it differs by more than ``HYSTERESIS`` (10 %), a dead band that is wider than
the noise of a 5-minute rate on a busy pool and narrower than any price gap worth acting on (an
L40S and an H100 differ by 2x, spot and on-demand by 2-3x). A switch between observed and
estimated is always taken (the source changed, not the noise). The SLO verdict has the same band:
a pool found over the SLO meets it again once its TTFT is 10 % under it (or it has no reading). A long window alone was rejected:
it makes the figure slow to react to a real change (a spot price move, a new engine version) and
still flips on the day two figures cross.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from toposerve.planner.replicas import distribute

PoolOrder = Literal["tier", "weight", "cost"]
Source = Literal["observed", "estimated"]
FASTEST_FIRST = frozenset({"latency-critical", "long-context"})
GIB_PER_GB = 1.073741824  # GiB of weights over GB/s of bandwidth -> seconds
HYSTERESIS = 0.10  # a held cost figure is replaced only by one that differs by more than this share
# Sequences per decode step the estimate assumes: a busy batch of a memory-bound engine (the step
# costs about the same for 1 or 32 sequences because it streams the weights either way).
REFERENCE_BATCH = 32


@dataclass(frozen=True)
class PoolView:
    """What ordering and filling need to know about one pool."""

    name: str
    fits: bool  # some GPU type holds a replica; a pool that does not fit gets nothing
    step_ms: float = 0.0  # estimated decode step time of one replica (lower is faster)
    generation: int = 0  # of its GPU type (higher is newer)
    cost_per_hour: float = 0.0  # USD per hour of one replica
    weight: int = 1
    max_replicas: int | None = None  # pools[].maxReplicas: hard bound
    room: int | None = None  # replicas the inventory can hold now (placed + free); None: unbounded
    current: int = 0  # replicas its workloads run now
    # poolOrder cost (cost_per_hour is then the *marginal* replica's price: spot or on-demand)
    tokens_per_second: float = 0.0  # one replica's output tokens/s at a busy batch; 0: estimate it
    throughput_source: Source = "estimated"  # where tokens_per_second came from
    ttft_seconds: float | None = None  # the pool's observed TTFT quantile; None: no reading
    slo_seconds: float | None = None  # spec.autoscaling.ttftSLO.seconds; None: no SLO
    held_cost: float | None = None  # USD per million tokens ranked by last time (status), for hysteresis
    held_source: Source | None = None  # the source of that held figure
    held_meets_slo: bool | None = None  # the SLO verdict last time (status), for its dead band
    on_demand_baseline: int = 0  # replicas shrinking keeps while the total allows

    @property
    def cost_per_token(self) -> float:
        """Relative cost per token at an equal batch size (USD/h x ms per step)."""
        return self.cost_per_hour * self.step_ms

    @property
    def meets_slo(self) -> bool:
        """Within the TTFT SLO, or no SLO, or no reading (no evidence against the pool). A pool
        found over it last time meets it again only ``HYSTERESIS`` below it (the same dead band)."""
        if self.slo_seconds is None or self.ttft_seconds is None:
            return True
        bound = self.slo_seconds * (1 - HYSTERESIS) if self.held_meets_slo is False else self.slo_seconds
        return self.ttft_seconds <= bound

    @property
    def replica_tokens_per_second(self) -> float:
        """Observed when given, else ``REFERENCE_BATCH`` tokens per estimated decode step."""
        if self.tokens_per_second > 0:
            return self.tokens_per_second
        return REFERENCE_BATCH * 1000.0 / self.step_ms if self.step_ms > 0 else 0.0

    @property
    def source(self) -> Source:
        return self.throughput_source if self.tokens_per_second > 0 else "estimated"

    @property
    def raw_cost_per_million(self) -> float | None:
        """USD per million output tokens of one more replica; None when its throughput is unknown."""
        tps = self.replica_tokens_per_second
        if tps <= 0:
            return None
        return self.cost_per_hour / (tps * 3600.0) * 1_000_000

    @property
    def cost_per_million(self) -> float | None:
        """The figure the cost order ranks by: the held one unless the new one left the dead band
        (``HYSTERESIS``) or the source changed (see the module doc)."""
        new = self.raw_cost_per_million
        held = self.held_cost
        if new is None or held is None or self.held_source not in (None, self.source):
            return new
        return held if abs(new - held) <= HYSTERESIS * held else new


def decode_step_ms(weights_gib_per_gpu: float, pipeline_parallel: int, bandwidth_gbps: float) -> float:
    """Memory-bound decode step estimate: every stage streams its GPU's weights once, in turn."""
    if bandwidth_gbps <= 0:
        return float("inf")
    return weights_gib_per_gpu * GIB_PER_GB * max(1, pipeline_parallel) / bandwidth_gbps * 1000.0


def rank(tier: str, pools: Sequence[PoolView], how: PoolOrder = "tier") -> list[str]:
    """The names of the pools that fit, in the order they grow (they shrink in reverse).

    ``how`` tier: by the tier (fastest or cheapest per token at an equal batch); cost: meeting the
    SLO first, by ``cost_per_million`` (held figure), then those over the SLO, fastest first.
    """
    indexed = [(i, p) for i, p in enumerate(pools) if p.fits]
    if how == "cost":
        inf = float("inf")

        def key(ip: tuple[int, PoolView]) -> tuple[bool, float, float, int, int]:
            i, p = ip
            c = p.cost_per_million
            figure = (inf if c is None else c) if p.meets_slo else 0.0  # over the SLO: speed only
            return (not p.meets_slo, figure, p.step_ms, -p.generation, i)

        indexed.sort(key=key)
    elif tier in FASTEST_FIRST:
        indexed.sort(key=lambda ip: (ip[1].step_ms, -ip[1].generation, ip[0]))
    else:
        indexed.sort(key=lambda ip: (ip[1].cost_per_token, ip[1].step_ms, -ip[1].generation, ip[0]))
    return [p.name for _, p in indexed]


def fill(total: int, order: Sequence[str], pools: Sequence[PoolView]) -> dict[str, int]:
    """Replicas per pool for ``total``, starting from what each pool runs now (see the module doc).

    Every pool of ``pools`` gets an entry; pools missing from ``order`` (they do not fit) get 0.
    """
    by_name = {p.name: p for p in pools}
    out = {p.name: 0 for p in pools}
    for name in order:
        p = by_name[name]
        hard = p.max_replicas
        out[name] = max(0, p.current if hard is None else min(p.current, hard))
    have = sum(out.values())
    if have > total:
        excess = have - total
        for keep_baseline in (True, False):  # above the on-demand baselines first
            for name in reversed(order):
                floor = min(out[name], max(0, by_name[name].on_demand_baseline)) if keep_baseline else 0
                take = min(out[name] - floor, excess)
                out[name] -= take
                excess -= take
    elif have < total:
        need = total - have
        for soft in (True, False):  # inventory room first, then only maxReplicas
            for name in order:
                if need == 0:
                    break
                p = by_name[name]
                limits = [x for x in (p.max_replicas, p.room if soft else None) if x is not None]
                allowed = need if not limits else max(0, min(limits) - out[name])
                add = min(allowed, need)
                out[name] += add
                need -= add
    return out


def weight_split(total: int, pools: Sequence[PoolView]) -> dict[str, int]:
    """Split ``total`` by weight (largest remainder, ties to the earlier pool) among the pools
    that fit; a pool at its ``maxReplicas`` keeps that and the rest is split again among the others."""
    out = {p.name: 0 for p in pools}
    free = [p for p in pools if p.fits and p.weight > 0]
    left = total
    while free and left > 0:
        shares = distribute(left, [(p.name, p.weight) for p in free])
        over = [p for p in free if p.max_replicas is not None and shares[p.name] > p.max_replicas]
        if not over:
            for p in free:
                out[p.name] += shares[p.name]
            break
        for p in over:
            out[p.name] = p.max_replicas or 0
            left -= out[p.name]
        free = [p for p in free if p not in over]
    return out


@dataclass(frozen=True)
class Split:
    """Replicas per pool, and each pool's place in the growth order (1-based; None: no place)."""

    replicas: Mapping[str, int]
    place: Mapping[str, int | None]
    order: PoolOrder


def split(total: int, how: PoolOrder, tier: str, pools: Sequence[PoolView]) -> Split:
    """Replicas per pool for ``total`` by ``how`` (tier order, cost order or weight)."""
    if how == "weight":
        return Split(weight_split(total, pools), {p.name: None for p in pools}, how)
    order = rank(tier, pools, how)
    place: dict[str, int | None] = {p.name: None for p in pools}
    place.update({name: i + 1 for i, name in enumerate(order)})
    return Split(fill(total, order, pools), place, how)


@dataclass(frozen=True)
class CostFigure:
    """What the cost order ranked one pool by (status.pools[].costRank)."""

    cost_per_million_tokens: float | None  # USD per million output tokens of one more replica (held)
    source: Source
    meets_slo: bool
    marginal_cost_per_hour: float
    tokens_per_second: float  # one replica's output tokens/s the (held) figure stands for
    ttft_seconds: float | None


def cost_figures(pools: Sequence[PoolView]) -> dict[str, CostFigure]:
    """The figures ``rank(..., how="cost")`` used, per pool that fits (for status and the Event)."""
    out = {}
    for p in pools:
        if not p.fits:
            continue
        c = p.cost_per_million
        # The throughput the (held) figure stands for, so status agrees with itself and a figure
        # held in the dead band writes no new throughput either.
        tps = p.cost_per_hour / (c * 3600.0) * 1_000_000 if c else p.replica_tokens_per_second
        out[p.name] = CostFigure(c, p.source, p.meets_slo, p.cost_per_hour, tps, p.ttft_seconds)
    return out


def changes(before: Mapping[str, int], after: Mapping[str, int]) -> list[tuple[str, int, int]]:
    """(pool, before, after) for every pool whose count changed, in ``after``'s order."""
    return [(n, before.get(n, 0), a) for n, a in after.items() if before.get(n, 0) != a]


def room(types: Sequence[tuple[int, int]]) -> int:
    """Replicas a pool can hold now over its GPU types, each given as (replicas whose pods are bound
    to nodes, more that free capacity places): pending pods hold nothing yet."""
    return sum(max(0, bound) + max(0, free) for bound, free in types)
