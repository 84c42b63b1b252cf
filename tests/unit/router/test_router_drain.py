"""The router on SIGTERM (docs/production.md): out of its Service (/health 503), every answer with
`Connection: close` so kept-alive clients reconnect elsewhere, requests still served, and the
drain ends once nothing is in flight and no request came for a quiet period."""

from __future__ import annotations

import asyncio

import aiohttp
from test_router_proxy import Harness, chat, harness

from toposerve.router import strategies as st
from toposerve.router.proxy import RouterConfig

__all__ = ["harness"]


async def test_draining_router_is_unready_serves_and_closes_connections(harness: Harness) -> None:
    router, url, ups = await harness(1, cfg=RouterConfig(strategy=st.ROUND_ROBIN), mode="gate")
    async with aiohttp.ClientSession() as s:
        async with s.get(url + "/health") as r:
            assert r.status == 200
        stream = await s.post(url + "/v1/chat/completions", json=chat(stream=True, max_tokens=5))
        await stream.content.readuntil(b"\n\n")  # in flight, held by the upstream's gate
        router.begin_drain()
        async with s.get(url + "/health") as r:
            assert r.status == 503 and (await r.json())["status"] == "draining"
        assert not await router.drained(quiet_s=0, timeout_s=0.3)  # the stream is still in flight
        ups[0].gate.set()
        rest = await stream.read()
        assert rest.endswith(b"data: [DONE]\n\n")
        stream.close()
        async with s.post(url + "/v1/chat/completions", json=chat()) as r:  # still served, then closed
            assert r.status == 200 and r.headers.get("Connection", "").lower() == "close", dict(r.headers)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    assert await router.drained(quiet_s=0.2, timeout_s=5)
    assert loop.time() - t0 >= 0.1  # waited for the quiet period after the last request


async def test_probes_and_scrapes_do_not_hold_the_drain(harness: Harness) -> None:
    router, url, _ = await harness(1, cfg=RouterConfig(strategy=st.ROUND_ROBIN))
    router.begin_drain()
    router.last_request -= 10
    async with aiohttp.ClientSession() as s:
        for path in ("/health", "/metrics"):
            async with s.get(url + path):
                pass
    assert await router.drained(quiet_s=5, timeout_s=0.5)


async def test_a_discovering_router_is_unready_until_it_knows_its_engines(harness: Harness) -> None:
    """A router that joined its Service before discovery answered would 503 every client it got."""
    router, url, _ = await harness(1, cfg=RouterConfig(strategy=st.ROUND_ROBIN))
    known = {u: (b.spec, False) for u, b in router.backends.items()}
    router.discovering = True  # as `toposerve router` starts without static backends
    async with aiohttp.ClientSession() as s:
        async with s.get(url + "/health") as r:
            assert r.status == 503 and (await r.json())["status"] == "discovering"
        router.reconcile(known)  # discovery's first answer
        async with s.get(url + "/health") as r:
            assert r.status == 200 and (await r.json())["healthyBackends"] == 1
        router.reconcile({})  # engines going away later do not take the router out
        async with s.get(url + "/health") as r:
            assert r.status == 200
