"""The pure KV-event index (kvevents/index.py): what every event does, the sequence rules
(duplicates, gaps, restarts, replays that prove or fail continuity), the longest cached prefix
against brute force, and the memory bound."""

from __future__ import annotations

import dataclasses

from hypothesis import given, settings
from hypothesis import strategies as hs

from toposerve.kvevents import hashing, wire
from toposerve.kvevents.index import BYTES_PER_BLOCK, EngineIndex, Live, key
from toposerve.router import strategies as st

H = [hashing.sha256(i) for i in range(64)]


def stored(*hashes: bytes) -> wire.BlockStored:
    return wire.BlockStored(
        block_hashes=list(hashes),
        parent_block_hash=None,
        token_ids=[],
        block_size=16,
        lora_id=None,
        medium="GPU",
        lora_name=None,
    )


def removed(*hashes: bytes) -> wire.BlockRemoved:
    return wire.BlockRemoved(block_hashes=list(hashes), medium="GPU")


def batch(*events: object, ts: float = 0.0) -> bytes:
    return wire.encode(wire.KVEventBatch(ts=ts, events=list(events)))  # type: ignore[arg-type]


def test_each_event_type() -> None:
    idx = EngineIndex()
    idx.apply(0, batch(stored(H[0], H[1], H[2])))
    assert idx.keys() == {key(h) for h in H[:3]} and H[1] in idx
    idx.apply(1, batch(removed(H[1])))
    assert H[1] not in idx and len(idx) == 2
    idx.apply(2, batch(wire.AllBlocksCleared(), stored(H[5])))
    assert idx.keys() == {key(H[5])} and idx.applied == 2
    # an engine publishing int hashes (VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES) is indexed alike
    idx.apply(3, batch(stored(hashing.as_int(H[7]))))  # type: ignore[arg-type]
    assert H[7] in idx


