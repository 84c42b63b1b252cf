"""Which pool grows and which shrinks (planner/poolorder.py), and its use in plan_deployment."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from toposerve.api.config import OperatorConfig
from toposerve.api.errors import SpecError
from toposerve.api.manifest import parse_spec
from toposerve.api.spec import LLMDeploymentSpec
from toposerve.planner.plan import assign_replicas, plan_deployment
from toposerve.planner.poolorder import (
    PoolView,
    changes,
    decode_step_ms,
    fill,
    rank,
    room,
    split,
    weight_split,
)
from toposerve.planner.replicas import distribute

from .conftest import make_spec

L70 = "meta-llama/Llama-3.1-70B-Instruct"
AWQ = "hugging-quants/Meta-Llama-3.1-70B-Instruct-AWQ-INT4"

FAST = PoolView("fast", True, step_ms=5.0, generation=4, cost_per_hour=20.0)  # 100 per token
CHEAP = PoolView("cheap", True, step_ms=10.0, generation=3, cost_per_hour=4.0)  # 40 per token
MID = PoolView("mid", True, step_ms=8.0, generation=3, cost_per_hour=8.0)  # 64 per token


# ---- ranking ------------------------------------------------------------------------------------


def test_latency_critical_and_long_context_rank_the_fastest_first() -> None:
    assert rank("latency-critical", [CHEAP, MID, FAST]) == ["fast", "mid", "cheap"]
    assert rank("long-context", [CHEAP, MID, FAST]) == ["fast", "mid", "cheap"]


def test_throughput_and_batch_rank_the_cheapest_per_token_first() -> None:
    assert rank("throughput", [FAST, MID, CHEAP]) == ["cheap", "mid", "fast"]
    assert rank("batch", [FAST, MID, CHEAP]) == ["cheap", "mid", "fast"]


def test_ties_go_to_the_newer_generation_then_the_spec_order() -> None:
    old = replace(FAST, name="old", generation=3)
    assert rank("latency-critical", [old, FAST]) == ["fast", "old"]
    twin = replace(FAST, name="twin")
    assert rank("latency-critical", [twin, FAST]) == ["twin", "fast"]
    assert rank("latency-critical", [FAST, twin]) == ["fast", "twin"]
    # equal cost per token: the faster pool first
    slow_cheap = PoolView("a", True, step_ms=10.0, cost_per_hour=10.0)
    fast_dear = PoolView("b", True, step_ms=5.0, cost_per_hour=20.0)
    assert rank("throughput", [slow_cheap, fast_dear]) == ["b", "a"]


def test_pools_that_do_not_fit_have_no_place() -> None:
    gone = replace(FAST, fits=False)
    assert rank("latency-critical", [gone, CHEAP]) == ["cheap"]
    s = split(3, "tier", "latency-critical", [gone, CHEAP])
    assert s.replicas == {"fast": 0, "cheap": 3} and s.place == {"fast": None, "cheap": 1}


def test_decode_step_follows_weights_stages_and_bandwidth() -> None:
    assert decode_step_ms(10.0, 1, 1000.0) == pytest.approx(10.737, rel=1e-3)
    assert decode_step_ms(10.0, 2, 1000.0) == pytest.approx(2 * decode_step_ms(10.0, 1, 1000.0))
    assert decode_step_ms(10.0, 1, 2000.0) == pytest.approx(decode_step_ms(10.0, 1, 1000.0) / 2)
    assert decode_step_ms(10.0, 1, 0.0) == float("inf")


# ---- filling --------------------------------------------------------------------------------------


def test_growth_fills_the_first_pool_with_room_then_the_next() -> None:
    pools = [replace(FAST, room=2), replace(MID, room=1), CHEAP]
    order = rank("latency-critical", pools)
    assert fill(1, order, pools) == {"fast": 1, "mid": 0, "cheap": 0}
    assert fill(3, order, pools) == {"fast": 2, "mid": 1, "cheap": 0}
    assert fill(5, order, pools) == {"fast": 2, "mid": 1, "cheap": 2}


def test_shrinking_removes_from_the_end_of_the_order() -> None:
    pools = [replace(FAST, current=2), replace(MID, current=1), replace(CHEAP, current=2)]
    order = rank("latency-critical", pools)
    assert fill(4, order, pools) == {"fast": 2, "mid": 1, "cheap": 1}
    assert fill(2, order, pools) == {"fast": 2, "mid": 0, "cheap": 0}
    assert fill(0, order, pools) == {"fast": 0, "mid": 0, "cheap": 0}


def test_growth_starts_from_what_runs_and_moves_nothing() -> None:
    """A weight split from before (or capacity that freed up on the fast pool) is not rebalanced."""
    pools = [replace(FAST, current=0), replace(CHEAP, current=3)]
    order = rank("latency-critical", pools)
    assert fill(3, order, pools) == {"fast": 0, "cheap": 3}
    assert fill(4, order, pools) == {"fast": 1, "cheap": 3}


def test_max_replicas_is_a_hard_bound_and_room_a_soft_one() -> None:
    pools = [replace(FAST, room=1, max_replicas=2), replace(CHEAP, room=0, max_replicas=1)]
    order = rank("latency-critical", pools)
    # room first (1 on fast), then overflow in order up to maxReplicas (they wait for capacity there)
    assert fill(2, order, pools) == {"fast": 2, "cheap": 0}
    assert fill(3, order, pools) == {"fast": 2, "cheap": 1}
    assert fill(9, order, pools) == {"fast": 2, "cheap": 1}  # every pool at its maximum
    # a maximum lowered below what runs trims that pool and the rest goes elsewhere
    over = [replace(FAST, current=3, max_replicas=1), replace(CHEAP, current=0)]
    assert fill(3, rank("latency-critical", over), over) == {"fast": 1, "cheap": 2}


def test_room_of_a_pool_counts_placed_replicas_and_free_capacity() -> None:
    assert room([(2, 2), (0, 4)]) == 8  # 2 bound + 2 free, 4 free on the fallback type
    assert room([(0, 0)]) == 0
    assert room([]) == 0


def test_weight_split_matches_distribute_and_honours_max_replicas() -> None:
    a, b, c = PoolView("a", True, weight=2), PoolView("b", True, weight=1), PoolView("c", False, weight=5)
    assert weight_split(7, [a, b, c]) == distribute(7, [("a", 2), ("b", 1), ("c", 0)])
    capped = [replace(a, max_replicas=2), b, c]
    assert weight_split(7, capped) == {"a": 2, "b": 5, "c": 0}
    assert weight_split(7, [replace(a, max_replicas=2), replace(b, max_replicas=1)]) == {"a": 2, "b": 1}
    s = split(7, "weight", "latency-critical", [a, b])
    assert s.place == {"a": None, "b": None}


def test_changes_names_the_pools_that_moved() -> None:
    assert changes({"a": 1, "b": 2}, {"a": 2, "b": 2, "c": 0}) == [("a", 1, 2)]
    assert changes({"a": 1}, {"a": 0, "b": 3}) == [("a", 1, 0), ("b", 0, 3)]


# ---- properties -----------------------------------------------------------------------------------

TIERS = st.sampled_from(["latency-critical", "long-context", "throughput", "batch"])


@st.composite
def pool_sets(draw: st.DrawFn, bounded: bool = True) -> list[PoolView]:
    n = draw(st.integers(1, 5))
    out = []
    for i in range(n):
        out.append(
            PoolView(
                name=f"p{i}",
                fits=draw(st.booleans()) if i else True,
                step_ms=draw(st.sampled_from([4.0, 6.0, 8.0])),
                generation=draw(st.integers(2, 5)),
                cost_per_hour=draw(st.sampled_from([2.0, 4.0, 8.0])),
                weight=draw(st.integers(0, 3)),
                max_replicas=draw(st.none() | st.integers(0, 6)) if bounded else None,
                room=draw(st.none() | st.integers(0, 6)),
                current=draw(st.integers(0, 6)),
            )
        )
    return out


@settings(max_examples=300, deadline=None)
@given(pool_sets(), st.integers(0, 30), TIERS)
def test_the_total_is_the_request_unless_every_pool_is_at_its_maximum(
    pools: list[PoolView], total: int, tier: str
) -> None:
    out = fill(total, rank(tier, pools), pools)
    fitting = [p for p in pools if p.fits]
    bound = (
        None if any(p.max_replicas is None for p in fitting) else sum(p.max_replicas or 0 for p in fitting)
    )
    assert sum(out.values()) == (total if bound is None else min(total, bound))
    for p in pools:
        assert out[p.name] >= 0 and (p.fits or out[p.name] == 0)
        assert p.max_replicas is None or out[p.name] <= p.max_replicas


@settings(max_examples=300, deadline=None)
@given(pool_sets(), st.integers(0, 30), TIERS)
def test_growth_never_removes_from_a_pool_and_shrinking_never_adds(
    pools: list[PoolView], total: int, tier: str
) -> None:
    order = rank(tier, pools)
    out = fill(total, order, pools)
    start = {
        p.name: min(p.current, p.max_replicas) if p.max_replicas is not None else p.current for p in pools
    }
    start = {p.name: start[p.name] if p.fits else 0 for p in pools}
    if total >= sum(start.values()):
        assert all(out[n] >= start[n] for n in start)
    else:
        assert all(out[n] <= start[n] for n in start)
        # removal from the end of the order: a pool that lost replicas has only empty pools after it
        for i, n in enumerate(order):
            if out[n] < start[n]:
                assert all(out[m] == 0 for m in order[i + 1 :])


@settings(max_examples=300, deadline=None)
@given(pool_sets(), st.integers(0, 20), TIERS)
def test_scaling_down_retraces_the_way_up_in_reverse(pools: list[PoolView], n: int, tier: str) -> None:
    """Within room, growing one at a time from zero and shrinking one at a time pass through the
    same counts: the order reverses on the way down."""
    empty = [replace(p, current=0) for p in pools]
    order = rank(tier, empty)
    soft = sum(
        min(x for x in (p.room, p.max_replicas) if x is not None)
        if p.room is not None or p.max_replicas is not None
        else 1000
        for p in empty
        if p.fits
    )
    n = min(n, soft)
    up = [fill(k, order, empty) for k in range(n + 1)]
    state = up[-1]
    for k in range(n - 1, -1, -1):
        state = fill(k, order, [replace(p, current=state[p.name]) for p in empty])
        assert state == up[k]


@settings(max_examples=200, deadline=None)
@given(pool_sets(), TIERS)
def test_ranking_is_deterministic_and_sorted_by_the_tier_key(pools: list[PoolView], tier: str) -> None:
    order = rank(tier, pools)
    assert order == rank(tier, list(pools))
    by = {p.name: p for p in pools}
    keys = [
        by[n].step_ms if tier in ("latency-critical", "long-context") else by[n].cost_per_token for n in order
    ]
    assert keys == sorted(keys)
    assert sorted(order) == sorted(p.name for p in pools if p.fits)


# ---- in the planner -------------------------------------------------------------------------------


def two_pools(
    tier: str,
    replicas: int = 3,
    h100: dict[str, int] | None = None,
    a100: dict[str, int] | None = None,
    **auto: object,
) -> LLMDeploymentSpec:
    return make_spec(
        L70, 32768, replicas=replicas, placement={"tier": tier},
        autoscaling={"enabled": True, "maxReplicas": 8, **auto},
        pools=[
            {"name": "h100", "gpuTypes": ["H100"], "weight": 2, **(h100 or {})},
            {"name": "a100", "gpuTypes": ["A100-40GB"], "dtype": "int4", "weight": 1, "checkpoint": AWQ,
             **(a100 or {})},
        ],
    )  # fmt: skip


def test_the_planner_grows_the_fastest_pool_for_latency_critical() -> None:
    d = plan_deployment("x", two_pools("latency-critical"))
    by = {p.name: p for p in d.pools}
    # H100 x4 bf16 streams 33 GiB per GPU at 3.35 TB/s; A100-40GB x2 int4 16 GiB at 1.56 TB/s
    assert by["h100"].decode_step_ms < by["a100"].decode_step_ms
    assert (by["h100"].replicas, by["a100"].replicas) == (3, 0)
    assert (by["h100"].order, by["a100"].order) == (1, 2)


def test_the_planner_grows_the_cheapest_per_token_pool_for_throughput() -> None:
    d = plan_deployment("x", two_pools("throughput"))
    by = {p.name: p for p in d.pools}
    assert (by["h100"].replicas, by["a100"].replicas) == (0, 3)
    assert (by["a100"].order, by["h100"].order) == (1, 2)
    assert by["a100"].cost_per_hour == pytest.approx(3 * by["a100"].cost_per_hour_per_replica)


def test_without_autoscaling_pools_keep_the_weight_split() -> None:
    spec = two_pools("latency-critical", enabled=False)
    d = plan_deployment("x", spec)
    assert [(p.name, p.replicas, p.order) for p in d.pools] == [("h100", 2, None), ("a100", 1, None)]
    explicit = two_pools("latency-critical", poolOrder="weight")
    assert [p.replicas for p in plan_deployment("x", explicit).pools] == [2, 1]
    tiered = two_pools("latency-critical", enabled=False, poolOrder="tier")
    assert [p.replicas for p in plan_deployment("x", tiered).pools] == [3, 0]


def test_assign_replicas_grows_from_what_runs_within_room_and_max_replicas() -> None:
    spec = two_pools("latency-critical", replicas=5, a100={"maxReplicas": 3})
    d = plan_deployment("x", spec)
    catalog = OperatorConfig().catalog()
    a = assign_replicas(d, spec, catalog, current={"h100": 1, "a100": 1}, room={"h100": 2, "a100": None})
    by = {p.name: p for p in a.pools}
    assert (by["h100"].replicas, by["a100"].replicas) == (2, 3)
    assert (by["h100"].room, by["a100"].room, by["a100"].max_replicas) == (2, None, 3)


@pytest.mark.parametrize(
    ("replicas", "auto", "planned"),
    [
        (9, {"maxReplicas": 4}, 4),  # not 9 pods until the autoscaler's first decision
        (0, {"minReplicas": 2}, 2),
        (0, {"minReplicas": 0}, 0),  # scaled to zero stays there
        (3, {"minReplicas": 1, "maxReplicas": 4}, 3),
        (9, {"enabled": False, "maxReplicas": 4}, 9),  # no autoscaler: spec.replicas as written
        (9, {"mode": "hpa", "maxReplicas": 4}, 4),
    ],
)
def test_spec_replicas_is_held_within_the_autoscalers_bounds(
    replicas: int, auto: dict[str, object], planned: int
) -> None:
    spec = two_pools("throughput", replicas=replicas, **auto)
    assert spec.replicas == replicas  # the spec is left as written: the autoscaler writes it
    assert sum(p.replicas for p in plan_deployment("x", spec).pools) == planned


def test_warm_standby_sits_at_the_end_of_the_order() -> None:
    spec = two_pools("latency-critical", replicas=2, h100={"maxReplicas": 2}, warmStandby=1)
    d = plan_deployment("x", spec)
    assert [(p.name, p.replicas, p.serving_replicas) for p in d.pools] == [("h100", 2, 2), ("a100", 1, 0)]


def test_the_api_names_bad_pool_fields() -> None:
    base = {"model": {"name": L70}, "pools": [{"name": "a", "gpuTypes": ["H100"], "maxReplicas": -1}]}
    with pytest.raises(SpecError, match=r"spec\.pools\[0\]\.maxReplicas"):
        parse_spec(base)
    with pytest.raises(SpecError, match=r"spec\.autoscaling\.poolOrder"):
        parse_spec({"model": {"name": L70}, "autoscaling": {"poolOrder": "fastest"}})
