"""The router-demand rule (queueing.demand_replicas) and how decide() uses it (Inputs.demand)."""

from __future__ import annotations

import math
from dataclasses import fields, replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from toposerve.autoscale.decision import (
    ROUTER_ARRIVALS,
    Config,
    Decision,
    History,
    Inputs,
    Policy,
    Replica,
    Rules,
    decide,
)
from toposerve.autoscale.queueing import Demand, demand_replicas, staffed

CAP = 10_000.0  # KV tokens per replica


def demand(rate: float = 1.0, short: float | None = None, **kw: object) -> Demand:
    """``rate`` req/s over the long window (``short`` over the short one, default the same), 1,000
    prompt + 100 decode tokens each; a replica decodes 100 tokens/s at batch 10 (10 tokens/s per
    sequence, so a request stays 10 s); in flight: what Little's law says for the long window."""
    s = rate if short is None else short
    base: dict[str, object] = dict(
        kv_tokens_per_replica=CAP, arrivals_short=s, arrivals_long=rate, prompt_tokens_short=1000 * s,
        prompt_tokens_long=1000 * rate, decode_tokens_short=100 * s, decode_tokens_long=100 * rate,
        in_flight=10 * rate, in_flight_tokens=1100 * 10 * rate, decode_tokens_per_replica=100.0, batch=10.0,
    )  # fmt: skip
    base.update(kw)
    return Demand(**base)  # type: ignore[arg-type]


# ---- the rule ----------------------------------------------------------------------------------


def test_littles_law_in_tokens() -> None:
    # 2 req/s x 10 s = 20 requests x 1,100 tokens = 22,000 tokens; at 0.5 x 10,000 per replica: 4.4
    p = demand_replicas(demand(2.0), target_kv=0.5)
    assert p is not None
    assert p.load == pytest.approx(4.4)
    assert p.replicas == 5 and p.headroom == 0.0
    assert "router arrivals" in p.explanation and "-> 5" in p.explanation


def test_square_root_headroom() -> None:
    p = demand_replicas(demand(2.0), target_kv=0.5, beta=1.0)
    assert p is not None
    assert p.headroom == pytest.approx(math.sqrt(4.4))
    assert p.replicas == math.ceil(4.4 + math.sqrt(4.4))
    assert "beta 1" in p.explanation


def test_short_window_leads_a_rise() -> None:
    p = demand_replicas(demand(1.0, short=3.0), target_kv=0.5)
    assert p is not None and p.window == "short"
    # 3 req/s decode 300 tok/s / 10 per sequence = 30 requests x 1,100 tokens / 5,000
    assert p.load == pytest.approx(6.6)


def test_long_window_holds_a_fall() -> None:
    p = demand_replicas(demand(2.0, short=0.0), target_kv=0.5)
    assert p is not None and p.window in ("long", "in-flight")
    assert p.load == pytest.approx(4.4)


def test_in_flight_backlog_counts() -> None:
    # the engines' queues hold far more than the arrivals explain (a queue building up)
    p = demand_replicas(demand(1.0, in_flight=50, in_flight_tokens=55_000), target_kv=0.5)
    assert p is not None and p.window == "in-flight" and p.load == pytest.approx(11.0)


def test_held_requests_count_and_ask_for_one() -> None:
    only_held = Demand(kv_tokens_per_replica=CAP, arrivals_short=0, arrivals_long=0, held=1,
                       decode_tokens_per_replica=100.0, batch=10.0)  # fmt: skip
    p = demand_replicas(only_held, target_kv=0.5)
    assert p is not None and p.replicas == 1
    more = demand_replicas(demand(1.0, held=20), target_kv=0.5)
    base = demand_replicas(demand(1.0), target_kv=0.5)
    assert more is not None and base is not None and more.load > base.load


def test_zero_demand_proposes_zero_even_without_service_figures() -> None:
    z = Demand(kv_tokens_per_replica=CAP, arrivals_short=0, arrivals_long=0)
    p = demand_replicas(z, target_kv=0.7, beta=2.0)
    assert p is not None and p.replicas == 0 and p.load == 0.0


def test_tokens_per_request_from_arrivals_when_nothing_in_flight() -> None:
    p = demand_replicas(demand(2.0, in_flight=0, in_flight_tokens=0), target_kv=0.5)
    assert p is not None and p.load == pytest.approx(4.4)


def test_clamped_to_max_replicas() -> None:
    p = demand_replicas(demand(100.0), target_kv=0.5, max_replicas=7)
    assert p is not None and p.replicas == 7 and p.load > 7


