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
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from toposerve.planner.replicas import distribute

PoolOrder = Literal["tier", "weight"]
FASTEST_FIRST = frozenset({"latency-critical", "long-context"})
GIB_PER_GB = 1.073741824  # GiB of weights over GB/s of bandwidth -> seconds


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

    @property
    def cost_per_token(self) -> float:
        """Relative cost per token at an equal batch size (USD/h x ms per step)."""
        return self.cost_per_hour * self.step_ms


def decode_step_ms(weights_gib_per_gpu: float, pipeline_parallel: int, bandwidth_gbps: float) -> float:
    """Memory-bound decode step estimate: every stage streams its GPU's weights once, in turn."""
    if bandwidth_gbps <= 0:
        return float("inf")
    return weights_gib_per_gpu * GIB_PER_GB * max(1, pipeline_parallel) / bandwidth_gbps * 1000.0


def rank(tier: str, pools: Sequence[PoolView]) -> list[str]:
    """The names of the pools that fit, in the order they grow (they shrink in reverse)."""
    indexed = [(i, p) for i, p in enumerate(pools) if p.fits]
    if tier in FASTEST_FIRST:
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
        for name in reversed(order):
            take = min(out[name], excess)
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
    """Replicas per pool for ``total`` by ``how`` (tier order or weight)."""
    if how == "weight":
        return Split(weight_split(total, pools), {p.name: None for p in pools}, how)
    order = rank(tier, pools)
    place: dict[str, int | None] = {p.name: None for p in pools}
    place.update({name: i + 1 for i, name in enumerate(order)})
    return Split(fill(total, order, pools), place, how)


def changes(before: Mapping[str, int], after: Mapping[str, int]) -> list[tuple[str, int, int]]:
    """(pool, before, after) for every pool whose count changed, in ``after``'s order."""
    return [(n, before.get(n, 0), a) for n, a in after.items() if before.get(n, 0) != a]


def room(types: Sequence[tuple[int, int]]) -> int:
    """Replicas a pool can hold now over its GPU types, each given as (replicas whose pods are bound
    to nodes, more that free capacity places): pending pods hold nothing yet."""
    return sum(max(0, bound) + max(0, free) for bound, free in types)
