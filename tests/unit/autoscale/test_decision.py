"""The autoscaling decision on a table of scenarios, the seed lesson's HPA example, and properties."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.autoscale import decision_strategies as strat
from toposerve.api.spec import AutoscalingSpec, ScalingPolicy, ScalingRules
from toposerve.autoscale.decision import (
    Config,
    Decision,
    History,
    Inputs,
    Policy,
    Replica,
    Rules,
    decide,
    metric_replicas,
    rate_limit,
    scale_down_limit,
    scale_up_limit,
    stabilize,
)

NO_WINDOWS = Rules(0, (Policy("Percent", 1000, 15),))


def cfg(**kw: object) -> Config:
    base = Config(
        min_replicas=1, max_replicas=10, target_kv=0.7, target_waiting=4.0, tolerance=0.1,
        up=NO_WINDOWS, down=Rules(0, (Policy("Percent", 100, 15),)), startup_grace=600,
    )  # fmt: skip
    return replace(base, **kw)  # type: ignore[arg-type]


def ready(n: int, kv: float | None, waiting: float | None = 0.0, age: float = 3600) -> tuple[Replica, ...]:
    return tuple(Replica(f"r{i}", True, age, kv=kv, waiting=waiting, running=1.0) for i in range(n))


def starting(n: int, age: float = 60) -> tuple[Replica, ...]:
    return tuple(Replica(f"s{i}", False, age) for i in range(n))


# Steady history: the current count recommended long enough ago to be outside every window but
# inside none (an empty history would be seeded with the current count: see test_fresh_loop...).
def steady(n: int, now: float = 10_000) -> History:
    return History(recommendations=((now - 5000, n),))


def run(c: Config, inputs: Inputs, history: History | None = None) -> Decision:
    return decide(c, inputs, steady(inputs.current, inputs.now) if history is None else history)


# ---- the replica calculator ----------------------------------------------------------------------

CALC = [
    # (values, target, current, starting, missing, tolerance) -> replicas; why
    (([0.7, 0.7], 0.7, 2, 0, 0, 0.1), 2, "at target"),
    (([0.75, 0.75], 0.7, 2, 0, 0, 0.1), 2, "ratio 1.07 is inside the 10% band"),
    (([0.8, 0.8], 0.7, 2, 0, 0, 0.1), 3, "ratio 1.14: ceil(2.29)"),
    (([1.0, 1.0], 0.5, 2, 0, 0, 0.1), 4, "burst: double"),
    (([0.1, 0.1, 0.1, 0.1], 0.7, 4, 0, 0, 0.1), 1, "idle: ceil(0.57)"),
    (([0.0, 0.0], 0.7, 2, 0, 0, 0.1), 0, "zero load proposes zero (the floor keeps min)"),
    (
        ([0.9, 0.9], 0.7, 4, 2, 0, 0.1),
        4,
        "two starting at 0 flip the ratio below 1: hold (capacity on the way)",
    ),
    (([1.0, 1.0], 0.5, 3, 1, 0, 0.1), 4, "one starting counts 0: 2/3/0.5 = 1.33 -> ceil(4.0)"),
    (([0.2, 0.2], 0.7, 3, 1, 0, 0.1), 1, "starting replicas do not matter on a scale-down"),
    (([0.2, 0.2], 0.7, 3, 0, 1, 0.1), 3, "a replica without metrics forbids the scale-down"),
    (([1.4, 1.4], 0.7, 3, 0, 1, 0.1), 4, "missing counts 0 on a scale-up: 2.8/3/0.7 = 1.33 -> 4"),
    (([0.8], 0.7, 3, 0, 2, 0.1), 3, "missing at 0 flips the direction: hold"),
    (([], 0.7, 3, 0, 0, 0.1), 3, "no data: hold"),
    (([0.8, 0.8], 0.7, 5, 0, 0, 0.1), 5, "above target never proposes fewer (ignored replicas)"),
    (([0.3], 0.7, 1, 0, 0, 0.0), 1, "zero tolerance, ceil(0.43) = 1"),
]


@pytest.mark.parametrize(("args", "want", "why"), CALC, ids=[c[2] for c in CALC])
def test_metric_replicas(args: tuple, want: int, why: str) -> None:  # type: ignore[type-arg]
    assert metric_replicas(*args) == want, why


# ---- behaviour pieces, exactly as horizontal.go ---------------------------------------------------


def test_stabilize_takes_the_most_conservative_recommendation_in_each_window() -> None:
    up, down = Rules(60, ()), Rules(300, ())
    recs = [(900.0, 6), (950.0, 4), (990.0, 5)]
    assert stabilize(3, 8, recs, 1000, up, down) == 4  # up: lowest of the last 60 s (4, 5, 8)
    assert stabilize(8, 2, recs, 1000, up, down) == 6  # down: highest of the last 300 s
    assert stabilize(5, 5, recs, 1000, up, down) == 5
    assert stabilize(3, 8, [(930.0, 2)], 1000, up, down) == 8  # outside the up window


def test_scale_up_limits_pods_percent_and_select_policy() -> None:
    both = (Policy("Pods", 4, 60), Policy("Percent", 100, 60))
    h = History()
    assert scale_up_limit(2, h, Rules(0, both, "Max"), 0) == 6  # max(2+4, 2*2)
    assert scale_up_limit(10, h, Rules(0, both, "Max"), 0) == 20
    assert scale_up_limit(10, h, Rules(0, both, "Min"), 0) == 14  # min(10+4, 20)
    assert scale_up_limit(10, h, Rules(0, both, "Disabled"), 0) == 10
    assert scale_up_limit(3, h, Rules(0, (Policy("Percent", 10, 60),)), 0) == 4  # ceil(3.3): always >= +1
    # replicas added within the period come off the allowance: period start = 6 - 4
    assert scale_up_limit(6, History(scale_ups=((50.0, 4),)), Rules(0, (Policy("Pods", 4, 60),)), 100) == 6
    assert scale_up_limit(6, History(scale_ups=((30.0, 4),)), Rules(0, (Policy("Pods", 4, 60),)), 100) == 10


def test_scale_down_limits_pods_percent_and_select_policy() -> None:
    both = (Policy("Pods", 1, 60), Policy("Percent", 50, 60))
    h = History()
    assert scale_down_limit(10, h, Rules(0, both, "Max"), 0) == 5  # the larger change
    assert scale_down_limit(10, h, Rules(0, both, "Min"), 0) == 9
    assert scale_down_limit(10, h, Rules(0, both, "Disabled"), 0) == 10
    assert scale_down_limit(3, h, Rules(0, (Policy("Percent", 50, 60),)), 0) == 1  # int(1.5): truncated
    assert (
        scale_down_limit(9, History(scale_downs=((50.0, 1),)), Rules(0, (Policy("Pods", 1, 60),)), 100) == 9
    )


def test_rate_limit_reports_which_limit_bit() -> None:
    c = cfg(up=Rules(0, (Policy("Pods", 2, 60),)), down=Rules(0, (Policy("Pods", 1, 60),)), max_replicas=10)
    assert rate_limit(2, 9, 1, 10, History(), c, 0) == (4, "ScaleUpLimit")
    assert rate_limit(9, 20, 1, 10, History(), c, 0) == (10, "TooManyReplicas")
    assert rate_limit(5, 1, 1, 10, History(), c, 0) == (4, "ScaleDownLimit")
    assert rate_limit(3, 0, 2, 10, History(), c, 0) == (2, "TooFewReplicas")  # the floor bites first
    assert rate_limit(4, 4, 1, 10, History(), c, 0) == (4, "")


# ---- decisions: a table of scenarios -----------------------------------------------------------------

T = 10_000.0
S = [
    # name, config, inputs, (desired, reason)
    ("burst", cfg(), Inputs(T, 2, ready(2, 1.0)), (3, "ScaleUp")),
    ("within tolerance", cfg(), Inputs(T, 3, ready(3, 0.74)), (3, "WithinTolerance")),
    ("idle scales down to min", cfg(min_replicas=2), Inputs(T, 6, ready(6, 0.05)), (2, "ScaleDown")),
    ("idle at min says so", cfg(min_replicas=2), Inputs(T, 2, ready(2, 0.05)), (2, "AtFloor")),
    ("overloaded at max says so", cfg(max_replicas=4), Inputs(T, 4, ready(4, 1.0)), (4, "AtMax")),
    ("max bounds the burst", cfg(max_replicas=4), Inputs(T, 3, ready(3, 1.0)), (4, "ScaleUp")),
    ("above max comes down to max", cfg(max_replicas=4), Inputs(T, 7, ready(7, 1.0)), (4, "AboveMax")),
    ("below min goes to min", cfg(min_replicas=3), Inputs(T, 1, ready(1, 0.0)), (3, "BelowFloor")),
    ("schedule raises the floor", cfg(), Inputs(T, 2, ready(2, 0.1), schedule_floor=5, schedule_name="office"),
     (5, "BelowFloor")),
    ("forecast raises the floor", cfg(), Inputs(T, 2, ready(2, 0.1), forecast_floor=4), (4, "BelowFloor")),
    ("floor never exceeds max", cfg(max_replicas=3), Inputs(T, 1, ready(1, 0.1), schedule_floor=9, schedule_name="x"),
     (3, "BelowFloor")),
    ("start-up lag: no over-scale", cfg(), Inputs(T, 4, ready(2, 0.9) + starting(2)), (4, "WithinTolerance")),
    ("requested but no pod yet counts as starting", cfg(), Inputs(T, 4, ready(2, 0.9)), (4, "WithinTolerance")),
    ("stuck past grace is ignored", cfg(), Inputs(T, 3, ready(2, 1.4) + starting(1, age=900)), (4, "ScaleUp")),
    ("stale replica: no scale-down", cfg(), Inputs(T, 3, ready(2, 0.1) + ready(1, None)), (3, "WithinTolerance")),
    ("stale replica: scale-up on fresh data only", cfg(), Inputs(T, 2, ready(1, 1.4) + ready(1, None)),
     (2, "WithinTolerance")),
    ("NaN is a missing sample", cfg(), Inputs(T, 3, ready(2, 0.1) + ready(1, math.nan)), (3, "WithinTolerance")),
    ("source down: hold", cfg(), Inputs(T, 3, ready(3, 0.01), source_ok=False), (3, "MetricsUnavailable")),
    ("all stale: hold", cfg(), Inputs(T, 3, ready(3, None, None)), (3, "MetricsUnavailable")),
    ("waiting requests scale up with KV low", cfg(), Inputs(T, 2, ready(2, 0.3, waiting=12.0)), (6, "ScaleUp")),
    ("the larger metric proposal wins", cfg(), Inputs(T, 2, ready(2, 1.4, waiting=6.0)), (4, "ScaleUp")),
    ("scale from zero on held requests", cfg(min_replicas=0), Inputs(T, 0, held_requests=3), (1, "ScaleFromZero")),
    ("zero stays zero when idle", cfg(min_replicas=0), Inputs(T, 0), (0, "ScaledToZero")),
    ("zero with a floor", cfg(min_replicas=0), Inputs(T, 0, schedule_floor=2, schedule_name="a"), (2, "BelowFloor")),
    ("idle at min 0 goes to zero", cfg(min_replicas=0), Inputs(T, 2, ready(2, 0.0, 0.0)), (0, "ScaleDown")),
    ("scale-down disabled", cfg(down=Rules(0, (Policy("Pods", 5, 15),), "Disabled")), Inputs(T, 5, ready(5, 0.0)),
     (5, "ScaleDownLimit")),
    ("scale-up disabled", cfg(up=Rules(0, (Policy("Pods", 5, 15),), "Disabled")), Inputs(T, 2, ready(2, 1.4)),
     (2, "ScaleUpLimit")),
]  # fmt: skip


@pytest.mark.parametrize(("name", "c", "inputs", "want"), S, ids=[s[0] for s in S])
def test_decision_table(name: str, c: Config, inputs: Inputs, want: tuple[int, str]) -> None:
    d = run(c, inputs)
    assert (d.desired, d.reason) == want, d.message
    assert d.floor <= c.max_replicas


def test_status_inputs_are_reported() -> None:
    d = run(cfg(), Inputs(T, 4, ready(2, 0.5, 1.0) + ready(1, None, None) + starting(1)))
    assert (d.ready, d.starting, d.missing, d.stuck, d.metrics_ok) == (3, 1, 1, 0, False)
    assert d.kv == pytest.approx(0.5) and d.waiting == pytest.approx(1.0) and d.running == pytest.approx(1.0)
    assert "without fresh metrics" in d.message


def test_schedule_floor_source_is_named() -> None:
    d = run(cfg(), Inputs(T, 2, ready(2, 0.1), schedule_floor=5, schedule_name="office"))
    assert (d.floor, d.floor_source) == (5, "schedule/office")
    d = run(cfg(), Inputs(T, 2, ready(2, 0.1), schedule_floor=3, schedule_name="office", forecast_floor=4))
    assert (d.floor, d.floor_source) == (4, "forecast")
    assert run(cfg(), Inputs(T, 2, ready(2, 0.7))).floor_source == "minReplicas"


def test_warm_standby_is_promoted_first() -> None:
    d = run(cfg(), Inputs(T, 2, ready(2, 1.4), standby_ready=1))
    assert (d.desired, d.promote) == (4, 1)  # one standby goes into rotation, one new replica starts
    d = run(cfg(), Inputs(T, 2, ready(2, 1.4), standby_ready=5))
    assert d.promote == 2
    assert run(cfg(), Inputs(T, 4, ready(4, 0.1), standby_ready=5)).promote == 0


def test_fresh_loop_waits_a_full_window_before_acting() -> None:
    """No history (new deployment, lost status): as if the current count was just recommended."""
    c = cfg(up=Rules(60, (Policy("Pods", 2, 120),)), down=Rules(300, (Policy("Pods", 1, 300),)))
    d = decide(c, Inputs(0, 2, ready(2, 1.4)))
    assert (d.desired, d.reason) == (2, "ScaleUpStabilized")
    d = decide(c, Inputs(61, 2, ready(2, 1.4)), d.history)
    assert (d.desired, d.reason) == (4, "ScaleUp")
    d = decide(c, Inputs(0, 4, ready(4, 0.0)))
    assert (d.desired, d.reason) == (4, "ScaleDownStabilized")


# ---- the seed lesson's HPA example, simulated ---------------------------------------------------------

SEED = AutoscalingSpec.model_validate(
    {
        "enabled": True,
        "minReplicas": 2,
        "maxReplicas": 16,
        "targetKVCacheUtilization": 0.70,
        "scaleUp": {
            "stabilizationWindowSeconds": 60,
            "policies": [{"type": "Pods", "value": 2, "periodSeconds": 120}],
        },
        "scaleDown": {
            "stabilizationWindowSeconds": 300,
            "policies": [{"type": "Pods", "value": 1, "periodSeconds": 300}],
        },
    }
)


def simulate(c: Config, demand: list[float], start: int, period: float = 15.0) -> list[int]:
    """Replicas after each sync; ``demand`` is the load in replica-equivalents, spread evenly over
    the replicas (all ready: start-up is tested elsewhere). KV usage saturates at 100%; what does
    not fit waits (8 requests per replica-equivalent), as in vLLM."""
    h, n, out = History(), start, []  # a fresh loop: it seeds its history with the current count
    for i, load in enumerate(demand):
        kv = min(1.0, load / n) if n else 0.0
        waiting = max(0.0, load / n - 1.0) * 8 if n else 0.0
        d = decide(c, Inputs(i * period, n, ready(n, kv, waiting)), h)
        h, n = d.history, d.desired
        out.append(n)
    return out


def test_seed_hpa_example_reacts_in_a_minute_adds_two_per_two_minutes_and_waits_five_to_shrink() -> None:
    c = Config.from_spec(SEED)
    # 5 min of quiet at target, 15 min of a load worth 8 replicas at 100% (needs ceil(8/0.7) = 12),
    # then 25 min idle; one sync every 15 s.
    out = simulate(c, [1.4] * 20 + [8.0] * 60 + [0.2] * 100, start=2)
    assert out[:20] == [2] * 20
    first_up = next(i for i, n in enumerate(out) if n > 2)
    # the up window: no reaction before a minute of high load (the sample exactly 60 s old is out)
    assert (first_up - 20) * 15 >= 60 - 15
    assert out[first_up] == 4  # +2 pods per 120 s
    ups = [(i, b - a) for i, (a, b) in enumerate(zip([2, *out], out, strict=False)) if b > a]
    for (i, k), (j, _) in itertools.pairwise(ups):
        assert k <= 2 and (j - i) * 15 >= 120, ups  # never more than 2 per 120 s
    assert max(out[:80]) == 12  # reaches what the load needs (0.67 per replica, inside tolerance)
    top = out[79]
    first_down = next(i for i in range(80, 180) if out[i] < top)
    assert (first_down - 80) * 15 >= 300 - 15  # the down window: five minutes of low load first
    downs = [i for i in range(80, 180) if out[i] < out[i - 1]]
    assert len(downs) == 5 and out[-1] == 7  # 25 min idle: one pod per 5 min, from 12
    assert all((b - a) * 15 >= 300 for a, b in itertools.pairwise(downs))  # 1 pod per 300 s
    assert all(out[i - 1] - out[i] <= 1 for i in downs)


def test_config_from_spec_maps_fields_and_k8s_default_policies() -> None:
    c = Config.from_spec(SEED)
    assert c.up == Rules(60, (Policy("Pods", 2, 120),), "Max")
    assert c.down == Rules(300, (Policy("Pods", 1, 300),), "Max")
    bare = Config.from_spec(
        AutoscalingSpec(
            enabled=True,
            scale_up=ScalingRules(),
            scale_down=ScalingRules(stabilization_window_seconds=30, policies=[]),
        )
    )
    assert bare.up.policies == (Policy("Pods", 4, 15), Policy("Percent", 100, 15))
    assert bare.down == Rules(30, (Policy("Percent", 100, 15),))
    one = ScalingRules(
        policies=[ScalingPolicy(type="Percent", value=50, period_seconds=60)], select_policy="Min"
    )
    assert Config.from_spec(AutoscalingSpec(enabled=True, scale_up=one)).up.select == "Min"


def test_default_behaviour_reacts_at_once_up_and_one_pod_at_a_time_down() -> None:
    """The product's defaults: the HPA's scale-up (model loads take minutes; a window only adds to
    them), the conservative one-pod-per-5-minutes scale-down."""
    d = Config.from_spec(AutoscalingSpec(enabled=True))
    assert d.up == Rules(0, (Policy("Pods", 4, 15), Policy("Percent", 100, 15)), "Max")
    assert d.down == Rules(300, (Policy("Pods", 1, 300),), "Max")


def test_defaults_answer_a_burst_on_eight_replicas_in_one_pass() -> None:
    """A 1.6x burst on 8 replicas at the 0.7 target wants 5 more: the defaults add them at the first
    sync (max(4 pods, 100 %) per 15 s), where the former 2 pods/120 s after 60 s took 5 minutes."""
    c = Config.from_spec(AutoscalingSpec(enabled=True, max_replicas=16))
    d = run(c, Inputs(now=10_000, current=8, replicas=ready(8, 0.7 * 1.6)), steady(8))
    assert (d.desired, d.reason, d.limited) == (13, "ScaleUp", "")  # ceil(8 x 1.6) = 13
    # the replicas now loading count as capacity on the way: the next pass adds none on top
    nxt = run(c, Inputs(now=10_015, current=13, replicas=ready(8, 0.7 * 1.6) + starting(5)), d.history)
    assert nxt.desired == 13


# ---- properties ----------------------------------------------------------------------------------------

configs = strat.configs(cfg, 5, 20, strat.rules([0.0, 30.0, 60.0, 300.0], [15.0, 60.0, 120.0, 300.0], 3))
replica = strat.replicas(2000)


@settings(max_examples=300, deadline=None)
@given(
    configs,
    st.integers(0, 40),
    st.lists(replica, max_size=30),
    st.booleans(),
    st.integers(0, 30),
    st.integers(0, 5),
)
def test_bounds_always_hold(
    c: Config, current: int, reps: list[Replica], ok: bool, sched: int, held: int
) -> None:
    d = decide(c, Inputs(100.0, current, tuple(reps), source_ok=ok, schedule_floor=sched, schedule_name="s",
                         held_requests=held))  # fmt: skip
    assert d.desired <= c.max_replicas
    assert d.floor == min(max(c.min_replicas, sched), c.max_replicas)
    if current > 0 or d.floor > 0:
        assert d.desired >= d.floor
    if current == 0 and held and d.floor == 0:
        assert d.desired == 1
    if current and d.floor <= current <= c.max_replicas and not d.metrics_ok:
        assert d.desired >= current, "missing or stale metrics never scale down"
    assert 0 <= d.promote <= max(0, d.desired - current)


@settings(max_examples=150, deadline=None)
@given(configs, st.lists(replica, max_size=12), st.integers(1, 12))
def test_partial_data_never_scales_up_past_what_fresh_replicas_justify(
    c: Config, reps: list[Replica], cur: int
) -> None:
    """Adding replicas without data can only lower the scale-up, never raise it."""
    fresh = tuple(replace(r, ready=True) for r in reps if r.kv is not None and not math.isnan(r.kv))
    blind = fresh + tuple(Replica(f"b{i}", True, 3600) for i in range(3))
    cur = max(cur, len(blind))
    h = History(recommendations=((-1e6, cur),))
    with_blind = decide(c, Inputs(0, cur, blind), h).desired
    only_fresh = decide(c, Inputs(0, cur, fresh), h).desired
    if with_blind > cur:
        assert with_blind <= max(only_fresh, cur)


@settings(max_examples=100, deadline=None)
@given(st.integers(100, 600), st.floats(0.05, 0.4), st.floats(0.8, 1.0), st.integers(1, 3))
def test_no_flapping_under_an_oscillating_signal(window: int, low: float, high: float, half: int) -> None:
    """A signal that swings faster than the scale-down window never scales down while it swings
    (scale-up reacts at once here, so the highs do add replicas)."""
    c = cfg(
        max_replicas=16, up=Rules(0, (Policy("Pods", 2, 60),)), down=Rules(window, (Policy("Pods", 1, 60),))
    )
    period = 15.0
    assert half * 2 * period < window
    h, n, seq = History(recommendations=((-1e6, 4),)), 4, []
    for i in range(120):
        level = high if (i // half) % 2 == 0 else low
        d = decide(c, Inputs(i * period, n, ready(n, level)), h)
        h, n = d.history, d.desired
        seq.append(n)
    assert seq == sorted(seq), f"replicas went down while the signal oscillated: {seq}"
    assert seq[-1] > 4


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.floats(0.0, 3.0), min_size=5, max_size=80),
    st.integers(1, 4),
    st.sampled_from([30.0, 60.0, 120.0]),
)
def test_pods_policy_is_never_exceeded_in_any_period(loads: list[float], value: int, period: float) -> None:
    c = cfg(max_replicas=50, up=Rules(0, (Policy("Pods", value, period),)),
            down=Rules(0, (Policy("Pods", value, period),)))  # fmt: skip
    h, n, counts = History(recommendations=((-1e6, 2),)), 2, []
    for i, load in enumerate(loads):
        now = i * 15.0
        d = decide(c, Inputs(now, n, ready(n, min(1.0, load / n))), h)
        if d.desired != n:
            counts.append((now, d.desired))
        h, n = d.history, d.desired
    # Every change moves at most `value` past the count in force when its period started (HPA: the
    # period's start = replicas now - added + removed within the period): a scale-up ends at most
    # `value` above it, a scale-down at most `value` below it. (A scale-up may still end below
    # that start, after a scale-down inside the period.)
    history = [(-1e9, 2), *counts]
    for i, (t, after) in enumerate(counts):
        before = history[i][1]
        start = next(m for s, m in reversed(history) if s <= t - period)
        if after > before:
            assert after <= start + value, (t, counts)
        else:
            assert after >= start - value, (t, counts)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 30), st.integers(0, 10), st.floats(0.71, 1.0))
def test_starting_replicas_never_cause_more_scale_up(ready_n: int, start_n: int, kv: float) -> None:
    c = cfg(max_replicas=1000)
    cur = ready_n + start_n
    h = History(recommendations=((-1e6, cur),))
    with_starting = decide(c, Inputs(0, cur, ready(ready_n, kv) + starting(start_n)), h).desired
    # the same ready replicas as if the starting ones were not there at all (and never requested)
    alone = decide(c, Inputs(0, ready_n, ready(ready_n, kv)), History(recommendations=((-1e6, ready_n),)))
    assert with_starting <= max(cur, alone.desired)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 6), min_size=1, max_size=40), st.sampled_from([0.0, 30.0, 60.0, 300.0]))
def test_compacted_history_stabilizes_like_the_full_one(recs: list[int], window: float) -> None:
    """Keeping only the newest sample of each value gives the same stabilization as every sample."""
    from toposerve.autoscale.decision import remember

    full: list[tuple[float, int]] = []
    short: tuple[tuple[float, int], ...] = ()
    rules = Rules(window, ())
    for i, r in enumerate(recs):
        now = i * 15.0
        for cur in (0, 3, 6):
            assert stabilize(cur, r, full, now, rules, rules) == stabilize(cur, r, short, now, rules, rules)
        full.append((now, r))
        short = remember(short, now, r)
    assert len(short) == len(set(recs))
