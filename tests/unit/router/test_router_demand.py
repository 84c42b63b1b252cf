"""The autoscaler's leading signal, pure part (demand.py): windows, rates, expiry, in-flight
accounting, engine counters and their resets. Clocks are arguments: nothing here waits."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs

from toposerve.mockengine.metrics import EngineMetrics
from toposerve.mockengine.scheduler import StepStats
from toposerve.router import demand as dm

# ---------------------------------------------------------------------------------------- ring


def test_ring_sums_only_the_window_and_reads_zero_when_idle() -> None:
    r = dm.Ring(60, 2)
    for t in (100.1, 100.9, 101.5, 104.0):
        i = r.slot(t)
        r.cols[0][i] += 1
        r.cols[1][i] += 10
    assert r.sums(104.5, 5) == [4.0, 40.0]  # seconds 100..104
    assert r.sums(104.5, 4) == [2.0, 20.0]  # seconds 101..104
    assert r.sums(105.0, 5) == [2.0, 20.0]  # 100 left the window
    assert r.sums(163.9, 60) == [1.0, 10.0]  # only 104 still in 104..163
    assert r.sums(164.0, 60) == [0.0, 0.0]  # idle for a minute: 0, not the stale buckets


def test_ring_reuses_a_slot_a_whole_turn_later_without_stale_values() -> None:
    r = dm.Ring(5, 1)
    r.cols[0][r.slot(3.0)] += 7
    i = r.slot(8.0)  # the same slot (8 % 5 == 3), a turn later: zeroed first
    assert r.cols[0][i] == 0.0
    r.cols[0][i] += 1
    assert r.sums(8.0, 5) == [1.0]


def test_ring_rejects_windows_it_cannot_hold() -> None:
    r = dm.Ring(5, 1)
    with pytest.raises(ValueError):
        r.sums(10.0, 6)
    with pytest.raises(ValueError):
        dm.Ring(0, 1)


def test_span_covers_the_buckets_and_not_before_counting_began() -> None:
    assert dm.span(100.25, 5, since=0.0) == pytest.approx(4.25)  # 96.0 .. 100.25
    assert dm.span(100.0, 60, since=0.0) == pytest.approx(59.0)
    assert dm.span(100.0, 60, since=90.0) == pytest.approx(10.0)  # a router up for 10 s
    assert dm.span(100.0, 60, since=99.9) == dm.MIN_SPAN_S  # never below one bucket


# ------------------------------------------------------------------------------------ arrivals


def test_rates_per_pool_and_window() -> None:
    d = dm.Demand(since=0.0)
    for k in range(10):  # one a second for 10 s on h100, 100 prompt + 50 decode tokens each
        d.arrive("h100", 100, 50, 200.0 + k)
    d.arrive("a100", 1000, 10, 209.5)
    r5 = d.rates("h100", 5, 209.5)  # seconds 205..209 hold 5 arrivals, over 4.5 s
    assert r5 == dm.ArrivalRates(5 / 4.5, 500 / 4.5, 250 / 4.5)
    r60 = d.rates("h100", 60, 209.5)
    assert r60.requests == pytest.approx(10 / 59.5)
    assert d.rates("a100", 5, 209.5).prompt_tokens == pytest.approx(1000 / 4.5)
    assert d.rates("nowhere", 5, 209.5) == dm.ArrivalRates(0.0, 0.0, 0.0)
    p = d.pools["h100"]
    assert (p.requests, p.prompt_tokens, p.decode_tokens) == (10, 1000, 500)


def test_rates_fall_to_zero_without_traffic() -> None:
    d = dm.Demand(since=0.0)
    d.arrive("p", 10, 10, 50.0)
    assert d.rates("p", 5, 54.9).requests > 0
    assert d.rates("p", 5, 55.0).requests == 0.0  # second 50 is out of 51..55
    assert d.rates("p", 60, 109.9).requests > 0
    assert d.rates("p", 60, 110.0) == dm.ArrivalRates(0.0, 0.0, 0.0)
    assert d.pools["p"].requests == 1  # the cumulative counter stays


def test_in_flight_comes_back_to_zero() -> None:
    d = dm.Demand(since=0.0)
    d.sent("p", 300)
    d.sent("p", 50)
    assert (d.pools["p"].in_flight, d.pools["p"].in_flight_tokens) == (2, 350)
    d.finished("p", 300)
    d.finished("p", 50)
    assert (d.pools["p"].in_flight, d.pools["p"].in_flight_tokens) == (0, 0)
    d.finished("gone", 1)  # unknown pool: ignored, never negative elsewhere


def test_prune_forgets_idle_pools_only() -> None:
    d = dm.Demand(since=0.0)
    d.arrive("old", 1, 1, 10.0)
    d.arrive("busy", 1, 1, 10.0)
    d.sent("busy", 2)
    d.arrive("kept", 1, 1, 10.0)
    d.arrive("recent", 1, 1, 60.0)
    d.prune(69.0, keep=["kept"])
    assert set(d.pools) == {"old", "busy", "kept", "recent"}  # second 10 is still in 10..69
    d.prune(71.0, keep=["kept"])
    assert set(d.pools) == {"busy", "kept", "recent"}  # in flight and kept stay


def test_common_pool() -> None:
    assert dm.common_pool([]) == ""
    assert dm.common_pool(["h100", "h100"]) == "h100"
    assert dm.common_pool(["h100", "a100"]) == ""
    assert dm.common_pool(iter(["x"])) == "x"


times = hs.floats(min_value=0.0, max_value=400.0, allow_nan=False)


@settings(max_examples=300, deadline=None)
@given(
    events=hs.lists(hs.tuples(times, hs.integers(0, 5000), hs.integers(0, 5000)), max_size=80),
    queries=hs.lists(times, max_size=8),
    window=hs.sampled_from(dm.WINDOWS),
    since=hs.floats(min_value=-100.0, max_value=100.0),
)
def test_rates_equal_a_brute_force_count_of_the_window(
    events: list[tuple[float, int, int]], queries: list[float], window: int, since: float
) -> None:
    """Any arrival history, read at any later times: rate x span is exactly what arrived in the
    window's buckets (expired seconds drop out, reused slots carry nothing stale)."""
    d = dm.Demand(since=since)
    log: list[tuple[float, int, int]] = []
    stream = sorted([(t, 0, p, q) for t, p, q in events] + [(t, 1, 0, 0) for t in queries])
    for t, is_query, p, q in stream:
        if not is_query:
            d.arrive("p", p, q, t)
            log.append((t, p, q))
            continue
        lo = math.floor(t) - window + 1
        inside = [(p_, q_) for t_, p_, q_ in log if math.floor(t_) >= lo]
        r = d.rates("p", window, t)
        s = dm.span(t, window, since)
        assert r.requests * s == pytest.approx(len(inside), abs=1e-9)
        assert r.prompt_tokens * s == pytest.approx(sum(x for x, _ in inside), abs=1e-6)
        assert r.decode_tokens * s == pytest.approx(sum(y for _, y in inside), abs=1e-6)
    assert all(len(col) == dm.LONG_WINDOW_S for col in d.pools["p"].ring.cols) if events else True


