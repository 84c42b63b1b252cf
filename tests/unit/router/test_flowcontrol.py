"""Flow control (router/flowcontrol.py): strict priority between bands, weighted fair queuing
on tokens within a band, bounds in bytes and time; cases plus hypothesis properties."""

from __future__ import annotations

import itertools
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as hs

from toposerve.router.flowcontrol import FlowQueue, Item

_ids = itertools.count()


def item(
    tenant: str, band: int = 1, cost: float = 100, weight: float = 1.0, size: int = 10, at: float = 0.0
) -> Item:
    return Item(next(_ids), tenant, band, weight, cost, size, at)


def drain(q: FlowQueue) -> list[Item]:
    out = []
    while (i := q.pop()) is not None:
        out.append(i)
    return out


def test_higher_band_first_fifo_tie() -> None:
    q = FlowQueue()
    s = item("a", band=2)
    n = item("a", band=1)
    c = item("b", band=0)
    for i in (s, n, c):
        assert q.push(i).accepted
    assert [i.band for i in drain(q)] == [0, 1, 2]


def test_token_fairness_not_request_fairness() -> None:
    """a sends 1000-token requests, b sends 100-token ones: per token they alternate."""
    q = FlowQueue()
    for _ in range(3):
        q.push(item("a", cost=1000))
    for _ in range(30):
        q.push(item("b", cost=100))
    order = [i.tenant for i in drain(q)]
    first = order[: order.index("a", order.index("a") + 1) + 1]  # up to a's second request
    assert Counter(first)["b"] >= 9  # ~1000 tokens of b between a's requests


def test_weight_doubles_the_share() -> None:
    q = FlowQueue()
    for _ in range(40):
        q.push(item("heavy", weight=2))
        q.push(item("light", weight=1))
    first = [i.tenant for i in drain(q)][:30]
    assert Counter(first)["heavy"] == 20


def test_bytes_bound_evicts_the_lowest_band_newest_first() -> None:
    q = FlowQueue(max_bytes=30)
    s1, s2, n1 = item("a", band=2), item("b", band=2), item("c", band=1)
    for i in (s1, s2, n1):
        assert q.push(i).accepted
    crit = item("d", band=0, size=15)
    r = q.push(crit)
    assert r.accepted and [e.id for e in r.evicted] == [s2.id, s1.id]
    assert q.bytes == 25 and s1.id not in q and n1.id in q
    # nothing lower than standard is left to evict: another standard one is refused, nothing lost
    r2 = q.push(item("e", band=1, size=10))
    assert not r2.accepted and r2.evicted == () and len(q) == 2 and q.bytes == 25


def test_refused_when_eviction_cannot_make_room_keeps_everyone() -> None:
    q = FlowQueue(max_bytes=30)
    s = item("a", band=2, size=5)
    n = item("b", band=1, size=20)
    q.push(s), q.push(n)
    r = q.push(item("c", band=1, size=11))  # evicting s frees 5 (10 in all): still 1 short
    assert not r.accepted and s.id in q and q.bytes == 25


def test_expire_and_remove() -> None:
    q = FlowQueue(max_wait_s=5)
    old, new = item("a", at=0), item("b", at=3)
    q.push(old), q.push(new)
    assert [i.id for i in q.expire(5)] == [old.id]
    assert q.remove(new.id) is new and len(q) == 0 and q.bytes == 0
    assert q.pop() is None and q.retry_after_s() == 5


def test_a_tenant_whose_requests_left_is_not_penalised() -> None:
    q = FlowQueue()
    gone = [item("a", cost=1000) for _ in range(5)]
    for i in gone:
        q.push(i)
    for i in gone:
        q.remove(i.id)
    q.push(b := item("b", cost=100))
    q.push(a := item("a", cost=100))
    assert a.finish == b.finish  # a's tag went back with its removed requests


# ------------------------------------------------------------------------------ properties

