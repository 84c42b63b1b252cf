"""poolOrder cost (planner/poolorder.py): the cheapest per token meeting the SLO grows first, pools
over the SLO last (fastest first), shrink in reverse keeping the on-demand baseline, and the held
figure's dead band (HYSTERESIS) that keeps two close pools from swapping on noise."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from toposerve.planner.poolorder import (
    HYSTERESIS,
    REFERENCE_BATCH,
    PoolView,
    cost_figures,
    fill,
    rank,
    split,
)

TIERS = st.sampled_from(["latency-critical", "long-context", "throughput", "batch"])


def pool(name: str, usd_h: float, tps: float = 0.0, step_ms: float = 10.0, **kw: object) -> PoolView:
    return PoolView(
        name=name,
        fits=True,
        step_ms=step_ms,
        cost_per_hour=usd_h,
        tokens_per_second=tps,
        throughput_source="observed" if tps else "estimated",
        **kw,  # type: ignore[arg-type]
    )


def test_cheapest_per_token_meeting_the_slo_grows_first_whatever_the_tier() -> None:
    # H100 on demand: $8/h for 4000 tok/s = $0.556/M; L40S spot: $1/h for 1000 tok/s = $0.278/M
    h100 = pool("h100", 8.0, 4000, step_ms=8)
    l40s = pool("l40s", 1.0, 1000, step_ms=30)
    for tier in ("latency-critical", "throughput"):
        assert rank(tier, [h100, l40s], "cost") == ["l40s", "h100"]
        assert rank(tier, [l40s, h100], "cost") == ["l40s", "h100"]
    f = cost_figures([h100, l40s])
    assert f["l40s"].cost_per_million_tokens == 1.0 / (1000 * 3600) * 1e6
    assert f["l40s"].source == "observed" and f["l40s"].meets_slo


def test_a_pool_over_the_slo_goes_last_and_those_over_it_fastest_first() -> None:
    slo = 0.5
    cheap_slow = pool("l40s", 1.0, 1000, step_ms=30, ttft_seconds=0.9, slo_seconds=slo)
    a100 = pool("a100", 4.0, 2000, step_ms=15, ttft_seconds=0.7, slo_seconds=slo)
    h100 = pool("h100", 8.0, 4000, step_ms=8, ttft_seconds=0.3, slo_seconds=slo)
    assert rank("throughput", [cheap_slow, a100, h100], "cost") == ["h100", "a100", "l40s"]
    assert not cost_figures([cheap_slow])["l40s"].meets_slo
    # No reading or no SLO is no evidence against a pool: it ranks by cost.
    unread = replace(cheap_slow, ttft_seconds=None)
    no_slo = replace(cheap_slow, slo_seconds=None)
    assert rank("throughput", [unread, a100, h100], "cost")[0] == "l40s"
    assert rank("throughput", [no_slo, a100, h100], "cost")[0] == "l40s"


def test_without_observations_the_estimate_ranks_and_says_so() -> None:
    a = pool("a", 4.0, step_ms=10)  # estimated: 32 seq x 100 steps/s = 3200 tok/s
    b = pool("b", 2.0, step_ms=40)  # 800 tok/s at half the price: twice the cost per token
    assert rank("batch", [b, a], "cost") == ["a", "b"]
    f = cost_figures([a])["a"]
    assert f.source == "estimated" and f.tokens_per_second == pytest.approx(REFERENCE_BATCH * 100)


def test_spot_price_of_the_marginal_replica_decides() -> None:
    # The controller prices the marginal replica (spot when spot capacity is free); same throughput.
    on_demand = pool("h100-od", 8.0, 4000)
    spot = pool("h100-spot", 3.0, 4000)
    assert rank("throughput", [on_demand, spot], "cost") == ["h100-spot", "h100-od"]


def test_grow_fills_cheapest_first_and_shrink_removes_the_most_expensive_first() -> None:
    cheap = pool("cheap", 1.0, 1000, current=2, max_replicas=3)
    dear = pool("dear", 8.0, 4000, current=1)
    order = rank("throughput", [dear, cheap], "cost")
    assert fill(6, order, [dear, cheap]) == {"dear": 3, "cheap": 3}  # cheap to its max, then dear
    assert fill(2, order, [dear, cheap]) == {"dear": 0, "cheap": 2}  # dear leaves first


def test_shrink_keeps_the_on_demand_baseline_while_the_total_allows() -> None:
    cheap = pool("cheap", 1.0, 1000, current=3)
    dear = pool("dear", 8.0, 4000, current=3, on_demand_baseline=2)
    order = rank("throughput", [dear, cheap], "cost")
    assert order == ["cheap", "dear"]
    assert fill(3, order, [dear, cheap]) == {"dear": 2, "cheap": 1}  # not dear 0, cheap 3
    assert fill(1, order, [dear, cheap]) == {"dear": 1, "cheap": 0}  # below the baselines' sum


def test_small_changes_do_not_reorder_large_ones_do() -> None:
    a = pool("a", 1.0, 1000)  # 0.2778 $/M
    b = pool("b", 1.05, 1000)  # 0.2917 $/M: 5 % dearer
    held = {n: f.cost_per_million_tokens for n, f in cost_figures([a, b]).items()}
    assert rank("throughput", [a, b], "cost") == ["a", "b"]
    # Noise: a's throughput drops 8 %, b's rises 4 %; raw figures cross, held ones do not.
    a2 = replace(a, tokens_per_second=920, held_cost=held["a"], held_source="observed")
    b2 = replace(b, tokens_per_second=1040, held_cost=held["b"], held_source="observed")
    assert a2.raw_cost_per_million is not None and b2.raw_cost_per_million is not None
    assert a2.raw_cost_per_million > b2.raw_cost_per_million
    assert rank("throughput", [a2, b2], "cost") == ["a", "b"]
    # A real change (a's throughput halves) leaves the dead band and reorders.
    a3 = replace(a2, tokens_per_second=500)
    assert rank("throughput", [a3, b2], "cost") == ["b", "a"]
    # A switch of source is taken even inside the band.
    a4 = replace(a, tokens_per_second=0, step_ms=1e9, held_cost=held["a"], held_source="observed")
    assert a4.cost_per_million != held["a"]


def test_split_cost_places_every_pool_and_weight_split_unchanged() -> None:
    cheap = pool("cheap", 1.0, 1000)
    dear = pool("dear", 8.0, 4000)
    s = split(3, "cost", "latency-critical", [dear, cheap])
    assert s.place == {"dear": 2, "cheap": 1} and s.replicas == {"dear": 0, "cheap": 3}


# --- properties -----------------------------------------------------------------------------------


@st.composite
def cost_pools(draw: st.DrawFn, close: bool = False) -> list[PoolView]:
    """Pools that fit or not, with or without observations, an SLO and a reading; ``close``: their
    cost figures within a few percent of each other (where noise would swap them)."""
    n = draw(st.integers(1, 4))
    slo = draw(st.one_of(st.none(), st.floats(0.1, 2.0)))
    out = []
    for i in range(n):
        out.append(
            PoolView(
                name=f"p{i}",
                fits=draw(st.booleans()) if n > 1 else True,
                step_ms=draw(st.floats(1.0, 100.0)),
                generation=draw(st.integers(0, 3)),
                cost_per_hour=draw(st.floats(1.0, 1.08) if close else st.floats(0.1, 40.0)),
                tokens_per_second=1000.0
                if close
                else draw(st.one_of(st.just(0.0), st.floats(10.0, 10000.0))),
                throughput_source="observed",
                ttft_seconds=draw(st.one_of(st.none(), st.floats(0.01, 5.0))),
                slo_seconds=slo,
                max_replicas=draw(st.one_of(st.none(), st.integers(0, 8))),
                room=draw(st.one_of(st.none(), st.integers(0, 8))),
                current=draw(st.integers(0, 6)),
                on_demand_baseline=draw(st.integers(0, 3)),
            )
        )
    return out


@settings(max_examples=300, deadline=None)
@given(cost_pools(), TIERS)
def test_meeting_pools_first_by_cost_then_missing_pools_fastest_first(
    pools: list[PoolView], tier: str
) -> None:
    order = rank(tier, pools, "cost")
    by = {p.name: p for p in pools}
    assert sorted(order) == sorted(p.name for p in pools if p.fits)
    meets = [by[n].meets_slo for n in order]
    assert meets == sorted(meets, reverse=True)  # no missing pool before a meeting one
    inf = float("inf")
    costs = [c if (c := by[n].cost_per_million) is not None else inf for n in order if by[n].meets_slo]
    assert costs == sorted(costs)
    steps = [by[n].step_ms for n in order if not by[n].meets_slo]
    assert steps == sorted(steps)


@settings(max_examples=300, deadline=None)
@given(cost_pools(), st.integers(0, 30), TIERS)
def test_fill_by_cost_keeps_max_grows_in_order_and_shrinks_in_reverse(
    pools: list[PoolView], total: int, tier: str
) -> None:
    order = rank(tier, pools, "cost")
    got = split(total, "cost", tier, pools).replicas
    by = {p.name: p for p in pools}
    for p in pools:
        if p.max_replicas is not None:
            assert got[p.name] <= p.max_replicas
        if not p.fits:
            assert got[p.name] == 0
    start = {
        n: by[n].current if by[n].max_replicas is None else min(by[n].current, by[n].max_replicas)
        for n in order
    }
    have = sum(start.values())
    if total >= have:  # growth never removes, and adds to a later pool only once the earlier are full
        assert all(got[n] >= start[n] for n in order)
        grown = [n for n in order if got[n] > start[n]]
        if grown:
            last = order.index(grown[-1])
            for n in order[:last]:
                p = by[n]
                limits = [x for x in (p.max_replicas,) if x is not None]
                assert not limits or got[n] == min(limits) or got[n] >= (p.room or 0)
    else:  # shrink never adds, keeps baselines while the total allows, and ends at the total
        assert all(got[n] <= start[n] for n in order)
        assert sum(got.values()) == total
        floors = {n: min(start[n], by[n].on_demand_baseline) for n in order}
        if total >= sum(floors.values()):
            assert all(got[n] >= floors[n] for n in order)
            # the most expensive above its floor goes first: a pool keeps more than its floor only
            # while every later pool in the order is at its floor
            for i, n in enumerate(order):
                if got[n] > floors[n] and got[n] < start[n]:
                    assert all(got[m] == floors[m] for m in order[i + 1 :])


@settings(max_examples=300, deadline=None)
@given(cost_pools(close=True), TIERS, st.lists(st.floats(-0.099, 0.099), min_size=4, max_size=4))
def test_changes_inside_the_dead_band_never_reorder(
    pools: list[PoolView], tier: str, noise: list[float]
) -> None:
    assert HYSTERESIS >= 0.1  # the noise above is drawn inside the documented 10 % band
    held = cost_figures(pools)
    moved = []
    for p, e in zip(pools, noise, strict=False):
        f = held.get(p.name)
        if f is None or f.cost_per_million_tokens is None:
            moved.append(p)
            continue
        # throughput moved by noise: the new raw figure is within the band around the held one
        new_tps = p.cost_per_hour / (f.cost_per_million_tokens * (1 + e) * 3600) * 1e6
        moved.append(
            replace(p, tokens_per_second=new_tps, throughput_source=f.source, held_cost=f.cost_per_million_tokens,
                    held_source=f.source)
        )  # fmt: skip
    assert rank(tier, moved, "cost") == rank(tier, pools, "cost")


def test_the_slo_verdict_has_the_same_dead_band() -> None:
    slo = 1.0
    p = pool("a", 1.0, 1000, ttft_seconds=0.95, slo_seconds=slo)
    assert p.meets_slo  # within the SLO, never over it before
    was_over = replace(p, held_meets_slo=False)
    assert not was_over.meets_slo  # found over it last time: 0.95 is not 10 % under the SLO yet
    assert replace(was_over, ttft_seconds=0.89).meets_slo
    assert replace(was_over, ttft_seconds=None).meets_slo  # idle: no evidence against it
    assert not replace(p, ttft_seconds=1.01, held_meets_slo=True).meets_slo
