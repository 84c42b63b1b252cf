"""The autoscaler's leading signal over loopback: what the client port's /metrics says per pool
(arrivals, in flight, queued, held, the engines' service rate), read as the autoscaler will.

No assertion depends on timing: rates are checked through relations that hold at any elapsed
time (decode rate = max_tokens x request rate over the same span) and bounds, counts exactly."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import aiohttp
from test_router_proxy import Harness, _get, _post, chat, eventually, harness

from toposerve.router import strategies as st
from toposerve.router.endpoints import BackendSpec
from toposerve.router.proxy import Router, RouterConfig

__all__ = ["harness"]


def samples(text: str, name: str) -> dict[frozenset[tuple[str, str]], float]:
    """{labels: value} of one metric in an exposition page."""
    out: dict[frozenset[tuple[str, str]], float] = {}
    for line in text.splitlines():
        if line.startswith("#") or not (line.startswith(name + "{") or line.startswith(name + " ")):
            continue
        head, value = line.rsplit(" ", 1)
        labels: set[tuple[str, str]] = set()
        if "{" in head:
            for kv in head[head.index("{") + 1 : head.rindex("}")].split(","):
                if kv:
                    k, v = kv.split("=", 1)
                    labels.add((k, v.strip('"')))
        out[frozenset(labels)] = float(value)
    return out


def one(text: str, name: str, **labels: str) -> float:
    want = frozenset(labels.items())
    got = samples(text, name)
    assert want in got, f"{name}{labels} not in {got}"
    return got[want]


async def metrics(url: str) -> str:
    status, text = await _get(url + "/metrics")
    assert status == 200
    return text


def pool(router: Router, urls: list[str], name: str) -> None:
    router.reconcile({u: (BackendSpec(u, gpu_type="H100", pool=name), False) for u in urls})


async def test_arrivals_per_pool_count_routed_requests_and_not_4xx(harness: Harness) -> None:
    t_start = time.monotonic()
    router, url, ups = await harness(2)
    pool(router, [ups[0].url, ups[1].url], "h100")
    for _ in range(3):
        status, _ = await _post(url + "/v1/chat/completions", chat(max_tokens=7))
        assert status == 200
    # n=2 doubles the decode estimate; max_tokens past the bound is clamped (2^24)
    assert (await _post(url + "/v1/chat/completions", chat(max_tokens=5, n=2)))[0] == 200
    # rejected before routing: bad JSON, an unknown strategy, a body that is not an object
    async with aiohttp.ClientSession() as s:
        async with s.post(url + "/v1/chat/completions", data=b"{nope") as r:
            assert r.status == 400
        async with s.post(
            url + "/v1/chat/completions", json=chat(), headers={"x-toposerve-strategy": "nope"}
        ) as r:
            assert r.status == 400
        async with s.post(url + "/v1/completions", json=[1, 2]) as r:
            assert r.status == 400
    text = await metrics(url)
    t_end = time.monotonic()
    est = router.estimator.estimate(len("user\nhello\n"))  # what the router charged per prompt
    # the estimator learns from usage as responses come back: the sum, not 4x one estimate
    prompt_total = one(text, "toposerve_router_arrival_prompt_tokens_total", pool="h100")
    assert one(text, "toposerve_router_arrivals_total", pool="h100") == 4
    assert one(text, "toposerve_router_arrival_decode_tokens_total", pool="h100") == 3 * 7 + 10
    assert prompt_total >= 4 * min(est, 3) and prompt_total > 0
    for window in ("5s", "15s", "60s"):
        req = one(text, "toposerve_router_arrival_requests_per_second", pool="h100", window=window)
        # 4 arrivals over a span between 1 s (the floor) and the time the test took
        assert 4 / max(t_end - t_start, 1.0) - 1e-9 <= req <= 4.0
        decode = one(text, "toposerve_router_arrival_decode_tokens_per_second", pool="h100", window=window)
        prompt = one(text, "toposerve_router_arrival_prompt_tokens_per_second", pool="h100", window=window)
        assert abs(decode - req * 31 / 4) < 1e-6 and abs(prompt - req * prompt_total / 4) < 1e-6
    assert one(text, "toposerve_router_in_flight_requests", pool="h100") == 0
    assert one(text, "toposerve_router_in_flight_tokens", pool="h100") == 0
    assert one(text, "toposerve_router_pool_ready_replicas", pool="h100") == 2
    assert one(text, "toposerve_router_queued_requests") == 0
    # the client port names no backend, these series included
    assert "127.0.0.1" not in text


async def test_a_retry_is_one_arrival(harness: Harness) -> None:
    router, url, ups = await harness(2)
    pool(router, [ups[0].url, ups[1].url], "p")
    ups[0].mode = "error500"
    for _ in range(2):  # each tries the failing engine first and is retried on the other
        assert (await _post(url + "/v1/chat/completions", chat()))[0] == 200
    assert len(ups[0].received) == 2 and len(ups[1].received) == 2  # four attempts
    assert one(await metrics(url), "toposerve_router_arrivals_total", pool="p") == 2


async def test_in_flight_requests_and_tokens_while_a_stream_runs(harness: Harness) -> None:
    router, url, ups = await harness(1, mode="gate")
    pool(router, [ups[0].url], "h100")
    async with (
        aiohttp.ClientSession() as s,
        s.post(url + "/v1/chat/completions", json=chat(stream=True, max_tokens=10)) as r,
    ):
        assert r.status == 200
        await asyncio.wait_for(r.content.readuntil(b"\n\n"), 60)  # the engine holds the rest
        text = await metrics(url)
        prompt = one(text, "toposerve_router_arrival_prompt_tokens_total", pool="h100")
        assert one(text, "toposerve_router_in_flight_requests", pool="h100") == 1
        # the full charge (prompt + expected decode), not what is left of it after the first token
        assert one(text, "toposerve_router_in_flight_tokens", pool="h100") == prompt + 10
        ups[0].gate.set()
        await r.read()
    await eventually(lambda: router.ledger.backends() == [])
    text = await metrics(url)
    assert one(text, "toposerve_router_in_flight_requests", pool="h100") == 0
    assert one(text, "toposerve_router_in_flight_tokens", pool="h100") == 0


async def test_queued_requests_count_as_arrivals_while_they_wait(harness: Harness) -> None:
    cfg = RouterConfig(
        strategy=st.ROUND_ROBIN, queue_timeout_s=60, routing=replace(st.Config(), max_in_flight=1)
    )
    router, url, ups = await harness(1, cfg=cfg, mode="gate")
    pool(router, [ups[0].url], "h100")
    async with aiohttp.ClientSession() as s:
        first = await s.post(url + "/v1/chat/completions", json=chat(stream=True))
        await first.content.readuntil(b"\n\n")  # the only backend is now saturated
        second = asyncio.create_task(_post(url + "/v1/chat/completions", chat()))
        await eventually(lambda: router.queued == 1)
        text = await metrics(url)
        assert one(text, "toposerve_router_queued_requests") == 1
        assert one(text, "toposerve_router_arrivals_total", pool="h100") == 2  # before it is served
        assert one(text, "toposerve_router_in_flight_requests", pool="h100") == 1
        ups[0].gate.set()
        await first.read()
        first.close()
        assert (await second)[0] == 200
    text = await metrics(url)
    assert one(text, "toposerve_router_queued_requests") == 0
    assert one(text, "toposerve_router_arrivals_total", pool="h100") == 2


async def test_held_requests_count_as_arrivals_once(harness: Harness) -> None:
    cfg = RouterConfig(strategy=st.ROUND_ROBIN, hold_at_zero_s=30.0, max_held=4)
    router, url, ups = await harness(1, cfg=cfg)
    router.reconcile({})  # zero replicas: no pool known
    held = asyncio.create_task(_post(url + "/v1/chat/completions", chat(max_tokens=9)))
    await eventually(lambda: router.held == 1)
    text = await metrics(url)
    assert one(text, "toposerve_router_held_requests") == 1  # unchanged, unlabelled
    assert one(text, "toposerve_router_arrivals_total", pool="") == 1
    assert one(text, "toposerve_router_arrival_decode_tokens_total", pool="") == 9
    assert one(text, "toposerve_router_arrival_requests_per_second", pool="", window="5s") > 0
    pool(router, [ups[0].url], "h100")  # the autoscaler's replica appears
    assert (await held)[0] == 200
    text = await metrics(url)
    assert one(text, "toposerve_router_arrivals_total", pool="") == 1  # not counted again
    assert one(text, "toposerve_router_arrivals_total", pool="h100") == 0
    assert one(text, "toposerve_router_held_requests") == 0


GEN = 'vllm:generation_tokens_total{{engine="{e}",model_name="m"}} {v}\n'
PROMPT = 'vllm:prompt_tokens_total{{engine="{e}",model_name="m"}} {v}\n'


def counters(gen: tuple[float, float], prompt: float | None = None) -> str:
    text = GEN.format(e=0, v=gen[0]) + GEN.format(e=1, v=gen[1])
    text += 'vllm:num_requests_running{engine="1",model_name="m"} 2.0\n'  # + the fake's 1.0
    if prompt is not None:
        text += PROMPT.format(e=0, v=prompt)
    return text


async def test_service_rate_learnt_from_the_engines_counters(harness: Harness) -> None:
    router, url, ups = await harness(2)
    pool(router, [ups[0].url, ups[1].url], "h100")
    ups[0].metrics_extra = counters((100.0, 50.0), prompt=1000.0)
    ups[1].metrics_extra = counters((10.0, 0.0), prompt=0.0)
    text = await metrics(url)
    assert not samples(text, "toposerve_router_pool_decode_tokens_per_second_per_replica")
    await router.probe_all()  # the base
    await asyncio.sleep(0.01)
    ups[0].metrics_extra = counters((400.0, 150.0), prompt=1600.0)  # +400 decode, +600 prompt
    ups[1].metrics_extra = counters((110.0, 100.0), prompt=200.0)  # +200 decode, +200 prompt
    await router.probe_all()
    text = await metrics(url)
    decode = one(
        text, "toposerve_router_pool_decode_tokens_per_second_per_replica", pool="h100", window="60s"
    )
    prompt = one(
        text, "toposerve_router_pool_prompt_tokens_per_second_per_replica", pool="h100", window="60s"
    )
    seconds = one(text, "toposerve_router_pool_observed_replica_seconds", pool="h100", window="60s")
    running = one(text, "toposerve_router_pool_running_requests_per_replica", pool="h100", window="60s")
    assert seconds > 0
    assert abs(decode * seconds - 600.0) < 1e-6  # both engines' increases, series summed
    assert abs(prompt * seconds - 800.0) < 1e-6
    assert running == 3.0  # 1 + 2 running on each engine
    # an engine restarts: its counters go down; that interval is dropped, not read as negative
    await asyncio.sleep(0.01)
    ups[0].metrics_extra = counters((5.0, 0.0), prompt=0.0)
    ups[1].metrics_extra = counters((110.0, 100.0), prompt=200.0)  # idle: +0
    await router.probe_all()
    text = await metrics(url)
    seconds2 = one(text, "toposerve_router_pool_observed_replica_seconds", pool="h100", window="60s")
    decode2 = one(
        text, "toposerve_router_pool_decode_tokens_per_second_per_replica", pool="h100", window="60s"
    )
    assert seconds2 > seconds  # ups[1]'s idle interval counts, ups[0]'s reset does not
    assert abs(decode2 * seconds2 - 600.0) < 1e-6


async def test_engines_without_token_counters_report_no_service_rate(harness: Harness) -> None:
    router, url, _ups = await harness(1)
    for _ in range(3):
        await router.probe_all()
        await asyncio.sleep(0.01)
    text = await metrics(url)
    for name in (
        "toposerve_router_pool_decode_tokens_per_second_per_replica",
        "toposerve_router_pool_prompt_tokens_per_second_per_replica",
        "toposerve_router_pool_running_requests_per_replica",
        "toposerve_router_pool_observed_replica_seconds",
    ):
        assert not samples(text, name), name
    # the load metrics still come from the same poll
    assert one(text, "toposerve_router_backend_kv_cache_usage", gpu_type="") == 0.25
