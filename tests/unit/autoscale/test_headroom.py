"""burstHeadroom: square-root staffing on the KV proposal, ceil(R + beta x sqrt(R)).

beta 0 must be today's HPA rule exactly (checked against a frozen copy of the calculator as it
was before the knob), and beta > 0 must keep the rule's guarantees: monotone in load, never below
the beta-0 proposal, a headroom share that shrinks as the load grows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from unittest import mock

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.autoscale import decision_strategies as strat
from toposerve.autoscale import decision
from toposerve.autoscale.decision import (
    Config,
    History,
    Inputs,
    Policy,
    Replica,
    Rules,
    decide,
    metric_replicas,
    staffed,
)
from toposerve.autoscale.forecast import demand_floor
from toposerve.autoscale.report import PodSample, Reading, event_of, status_of


def hpa_metric_replicas(
    values: Sequence[float], target: float, current: int, starting: int, missing: int, tolerance: float
) -> int:
    """metric_replicas as it was before burstHeadroom (commit 057c3ef), frozen as the reference."""
    _within, _ceil = decision._within, decision._ceil
    if not values:
        return current
    ratio = sum(values) / len(values) / target
    up_with_unready = starting > 0 and ratio > 1.0
    if not up_with_unready and missing == 0:
        if _within(ratio, tolerance):
            return current
        new = _ceil(ratio * len(values))
        return max(new, current) if ratio > 1.0 else min(new, current)
    if ratio < 1.0 and missing:
        return current
    samples = list(values)
    if ratio > 1.0:
        samples += [0.0] * missing
    if up_with_unready:
        samples += [0.0] * starting
    new_ratio = sum(samples) / len(samples) / target
    if _within(new_ratio, tolerance) or (ratio < 1.0 < new_ratio) or (ratio > 1.0 > new_ratio):
        return current
    new = _ceil(new_ratio * len(samples))
    if (new_ratio < 1.0 and new > current) or (new_ratio > 1.0 and new < current):
        return current
    return new


def cfg(**kw: object) -> Config:
    base = Config(
        min_replicas=1, max_replicas=40, target_kv=0.5, target_waiting=1000.0, tolerance=0.1,
        up=Rules(0, (Policy("Percent", 1000, 15),)), down=Rules(0, (Policy("Percent", 100, 15),)),
        startup_grace=600,
    )  # fmt: skip
    return replace(base, **kw)  # type: ignore[arg-type]


def ready(n: int, kv: float) -> tuple[Replica, ...]:
    return tuple(Replica(f"r{i}", True, 3600, kv=kv, waiting=0.0) for i in range(n))


def run(c: Config, current: int, reps: tuple[Replica, ...]) -> decision.Decision:
    return decide(c, Inputs(10_000.0, current, reps), History(recommendations=((0.0, current),)))


# ---- the formula -------------------------------------------------------------------------------


def test_staffed_is_load_plus_beta_sqrt_load() -> None:
    assert staffed(4.0, 1.0) == 6.0
    assert staffed(9.0, 2.0) == 15.0
    assert staffed(2.5, 0.0) == 2.5
    assert staffed(0.0, 3.0) == 0.0


@given(st.floats(0.01, 500), st.floats(0.01, 500), st.floats(0.01, 10))
def test_headroom_share_shrinks_as_the_load_grows(a: float, b: float, beta: float) -> None:
    lo, hi = sorted((a, b))
    share_lo, share_hi = staffed(lo, beta) / lo - 1, staffed(hi, beta) / hi - 1
    assert staffed(lo, beta) <= staffed(hi, beta)
    assert share_hi <= share_lo + 1e-12
    if hi > lo * 1.01:
        assert share_hi < share_lo


def test_small_fleets_get_proportionally_more_room_than_big_ones() -> None:
    """target 0.5, beta 1: one replica's worth of load gets two replicas, nine get twelve; the
    HPA rule at the same target gives one and nine."""
    c = cfg(burst_headroom=1.0)
    assert run(c, 1, ready(1, 0.5)).desired == 2  # R = 1: 1 + 1
    assert run(c, 9, ready(9, 0.5)).desired == 12  # R = 9: 9 + 3
    assert run(replace(c, burst_headroom=0.0), 9, ready(9, 0.5)).desired == 9


def test_it_scales_down_to_the_staffed_count_not_below() -> None:
    c = cfg(burst_headroom=1.0)
    # 10 replicas at 0.2: R = 4, staffed 6; the HPA rule would go to 4
    assert run(c, 10, ready(10, 0.2)).desired == 6
    assert run(replace(c, burst_headroom=0.0), 10, ready(10, 0.2)).desired == 4


def test_tolerance_band_applies_to_the_staffed_ratio() -> None:
    c = cfg(burst_headroom=1.0, tolerance=0.1)
    # 6 replicas at 0.33: R = 3.96, staffed 5.95 -> ratio 0.99: inside the band, no change
    d = run(c, 6, ready(6, 0.33))
    assert (d.desired, d.reason) == (6, "WithinTolerance")


def test_starting_replicas_count_as_capacity_on_the_way() -> None:
    """4 ready at 0.8 with beta 1: R = 6.4, staffed 8.93 -> 9. With 5 already starting (9 in
    spec.replicas), the recount over 9 samples sits inside the band: no more pods."""
    c = cfg(burst_headroom=1.0)
    assert run(c, 4, ready(4, 0.8)).desired == 9
    starting = tuple(Replica(f"s{i}", False, 60) for i in range(5))
    d = run(c, 9, ready(4, 0.8) + starting)
    assert d.desired == 9 and "5 replica(s) starting" in d.message


def test_missing_metrics_still_forbid_a_scale_down() -> None:
    c = cfg(burst_headroom=1.0)
    reps = (*ready(9, 0.1), Replica("blind", True, 3600))
    d = run(c, 10, reps)
    assert d.desired == 10 and not d.metrics_ok


def test_the_decision_reports_the_load_and_the_headroom() -> None:
    c = cfg(burst_headroom=1.5)
    d = run(c, 4, ready(4, 0.5))  # R = 4, headroom 3
    assert d.kv_load == 4.0 and d.headroom == 3.0
    assert d.desired == 7
    assert "kv-cache load 4.00 replicas + burst headroom 3.00 (beta 1.5 x sqrt(load))" in d.message
    reading = Reading("scrape", True, {"r0": PodSample(kv=0.5)})
    inputs = status_of(d, reading, "builtin", "t", None, burst_headroom=1.5)["inputs"]
    assert (inputs["kvLoadReplicas"], inputs["burstHeadroomReplicas"]) == (4.0, 3.0)
    assert "kvLoadReplicas" not in status_of(d, reading, "builtin", "t", None)["inputs"]
    assert "burst headroom 3.00 (beta 1.5" in event_of(d, 0.5)[1]
    assert "headroom" not in run(replace(c, burst_headroom=0.0), 4, ready(4, 0.5)).message


def test_the_forecast_floor_is_staffed_the_same_way() -> None:
    assert demand_floor([2.0], [], 0.5, 4.0, 40) == 4  # R = 4
    assert demand_floor([2.0], [], 0.5, 4.0, 40, burst_headroom=1.0) == 6  # 4 + 2
    assert demand_floor([2.0], [], 0.5, 4.0, 5, burst_headroom=1.0) == 5  # never above max


# ---- properties -------------------------------------------------------------------------------

configs = strat.configs(
    lambda **kw: cfg(target_waiting=4.0, **kw), 4, 30, strat.rules([0.0, 60.0, 300.0], [15.0, 60.0], 2)
)
replica = strat.replicas(1200)


@settings(max_examples=400, deadline=None)
@given(
    configs,
    st.integers(0, 40),
    st.lists(replica, max_size=25),
    st.booleans(),
    st.integers(0, 12),
    st.integers(0, 12),
    st.lists(st.tuples(st.floats(-600, 0), st.integers(0, 40)), max_size=4),
)
def test_beta_zero_decides_exactly_as_the_hpa_rule_did(
    c: Config,
    current: int,
    reps: list[Replica],
    ok: bool,
    sched: int,
    forecast: int,
    recs: list[tuple[float, int]],
) -> None:
    """Every field of the decision (desired, reason, message, history...) is what the calculator
    before burstHeadroom gives, on random inputs, with burstHeadroom 0."""
    inputs = Inputs(0.0, current, tuple(reps), source_ok=ok, schedule_floor=sched, schedule_name="s",
                    forecast_floor=forecast)  # fmt: skip
    history = History(recommendations=tuple(recs))
    now = decide(replace(c, burst_headroom=0.0), inputs, history)

    def reference(
        values: Sequence[float], target: float, cur: int, s: int, m: int, tol: float, *_: float
    ) -> int:
        return hpa_metric_replicas(values, target, cur, s, m, tol)

    with mock.patch.object(decision, "metric_replicas", reference):
        before = decide(replace(c, burst_headroom=0.0), inputs, history)
    assert now == before


@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.floats(0.0, 1.0), min_size=1, max_size=20),
    st.floats(0.05, 1.0),
    st.integers(1, 40),
    st.integers(0, 8),
    st.integers(0, 3),
    st.sampled_from([0.0, 0.1, 0.3]),
    st.floats(0.0, 4.0),
)
def test_never_below_the_beta_zero_proposal(
    values: list[float], target: float, current: int, starting: int, missing: int, tol: float, beta: float
) -> None:
    assert metric_replicas(values, target, current, starting, missing, tol, beta) >= metric_replicas(
        values, target, current, starting, missing, tol, 0.0
    )


@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.floats(0.0, 1.0), min_size=1, max_size=20),
    st.floats(0.0, 1.0),
    st.floats(0.05, 1.0),
    st.integers(1, 40),
    st.integers(0, 8),
    st.sampled_from([0.0, 0.1, 0.3]),
    st.floats(0.0, 4.0),
)
def test_monotone_in_load(
    values: list[float], scale: float, target: float, current: int, starting: int, tol: float, beta: float
) -> None:
    """Scaling every replica's KV usage down never raises the proposal."""
    lower = [v * scale for v in values]
    assert metric_replicas(lower, target, current, starting, 0, tol, beta) <= metric_replicas(
        values, target, current, starting, 0, tol, beta
    )


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 30), st.floats(0.0, 1.0), st.floats(0.0, 1.0), st.floats(0.1, 3.0))
def test_more_beta_never_fewer_replicas(n: int, kv: float, beta_a: float, beta_b: float) -> None:
    lo, hi = sorted((beta_a, beta_b))
    c = cfg(max_replicas=200)
    assert (
        run(replace(c, burst_headroom=lo), n, ready(n, kv)).desired
        <= run(replace(c, burst_headroom=hi), n, ready(n, kv)).desired
    )
