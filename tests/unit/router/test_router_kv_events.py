"""Routing on the engines' real KV-cache events, over loopback with real mock engines publishing
vLLM 0.33.0's events (router/kvindex.py, docs/router.md "Routing on KV-cache events").

Every wait is bounded (``until``); nothing asserts on how long something took."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import zmq
from aiohttp import web

from toposerve.kvevents import hashing
from toposerve.kvevents.index import key
from toposerve.kvevents.publisher import KVEventsConfig, ZmqPublisher
from toposerve.mockengine.server import EngineConfig, MockServer
from toposerve.router import strategies as st
from toposerve.router.endpoints import BackendSpec
from toposerve.router.kvindex import KVEventsOptions
from toposerve.router.proxy import Router, RouterConfig, serve

MODEL = "mock-model"
BLOCK = 4
LOOPBACK = KVEventsConfig(
    enable_kv_cache_events=True, endpoint="tcp://127.0.0.1:*", replay_endpoint="tcp://127.0.0.1:*"
)


async def until(pred: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        assert loop.time() < deadline, f"not within {timeout}s: {what}"
        await asyncio.sleep(0.02)


async def engine(num_gpu_blocks: int = 256) -> MockServer:
    cfg = EngineConfig(
        model=MODEL,
        time_scale=0.0,
        num_gpu_blocks=num_gpu_blocks,
        block_size=BLOCK,
        max_model_len=1024,
        kv_events=LOOPBACK,
    )
    return await MockServer(cfg).start()


def spec(srv: MockServer) -> BackendSpec:
    pub = srv.engine.kv_publisher
    assert pub is not None and pub.replay_endpoint
    return BackendSpec(srv.url, kv_events=pub.endpoint, kv_replay=pub.replay_endpoint)


def engine_keys(srv: MockServer) -> set[int]:
    return {key(h) for h in srv.engine.scheduler.blocks._cached}


@contextlib.asynccontextmanager
async def router_for(
    engines: list[MockServer], probe: bool = False, **kv: Any
) -> AsyncIterator[tuple[Router, str]]:
    opts = KVEventsOptions(enabled=True, **{"block_size": BLOCK, **kv})
    router = Router(
        [spec(e) for e in engines], RouterConfig(strategy=st.AUTO, expose_backend=True, kv_events=opts)
    )
    runner: web.AppRunner = await serve(router, "127.0.0.1", 0, probe=probe)
    try:
        yield router, f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def index_keys(router: Router, srv: MockServer) -> set[int]:
    assert router.kvindex is not None
    return router.kvindex.feeds[srv.url].index.keys()


def fresh(router: Router, srv: MockServer) -> bool:
    assert router.kvindex is not None
    return not router.kvindex.stale(srv.url, asyncio.get_running_loop().time())


async def complete(s: aiohttp.ClientSession, base: str, prompt: str, **headers: str) -> str:
    async with s.post(
        base + "/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 2}, headers=headers
    ) as r:
        assert r.status == 200, await r.text()
        await r.read()
        return r.headers.get("x-toposerve-backend", "")


def prompt(i: int, words: int = 40) -> str:
    return f"tenant {i} says: " + " ".join(f"w{i}x{j}" for j in range(words))


async def test_index_equals_the_engine_cache_through_requests_and_evictions_and_replay_at_start() -> None:
    a, b = await engine(num_gpu_blocks=48), await engine(num_gpu_blocks=48)
    try:
        async with aiohttp.ClientSession() as s:
            for i in range(3):  # cached before the router exists: it must catch up by replay
                await complete(s, a.url, prompt(i))
            async with router_for([a, b]) as (router, base):
                await until(lambda: fresh(router, a) and fresh(router, b), "both indexes fresh")
                await until(lambda: index_keys(router, a) == engine_keys(a) != set(), "replayed index")
                assert router.kvindex is not None and router.kvindex.feeds[a.url].resyncs["gap"] == 0
                for i in range(3, 12):  # 48 blocks of 4 tokens: later prompts evict earlier ones
                    await complete(s, base, prompt(i))
                    await complete(s, a.url, prompt(100 + i))
                evicted = {
                    key(h)
                    for i in range(3)
                    for h in hashing.block_hashes(a.engine.tokenizer.encode(prompt(i)), BLOCK)
                }
                await until(lambda: index_keys(router, a) == engine_keys(a), "index of a after evictions")
                await until(lambda: index_keys(router, b) == engine_keys(b), "index of b")
                assert not evicted <= index_keys(router, a)  # evictions reached the index
    finally:
        await a.stop()
        await b.stop()


async def test_a_request_goes_to_the_engine_that_caches_its_prefix() -> None:
    a, b = await engine(), await engine()
    try:
        async with (
            router_for([a, b], probe=True, block_size=0) as (router, base),
            aiohttp.ClientSession() as s,
        ):
            # the block size comes from the engines' vllm:cache_config_info
            await until(lambda: router._block_size() == BLOCK, "block size scraped")
            for n, target in enumerate((b, a, b)):
                long = prompt(7 + n, words=120)
                await complete(s, target.url, long)  # the router never saw this prefix
                await until(lambda t=target: index_keys(router, t) == engine_keys(t), "index caught up")
                for strategy in (st.AUTO, st.PREFIX_AWARE):
                    chosen = await complete(
                        s, base, long + " and one more question", **{"x-toposerve-strategy": strategy}
                    )
                    assert chosen == target.url, strategy
            assert router.kvindex is not None and router.kvindex.fallbacks["tokenize"] == 0
    finally:
        await a.stop()
        await b.stop()


async def test_an_engine_restart_clears_its_index() -> None:
    a = await engine()
    try:
        async with router_for([a]) as (router, base), aiohttp.ClientSession() as s:
            await until(lambda: fresh(router, a), "fresh")
            for i in range(3):
                await complete(s, base, prompt(i))
            await until(lambda: index_keys(router, a) == engine_keys(a) != set(), "index")
            old = index_keys(router, a)
            # the engine restarts: a new publisher on the same endpoints (seq from 0), an empty cache
            pub = a.engine.kv_publisher
            assert pub is not None
            endpoints = dataclasses.replace(
                LOOPBACK, endpoint=pub.endpoint, replay_endpoint=pub.replay_endpoint
            )
            pub.close()
            blocks = a.engine.scheduler.blocks
            assert blocks.reset_prefix_cache()
            blocks.take_events()
            for _ in range(100):  # the port is free once ZeroMQ's I/O thread has closed it
                try:
                    a.engine.kv_publisher = ZmqPublisher(endpoints)
                    break
                except zmq.ZMQError:
                    await asyncio.sleep(0.05)
            await complete(s, base, prompt(50))
            await until(lambda: index_keys(router, a) == engine_keys(a) != set(), "index rebuilt")
            assert not old & index_keys(router, a)
            feed = router.kvindex.feeds[a.url]  # type: ignore[union-attr]
            assert feed.resyncs["restart"] + feed.resyncs["rebuild"] >= 1
    finally:
        await a.stop()


async def test_silence_where_events_are_due_marks_stale_and_falls_back() -> None:
    a, b = await engine(), await engine()
    try:
        async with router_for([a, b], silence_s=0.2) as (router, base), aiohttp.ClientSession() as s:
            await until(lambda: fresh(router, a) and fresh(router, b), "fresh")
            for srv in (a, b):  # the publishers go quiet (events lost), the engines keep serving
                pub = srv.engine.kv_publisher
                assert pub is not None
                pub.publish = lambda batch: None  # type: ignore[method-assign]
            chosen = await complete(s, base, prompt(1))
            stale = a if chosen == a.url else b
            await until(lambda: not fresh(router, stale), "stale after silence")
            async with s.get(base + "/metrics") as r:
                page = await r.text()
            assert "toposerve_router_kv_index_stale 1.0" in page and a.url not in page and b.url not in page
            await complete(s, base, prompt(2))  # scored with the approximation for the stale one
            assert router.kvindex is not None and router.kvindex.fallbacks["stale"] >= 1
            # its publisher closes: the other engine's index goes stale too (disconnected)
            other = b if stale is a else a
            assert other.engine.kv_publisher is not None
            other.engine.kv_publisher.close()
            await until(lambda: not fresh(router, other), "stale when disconnected")
    finally:
        await a.stop()
        await b.stop()


async def test_off_by_default_and_without_tokenize_the_approximation_is_used() -> None:
    a = await engine()
    try:
        router = Router([spec(a)], RouterConfig())
        runner = await serve(router, "127.0.0.1", 0, probe=False)
        try:
            assert router.kvindex is None
        finally:
            await runner.cleanup()
        async with router_for([a], tokenize_timeout_s=0.5) as (router, base), aiohttp.ClientSession() as s:
            # a batch of prompts has no one token list: scored as before, counted
            async with s.post(
                base + "/v1/completions", json={"model": MODEL, "prompt": ["x y", "z"], "max_tokens": 1}
            ) as r:
                await r.read()
            assert router.kvindex is not None and router.kvindex.fallbacks["tokenize"] == 1
    finally:
        await a.stop()


def test_endpoints_are_tags_or_the_convention_ports() -> None:
    from toposerve.router.kvindex import endpoints_for

    opts = KVEventsOptions(enabled=True)
    tagged = BackendSpec.parse(
        "http://10.0.0.1:8000#pool=a&kv-events=tcp://10.0.0.1:6000&kv-replay=tcp://10.0.0.1:6001"
    )
    assert (
        endpoints_for(tagged, opts) == ("tcp://10.0.0.1:6000", "tcp://10.0.0.1:6001") and tagged.pool == "a"
    )
    assert endpoints_for(BackendSpec("http://10.0.0.2:8000"), opts) == (
        "tcp://10.0.0.2:5557",
        "tcp://10.0.0.2:5558",
    )
    assert endpoints_for(BackendSpec("http://[fd00::1]:8000"), dataclasses.replace(opts, replay_port=0)) == (
        "tcp://[fd00::1]:5557",
        None,
    )
    try:
        BackendSpec.parse("http://10.0.0.1:8000#kv-events=http://x")
    except ValueError:
        pass
    else:
        raise AssertionError("a non-ZeroMQ endpoint must be refused")