events_st = hs.lists(
    hs.one_of(
        hs.tuples(hs.just("store"), hs.lists(hs.integers(0, 63), min_size=1, max_size=6)),
        hs.tuples(hs.just("remove"), hs.lists(hs.integers(0, 63), min_size=1, max_size=6)),
        hs.tuples(hs.just("clear"), hs.just([])),
    ),
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(events=events_st, cap=hs.integers(1, 80), probe=hs.lists(hs.integers(0, 63), max_size=10))
def test_index_equals_a_model_set_under_its_bound(
    events: list[tuple[str, list[int]]], cap: int, probe: list[int]
) -> None:
    idx = EngineIndex(max_blocks=cap)
    model: dict[int, None] = {}  # insertion-ordered, oldest stored first
    for seq, (kind, ids) in enumerate(events):
        if kind == "store":
            ev: object = stored(*(H[i] for i in ids))
            for i in ids:
                model.pop(i, None)
                model[i] = None
            while len(model) > cap:
                del model[next(iter(model))]
        elif kind == "remove":
            ev = removed(*(H[i] for i in ids))
            for i in ids:
                model.pop(i, None)
        else:
            ev = wire.AllBlocksCleared()
            model.clear()
        idx.apply(seq, batch(ev))
        assert len(idx) <= cap
    assert idx.keys() == {key(H[i]) for i in model}
    # longest cached prefix: brute force
    keys = [key(H[i]) for i in probe]
    n = 0
    while n < len(probe) and probe[n] in model:
        n += 1
    assert idx.longest_prefix(keys) == n


@settings(max_examples=150, deadline=None)
@given(seqs=hs.lists(hs.integers(0, 30), min_size=1, max_size=30))
def test_live_rules(seqs: list[int]) -> None:
    """Backwards (or repeated) on the live stream: a restart; else apply the next, replay a gap."""
    idx = EngineIndex()
    last_live = -1
    for s in seqs:
        applied = idx.applied
        verdict = idx.live(s)
        if last_live >= 0 and s <= last_live:
            assert verdict is Live.RESTART
            idx.clear()
            idx.live_last = s
        elif s <= applied:
            assert verdict is Live.DUPLICATE
        elif s == applied + 1:
            assert verdict is Live.APPLY
        else:
            assert verdict is Live.GAP
        last_live = s
        if verdict in (Live.APPLY, Live.GAP):
            idx.apply(s, batch(stored(H[s % 64])))


def test_replay_continues_only_the_same_publisher() -> None:
    first = [(i, batch(stored(H[i]), ts=float(i))) for i in range(5)]
    idx = EngineIndex()
    assert idx.replay_start() == 0 and idx.catch_up(first[:3])  # a fresh router: everything
    assert idx.applied == 2 and idx.replay_start() == 2
    # the same publisher answers from the last applied batch: the rest is applied
    assert idx.catch_up(first[2:]) and idx.applied == 4 and H[4] in idx
    # a restarted engine that already got past our number: same seq, another payload
    other = [(i, batch(stored(H[10 + i]), ts=100.0 + i)) for i in range(7)]
    assert not idx.catch_up(other[4:]) and idx.applied == 4
    assert not idx.catch_up([])  # nothing buffered from there (a new publisher, short history)
    idx.rebuild(other)
    assert idx.keys() == {key(H[10 + i]) for i in range(7)} and idx.applied == 6 and idx.live_last == -1


def test_memory_per_block_is_what_the_docs_say() -> None:
    idx = EngineIndex()
    idx.apply(0, batch(stored(*(hashing.sha256(i) for i in range(50_000)))))
    per_block = idx.memory_bytes() / len(idx)
    assert 40 < per_block <= BYTES_PER_BLOCK, per_block


def test_exact_matches_replace_the_approximation_only_where_fresh() -> None:
    """The strategies' view: engine blocks for fresh backends, the approximation scaled for others."""
    mem = st.RoutingMemory()
    req = st.Request(prompt_tokens=100, max_tokens=10, block_hashes=(1, 2, 3, 4))
    mem.prefix.insert((1, 2, 3, 4), "b", 0.0)
    kv = st.KVMatch(blocks=8, matched={"a": 6})
    got, n = st.prefix_matches(dataclasses.replace(req, kv=kv), mem, ["a", "b", "c"])
    assert n == 8 and got == {"a": 6, "b": 8, "c": 0}
    assert st.prefix_matches(req, mem, ["a", "b"]) == ({"a": 0, "b": 4}, 4)  # off: as before


async def test_a_long_replay_is_applied_in_slices_that_let_other_tasks_run() -> None:
    """A router catching up on an engine's whole buffer (10,000 steps by default) must keep
    answering meanwhile: the feed yields to the event loop between slices of the replay."""
    import asyncio

    import zmq.asyncio

    from toposerve.router import kvindex as kvi

    ctx = zmq.asyncio.Context()
    feed = kvi.EngineFeed(ctx, "tcp://127.0.0.1:1", None, kvi.KVEventsOptions(enabled=True))
    n = kvi.REPLAY_SLICE * 5 + 3
    batches = [(i, batch(stored(hashing.sha256(("replay", i))), ts=float(i))) for i in range(n)]
    ticks = 0
    seen: list[int] = []

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    original = feed.index.apply_new

    def record(part: list[tuple[int, bytes]]) -> None:
        seen.append(ticks)
        original(part)

    feed.index.apply_new = record  # type: ignore[method-assign]
    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    try:
        await feed._apply_in_slices(batches)
    finally:
        task.cancel()
        ctx.term()
    assert len(feed.index) == n and feed.index.applied == n - 1
    assert len(seen) == 6 and seen == sorted(seen) and len(set(seen)) == 6  # the ticker ran between slices


def test_routed_blocks_count_until_stored_evicted_cleared_or_expired() -> None:
    """A prompt routed to an engine counts as on its way there (``note_routed``) until the
    engine's events settle it: stored (then it is simply cached), evicted, or cleared; or until
    the hold runs out. ``longest_prefix`` (what events say) never counts them."""
    idx = EngineIndex()
    idx.apply(0, batch(stored(H[0])))
    keys = [key(h) for h in H[:4]]
    assert idx.longest_routed_prefix(keys, 0.0) == 1
    idx.note_routed(keys, now=0.0, hold_s=10.0)
    assert idx.longest_routed_prefix(keys, 5.0) == 4 and idx.longest_prefix(keys) == 1
    assert idx.longest_routed_prefix(keys, 10.5) == 1  # the hold ran out
    idx.note_routed(keys, now=20.0, hold_s=10.0)
    idx.apply(1, batch(stored(H[1]), removed(H[2])))  # block 1 stored, block 2 evicted on its way
    assert idx.longest_routed_prefix(keys, 21.0) == 2 and idx.longest_prefix(keys) == 2
    idx.note_routed(keys, now=22.0, hold_s=10.0)
    idx.apply(2, batch(wire.AllBlocksCleared()))
    assert idx.longest_routed_prefix(keys, 23.0) == 0
    idx.note_routed(keys, now=30.0, hold_s=0.0)  # off
    assert idx.longest_routed_prefix(keys, 30.0) == 0


@given(hs.lists(hs.integers(0, 63), min_size=1, max_size=40), hs.integers(1, 16))
@settings(max_examples=200, deadline=None)
def test_routed_blocks_stay_within_the_bound(ids: list[int], bound: int) -> None:
    idx = EngineIndex(max_blocks=bound)
    for n, i in enumerate(ids):
        idx.note_routed([key(H[i])], now=float(n), hold_s=1000.0)
        assert idx.pending_count(float(n)) <= bound


def test_the_router_scores_a_prefix_routed_a_moment_ago_on_the_engine_it_went_to() -> None:
    """KVIndex.routed + score: before any event arrives, the next request of the same prefix
    finds it on the engine the first one went to (and only there)."""
    import zmq.asyncio

    from toposerve.router import kvindex as kvi

    ctx = zmq.asyncio.Context()
    kv = kvi.KVIndex(kvi.KVEventsOptions(enabled=True, block_size=16))
    for url in ("http://a", "http://b"):
        feed = kvi.EngineFeed(ctx, f"tcp://{url[7:]}:1", None, kv.opts)
        feed.connected = feed.synced = True
        kv.feeds[url] = feed
    keys = [key(h) for h in H[:6]]
    assert kv.score(keys, 16, {}, ["http://a", "http://b"]).matched == {"http://a": 0, "http://b": 0}
    kv.routed("http://b", keys)
    assert kv.score(keys, 16, {}, ["http://a", "http://b"]).matched == {"http://a": 0, "http://b": 6}
    off = kvi.KVIndex(kvi.KVEventsOptions(enabled=True, block_size=16, pending_s=0))
    off.feeds = kv.feeds
    off.routed("http://a", keys)
    assert off.score(keys, 16, {}, ["http://a"]).matched == {"http://a": 0}
    ctx.term()