@settings(max_examples=200, deadline=None)
@given(
    n=hs.integers(1, 2000),
    window=hs.sampled_from(dm.WINDOWS),
    now=hs.floats(min_value=100.0, max_value=1e6),
    seed=hs.randoms(use_true_random=False),
)
def test_n_events_spread_over_a_window_read_as_n_over_the_window(
    n: int, window: int, now: float, seed: object
) -> None:
    """N arrivals spread over the span a window covers read as N / span requests per second."""
    import random

    assert isinstance(seed, random.Random)
    s = dm.span(now, window, since=0.0)
    ts = sorted(now - s * seed.random() for _ in range(n))
    d = dm.Demand(since=0.0)
    for t in ts:
        d.arrive("p", 3, 2, t)
    r = d.rates("p", window, now)
    assert r.requests == pytest.approx(n / s)
    assert r.prompt_tokens == pytest.approx(3 * n / s)
    assert r.decode_tokens == pytest.approx(2 * n / s)
    # and nothing of it is left one full window later
    assert d.rates("p", window, now + window).requests == 0.0


# ---------------------------------------------------------------------------- engine counters

VLLM_PAGE = """\
# HELP vllm:generation_tokens_total Number of generation tokens processed.
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{engine="0",model_name="m"} 1000.0
vllm:generation_tokens_total{engine="1",model_name="m"} 500.0
vllm:generation_tokens_created{engine="0",model_name="m"} 1.7e9
vllm:prompt_tokens_total{engine="0",model_name="m"} 2e3
vllm:prompt_tokens_total{engine="1",model_name="m"} 1.0e3
vllm:request_prompt_tokens_bucket{engine="0",le="+Inf",model_name="m"} 9.0
vllm:request_generation_tokens_sum{engine="0",model_name="m"} 77.0
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_running{engine="1",model_name="m"} 2.0
vllm:num_requests_waiting{engine="0",model_name="m"} 1.0
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.4
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.5
vllm:num_requests_running{engine="2",model_name="m"} NaN
"""


def test_parse_engine_page_sums_a_pods_series() -> None:
    page = dm.parse_engine_page(VLLM_PAGE)
    assert page == dm.EngineSample(
        kv_usage=0.5, waiting=1, running=5.0, generation_tokens=1500.0, prompt_tokens=3000.0
    )


def test_parse_engine_page_without_the_series_says_none() -> None:
    assert dm.parse_engine_page("# nothing\nother_metric 1\n") == dm.EngineSample()


def test_the_mock_engine_exports_what_the_router_reads() -> None:
    m = EngineMetrics("mock", {"block_size": 16, "num_gpu_blocks": 100})
    m.observe_step(StepStats(generation_tokens=42, prompt_tokens=17))
    page = dm.parse_engine_page(m.render().decode())
    assert page.generation_tokens == 42.0 and page.prompt_tokens == 17.0
    assert page.running == 0.0 and page.waiting == 0 and page.kv_usage == 0.0


