"""Scale from zero: at zero replicas the router holds requests (bounded queue, bounded wait), says
how many in toposerve_router_held_requests (what the autoscaler scales 0 -> 1 on), serves them when
a replica appears, and answers 503 with Retry-After when it gives up."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import aiohttp
from test_router_proxy import Harness, _get, _post, chat, eventually, harness

from toposerve.router import strategies as st
from toposerve.router.endpoints import BackendSpec
from toposerve.router.proxy import RouterConfig

__all__ = ["harness"]
HOLD = RouterConfig(strategy=st.ROUND_ROBIN, hold_at_zero_s=30.0, max_held=2)


def held_metric(text: str) -> float:
    (line,) = [ln for ln in text.splitlines() if ln.startswith("toposerve_router_held_requests ")]
    return float(line.split()[1])


async def test_held_until_a_replica_appears_then_served(harness: Harness) -> None:
    router, url, ups = await harness(1, cfg=HOLD)
    a = ups[0].url
    router.reconcile({})  # zero replicas
    first = asyncio.create_task(_post(url + "/v1/chat/completions", chat()))
    await eventually(lambda: router.held == 1)
    assert held_metric((await _get(url + "/metrics"))[1]) == 1.0
    assert not first.done()
    router.reconcile({a: (BackendSpec(a), False)})  # the autoscaler's new replica is discovered
    status, _ = await first
    assert status == 200 and router.held == 0
    assert held_metric((await _get(url + "/metrics"))[1]) == 0.0


async def test_hold_is_bounded_in_time_and_in_count(harness: Harness) -> None:
    router, url, _ups = await harness(1, cfg=replace(HOLD, hold_at_zero_s=0.3, max_held=1))
    router.reconcile({})
    async with aiohttp.ClientSession() as s:
        waiting = asyncio.create_task(s.post(url + "/v1/chat/completions", json=chat()))
        await eventually(lambda: router.held == 1)
        async with s.post(url + "/v1/chat/completions", json=chat()) as r:  # the queue is full
            assert r.status == 503 and r.headers["Retry-After"] == "1"
            assert "hold queue is full" in (await r.json())["error"]["message"]
        r = await waiting  # gave up after 0.3 s with no replica
        assert r.status == 503 and r.headers["Retry-After"] == "1"
        assert "no replica became ready" in (await r.json())["error"]["message"]
        r.close()
    assert router.held == 0


async def test_without_hold_zero_replicas_is_503_at_once(harness: Harness) -> None:
    router, url, _ups = await harness(1, cfg=RouterConfig(strategy=st.ROUND_ROBIN))
    router.reconcile({})
    assert (await _post(url + "/v1/chat/completions", chat()))[0] == 503
    assert router.held == 0


async def test_a_request_during_a_handover_waits_for_the_successor(harness: Harness) -> None:
    """Rollouts and drains: the only replica turns draining a moment before its successor is
    discovered. Without scale from zero configured, a request in that gap waits for the successor
    (up to the queue timeout) instead of a 503; with nothing draining it is still 503 at once."""
    router, url, ups = await harness(2, cfg=RouterConfig(strategy=st.ROUND_ROBIN, queue_timeout_s=10))
    a, b = ups[0].url, ups[1].url
    router.reconcile({a: (BackendSpec(a), True)})  # the old replica drains; b not yet discovered
    pending = asyncio.create_task(_post(url + "/v1/chat/completions", chat()))
    await eventually(lambda: router.held == 1)
    router.reconcile({a: (BackendSpec(a), True), b: (BackendSpec(b), False)})  # the successor
    status, _ = await pending
    assert status == 200 and len(ups[1].received) == 1 and not ups[0].received and router.held == 0
