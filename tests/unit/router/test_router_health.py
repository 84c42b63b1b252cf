"""Health rules (pure): blame, non-compounding ejection, probe re-admission, the ejection cap."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as hs

from toposerve.router import health as hl

CFG = hl.HealthConfig(eject_after=3, base_s=5.0, max_s=60.0, max_ejection_percent=50.0)
FAILURES = (hl.UNREACHABLE, hl.DISCONNECT, hl.STATUS_5XX, hl.STREAM_BROKEN)


def fleet(n: int) -> dict[str, hl.HealthState]:
    return {f"b{i}": hl.HealthState() for i in range(n)}


def test_blame_counts_a_pre_first_byte_failure_only_when_another_backend_then_succeeded() -> None:
    assert hl.blame([hl.STATUS_5XX, hl.OK]) == [True, False]
    assert hl.blame([hl.DISCONNECT, hl.OK]) == [True, False]
    # both failed: the request is the suspect, nobody is blamed
    assert hl.blame([hl.STATUS_5XX, hl.STATUS_5XX]) == [False, False]
    assert hl.blame([hl.STATUS_5XX, hl.DISCONNECT]) == [False, False]
    # the retry said the request is bad (4xx): the first 5xx is not the backend's either
    assert hl.blame([hl.STATUS_5XX, hl.CLIENT_ERROR]) == [False, False]
    # no second opinion
    assert hl.blame([hl.STATUS_5XX]) == [False]
    # unreachable never depends on the request; a broken stream had no retry to spread it
    assert hl.blame([hl.UNREACHABLE, hl.STATUS_5XX]) == [True, False]
    assert hl.blame([hl.STREAM_BROKEN]) == [True]


@given(hs.lists(hs.sampled_from((*FAILURES, hl.CLIENT_ERROR)), max_size=4))
def test_without_a_success_no_request_caused_failure_is_blamed(outcomes: list[str]) -> None:
    for o, b in zip(outcomes, hl.blame(outcomes), strict=True):
        if o in (hl.STATUS_5XX, hl.DISCONNECT):
            assert not b


def test_failures_while_ejected_do_not_compound_the_hold() -> None:
    states = fleet(2)
    hold = None
    for _ in range(3):
        hold = hl.record_failure(states, states, "b0", hl.STATUS_5XX, 100.0, CFG)
    assert hold == 5.0 and states["b0"].ejected(104.9)
    # ten requests that were in flight during the same outage fail now: still 5 s
    for _ in range(10):
        assert hl.record_failure(states, states, "b0", hl.STREAM_BROKEN, 101.0, CFG) is None
    assert states["b0"].ejected_until == 105.0 and not states["b0"].ejected(105.0)


def test_back_off_doubles_only_across_re_admissions_and_resets_on_success() -> None:
    states = fleet(2)
    b = states["b0"]
    assert hl.record_failure(states, states, "b0", hl.UNREACHABLE, 0.0, CFG) == 5.0
    assert hl.record_failure(states, states, "b0", hl.UNREACHABLE, 5.0, CFG) == 10.0  # failed again once back
    hl.record_success(b, 15.0)
    assert b.ejections == 0
    assert hl.record_failure(states, states, "b0", hl.UNREACHABLE, 16.0, CFG) == 5.0
    big = {k: hl.HealthState(ejections=10_000) for k in states}
    assert hl.record_failure(big, big, "b0", hl.UNREACHABLE, 0.0, CFG) == CFG.max_s  # no overflow


def test_probe_re_admits_a_restarted_or_unreachable_backend() -> None:
    states = fleet(2)
    b = states["b0"]
    hl.record_failure(states, states, "b0", hl.UNREACHABLE, 0.0, CFG)
    assert b.ejected(1.0)
    assert hl.record_probe(b, True, 1.0)  # reachable again: back at once
    assert b.healthy(1.0)
    # crashed mid-stream: probes fail while it restarts, then pass
    for _ in range(3):
        hl.record_failure(states, states, "b0", hl.STREAM_BROKEN, 2.0, CFG)
    assert b.ejected(2.5)
    assert not hl.record_probe(b, False, 2.5)
    assert not b.healthy(2.5)
    assert hl.record_probe(b, True, 3.0) and b.healthy(3.0)


def test_probe_does_not_cut_short_an_ejection_for_errors_its_health_endpoint_misses() -> None:
    states = fleet(2)
    b = states["b0"]
    for _ in range(3):
        hl.record_failure(states, states, "b0", hl.STATUS_5XX, 0.0, CFG)
    assert not hl.record_probe(b, True, 1.0)  # /health said 200 all along
    assert b.ejected(1.0) and not b.ejected(5.0)


def test_ejection_cap_never_empties_the_fleet() -> None:
    one = fleet(1)
    assert hl.record_failure(one, one, "b0", hl.UNREACHABLE, 0.0, CFG) is None
    assert one["b0"].healthy(0.0)
    two = fleet(2)
    assert hl.record_failure(two, two, "b0", hl.UNREACHABLE, 0.0, CFG) == 5.0
    assert hl.record_failure(two, two, "b1", hl.UNREACHABLE, 0.0, CFG) is None  # 50 % of 2 is 1
    assert two["b1"].healthy(0.0)
    # a backend whose probe fails is not in service: it does not make room for ejections
    three = fleet(3)
    three["b2"].probe_ok = False
    assert hl.record_failure(three, ["b0", "b1"], "b0", hl.UNREACHABLE, 0.0, CFG) == 5.0
    assert hl.record_failure(three, ["b0", "b1"], "b1", hl.UNREACHABLE, 0.0, CFG) is None
    # 100 % still keeps the last one
    all_out = hl.HealthConfig(max_ejection_percent=100.0)
    assert hl.record_failure(two, two, "b1", hl.UNREACHABLE, 0.0, all_out) is None


@given(
    hs.integers(min_value=1, max_value=6),
    hs.lists(
        hs.tuples(hs.integers(min_value=0, max_value=5), hs.sampled_from(FAILURES), hs.floats(0, 2)),
        max_size=60,
    ),
    hs.floats(min_value=0, max_value=100),
)
def test_no_failure_sequence_ejects_every_backend(
    n: int, events: list[tuple[int, str, float]], pct: float
) -> None:
    cfg = hl.HealthConfig(max_ejection_percent=pct)
    states = fleet(n)
    now = 0.0
    for i, kind, dt in events:
        now += dt
        hl.record_failure(states, states, f"b{i % n}", kind, now, cfg)
        assert any(s.healthy(now) for s in states.values())
        assert sum(s.ejected(now) for s in states.values()) <= max(0, int(n * pct / 100 + 1e-9))


def test_a_probe_timeout_is_a_busy_engine_until_it_repeats() -> None:
    """vLLM answers /health on the loop that streams: a late answer is a busy engine, taken out
    only after PROBE_TIMEOUTS_DOWN timeouts in a row; a refusal or non-200 at once."""
    b = hl.HealthState()
    for i in range(hl.PROBE_TIMEOUTS_DOWN - 1):
        assert not hl.record_probe(b, False, float(i), timed_out=True)
        assert b.healthy(float(i)), i
    hl.record_probe(b, False, 5.0, timed_out=True)
    assert not b.healthy(5.0)
    hl.record_probe(b, True, 6.0)
    assert b.healthy(6.0) and b.probe_timeouts == 0
    # a success between timeouts starts the count again
    hl.record_probe(b, False, 7.0, timed_out=True)
    hl.record_probe(b, True, 8.0)
    for t in (9.0, 10.0):
        hl.record_probe(b, False, t, timed_out=True)
    assert b.healthy(10.0)
    # a refusal (or a 503) is not a busy engine
    hl.record_probe(b, False, 11.0)
    assert not b.healthy(11.0)
    # already out: a timeout keeps it out
    hl.record_probe(b, False, 12.0, timed_out=True)
    assert not b.healthy(12.0)