def sample(gen: float | None, prompt: float | None = None, running: float | None = None) -> dm.EngineSample:
    return dm.EngineSample(generation_tokens=gen, prompt_tokens=prompt, running=running)


def test_counter_delta() -> None:
    assert dm.counter_delta(10.0, 25.0) == 15.0
    assert dm.counter_delta(10.0, 10.0) == 0.0
    assert dm.counter_delta(10.0, 3.0) is None  # reset
    assert dm.counter_delta(None, 3.0) is None
    assert dm.counter_delta(3.0, None) is None


def test_service_rate_is_the_mean_per_ready_replica_at_the_observed_batch() -> None:
    s = dm.ServiceRates()
    for k in range(11):  # a polled every second for 10 s: 100 tokens/s at batch 4
        s.observe("a", "h100", 100.0 + k, sample(100.0 * k, 10.0 * k, 4.0))
        s.observe("b", "h100", 100.0 + k, sample(300.0 * k, 30.0 * k, 8.0))  # b: 300/s at 8
    r = s.rate("h100", 110.0)
    assert r is not None
    assert r.decode_tokens_per_replica == pytest.approx(200.0)
    assert r.prompt_tokens_per_replica == pytest.approx(20.0)
    assert r.running_per_replica == pytest.approx(6.0)
    assert r.replica_seconds == pytest.approx(20.0)
    assert s.rate("a100", 110.0) is None
    assert s.rate("h100", 110.0 + dm.SERVICE_WINDOW_S) is None  # a minute without polls


def test_service_rate_drops_resets_gaps_and_draining_replicas() -> None:
    s = dm.ServiceRates(max_gap_s=10.0)
    s.observe("a", "p", 0.0, sample(1000.0))
    s.observe("a", "p", 1.0, sample(1100.0))  # +100 in 1 s
    s.observe("a", "p", 2.0, sample(40.0))  # restarted: dropped, 40 is the new base
    s.observe("a", "p", 3.0, sample(140.0))  # +100 in 1 s
    s.observe("a", "p", 30.0, sample(5000.0))  # 27 s since the last poll: dropped
    s.observe("a", "p", 31.0, sample(9000.0), ready=False)  # draining: re-based only
    s.observe("a", "p", 32.0, sample(9100.0))  # +100 in 1 s
    r = s.rate("p", 32.0)
    assert r is not None and r.replica_seconds == 3.0 and r.decode_tokens_per_replica == 100.0
    assert r.prompt_tokens_per_replica is None and r.running_per_replica is None


def test_missing_counters_report_nothing_rather_than_zero() -> None:
    s = dm.ServiceRates()
    for k in range(5):
        s.observe("a", "p", float(k), dm.EngineSample(kv_usage=0.1, waiting=0, running=1.0))
    assert s.rate("p", 4.0) is None and "p" not in s.pools
    for k in range(5):  # prompt counter only: still no decode rate to report
        s.observe("b", "q", float(k), sample(None, 10.0 * k))
    assert s.rate("q", 4.0) is None


def test_forgotten_backend_starts_over_and_idle_pools_are_pruned() -> None:
    s = dm.ServiceRates()
    s.observe("a", "p", 0.0, sample(0.0))
    s.observe("a", "p", 1.0, sample(10.0))
    s.forget("a")
    s.observe("a", "p", 2.0, sample(1e9))  # first poll again: a base, not an interval
    r = s.rate("p", 2.0)
    assert r is not None and r.replica_seconds == 1.0
    s.prune(100.0, keep=["p"])
    assert "p" in s.pools
    s.prune(100.0)
    assert s.pools == {}


@settings(max_examples=300, deadline=None)
@given(
    polls=hs.lists(
        hs.tuples(
            hs.floats(min_value=0.01, max_value=15.0),  # time since the previous poll
            hs.one_of(hs.none(), hs.floats(min_value=0.0, max_value=1e7)),  # counter (resets too)
            hs.booleans(),  # ready
        ),
        min_size=1,
        max_size=40,
    )
)
def test_service_rate_counts_exactly_the_valid_increases(
    polls: list[tuple[float, float | None, bool]],
) -> None:
    """Whatever the counter does (grows, resets, vanishes), the pool's rate x replica-seconds is
    the sum of the increases over the window's intervals that were short enough, ready and
    reset-free (a brute-force model over the same polls)."""
    s = dm.ServiceRates(max_gap_s=10.0, window=60)
    end = 0.0
    for dt, _, _ in polls:
        end += dt
    t = 0.0
    prev: float | None = None
    seen = False
    tokens = seconds = 0.0
    for dt, value, ready in polls:
        t += dt
        s.observe("a", "p", t, sample(value), ready)
        if seen and ready and dt <= 10.0 and math.floor(t) >= math.floor(end) - 59:
            delta = dm.counter_delta(prev, value)
            if delta is not None:
                tokens += delta
                seconds += dt
        prev, seen = value, True
    r = s.rate("p", end)
    if seconds == 0:
        assert r is None
    else:
        assert r is not None
        assert r.replica_seconds == pytest.approx(seconds)
        assert r.decode_tokens_per_replica * r.replica_seconds == pytest.approx(tokens, rel=1e-9, abs=1e-6)
