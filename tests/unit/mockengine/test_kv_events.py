"""The mock engine's KV-cache events: what its block pool emits, and the ZeroMQ publisher that sends
them as vLLM 0.33.0 does (PUB ``(topic, seq, payload)``, ROUTER replay), over loopback. The wire
format itself is judged by vLLM's own classes in tests/vllm/test_kv_events.py."""

from __future__ import annotations

import json
from collections.abc import Iterator

import aiohttp
import pytest
import zmq
from test_mockengine_server import MODEL, post, serve

from toposerve.kvevents import hashing, wire
from toposerve.kvevents.publisher import KVEventsConfig, ZmqPublisher
from toposerve.mockengine.cli import _kv_events_config
from toposerve.mockengine.kvcache import BlockManager

LOOPBACK = {
    "enable_kv_cache_events": True,
    "endpoint": "tcp://127.0.0.1:*",
    "replay_endpoint": "tcp://127.0.0.1:*",
}


def test_the_block_pool_says_what_it_stored_evicted_and_cleared() -> None:
    bm = BlockManager(num_blocks=3, block_size=2, kv_events=True)
    tokens = [5, 6, 7, 8, 9]
    hashes = hashing.block_hashes(tokens, 2)
    owned: list[int] = []
    assert bm.allocate(owned, (), len(tokens))
    bm.cache_blocks(owned[:1], hashes[:1], None, tokens)  # the first full block
    bm.cache_blocks(owned[1:2], hashes[1:2], hashes[0], tokens[2:])  # the next, as the scheduler does
    first, second = bm.take_events()
    assert first == wire.BlockStored(block_hashes=[hashes[0]], parent_block_hash=None, token_ids=[5, 6],
                                     block_size=2, lora_id=None, medium="GPU", lora_name=None,
                                     extra_keys=[None], group_idx=0)  # fmt: skip
    assert second.block_hashes == [hashes[1]] and second.parent_block_hash == hashes[0]
    assert second.token_ids == [7, 8] and bm.take_events() == []
    assert not bm.reset_prefix_cache()  # in use: refused, like vLLM's
    bm.free(owned)
    other: list[int] = []
    assert bm.allocate(other, (), 6)  # needs all 3 blocks: the cached ones are evicted
    removed = bm.take_events()
    assert sorted(h for e in removed for h in e.block_hashes) == sorted(hashes[:2])
    assert all(isinstance(e, wire.BlockRemoved) and e.medium == "GPU" for e in removed)
    bm.free(other)
    assert bm.reset_prefix_cache() and bm.take_events() == [wire.AllBlocksCleared()]
    quiet = BlockManager(num_blocks=3, block_size=2)  # events off: nothing collected
    quiet.cache_blocks([0], hashes[:1], None, tokens)
    assert quiet.take_events() == []


@pytest.fixture
def ctx() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    c: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield c
    c.destroy(linger=0)


def replay(ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str, start: int) -> list[tuple[bytes, int, bytes]]:
    """What a subscriber catching up gets: a REQ-style request with the start sequence number."""
    dealer = ctx.socket(zmq.DEALER)
    dealer.connect(endpoint)
    dealer.send_multipart((b"", start.to_bytes(8, "big")))
    out = []
    while True:
        assert dealer.poll(10_000), "no replay answer"
        _, topic, seq, payload = dealer.recv_multipart()
        if seq == wire.END_SEQ:
            return out
        out.append((topic, wire.seq_of(seq), payload))


def test_publisher_sends_topic_seq_payload_and_replays(ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    pub = ZmqPublisher(KVEventsConfig(**LOOPBACK, topic="kv@engine-0"))  # type: ignore[arg-type]
    try:
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"kv@")
        sub.connect(pub.endpoint)
        batches = [wire.KVEventBatch(ts=float(i), events=[wire.AllBlocksCleared()]) for i in range(3)]
        got: list[list[bytes]] = []
        # PUB drops what it sends before the subscription arrives (ZeroMQ's slow joiner): publish
        # until the subscriber sees one, then the rest; replay covers what it missed.
        for _ in range(200):
            pub.publish(wire.KVEventBatch(ts=-1.0, events=[]))
            if sub.poll(50):
                got.append(sub.recv_multipart())
                break
        assert got, "the subscriber never got a batch"
        for b in batches:
            pub.publish(b)
        for _ in batches:
            assert sub.poll(10_000)
            got.append(sub.recv_multipart())
        topics = {m[0] for m in got}
        seqs = [wire.seq_of(m[1]) for m in got]
        assert topics == {b"kv@engine-0"} and seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
        tail = [wire.decode(m[2]) for m in got[-3:]]
        assert [b.ts for b in tail] == [0.0, 1.0, 2.0] and all(b.data_parallel_rank == 0 for b in tail)
        # replay from the second-to-last: exactly the buffered batches from there, then the end
        again = replay(ctx, str(pub.replay_endpoint), seqs[-2])
        assert [(t, s) for t, s, _ in again] == [(b"kv@engine-0", seqs[-2]), (b"kv@engine-0", seqs[-1])]
        assert [wire.decode(p).ts for _, _, p in again] == [1.0, 2.0]
    finally:
        pub.close()


async def test_the_mock_engine_publishes_the_blocks_a_request_cached(
    ctx: zmq.Context[zmq.Socket[bytes]],
) -> None:
    cfg = KVEventsConfig(**LOOPBACK, topic="kv")  # type: ignore[arg-type]
    async with serve(kv_events=cfg) as srv, aiohttp.ClientSession() as s:
        pub = srv.engine.kv_publisher
        assert pub is not None and pub.replay_endpoint
        prompt = "You are a meticulous assistant. " * 20 + "Question?"
        status, answer = await post(
            s, srv.url + "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 2}
        )
        assert status == 200
        n = answer["usage"]["prompt_tokens"]
        batches = [wire.decode(p) for _, _, p in replay(ctx, pub.replay_endpoint, 0)]
    stored = [e for b in batches for e in b.events if isinstance(e, wire.BlockStored)]
    hashes = [h for e in stored for h in e.block_hashes]
    tokens = [t for e in stored for t in e.token_ids]
    assert len(hashes) == n // 16 and len(tokens) == 16 * len(hashes)
    # The hashes are the ones a router computes from the same token ids (vLLM's own: tests/vllm).
    assert hashes == hashing.block_hashes(tokens, 16)
    assert stored[0].parent_block_hash is None and all(e.block_size == 16 for e in stored)


def test_the_flag_is_vllms_json() -> None:
    cfg = _kv_events_config(json.dumps({"enable_kv_cache_events": True, "topic": "t"}))
    assert cfg.publishes and cfg.endpoint == "tcp://*:5557" and cfg.replay_endpoint is None
    assert not _kv_events_config('{"enable_kv_cache_events": false}').publishes
    assert not _kv_events_config('{"enable_kv_cache_events": true, "publisher": "null"}').publishes
    for bad, why in (("[1]", "JSON object"), ("{", "not JSON"), ('{"colour": 1}', "unknown field"),
                     ('{"publisher": "kafka"}', "null or zmq")):  # fmt: skip
        with pytest.raises(Exception, match=why):
            _kv_events_config(bad)