@pytest.mark.parametrize(
    "over",
    [
        {"decode_tokens_per_replica": None},
        {"batch": None},
        {"batch": 0.0},
        {"decode_tokens_per_replica": 0.0},
        {"arrivals_short": math.nan},
        {"in_flight_tokens": math.inf},
        {"decode_tokens_long": -1.0},
        {"kv_tokens_per_replica": 0.0},
        {"kv_tokens_per_replica": math.nan},
        {"batch": math.nan},
    ],
)
def test_unusable_inputs_give_no_proposal(over: dict[str, object]) -> None:
    assert demand_replicas(replace(demand(2.0), **over), target_kv=0.5) is None  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "target, beta", [(0.0, 0.0), (1.5, 0.0), (math.nan, 0.0), (0.5, -1.0), (0.5, math.nan)]
)
def test_bad_parameters_give_no_proposal(target: float, beta: float) -> None:
    assert demand_replicas(demand(2.0), target_kv=target, beta=beta) is None


# ---- properties --------------------------------------------------------------------------------

rates = st.floats(0.0, 200.0)
maybe_bad = st.one_of(st.floats(0.0, 1e6), st.none(), st.just(math.nan), st.just(math.inf), st.just(-1.0))


@settings(max_examples=300, deadline=None)
@given(rates, rates, st.floats(0.0, 100.0), st.floats(0.05, 1.0), st.floats(0.0, 3.0))
def test_monotone_in_arrival_rate(
    lo: float, extra: float, short_extra: float, target: float, beta: float
) -> None:
    """More arrivals (same request mix, same service) never ask for fewer replicas."""
    a = demand_replicas(demand(lo, short=lo), target, beta)
    b = demand_replicas(demand(lo + extra, short=lo + extra + short_extra), target, beta)
    assert a is not None and b is not None
    assert b.replicas >= a.replicas and b.load >= a.load


@settings(max_examples=300, deadline=None)
@given(rates, rates, st.floats(0.05, 1.0), st.floats(0.0, 3.0), st.integers(0, 50))
def test_bounded_and_consistent(long: float, short: float, target: float, beta: float, hi: int) -> None:
    p = demand_replicas(demand(long, short=short), target, beta, max_replicas=hi)
    assert p is not None
    assert 0 <= p.replicas <= hi
    assert p.replicas == min(hi, math.ceil(round(staffed(p.load, beta), 9)))
    assert p.load >= 0 and p.headroom >= 0


@settings(max_examples=300, deadline=None)
@given(st.fixed_dictionaries({f.name: maybe_bad for f in fields(Demand)}), st.floats(0.05, 1.0))
def test_any_bad_or_unknown_input_gives_no_proposal_or_a_sane_one(
    raw: dict[str, float | None], target: float
) -> None:
    """NaN, infinite or negative anywhere, or no service figure with demand: None. Never raises."""
    raw = {
        k: (0.0 if v is None and k not in ("decode_tokens_per_replica", "batch") else v)
        for k, v in raw.items()
    }
    d = Demand(**raw)  # type: ignore[arg-type]
    p = demand_replicas(d, target, 1.0, max_replicas=100)
    values = [v for v in raw.values() if v is not None]
    if any(not math.isfinite(v) or v < 0 for v in values) or not d.kv_tokens_per_replica:
        assert p is None
    elif p is not None:
        assert 0 <= p.replicas <= 100 and math.isfinite(p.load)


# ---- decide() with a demand input --------------------------------------------------------------

NO_WINDOWS = Rules(0, (Policy("Percent", 1000, 15),))


def cfg(**kw: object) -> Config:
    base = Config(
        min_replicas=1, max_replicas=20, target_kv=0.5, target_waiting=math.inf, tolerance=0.1,
        up=NO_WINDOWS, down=Rules(0, (Policy("Percent", 100, 15),)), startup_grace=600,
    )  # fmt: skip
    return replace(base, **kw)  # type: ignore[arg-type]


def ready(n: int, kv: float | None) -> tuple[Replica, ...]:
    return tuple(Replica(f"r{i}", True, 3600, kv=kv, waiting=0.0, running=1.0) for i in range(n))


def run(c: Config, inputs: Inputs) -> Decision:
    return decide(c, inputs, History(recommendations=((inputs.now - 5000, inputs.current),)))


def test_demand_none_changes_nothing() -> None:
    inputs = Inputs(now=10_000, current=3, replicas=ready(3, 0.5))
    a = run(cfg(), inputs)
    b = run(cfg(demand_headroom=2.0), replace(inputs, demand=None))
    assert a == b and a.demand is None and a.signal == "kv-cache"


def test_demand_leads_the_kv_metric() -> None:
    # KV says 3 replicas at target are right; the router already sees the rate that needs 7
    d = run(cfg(), Inputs(now=10_000, current=3, replicas=ready(3, 0.5), demand=demand(1.0, short=3.0)))
    assert d.desired == 7 and d.signal == ROUTER_ARRIVALS and d.reason == "ScaleUp"
    assert d.message.startswith("router arrivals above target") and "router arrivals:" in d.message
    assert d.demand is not None and d.demand.replicas == 7


