"""Budgets shared across gateway replicas (router/budget_share.py): the pure accounting, with
explicit times; hypothesis properties over simulated replicas exchanging reports in rounds."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as hs

from toposerve.router import budget_share as bs
from toposerve.router import tenants as tn

T = "team-a"


def names(n: int) -> list[str]:
    return [f"r{i}" for i in range(n)]


def fleet(n: int) -> dict[str, bs.SharedBudgets]:
    out = {r: bs.SharedBudgets(ttl_s=3.0, interval_s=1.0) for r in names(n)}
    for r, s in out.items():
        s.set_known(set(out) - {r})
    return out


def exchange(reps: dict[str, bs.SharedBudgets], reports: dict[str, dict], now: float) -> None:
    for r, s in reps.items():
        for p, rep in reports.items():
            if p != r:
                s.receive(p, bs.parse_usage(rep), now)
        s.sync(now)


def total(reps: dict[str, bs.SharedBudgets], kind: str, now: float) -> float:
    return sum(s.own_usage(T, now)[kind] for s in reps.values())


@dataclass
class Run:
    admitted: int = 0
    refused: int = 0


def simulate(
    n: int, budgets: tn.Budgets, kind: str, rounds: list[list[tuple[int, float, int]]], lag: bool
) -> Run:
    """Rounds of one second: an exchange at each round's start (reports of this instant, or of
    the previous round's start with `lag`), then arrivals (replica, offset, tokens). Asserts the
    bound after every admission: the budget, plus the usage admitted since the reports the
    replicas hold were taken (lag: the previous round too), plus one request per replica (the
    one each may let through on an empty share)."""
    reps = fleet(n)
    limit = bs.limits(budgets)[kind]
    run = Run()
    prev_reports: dict[str, dict] = {}
    prev_charged = 0.0
    for k, arrivals in enumerate(rounds):
        t0 = 1000.0 + k
        now_reports = {r: s.report(t0) for r, s in reps.items()}
        exchange(reps, prev_reports if lag else now_reports, t0)
        prev_reports = now_reports
        charged, first = 0.0, 0.0
        seen: set[str] = set()
        for idx, off, tokens in sorted(arrivals, key=lambda a: a[1]):
            r = names(n)[idx % n]
            now = t0 + off
            reserve = float(min(tokens, budgets.tokens_per_minute)) if kind == bs.TOKENS else 0.0
            cost = reserve if kind == bs.TOKENS else 1.0
            if reps[r].check(T, budgets, reserve, now) is None:
                reps[r].charge(T, budgets, reserve, now)
                run.admitted += 1
                charged += cost
                if r not in seen:
                    first += cost
                seen.add(r)
                slack = first + (prev_charged if lag else 0.0)
                assert total(reps, kind, now) <= limit + slack + 1e-6, (k, r, total(reps, kind, now), limit)
            else:
                run.refused += 1
        prev_charged = charged
    return run


arrival = hs.tuples(hs.integers(0, 3), hs.floats(0, 0.999), hs.integers(1, 400))
rounds_st = hs.lists(hs.lists(arrival, max_size=25), min_size=1, max_size=12)


@settings(max_examples=150, deadline=None)
@given(n=hs.integers(2, 4), rps=hs.floats(0.2, 8), rounds=rounds_st, lag=hs.booleans())
def test_requests_across_replicas_stay_within_the_budget(
    n: int, rps: float, rounds: list[list[tuple[int, float, int]]], lag: bool
) -> None:
    simulate(n, tn.Budgets(requests_per_second=rps), bs.REQUESTS, rounds, lag)


@settings(max_examples=150, deadline=None)
@given(n=hs.integers(2, 4), tpm=hs.integers(100, 5000), rounds=rounds_st, lag=hs.booleans())
def test_tokens_across_replicas_stay_within_the_budget(
    n: int, tpm: int, rounds: list[list[tuple[int, float, int]]], lag: bool
) -> None:
    simulate(n, tn.Budgets(tokens_per_minute=tpm), bs.TOKENS, rounds, lag)


def test_one_replica_may_use_the_whole_budget_over_a_few_exchanges() -> None:
    """Sharing is not a static split: clients pinned to one replica reach the budget (the
    split of the headroom halves the gap at each exchange)."""
    reps = fleet(2)
    b = tn.Budgets(requests_per_second=10)  # 100 requests per 10 s window
    admitted = 0
    for k in range(8):
        t0 = 1000.0 + k
        exchange(reps, {r: s.report(t0) for r, s in reps.items()}, t0)
        for i in range(40):
            now = t0 + i / 40
            if reps["r0"].check(T, b, 0, now) is None:
                reps["r0"].charge(T, b, 0, now)
                admitted += 1
    assert 95 <= admitted <= 100


def test_without_peers_nothing_is_refused_here() -> None:
    """Alone (no peer known or reporting): only the local buckets decide (tenants.py)."""
    s = bs.SharedBudgets()
    b = tn.Budgets(requests_per_second=1, concurrent=1, tokens_per_minute=10)
    assert s.mode(0.0) == bs.ALONE
    for i in range(50):
        assert s.check(T, b, 10, float(i) / 100) is None
        s.charge(T, b, 10, float(i) / 100)


def test_an_unreachable_peer_means_budget_over_replicas() -> None:
    """Degraded: a known peer with no live report: each replica keeps to B / n (the peer does
    the same on its side, so a partition never admits more than the budget in all)."""
    a = bs.SharedBudgets()
    a.set_known({"r1"})
    b = tn.Budgets(concurrent=10)
    assert a.mode(0.0) == bs.DEGRADED
    n = 0
    for k in range(6):  # exchanges keep failing: the cap holds over them
        a.sync(float(k))
        while a.check(T, b, 0, float(k)) is None:
            a.charge(T, b, 0, float(k))
            n += 1
    assert n == 5
    r = a.check(T, b, 0, 5.0)
    assert r is not None and r.param == "concurrentRequests" and r.mode == bs.DEGRADED and r.replicas == 2


@settings(max_examples=100, deadline=None)
@given(n=hs.integers(2, 5), conc=hs.integers(1, 40))
def test_a_partition_never_admits_more_than_the_budget(n: int, conc: int) -> None:
    """Every replica cut off from every other: together they admit at most the budget (or one
    request each where the budget is below one per replica)."""
    reps = {r: bs.SharedBudgets() for r in names(n)}
    for r, s in reps.items():
        s.set_known(set(reps) - {r})
    b = tn.Budgets(concurrent=conc)
    admitted = 0
    for k in range(6):  # the exchanges find no peer, time after time
        for s in reps.values():
            s.sync(float(k))
            while s.check(T, b, 0, float(k)) is None:
                s.charge(T, b, 0, float(k))
                admitted += 1
    assert admitted == n * max(1, conc // n)
    assert admitted <= max(conc, n)


@settings(max_examples=100, deadline=None)
@given(used=hs.integers(1, 30), ttl=hs.floats(0.5, 10), late=hs.floats(0, 20))
def test_a_dead_peers_share_returns_after_its_report_expires(used: int, ttl: float, late: float) -> None:
    """A peer that reported `used` in flight then vanished (gone from discovery, no more
    reports): its usage counts until the report expires, then the whole budget is free."""
    b = tn.Budgets(concurrent=30)
    a = bs.SharedBudgets(ttl_s=ttl)
    a.set_known({"r1"})
    a.receive("r1", {T: {bs.CONCURRENT: float(used)}}, 0.0)
    a.sync(0.0)
    a.set_known(set())  # its pod left the Service's endpoints
    now = late
    room = 0
    while a.check(T, b, 0, now) is None and room < 100:
        a.charge(T, b, 0, now)
        room += 1
    if late < ttl:
        assert a.mode(now) == bs.SHARED
        assert room <= 30 - used + 1  # its usage still counts (one free request per exchange)
    else:
        assert a.mode(now) == bs.ALONE
        assert room == 100  # alone: the local buckets decide (they allow concurrentRequests)


def test_windows_slide_and_settlement_adjusts_tokens() -> None:
    s = bs.SharedBudgets()
    b = tn.Budgets(tokens_per_minute=1000, requests_per_second=1)
    s.charge(T, b, 300, 0.0)
    s.finish(T, -200, 1.0)  # used 100 of the 300 reserved
    u = s.own_usage(T, 1.0)
    assert u == {bs.REQUESTS: 1.0, bs.TOKENS: 100.0, bs.CONCURRENT: 0.0}
    assert s.own_usage(T, 10.5)[bs.REQUESTS] == 0.0  # the 10 s requests window
    assert s.own_usage(T, 60.5)[bs.TOKENS] == 0.0
    assert bs.requests_window(0.01) == 100.0 and bs.requests_window(5) == 10.0


def test_parse_usage_drops_what_is_not_usage() -> None:
    doc = {T: {"requests": 3, "tokens": -1, "concurrent": "x", "other": 1}, "b": [1], 3: {}}
    assert bs.parse_usage(doc) == {T: {"requests": 3.0}}
    assert bs.parse_usage([1, 2]) == {}


def test_admission_refuses_over_the_shared_budget_with_retry_after() -> None:
    """tenants.Admission with `shared`: a request the local bucket allows is refused when the
    peers' usage leaves no room, naming the budget and the replicas."""
    shared = bs.SharedBudgets()
    key = "sk-team-a-0123456789abcdef"
    policy = {"budgets": {"requestsPerSecond": 1}, "keySha256": [tn.hash_key(key).hex()]}
    adm = tn.Admission(tn.build_table([tn.parse_policy(T, policy, "p")]), True, lambda: 100.0, shared)
    shared.set_known({"r1"})
    shared.receive("r1", {T: {bs.REQUESTS: 9.0}}, 100.0)  # the peer used 9 of the 10 s window's 10
    shared.sync(100.0)
    assert adm.admit({"x-api-key": key}, "m", 1).status == 200  # the last one
    assert shared.own_usage(T, 100.0)[bs.REQUESTS] == 1.0
    adm.clock = lambda: 105.0  # the local bucket (1/s) has refilled; the window has not
    d = adm.admit({"x-api-key": key}, "m", 1)
    assert d.status == 429 and d.param == "requestsPerSecond" and d.retry_after_s == 1
    assert "2 gateway replicas" in d.message and "shared" in d.message