ops = hs.lists(
    hs.one_of(
        hs.tuples(
            hs.just("push"),
            hs.sampled_from("abcd"),
            hs.integers(0, 2),
            hs.integers(1, 4000),
            hs.integers(1, 300),
            hs.sampled_from([0.5, 1.0, 2.0]),
        ),
        hs.tuples(hs.just("pop")),
        hs.tuples(hs.just("expire"), hs.floats(0, 3)),
    ),
    max_size=120,
)


@settings(max_examples=300, deadline=None)
@given(ops)
def test_bounds_and_strict_priority_hold(script: list[tuple]) -> None:
    """Under any sequence: bytes within the bound and equal to what is queued; a popped request
    is never of a lower band than one still waiting; nothing waits past max_wait_s after expire;
    each request leaves exactly once."""
    q = FlowQueue(max_bytes=1000, max_wait_s=5)
    now, seen, left = 0.0, set(), set()
    for op in script:
        if op[0] == "push":
            _, t, band, cost, size, w = op
            i = item(t, band, cost, w, size, now)
            r = q.push(i)
            seen.add(i.id)
            left.update(e.id for e in r.evicted)
            assert all(e.band > band for e in r.evicted)
            if not r.accepted:
                left.add(i.id)
        elif op[0] == "pop":
            got = q.pop()
            if got is not None:
                assert all(w.band >= got.band for w in q.items())
                left.add(got.id)
        else:
            now += op[1]
            left.update(i.id for i in q.expire(now))
            assert all(now - i.enqueued < 5 for i in q.items())
        assert q.bytes == sum(i.size for i in q.items()) <= 1000
        waiting = {i.id for i in q.items()}
        assert not (waiting & left) and waiting | left == seen


@settings(max_examples=100, deadline=None)
@given(
    costs=hs.dictionaries(hs.sampled_from("abcdef"), hs.integers(50, 2000), min_size=2),
    heavy=hs.sampled_from("abcdef"),
)
def test_equal_weights_converge_to_equal_token_shares(costs: dict[str, int], heavy: str) -> None:
    """Every tenant backlogged (one of them with 10x the requests): over a long busy period each
    is served tokens within one max request of every other at any point of the schedule (the
    SCFQ bound: |W_i/w_i - W_j/w_j| <= Lmax_i/w_i + Lmax_j/w_j)."""
    q = FlowQueue(max_bytes=10**9)
    # enough requests for 20 of the largest each (the heavy tenant: 10x that)
    per = {t: (200 if t == heavy else 20) * max(costs.values()) // c + 1 for t, c in costs.items()}
    for t, c in costs.items():
        for _ in range(per[t]):
            q.push(item(t, cost=c))
    served = dict.fromkeys(costs, 0.0)
    lmax = max(costs.values())
    rounds = 0
    while (i := q.pop()) is not None and all(served[t] + costs[t] <= per[t] * costs[t] for t in costs):
        served[i.tenant] += i.cost
        rounds += 1
        if all(served[t] < per[t] * costs[t] - costs[t] for t in costs):  # all still backlogged
            assert max(served.values()) - min(served.values()) <= 2 * lmax
    assert rounds > 0


@settings(max_examples=100, deadline=None)
@given(light=hs.integers(1, 20), flood=hs.integers(50, 400))
def test_a_heavy_tenant_cannot_starve_a_light_one(light: int, flood: int) -> None:
    """A light tenant's request that arrives behind a flood is served within about one of the
    flooder's requests per light request queued before it, not after the flood."""
    q = FlowQueue(max_bytes=10**9)
    for _ in range(flood):
        q.push(item("heavy", cost=100))
    q.pop()  # busy
    lights = [item("light", cost=100) for _ in range(light)]
    for i in lights:
        q.push(i)
    order = [i.tenant for i in drain(q)]
    last_light = len(order) - order[::-1].index("light")
    assert last_light <= 2 * light + 1
