"""Routing strategies and load accounting: exhaustive cases plus hypothesis properties."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from toposerve.api.gpus import throughput_weight
from toposerve.router import strategies as s
from toposerve.router.strategies import BackendState, Config, LoadLedger, Request, RoutingMemory

CFG = Config()
HOME = Config(w_home=2.0)  # homes are opt-in (`--home-weight`)


def B(i: str, **kw: object) -> BackendState:
    return BackendState(id=i, **kw)  # type: ignore[arg-type]


def req(
    prompt: int = 100, out: int = 50, text: str = "", session: str | None = None, root: str | None = None
) -> Request:
    """A request; `root` (the conversation's root text) gives it a home, as the proxy does."""
    if root is None:
        return Request(prompt, out, s.block_hashes(text), session)
    blocks = len(root) // s.DEFAULT_BLOCK_CHARS
    return Request(prompt, out, s.block_hashes(text), session, s.affinity_key(root), blocks)


def route(
    strategy: str, r: Request, backends: list[BackendState], mem: RoutingMemory, now: float = 0.0
) -> str:
    d = s.choose(strategy, r, backends, mem, CFG, now)
    assert d is not None
    s.commit(mem, strategy, r, d, CFG, now)
    return d.backend


# ------------------------------------------------------------------------------------------ block hashes


def test_block_hashes_are_chained_and_cover_only_full_blocks() -> None:
    a = s.block_hashes("x" * 64 * 3 + "tail", 64)
    assert len(a) == 3
    b = s.block_hashes("x" * 64 * 2 + "y" * 64, 64)
    assert a[:2] == b[:2] and a[2] != b[2]
    # same block content at a different position hashes differently (it is a prefix hash)
    c = s.block_hashes("y" * 64 + "x" * 64, 64)
    assert c[1] != a[1]
    assert s.block_hashes("short", 64) == ()


def test_prefix_index_longest_match_and_forget() -> None:
    idx = s.PrefixIndex()
    h = s.block_hashes("a" * 640, 64)  # 10 blocks
    idx.insert(h[:4], "b1", 0.0)
    idx.insert(h, "b2", 0.0)
    assert idx.match(h, ["b1", "b2", "b3"]) == {"b1": 4, "b2": 10, "b3": 0}
    other = s.block_hashes("z" * 640, 64)
    assert idx.match(other, ["b1", "b2"]) == {"b1": 0, "b2": 0}
    idx.forget("b2")
    assert idx.match(h, ["b1", "b2"]) == {"b1": 4, "b2": 0}
    assert len(idx) == 4


def test_prefix_index_is_lru_bounded() -> None:
    idx = s.PrefixIndex(capacity=5)
    h = s.block_hashes("q" * 64 * 8, 64)
    idx.insert(h, "b", 0.0)
    assert len(idx) == 5
    # the prompt's tail went first (as vLLM frees a sequence's blocks), so the front still matches
    assert idx.match(h, ["b"]) == {"b": 5}


def test_prefix_index_per_backend_capacity_evicts_tails_then_least_recent() -> None:
    idx = s.PrefixIndex()
    system = "S" * 64 * 4  # a shared prefix of 4 blocks
    a = s.block_hashes(system + "a" * 64 * 4, 64)  # 8 blocks
    b = s.block_hashes(system + "b" * 64 * 4, 64)  # shares the first 4
    idx.insert(a, "x", 0.0, backend_capacity=10)
    idx.insert(b, "x", 1.0, backend_capacity=10)  # 12 distinct blocks for a capacity of 10
    assert idx.held("x") == 10
    # a's history (least recently sent) lost its tail; the shared front, used by both, stays
    assert idx.match(a, ["x"]) == {"x": 6} and idx.match(b, ["x"]) == {"x": 8}
    # another backend's belief is its own: unbounded without a capacity
    idx.insert(a, "y", 2.0)
    assert idx.match(a, ["x", "y"]) == {"x": 6, "y": 8}
    # the bound shrinks what a backend holds as soon as it is known smaller
    idx.insert(b[:1], "x", 3.0, backend_capacity=3)
    assert idx.held("x") == 3 and idx.match(b, ["x"]) == {"x": 3}
    idx.forget("x")
    assert idx.held("x") == 0 and idx.match(a, ["x", "y"]) == {"x": 0, "y": 8}
    assert len(idx) == 8  # only y's blocks are left


@settings(max_examples=100, deadline=None)
@given(
    inserts=st.lists(st.tuples(st.sampled_from("abc"), st.integers(0, 3), st.integers(0, 12)), max_size=20),
    query=st.tuples(st.integers(0, 3), st.integers(0, 12)),
    capacity=st.integers(1, 40),
    per_backend=st.integers(0, 20),
)
def test_prefix_match_equals_brute_force(
    inserts: list[tuple[str, int, int]], query: tuple[int, int], capacity: int, per_backend: int
) -> None:
    """The optimised scan agrees with the definition: leading blocks whose entry holds the backend;
    and whatever the bounds, each backend's held set is exactly the entries naming it, within its
    capacity, and the index within its global bound."""
    chains = [s.block_hashes(f"{k}" * 64 * 12 + "z" * 64 * k, 64) for k in range(4)]
    idx = s.PrefixIndex(capacity=capacity)
    for backend, chain, length in inserts:
        idx.insert(chains[chain][:length], backend, 0.0, per_backend)
    hashes = chains[query[0]][: query[1]]
    got = idx.match(hashes, ["a", "b", "c"])
    for b in "abc":
        n = 0
        while n < len(hashes) and b in idx._map.get(hashes[n], {}):
            n += 1
        assert got[b] == n
        naming = {h for h, e in idx._map.items() if b in e}
        assert naming == set(idx._held.get(b, {}))
        assert per_backend == 0 or len(naming) <= per_backend
    assert len(idx) <= capacity and all(idx._map.values())


def test_session_table_ttl_and_bound() -> None:
    t = s.SessionTable(max_sessions=2)
    t.bind("u1", "b1", now=0.0, ttl=10)
    assert t.get("u1", 5.0) == "b1"
    assert t.get("u1", 10.0) is None  # expired exactly at ttl
    t.bind("u1", "b1", 0.0, 10)
    t.bind("u2", "b2", 0.0, 10)
    t.bind("u3", "b3", 0.0, 10)
    assert len(t) == 2 and t.get("u1", 1.0) is None


def test_session_table_bounds_key_size_bytes_and_time() -> None:
    t = s.SessionTable(max_sessions=1000, max_bytes=100 * s.SessionTable.ENTRY_BYTES)
    assert t.max_sessions == 100  # the byte bound is the tighter one
    huge = "u" * 1_000_000 + "\ud800"  # a megabyte id with a lone surrogate
    t.bind(huge, "b1", 0.0, 10)
    assert t.get(huge, 1.0) == "b1" and t.get(huge[:-1], 1.0) is None
    assert all(len(k) == 32 for k in t._map)  # stored as a fixed-size digest
    for i in range(500):
        t.bind(f"user-{i}", "b1", float(i) / 100, 10)
    assert len(t) == 100
    # time: everything bound before now - ttl is gone at the next bind, without a full scan
    t.bind("late", "b2", 100.0, 10)
    assert len(t) == 1 and t.get("late", 100.0) == "b2"


# ------------------------------------------------------------------------------------------ baselines


def test_round_robin_cycles_and_skips_unavailable() -> None:
    mem = RoutingMemory()
    bs = [B("a"), B("b", healthy=False), B("c"), B("d", draining=True), B("e", in_flight=CFG.max_in_flight)]
    picks = [route(s.ROUND_ROBIN, req(), bs, mem) for _ in range(4)]
    assert picks == ["a", "c", "a", "c"]


def test_choose_none_when_nothing_available_and_unknown_strategy_raises() -> None:
    mem = RoutingMemory()
    assert (
        s.choose(s.AUTO, req(), [B("a", healthy=False), B("b", waiting=CFG.max_waiting)], mem, CFG, 0) is None
    )
    assert s.choose(s.AUTO, req(), [], mem, CFG, 0) is None
    with pytest.raises(ValueError, match="unknown strategy"):
        s.choose("nope", req(), [B("a")], mem, CFG, 0)


def test_least_request_picks_fewest_in_flight_and_spreads_ties() -> None:
    mem = RoutingMemory()
    assert (
        route(s.LEAST_REQUEST, req(), [B("a", in_flight=3), B("b", in_flight=1), B("c", in_flight=2)], mem)
        == "b"
    )
    ties = [B("a"), B("b"), B("c")]
    assert {route(s.LEAST_REQUEST, req(), ties, mem) for _ in range(3)} == {"a", "b", "c"}


def test_token_aware_uses_pending_tokens_not_request_count() -> None:
    mem = RoutingMemory()
    bs = [B("a", in_flight=1, pending_tokens=20_000), B("b", in_flight=5, pending_tokens=500)]
    assert route(s.TOKEN_AWARE, req(), bs, mem) == "b"
    assert route(s.LEAST_REQUEST, req(), bs, mem) == "a"


def test_gpu_weighted_divides_by_throughput_weight() -> None:
    mem = RoutingMemory()
    h100 = B("h", weight=throughput_weight("H100"), pending_tokens=1500)
    a100 = B("a", weight=throughput_weight("A100-80GB"), pending_tokens=1000)
    # 1650/1.6 < 1150/1.0: the faster GPU is the less loaded one
    assert route(s.GPU_WEIGHTED, req(100, 50), [h100, a100], mem) == "h"
    assert route(s.TOKEN_AWARE, req(100, 50), [h100, a100], mem) == "a"


@settings(max_examples=60, deadline=None)
@given(
    gpus=st.lists(
        st.sampled_from(["A100-40GB", "A100-80GB", "H100", "H200", "B200", "L40S"]), min_size=2, max_size=5
    ),
    n=st.integers(50, 400),
    cost=st.integers(1, 4000),
)
def test_weighted_shares_follow_throughput_weights(gpus: list[str], n: int, cost: int) -> None:
    """Equal-cost requests that stay open split across backends in proportion to their weights."""
    mem = RoutingMemory()
    ledger = LoadLedger()
    base = {f"b{i}": B(f"b{i}", weight=throughput_weight(g)) for i, g in enumerate(gpus)}
    r = Request(cost, 0)
    for _ in range(n):
        route(s.GPU_WEIGHTED, r, s.snapshot(base, ledger), mem)
        d = s.choose(s.GPU_WEIGHTED, r, s.snapshot(base, ledger), mem, CFG, 0)
        assert d is not None
        ledger.acquire(d.backend, cost, 0)
    wsum = sum(b.weight for b in base.values())
    for k, b in base.items():
        expected = n * b.weight / wsum
        # greedy weighted-least-load keeps every count within one request of its fair share
        assert abs(ledger.in_flight(k) - expected) <= len(base), (k, ledger.in_flight(k), expected)


# ------------------------------------------------------------------------------------------ prefix-aware


def test_prefix_aware_follows_the_longest_prefix() -> None:
    mem = RoutingMemory()
    bs = [B("a"), B("b"), B("c")]
    system = "You are a helpful assistant. " * 20
    first = route(s.PREFIX_AWARE, req(text=system + "turn one " * 20), bs, mem)
    # a different conversation with the same system prompt lands on the same (now warm) backend
    d = s.choose(s.PREFIX_AWARE, req(text=system + "other user " * 20), bs, mem, CFG, 0)
    assert d is not None and d.backend == first and d.reason == s.R_PREFIX_HIT and d.matched_blocks > 0


def test_prefix_aware_longer_match_beats_shorter() -> None:
    mem = RoutingMemory()
    bs = [B("a"), B("b")]
    system = "S" * 640
    mem.prefix.insert(s.block_hashes(system), "a", 0)
    mem.prefix.insert(s.block_hashes(system + "H" * 640), "b", 0)
    d = s.choose(s.PREFIX_AWARE, req(text=system + "H" * 640 + "new turn"), bs, mem, CFG, 0)
    assert d is not None and d.backend == "b" and d.matched_blocks == len(s.block_hashes(system + "H" * 640))


def test_prefix_aware_hot_prefix_spills_when_over_bounded_load() -> None:
    mem = RoutingMemory()
    text = "hot prefix " * 100
    mem.prefix.insert(s.block_hashes(text), "a", 0)
    bs = [B("a", in_flight=30), B("b", in_flight=2), B("c", in_flight=2)]
    d = s.choose(s.PREFIX_AWARE, req(text=text), bs, mem, CFG, 0)
    assert d is not None and d.backend in {"b", "c"} and d.reason == s.R_PREFIX_OVERLOADED
    miss = s.choose(s.PREFIX_AWARE, req(text="cold " * 100), bs, mem, CFG, 0)
    assert miss is not None and miss.reason == s.R_PREFIX_MISS


@settings(max_examples=80, deadline=None)
@given(
    loads=st.lists(st.integers(0, 60), min_size=1, max_size=6),
    weights=st.lists(st.sampled_from([0.55, 0.8, 1.0, 1.6, 2.5]), min_size=6, max_size=6),
    hot=st.integers(0, 5),
    strategy=st.sampled_from([s.PREFIX_AWARE, s.AUTO]),
    factor=st.sampled_from([1.0, 1.1, 1.25, 2.0]),
    root=st.sampled_from([None, "", "shared system prompt ", "conversation 1 root"]),
)
def test_bounded_load_is_never_exceeded(
    loads: list[int], weights: list[float], hot: int, strategy: str, factor: float, root: str | None
) -> None:
    cfg = Config(bounded_load_factor=factor, w_home=2.0)
    bs = [B(f"b{i}", in_flight=n, weight=weights[i]) for i, n in enumerate(loads)]
    mem = RoutingMemory()
    text = "shared system prompt " * 50
    mem.prefix.insert(s.block_hashes(text), bs[hot % len(bs)].id, 0)
    caps = s.bounded_caps(bs, cfg)
    d = s.choose(strategy, req(text=text, root=root), bs, mem, cfg, 0)
    assert d is not None
    chosen = next(b for b in bs if b.id == d.backend)
    assert chosen.in_flight + 1 <= caps[chosen.id]


@settings(max_examples=40, deadline=None)
@given(
    ops=st.lists(st.tuples(st.booleans(), st.integers(0, 7)), min_size=1, max_size=300),
    home=st.booleans(),
)
def test_bounded_load_holds_over_a_request_stream(ops: list[tuple[bool, int]], home: bool) -> None:
    """Arrivals of one hot prefix (with or without a home) mixed with completions: the hot
    backend never exceeds its cap."""
    cfg = Config(bounded_load_factor=1.25, bounded_load_min=1, w_home=2.0 if home else 0.0)
    base = {f"b{i}": B(f"b{i}") for i in range(4)}
    mem, ledger, open_tickets = RoutingMemory(), LoadLedger(), []
    r = req(text="hot " * 200, root="hot " * 200 if home else None)
    for arrive, k in ops:
        if arrive or not open_tickets:
            snap = s.snapshot(base, ledger)
            caps = s.bounded_caps(snap, cfg)
            d = s.choose(s.PREFIX_AWARE, r, snap, mem, cfg, 0)
            assert d is not None
            assert ledger.in_flight(d.backend) + 1 <= caps[d.backend]
            s.commit(mem, s.PREFIX_AWARE, r, d, cfg, 0)
            open_tickets.append(ledger.acquire(d.backend, r.prompt_tokens, r.max_tokens))
        else:
            ledger.release(open_tickets.pop(k % len(open_tickets)))


# ------------------------------------------------------------------------------------------ homes (several router replicas)


def test_affinity_key_is_the_same_in_every_process() -> None:
    # a fixed value: blake2b is unsalted, unlike the `hash` behind block_hashes
    assert s.affinity_key("system\nYou are helpful.\nuser\nhi\n") == 0xF39052B173C4E38B


@settings(max_examples=60, deadline=None)
@given(
    key=st.integers(0, 2**64 - 1),
    n=st.integers(1, 6),
    gone=st.integers(0, 5),
    weights=st.lists(st.sampled_from([0.55, 0.8, 1.0, 1.6, 2.5]), min_size=6, max_size=6),
)
def test_home_order_is_order_free_and_moves_only_the_removed_backends_keys(
    key: int, n: int, gone: int, weights: list[float]
) -> None:
    bs = [B(f"10.0.0.{i}:8000", weight=weights[i]) for i in range(n)]
    order = s.home_order(key, bs)
    assert order == s.home_order(key, list(reversed(bs)))  # discovery order does not matter
    assert sorted(order) == sorted(b.id for b in bs)
    rest = [b for b in bs if b.id != bs[gone % n].id]
    if rest:  # removing a backend that was not the home keeps the home
        assert s.home_order(key, rest) == [i for i in order if i != bs[gone % n].id]


def test_homes_spread_by_throughput_weight() -> None:
    bs = [B("h100-a", weight=1.6), B("h100-b", weight=1.6), B("a100-a", weight=0.8), B("a100-b", weight=0.8)]
    firsts = Counter(s.home_order(s.affinity_key(f"conversation {i}"), bs)[0] for i in range(4000))
    for b in bs:
        assert abs(firsts[b.id] / 4000 - b.weight / 4.8) < 0.03, firsts


_SYSTEMS = ["system prompt one. " * 40, "system prompt two. " * 40]


@settings(max_examples=60, deadline=None)
@given(
    convs=st.lists(
        st.tuples(st.integers(0, 1), st.integers(1, 4), st.integers(0, 40)), min_size=1, max_size=12
    ),
    sides=st.lists(st.booleans(), min_size=48, max_size=48),
    n=st.integers(2, 5),
    strategy=st.sampled_from([s.PREFIX_AWARE, s.AUTO]),
    sessions=st.booleans(),
)
def test_two_replicas_fed_disjoint_halves_agree_on_every_conversation(
    convs: list[tuple[int, int, int]], sides: list[bool], n: int, strategy: str, sessions: bool
) -> None:
    """Two routers, each seeing a random part of every conversation's turns (a Service spreads
    requests), send all turns of a conversation to one backend when load allows: the router that
    never saw the earlier turns picks the backend the other one used."""
    bs = [B(f"10.0.0.{i}:8000", weight=1.6 if i % 2 else 0.8) for i in range(n)]
    mems = (RoutingMemory(), RoutingMemory())
    where: dict[int, set[str]] = {}
    k = 0
    for turn in range(4):
        for c, (system, turns, pad) in enumerate(convs):
            if turn >= turns:
                continue
            root = f"system\n{_SYSTEMS[system]}\nuser\nconversation {c} {'x' * pad}\n"
            text = root + "".join(f"assistant\nreply {t}\nuser\nturn {t}\n" for t in range(turn))
            r = req(len(text) // 4, 16, text, f"user-{c}" if sessions else None, root)
            mem = mems[sides[k % len(sides)]]
            k += 1
            d = s.choose(strategy, r, bs, mem, HOME, 0.0)
            assert d is not None
            s.commit(mem, strategy, r, d, HOME, 0.0)
            where.setdefault(c, set()).add(d.backend)
            assert d.backend == s.home_order(r.affinity or 0, bs)[0]
    assert all(len(v) == 1 for v in where.values()), where


def test_home_yields_to_load_and_to_a_longer_real_match() -> None:
    root = "system\nshared\nuser\n" + "question " * 40 + "\n"
    bs = [B("b0"), B("b1"), B("b2")]
    home = s.home_order(s.affinity_key(root), bs)[0]
    other = next(b.id for b in bs if b.id != home)
    # over its cap, the home is skipped
    loaded = [replace(b, in_flight=20) if b.id == home else b for b in bs]
    for strategy in (s.PREFIX_AWARE, s.AUTO):
        d = s.choose(strategy, req(text=root, root=root), loaded, RoutingMemory(), HOME, 0)
        assert d is not None and d.backend != home
    # a backend known to hold more of this prompt than the root wins over the presumed home
    text = root + "assistant\n" + "answer " * 200
    mem = RoutingMemory()
    mem.prefix.insert(s.block_hashes(text), other, 0)
    for strategy in (s.PREFIX_AWARE, s.AUTO):
        d = s.choose(strategy, req(len(text) // 4, 16, text, root=root), bs, mem, HOME, 0)
        assert d is not None and d.backend == other
    # w_home=0 turns homes off: a miss is least-loaded again
    cfg = CFG  # the default: homes off
    busy = [replace(b, pending_tokens=0 if b.id == other else 500) for b in bs]
    d = s.choose(s.PREFIX_AWARE, req(text=root, root=root), busy, RoutingMemory(), cfg, 0)
    assert d is not None and d.backend == other


def test_a_home_over_its_fair_share_passes_on_in_rendezvous_order() -> None:
    root = "system\nshared\nuser\n" + "question " * 40 + "\n"
    bs = [B(f"b{i}") for i in range(4)]
    first, second = s.home_order(s.affinity_key(root), bs)[:2]
    # low traffic: the home keeps its conversations up to home_load_min
    low = [replace(b, in_flight=1) if b.id == first else b for b in bs]
    # busy: the home holds 3 of 5 requests (under its bounded-load cap of 4), more than its fair
    # share max(2, ceil(6 / 4)) = 2
    busy = [replace(b, in_flight=3 if b.id == first else 1 if b.id != second else 0) for b in bs]
    for strategy in (s.PREFIX_AWARE, s.AUTO):
        d = s.choose(strategy, req(text=root, root=root), low, RoutingMemory(), HOME, 0)
        assert d is not None and d.backend == first
        d = s.choose(strategy, req(text=root, root=root), busy, RoutingMemory(), HOME, 0)
        assert d is not None and d.backend == second


# ------------------------------------------------------------------------------------------ session


def test_session_sticks_expires_and_fails_over() -> None:
    mem = RoutingMemory()
    bs = [B("a"), B("b")]
    first = s.choose(s.SESSION, req(session="u1"), bs, mem, CFG, 0)
    assert first is not None and first.reason == s.R_SESSION_NEW
    s.commit(mem, s.SESSION, req(session="u1"), first, CFG, 0)
    # make the bound backend look more loaded: stickiness still wins
    loaded = [replace(b, pending_tokens=10_000) if b.id == first.backend else b for b in bs]
    hit = s.choose(s.SESSION, req(session="u1"), loaded, mem, CFG, 1)
    assert hit is not None and hit.backend == first.backend and hit.reason == s.R_SESSION_HIT
    # after the TTL the session is new again and goes to the least loaded backend
    late = s.choose(s.SESSION, req(session="u1"), loaded, mem, CFG, CFG.session_ttl_s + 1)
    assert late is not None and late.reason == s.R_SESSION_NEW and late.backend != first.backend
    for broken in (
        {"healthy": False},
        {"draining": True},
        {"in_flight": CFG.max_in_flight},
        {"waiting": CFG.max_waiting},
    ):
        bad = [replace(b, **broken) if b.id == first.backend else b for b in bs]  # type: ignore[arg-type]
        d = s.choose(s.SESSION, req(session="u1"), bad, mem, CFG, 2)
        assert d is not None and d.reason == s.R_SESSION_FAILOVER and d.backend != first.backend
    # the fail-over rebinds: the session now lives on the other backend
    d = s.choose(s.SESSION, req(session="u1"), [replace(bs[0], healthy=False), bs[1]], mem, CFG, 3)
    assert d is not None
    s.commit(mem, s.SESSION, req(session="u1"), d, CFG, 3)
    assert mem.sessions.get("u1", 4) == d.backend


def test_session_without_id_is_weighted_least_load() -> None:
    mem = RoutingMemory()
    d = s.choose(s.SESSION, req(), [B("a", pending_tokens=9), B("b")], mem, CFG, 0)
    assert d is not None and d.backend == "b" and d.reason == s.R_LEAST_LOAD


# ------------------------------------------------------------------------------------------ long context


@pytest.mark.parametrize("strategy", [s.TOKEN_AWARE, s.GPU_WEIGHTED, s.PREFIX_AWARE, s.SESSION, s.AUTO])
def test_long_prompts_go_to_the_long_context_pool(strategy: str) -> None:
    mem = RoutingMemory()
    bs = [B("short1"), B("short2"), B("long1", long_context=True, pending_tokens=50_000)]
    long = Request(CFG.long_context_threshold, 100)
    d = s.choose(strategy, long, bs, mem, CFG, 0)
    assert d is not None and d.backend == "long1" and d.long_context
    short = s.choose(strategy, Request(100, 100), bs, mem, CFG, 0)
    assert short is not None and short.backend != "long1" and not short.long_context
    # no long-context pool available: long prompts still get served
    d2 = s.choose(strategy, long, [*bs[:2], replace(bs[2], healthy=False)], mem, CFG, 0)
    assert d2 is not None and d2.backend.startswith("short") and not d2.long_context


def test_baselines_ignore_the_long_context_rule() -> None:
    mem = RoutingMemory()
    bs = [B("short"), B("long", long_context=True)]
    d = s.choose(s.ROUND_ROBIN, Request(10**6, 1), bs, mem, CFG, 0)
    assert d is not None and d.backend == "short"


# ------------------------------------------------------------------------------------------ auto


def test_auto_prefers_prefix_then_yields_to_load_kv_and_queue() -> None:
    mem = RoutingMemory()
    text = "conversation history " * 60
    mem.prefix.insert(s.block_hashes(text), "a", 0)
    even = [B("a", pending_tokens=1000), B("b", pending_tokens=1000)]
    d = s.choose(s.AUTO, req(text=text), even, mem, CFG, 0)
    assert d is not None and d.backend == "a" and d.reason == s.R_AUTO_PREFIX
    # a much busier prefix holder loses to an idle one
    busy = [B("a", pending_tokens=200_000, kv_usage=0.9, waiting=20), B("b", pending_tokens=100)]
    d = s.choose(s.AUTO, req(text=text), busy, mem, CFG, 0)
    assert d is not None and d.backend == "b" and d.reason == s.R_AUTO_LOAD
    # without a prefix, KV usage and queue length decide between equal token loads
    assert route(s.AUTO, req(), [B("a", kv_usage=0.9), B("b", kv_usage=0.1)], RoutingMemory()) == "b"
    assert route(s.AUTO, req(), [B("a", waiting=0), B("b", waiting=7)], RoutingMemory()) == "a"


def test_auto_session_and_scores_are_normalised() -> None:
    mem = RoutingMemory()
    mem.sessions.bind("u", "b", 0, 100)
    d = s.choose(s.AUTO, req(session="u"), [B("a"), B("b")], mem, CFG, 1)
    assert d is not None and d.backend == "b" and d.reason == s.R_AUTO_SESSION
    scores = s.auto_scores([B("a", kv_usage=2.0, waiting=3), B("b")], req(), mem, CFG, 0)
    top = CFG.w_prefix + CFG.w_load + CFG.w_kv + CFG.w_queue + CFG.w_session
    assert all(0 <= v <= top for v in scores.values())


def test_commit_only_remembers_for_strategies_that_use_it() -> None:
    r = req(text="p" * 640, session="u")
    for strategy, prefix, sess in [
        (s.ROUND_ROBIN, False, False),
        (s.PREFIX_AWARE, True, False),
        (s.SESSION, False, True),
        (s.AUTO, True, True),
    ]:
        mem = RoutingMemory()
        route(strategy, r, [B("a")], mem)
        assert (len(mem.prefix) > 0, len(mem.sessions) > 0, mem.counter) == (prefix, sess, 1)


# ------------------------------------------------------------------------------------------ accounting


def test_ledger_exact_accounting_over_a_stream() -> None:
    led = LoadLedger()
    t = led.acquire("a", 100, 50)
    assert (led.in_flight("a"), led.pending("a")) == (1, 150)
    led.first_token(t)
    assert led.pending("a") == 50
    led.output_tokens(t, 20)
    assert led.pending("a") == 30
    led.output_tokens(t, 1000)  # more output than estimated never goes negative
    assert led.pending("a") == 0
    led.release(t)
    led.release(t)  # idempotent
    assert (led.in_flight("a"), led.pending("a"), led.backends()) == (0, 0, [])


_op = st.one_of(
    st.tuples(st.just("acquire"), st.sampled_from("abc"), st.integers(0, 5000), st.integers(0, 2000)),
    st.tuples(st.just("first"), st.integers(0, 99), st.just(0), st.just(0)),
    st.tuples(st.just("tokens"), st.integers(0, 99), st.integers(-3, 3000), st.just(0)),
    st.tuples(st.sampled_from(["ok", "error", "cancel"]), st.integers(0, 99), st.just(0), st.just(0)),
)


@settings(max_examples=150, deadline=None)
@given(ops=st.lists(_op, max_size=200))
def test_pending_load_returns_to_zero_after_any_mix(ops: list[tuple[str, object, int, int]]) -> None:
    """Successes, errors and cancellations in any order: load never negative, zero at the end."""
    led = LoadLedger()
    tickets: list[s.Ticket] = []
    for op, arg, x, y in ops:
        if op == "acquire":
            tickets.append(led.acquire(str(arg), x, y))
        elif tickets:
            t = tickets[int(arg) % len(tickets)]  # type: ignore[call-overload]
            if op == "first":
                led.first_token(t)
            elif op == "tokens":
                led.output_tokens(t, x)
            else:  # ok / error / cancel all end in release, possibly twice (cancel after error)
                led.release(t)
        for b in "abc":
            assert led.pending(b) >= 0 and led.in_flight(b) >= 0
            assert led.pending(b) == sum(t.outstanding for t in tickets if t.backend == b and not t.released)
            assert led.in_flight(b) == sum(1 for t in tickets if t.backend == b and not t.released)
    for t in tickets:
        led.release(t)
    assert all(led.pending(b) == 0 and led.in_flight(b) == 0 for b in "abc")
    assert led.backends() == []


def test_token_estimator_learns_the_ratio() -> None:
    est = s.TokenEstimator(chars_per_token=4.0, alpha=0.5)
    assert est.estimate(0) == 0 and est.estimate(9) == 3
    for _ in range(30):
        est.observe(6000, 1000)
    assert math.isclose(est.chars_per_token, 6.0, rel_tol=1e-3)
    est.observe(0, 10)
    est.observe(10, 0)
    assert math.isclose(est.chars_per_token, 6.0, rel_tol=1e-3)


@settings(max_examples=30, deadline=None)
@given(
    strategy=st.sampled_from(s.STRATEGIES),
    events=st.lists(st.tuples(st.booleans(), st.integers(0, 3), st.integers(0, 50)), max_size=120),
)
def test_every_strategy_only_picks_available_backends(
    strategy: str, events: list[tuple[bool, int, int]]
) -> None:
    base = {
        "a": B("a", weight=1.6),
        "b": B("b", weight=0.8),
        "down": B("down", healthy=False),
        "drain": B("drain", draining=True),
    }
    mem, led, open_t = RoutingMemory(), LoadLedger(), []
    picked: Counter[str] = Counter()
    for arrive, conv, turn in events:
        if arrive or not open_t:
            r = req(text=f"conv {conv} " * 40 + "turn " * turn, session=f"s{conv}")
            d = s.choose(strategy, r, s.snapshot(base, led), mem, CFG, float(turn))
            assert d is not None and d.backend in {"a", "b"}
            s.commit(mem, strategy, r, d, CFG, float(turn))
            open_t.append(led.acquire(d.backend, r.prompt_tokens, r.max_tokens))
            picked[d.backend] += 1
        else:
            led.release(open_t.pop(conv % len(open_t)))
    assert set(picked) <= {"a", "b"}