def test_largest_proposal_wins_kv_above_demand() -> None:
    d = run(cfg(), Inputs(now=10_000, current=3, replicas=ready(3, 1.0), demand=demand(0.5)))
    assert d.desired == 6 and d.signal == "kv-cache"


def test_demand_alone_does_not_scale_down_below_kv() -> None:
    d = run(cfg(), Inputs(now=10_000, current=5, replicas=ready(5, 0.5), demand=demand(0.1)))
    assert d.desired == 5


def test_scale_down_needs_both_and_keeps_the_down_window() -> None:
    c = cfg(down=Rules(300, (Policy("Percent", 100, 15),)))
    hist = History(recommendations=((9_900, 6),))
    d = decide(c, Inputs(now=10_000, current=6, replicas=ready(6, 0.1), demand=demand(0.5)), hist)
    assert d.desired == 6 and d.reason == "ScaleDownStabilized"
    later = decide(c, Inputs(now=10_400, current=6, replicas=ready(6, 0.1), demand=demand(0.5)), d.history)
    assert later.desired == 2  # demand 1.1 replicas -> 2, KV 1.2 -> 2


def test_demand_respects_max_and_rate_limits() -> None:
    c = cfg(max_replicas=8, up=Rules(0, (Policy("Pods", 2, 60),)))
    d = run(c, Inputs(now=10_000, current=3, replicas=ready(3, 0.5), demand=demand(10.0)))
    assert d.desired == 5 and d.limited == "ScaleUpLimit" and d.proposal == 8


def test_demand_within_tolerance_keeps_the_count() -> None:
    # demand load 2.2 at beta 0 against 2 replicas: ratio 1.1, inside a 0.15 band
    d = run(cfg(tolerance=0.15), Inputs(now=10_000, current=2, replicas=ready(2, 0.5), demand=demand(1.0)))
    assert d.desired == 2


def test_demand_scales_up_without_engine_metrics_and_never_down() -> None:
    # every replica still starting: no KV metric; the router's demand still sizes the fleet
    starting = tuple(Replica(f"s{i}", False, 60) for i in range(2))
    up = run(cfg(), Inputs(now=10_000, current=2, replicas=starting, demand=demand(3.0)))
    assert up.desired == 7 and up.signal == ROUTER_ARRIVALS
    down = run(cfg(), Inputs(now=10_000, current=6, replicas=starting, demand=demand(0.2)))
    assert down.desired == 6  # no fresh metrics: never a scale-down
    unusable = run(cfg(), Inputs(now=10_000, current=2, replicas=starting, demand=demand(3.0, batch=None)))
    assert unusable.reason == "MetricsUnavailable" and unusable.desired == 2


def test_starting_replicas_count_as_capacity_on_the_way() -> None:
    reps = ready(3, 0.5) + tuple(Replica(f"s{i}", False, 60) for i in range(4))
    d = run(cfg(), Inputs(now=10_000, current=7, replicas=reps, demand=demand(1.0, short=3.0)))
    assert d.desired == 7  # the 7 the router asks for are there or on the way


def test_scale_from_zero_sized_by_demand() -> None:
    held = demand(3.0, held=12, in_flight=0, in_flight_tokens=0)
    d = run(cfg(min_replicas=0), Inputs(now=10_000, current=0, held_requests=12, demand=held))
    assert d.reason == "ScaleFromZero" and d.desired == 7 and "router arrivals:" in d.message
    plain = run(cfg(min_replicas=0), Inputs(now=10_000, current=0, held_requests=12))
    assert plain.desired == 1


def test_demand_headroom_defaults_to_burst_headroom() -> None:
    inputs = Inputs(now=10_000, current=1, replicas=ready(1, 0.1), demand=demand(2.0))
    a = run(cfg(burst_headroom=1.0), inputs)
    b = run(cfg(burst_headroom=0.0, demand_headroom=1.0), inputs)
    c = run(cfg(burst_headroom=1.0, demand_headroom=0.0), inputs)
    assert a.desired == b.desired == math.ceil(4.4 + math.sqrt(4.4)) and c.desired == 5


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 20), st.floats(0.0, 1.0), rates, rates)
def test_decide_with_demand_never_below_decide_without(
    current: int, kv: float, lo: float, extra: float
) -> None:
    """Demand only joins the proposals: with it the fleet is never smaller, and more demand never
    gives fewer replicas."""
    inputs = Inputs(now=10_000, current=current, replicas=ready(current, kv))
    base = run(cfg(), inputs)
    a = run(cfg(), replace(inputs, demand=demand(lo)))
    b = run(cfg(), replace(inputs, demand=demand(lo + extra)))
    assert base.desired <= a.desired <= b.desired <= 20
