"""The streaming proxy against real in-process upstream servers on 127.0.0.1.

Upstreams are small aiohttp apps that speak just enough of the vLLM OpenAI API, with knobs for
failure modes. No assertion depends on timing: "eventually" loops poll a condition a bounded
number of times and the gating events make ordering deterministic.
"""

from __future__ import annotations

import asyncio
import gc
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from toposerve.router import strategies as st
from toposerve.router.endpoints import BackendSpec
from toposerve.router.proxy import (
    Router,
    RouterConfig,
    parse_engine_metrics,
    parse_kv_capacity,
    parse_request,
    serve,
    tune_gc,
)


@dataclass
class Upstream:
    """A fake engine. `mode`: ok | error500 | break | gate (stream waits on `gate` after one chunk)
    | drop (closes the connection without an answer) | garbage (answers bytes that are not HTTP)."""

    mode: str = "ok"
    health: int = 200
    tokens: int = 5
    kv: float = 0.25
    waiting: int = 3
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    received: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    poison: str = "POISON"  # a prompt containing it gets a 500 on every upstream (a query of death)
    cancelled: int = 0
    url: str = ""
    metrics_extra: str = ""  # more /metrics lines (token counters), read at each scrape

    async def completion(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.received.append(body)
        self.headers.append(dict(request.headers))
        if self.mode == "hang":
            await asyncio.Event().wait()
        if self.mode in ("drop", "garbage"):
            assert request.transport is not None
            if self.mode == "garbage":
                request.transport.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
            request.transport.abort()
            return web.Response()
        if self.mode == "error500" or self.poison in json.dumps(body):
            return web.json_response({"error": "boom"}, status=500)
        prompt_tokens = 40
        if not body.get("stream"):
            return web.json_response(
                {
                    "choices": [{"message": {"role": "assistant", "content": "hi"}}],
                    "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 2},
                }
            )
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            for i in range(self.tokens):
                await resp.write(f'data: {{"choices":[{{"delta":{{"content":"t{i}"}}}}]}}\n\n'.encode())
                if i == 0 and self.mode in ("gate", "break"):
                    await self.gate.wait()
                    if self.mode == "break":
                        assert request.transport is not None
                        request.transport.abort()
                        return resp
            usage = {
                "choices": [],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": self.tokens},
            }
            await resp.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())
            await resp.write_eof()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return resp

    async def health_h(self, request: web.Request) -> web.Response:
        if self.health == 0:  # as good as down: drop the connection
            assert request.transport is not None
            request.transport.abort()
        return web.Response(status=self.health)

    async def metrics_h(self, request: web.Request) -> web.Response:
        text = (
            "# HELP vllm:kv_cache_usage_perc KV-cache usage.\n# TYPE vllm:kv_cache_usage_perc gauge\n"
            f'vllm:kv_cache_usage_perc{{engine="0",model_name="m"}} {self.kv}\n'
            f'vllm:num_requests_waiting{{engine="0",model_name="m"}} {self.waiting}\n'
            'vllm:num_requests_running{model_name="m"} 1.0\n'
            'vllm:cache_config_info{block_size="16",cache_dtype="auto",num_gpu_blocks="40"} 1.0\n'
            + self.metrics_extra
        )
        return web.Response(text=text)

    async def models_h(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "m", "object": "model"}]})

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.completion)
        app.router.add_post("/v1/completions", self.completion)
        app.router.add_get("/health", self.health_h)
        app.router.add_get("/metrics", self.metrics_h)
        app.router.add_get("/v1/models", self.models_h)
        return app


Harness = Callable[..., Awaitable[tuple[Router, str, list[Upstream]]]]


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    runners: list[web.AppRunner] = []

    async def start(
        n: int = 2,
        cfg: RouterConfig | None = None,
        extra_urls: tuple[str, ...] = (),
        expose: bool = True,
        **up: Any,
    ) -> tuple[Router, str, list[Upstream]]:
        ups = []
        for _ in range(n):
            u = Upstream(**up)
            r = web.AppRunner(u.app(), handler_cancellation=True)
            await r.setup()
            site = web.TCPSite(r, "127.0.0.1", 0)
            await site.start()
            runners.append(r)
            u.url = f"http://127.0.0.1:{r.addresses[0][1]}"
            ups.append(u)
        specs = [BackendSpec(u.url) for u in ups] + [BackendSpec(x) for x in extra_urls]
        # the tests read x-toposerve-backend, which is opt-in (it reveals pod addresses)
        router = Router(specs, replace(cfg or RouterConfig(strategy=st.ROUND_ROBIN), expose_backend=expose))
        rr = await serve(router, "127.0.0.1", 0, probe=False)
        runners.append(rr)
        return router, f"http://127.0.0.1:{rr.addresses[0][1]}", ups

    yield start
    for r in reversed(runners):
        await r.cleanup()


async def eventually(cond: Callable[[], bool], rounds: int = 500) -> None:
    for _ in range(rounds):
        if cond():
            return
        await asyncio.sleep(0.01)
    assert cond()


def chat(text: str = "hello", stream: bool = False, **kw: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": text}], "stream": stream, **kw}


def ledger_idle(router: Router) -> bool:
    return router.ledger.backends() == []


async def test_streams_are_relayed_chunk_by_chunk(harness: Harness) -> None:
    router, url, ups = await harness(1, mode="gate")
    async with (
        aiohttp.ClientSession() as s,
        s.post(url + "/v1/chat/completions", json=chat(stream=True, max_tokens=10)) as r,
    ):
        assert r.status == 200 and r.headers["x-toposerve-backend"] == ups[0].url
        # a buffering proxy would block here forever (the upstream waits on the gate): fail, not hang
        first = await asyncio.wait_for(r.content.readuntil(b"\n\n"), 60)
        # the upstream is still blocked after its first chunk: the router did not buffer
        assert b"t0" in first and not ups[0].gate.is_set()
        assert router.ledger.in_flight(ups[0].url) == 1
        assert router.ledger.pending(ups[0].url) <= 10  # prompt part released at first byte
        ups[0].gate.set()
        rest = await r.read()
    assert b"[DONE]" in rest and b"t4" in rest
    await eventually(lambda: ledger_idle(router))
    # the usage in the last event taught the estimator: "user\nhello\n" is 12 chars for 40 tokens
    assert router.estimator.chars_per_token < 4.0


async def test_non_streaming_response_and_headers(harness: Harness) -> None:
    router, url, ups = await harness(2)
    async with aiohttp.ClientSession() as s:
        seen = set()
        for _ in range(4):
            async with s.post(url + "/v1/chat/completions", json=chat()) as r:
                assert r.status == 200
                body = await r.json()
                assert body["usage"]["prompt_tokens"] == 40
                assert r.headers["x-toposerve-route-reason"] == st.R_ROUND_ROBIN
                seen.add(r.headers["x-toposerve-backend"])
        assert seen == {u.url for u in ups}
        async with s.post(url + "/v1/completions", json={"model": "m", "prompt": [1, 2, 3]}) as r:
            assert r.status == 200
    assert ledger_idle(router)


async def test_retry_once_on_5xx_before_first_byte(harness: Harness) -> None:
    router, url, ups = await harness(2)
    ups[0].mode = "error500"
    async with aiohttp.ClientSession() as s:
        for _ in range(4):
            async with s.post(url + "/v1/chat/completions", json=chat()) as r:
                assert r.status == 200
                assert r.headers["x-toposerve-backend"] == ups[1].url
    # three consecutive 5xx eject the backend (passive outlier detection): the 4th request skips it
    assert len(ups[0].received) == router.cfg.eject_after == 3
    assert not router.backends[ups[0].url].healthy(time.monotonic())
    assert router.backends[ups[1].url].healthy(time.monotonic())
    text = (await _get(url + "/metrics"))[1]
    assert "toposerve_router_retries_total" in text
    assert ledger_idle(router)


async def test_both_fail_passes_on_the_engine_error_and_blames_nobody(harness: Harness) -> None:
    router, url, ups = await harness(2, mode="error500")
    for _ in range(router.cfg.eject_after * 3):  # enough to eject everyone if failures counted
        status, text = await _post(url + "/v1/chat/completions", chat())
        err = json.loads(text)["error"]
        assert status == 500 and err["type"] == "InternalServerError" and err["code"] == 500
    # exactly one retry per request, and a request that fails everywhere is the request's fault
    assert len(ups[0].received) + len(ups[1].received) == 2 * router.cfg.eject_after * 3
    assert all(b.healthy(time.monotonic()) and b.health.failures == 0 for b in router.backends.values())
    assert ledger_idle(router)


@pytest.mark.parametrize("mode", ["drop", "garbage"])
async def test_an_engine_that_breaks_off_before_answering_is_retried_elsewhere_and_blamed(
    harness: Harness, mode: str
) -> None:
    """A connection closed before the answer's head, or bytes that are not HTTP, is a disconnect:
    retried once on another backend, and blamed on the first because the retry succeeded."""
    router, url, ups = await harness(2, cfg=RouterConfig(strategy=st.ROUND_ROBIN))
    ups[0].mode = mode
    for _ in range(2):  # round-robin: each request tries the broken one, then the other
        status, _ = await _post(url + "/v1/chat/completions", chat())
        assert status == 200
    assert len(ups[0].received) == 2 and len(ups[1].received) == 2
    assert router.backends[ups[0].url].health.failures == 2  # each blamed (under eject_after, 3)
    assert router.backends[ups[1].url].health.failures == 0
    assert ledger_idle(router)


async def test_connect_failure_is_retried_and_ejects(harness: Harness) -> None:
    # a port with nothing listening: bind, note the port, close
    probe = web.AppRunner(web.Application())
    await probe.setup()
    site = web.TCPSite(probe, "127.0.0.1", 0)
    await site.start()
    dead = f"http://127.0.0.1:{probe.addresses[0][1]}"
    await probe.cleanup()
    router, url, ups = await harness(1, extra_urls=(dead,))
    for _ in range(3):
        status, _ = await _post(url + "/v1/chat/completions", chat())
        assert status == 200
    assert not router.backends[dead].healthy(time.monotonic())  # ejected after the first refusal
    assert len(ups[0].received) == 3


async def test_stream_broken_mid_way_ends_with_clean_error(harness: Harness) -> None:
    router, url, ups = await harness(1, mode="break")
    async with (
        aiohttp.ClientSession() as s,
        s.post(url + "/v1/chat/completions", json=chat(stream=True)) as r,
    ):
        assert r.status == 200
        first = await r.content.readuntil(b"\n\n")
        assert b"t0" in first
        ups[0].gate.set()
        rest = await r.read()
    events = [e for e in rest.split(b"\n\n") if e.strip()]
    last = json.loads(events[-1].removeprefix(b"data: "))
    assert last["error"]["type"] == "upstream_error"
    await eventually(lambda: ledger_idle(router))


async def test_client_disconnect_cancels_upstream_and_releases_load(harness: Harness) -> None:
    router, url, ups = await harness(1, mode="gate")
    s = aiohttp.ClientSession()
    r = await s.post(url + "/v1/chat/completions", json=chat(stream=True))
    await r.content.readuntil(b"\n\n")
    assert router.ledger.in_flight(ups[0].url) == 1
    r.close()
    await s.close()
    await eventually(lambda: ledger_idle(router) and ups[0].cancelled == 1)


async def test_saturated_gives_429_and_no_backend_gives_503(harness: Harness) -> None:
    cfg = RouterConfig(strategy=st.LEAST_REQUEST, routing=st.Config(max_in_flight=1), queue_timeout_s=0.0)
    router, url, ups = await harness(1, cfg=cfg, mode="gate")
    async with aiohttp.ClientSession() as s:
        held = await s.post(url + "/v1/chat/completions", json=chat(stream=True))
        await held.content.readuntil(b"\n\n")
        async with s.post(url + "/v1/chat/completions", json=chat()) as r:
            assert r.status == 429 and r.headers["Retry-After"] == "1"
        ups[0].gate.set()
        await held.read()
        held.close()
    await eventually(lambda: ledger_idle(router))
    ups[0].health = 503
    await router.probe_all()
    status, _ = await _post(url + "/v1/chat/completions", chat())
    assert status == 503
    # The router stays ready (its Service keeps it): clients get a 503 with Retry-After, not a refusal.
    assert (await _get(url + "/health"))[0] == 200
    ups[0].health = 200  # the active probe brings it back
    await router.probe_all()
    assert (await _post(url + "/v1/chat/completions", chat()))[0] == 200


async def test_queued_request_proceeds_when_capacity_frees(harness: Harness) -> None:
    cfg = RouterConfig(strategy=st.AUTO, routing=st.Config(max_in_flight=1), queue_timeout_s=30.0)
    router, url, ups = await harness(1, cfg=cfg, mode="gate")
    async with aiohttp.ClientSession() as s:
        held = await s.post(url + "/v1/chat/completions", json=chat(stream=True))
        await held.content.readuntil(b"\n\n")
        queued = asyncio.create_task(_post(url + "/v1/chat/completions", chat()))
        await eventually(lambda: len(router._waiters) == 1)
        assert not queued.done()
        ups[0].gate.set()
        await held.read()
        held.close()
        status, _ = await queued
    assert status == 200


async def test_strategy_override_header_and_bad_requests(harness: Harness) -> None:
    _router, url, _ups = await harness(2, cfg=RouterConfig(strategy=st.AUTO))
    async with aiohttp.ClientSession() as s:
        h = {"x-toposerve-strategy": "round-robin"}
        async with s.post(url + "/v1/chat/completions", json=chat(), headers=h) as r:
            assert r.headers["x-toposerve-route-reason"] == st.R_ROUND_ROBIN
        async with s.post(url + "/v1/chat/completions", json=chat()) as r:
            assert r.headers["x-toposerve-route-reason"].startswith("auto_")
        async with s.post(
            url + "/v1/chat/completions", json=chat(), headers={"x-toposerve-strategy": "x"}
        ) as r:
            assert r.status == 400
        async with s.post(url + "/v1/chat/completions", data=b"{not json") as r:
            assert r.status == 400


async def test_session_sticks_through_the_proxy(harness: Harness) -> None:
    _router, url, _ups = await harness(3, cfg=RouterConfig(strategy=st.SESSION))
    async with aiohttp.ClientSession() as s:
        backends = set()
        for i in range(5):
            async with s.post(
                url + "/v1/chat/completions", json=chat(f"turn {i}"), headers={"x-session-id": "abc"}
            ) as r:
                backends.add(r.headers["x-toposerve-backend"])
        assert len(backends) == 1
        # the `user` field works as a session id too
        users = set()
        for i in range(3):
            async with s.post(url + "/v1/chat/completions", json=chat(f"q {i}", user="u-7")) as r:
                users.add(r.headers["x-toposerve-backend"])
        assert len(users) == 1


async def test_prefix_affinity_through_the_proxy(harness: Harness) -> None:
    _router, url, _ups = await harness(3, cfg=RouterConfig(strategy=st.PREFIX_AWARE))
    system = "You are a careful assistant that answers briefly. " * 30
    async with aiohttp.ClientSession() as s:
        seen = []
        for i in range(4):
            body = {
                "model": "m",
                "messages": [{"role": "system", "content": system}, {"role": "user", "content": f"q{i}"}],
            }
            async with s.post(url + "/v1/chat/completions", json=body) as r:
                seen.append((r.headers["x-toposerve-backend"], r.headers["x-toposerve-route-reason"]))
    assert len({b for b, _ in seen}) == 1
    assert [reason for _, reason in seen[1:]] == [st.R_PREFIX_HIT] * 3


async def test_two_routers_with_homes_agree_through_the_proxy(harness: Harness) -> None:
    """With --home-weight, each conversation goes to its root's home and stays there, whichever
    of two independent routers gets each turn."""
    cfg = RouterConfig(strategy=st.PREFIX_AWARE, routing=st.Config(w_home=2.0))  # --home-weight 2
    router, url, _ups = await harness(3, cfg=cfg)
    cfg2 = cfg
    _router2, url2, _ = await harness(0, cfg=cfg2, extra_urls=tuple(u.url for u in _ups))
    system = "You are a careful assistant that answers briefly. " * 30
    homes = []
    async with aiohttp.ClientSession() as s:
        for i in range(4):
            msgs = [{"role": "system", "content": system}, {"role": "user", "content": f"q{i} " * 40}]
            seen = []
            for turn, u in enumerate((url, url2, url)):  # turns alternate between the two routers
                body = {"model": "m", "messages": msgs}
                async with s.post(u + "/v1/chat/completions", json=body) as r:
                    seen.append((r.headers["x-toposerve-backend"], r.headers["x-toposerve-route-reason"]))
                msgs = [
                    *msgs,
                    {"role": "assistant", "content": "ok " * 50},
                    {"role": "user", "content": f"t{turn}"},
                ]
            assert len({b for b, _ in seen}) == 1, seen
            assert seen[2][1] == st.R_PREFIX_HIT
            homes.append(seen[0][0])
    backends = router.snapshot()
    root = f"system\n{system}\n"
    expected = [
        st.home_order(st.affinity_key(root + f"user\n{f'q{i} ' * 40}\n"), backends)[0] for i in range(4)
    ]
    assert homes == expected


async def test_probes_scrape_engine_metrics_and_models_health_metrics(harness: Harness) -> None:
    router, url, ups = await harness(2)
    await router.probe_all()
    b = router.backends[ups[0].url]
    assert (b.kv_usage, b.waiting, b.kv_capacity_tokens) == (0.25, 3, 640)
    status, text = await _get(url + "/v1/models")
    assert status == 200 and json.loads(text)["data"][0]["id"] == "m"
    assert (await _get(url + "/health"))[0] == 200
    await _post(url + "/v1/chat/completions", chat())
    status, text = await _get(url + "/metrics")
    for name in (
        "toposerve_router_requests_total",
        "toposerve_router_ttft_seconds_bucket",
        "toposerve_router_e2e_seconds_count",
        "toposerve_router_decisions_total",
        "toposerve_router_backend_kv_cache_usage",
        "toposerve_router_backend_in_flight",
    ):
        assert name in text, name


async def test_concurrent_mix_returns_load_to_zero(harness: Harness) -> None:
    router, url, ups = await harness(3, cfg=RouterConfig(strategy=st.AUTO))
    ups[2].mode = "error500"

    async def one(i: int) -> int:
        status, _ = await _post(url + "/v1/chat/completions", chat(f"conv {i % 5} " * 30, stream=bool(i % 2)))
        return status

    statuses = await asyncio.gather(*(one(i) for i in range(30)))
    assert set(statuses) == {200}
    await eventually(lambda: ledger_idle(router))


async def test_discovery_updates_add_and_drain_without_restart(harness: Harness) -> None:
    router, url, ups = await harness(2, mode="gate")
    a, b = ups[0].url, ups[1].url
    router.reconcile({a: (BackendSpec(a), False)})
    assert b not in router.backends  # idle and gone: dropped at once
    async with aiohttp.ClientSession() as s:
        held = await s.post(url + "/v1/chat/completions", json=chat(stream=True))
        await held.content.readuntil(b"\n\n")
        # a disappears while a request is in flight; b comes (back) as a new endpoint
        router.reconcile({b: (BackendSpec(b), False)})
        assert router.backends[a].draining and router.backends[a].removed
        ups[1].mode = "ok"
        async with s.post(url + "/v1/chat/completions", json=chat()) as r:
            assert r.headers["x-toposerve-backend"] == b
        ups[0].gate.set()
        assert b"[DONE]" in await held.read()
        held.close()
    await eventually(lambda: a not in router.backends)


def test_parse_engine_metrics() -> None:
    text = (
        "# TYPE vllm:kv_cache_usage_perc gauge\n"
        'vllm:kv_cache_usage_perc{model_name="m",engine="0"} 0.5\n'
        'vllm:kv_cache_usage_perc{model_name="m",engine="1"} 0.7\n'
        'vllm:num_requests_waiting{model_name="a b"} 2.0 1700000000\n'
        "vllm:num_requests_waiting 3\n"
        "vllm:broken{x} notanumber\n"
        "other_metric 5\n"
    )
    assert parse_engine_metrics(text) == (0.7, 5)
    assert parse_engine_metrics('vllm:gpu_cache_usage_perc{a="b"} 0.1\n') == (0.1, None)
    assert parse_engine_metrics("") == (None, None)


def test_parse_kv_capacity() -> None:
    line = 'vllm:cache_config_info{block_size="16",cache_dtype="auto",num_gpu_blocks="28048",x="a=b"} 1.0\n'
    assert parse_kv_capacity("# HELP vllm:cache_config_info x\n" + line) == 28048 * 16
    assert parse_kv_capacity('vllm:cache_config_info{block_size="16",num_gpu_blocks="None"} 1.0\n') is None
    assert parse_kv_capacity('vllm:cache_config_info{block_size="16",num_gpu_blocks="0"} 1.0\n') is None
    assert parse_kv_capacity('vllm:cache_config_info{block_size="16"} 1.0\n') is None
    assert parse_kv_capacity("vllm:kv_cache_usage_perc 0.5\n") is None


async def test_prefix_memory_is_bounded_by_the_scraped_kv_capacity(harness: Harness) -> None:
    router, url, ups = await harness(1, cfg=RouterConfig(strategy=st.PREFIX_AWARE))
    await router.probe_all()  # 40 blocks x 16 tokens = 640 tokens of KV cache
    cap = router._capacity_blocks(ups[0].url)
    assert cap == int(640 * router.estimator.chars_per_token / router.cfg.block_chars) > 0
    for i in range(6):  # distinct ~2,000-char prompts: far more blocks than the cache holds
        status, _ = await _post(url + "/v1/chat/completions", chat(f"prompt {i} " * 200))
        assert status == 200
        assert 0 < router.memory.prefix.held(ups[0].url) <= router._capacity_blocks(ups[0].url)


async def _post(url: str, body: dict[str, Any]) -> tuple[int, str]:
    async with aiohttp.ClientSession() as s, s.post(url, json=body) as r:
        return r.status, await r.text()


async def _get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        return r.status, await r.text()


async def test_openai_sdk_streams_through_and_sees_a_broken_stream_as_an_error(harness: Harness) -> None:
    openai = pytest.importorskip("openai")
    router, url, ups = await harness(1, mode="ok")
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    stream = await client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == "t0t1t2t3t4"
    ups[0].mode = "break"
    ups[0].gate.set()
    stream = await client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    with pytest.raises(openai.APIError, match="broke mid-way"):
        async for _ in stream:
            pass
    await client.close()
    await eventually(lambda: ledger_idle(router))


async def test_custom_session_header_and_gpu_weighting_switch(harness: Harness) -> None:
    cfg = RouterConfig(strategy=st.SESSION, session_header="x-conv", gpu_weighting=False)
    router, url, _ = await harness(3, cfg=cfg)
    router.backends[next(iter(router.backends))].spec = BackendSpec(
        next(iter(router.backends)), gpu_type="B200"
    )
    assert {b.weight for b in router.snapshot()} == {1.0}
    async with aiohttp.ClientSession() as s:
        seen = set()
        for i in range(4):
            async with s.post(
                url + "/v1/chat/completions", json=chat(f"t{i}"), headers={"x-conv": "c1"}
            ) as r:
                seen.add(r.headers["x-toposerve-backend"])
                assert r.headers["x-toposerve-route-reason"] in (st.R_SESSION_NEW, st.R_SESSION_HIT)
    assert len(seen) == 1


async def test_a_poisoned_request_cannot_take_backends_out_of_rotation(harness: Harness) -> None:
    router, url, ups = await harness(2)
    for _ in range(router.cfg.eject_after * 4):
        status, text = await _post(url + "/v1/chat/completions", chat("please POISON the fleet"))
        assert status == 500 and json.loads(text)["error"]["code"] == 500
    now = time.monotonic()
    assert all(b.healthy(now) for b in router.backends.values())
    assert (await _get(url + "/health"))[0] == 200
    seen = set()
    for i in range(4):
        async with (
            aiohttp.ClientSession() as s,
            s.post(url + "/v1/chat/completions", json=chat(f"ok {i}")) as r,
        ):
            assert r.status == 200
            seen.add(r.headers["x-toposerve-backend"])
    assert seen == {u.url for u in ups}


async def test_a_crash_ejects_once_and_the_probe_re_admits_the_restarted_backend(harness: Harness) -> None:
    router, url, ups = await harness(2, mode="break")
    b0 = router.backends[ups[0].url]
    held = []
    async with aiohttp.ClientSession() as s:
        for _ in range(16):  # eight streams on each backend, all in flight
            r = await s.post(url + "/v1/chat/completions", json=chat(stream=True))
            await r.content.readuntil(b"\n\n")
            held.append(r)
        for u in ups:
            u.gate.set()  # the "crash": every stream breaks
        for r in held:
            await r.read()
            r.close()
    await eventually(lambda: ledger_idle(router))
    # one backend ejected (the cap keeps the other), held for the base time, not doubled per failure
    ejected = [b for b in router.backends.values() if b.health.ejected(time.monotonic())]
    assert len(ejected) == 1 and ejected[0].health.ejections == 1
    assert ejected[0].health.ejected_until - time.monotonic() <= router.cfg.eject_base_s
    # the engine restarts: the probe sees it down, then up, and re-admits it at once
    b = ejected[0]
    up = next(u for u in ups if u.url == b.spec.url)
    up.health = 503
    await router.probe_all()
    up.health, up.mode = 200, "ok"
    await router.probe_all()
    assert b.healthy(time.monotonic())
    assert b0.healthy(time.monotonic())


async def test_connection_named_headers_are_not_forwarded_and_backend_header_is_opt_in(
    harness: Harness,
) -> None:
    _router, url, ups = await harness(1, expose=False)
    async with aiohttp.ClientSession() as s:
        h = {"Connection": "keep-alive, X-Secret-Hop", "X-Secret-Hop": "1", "X-Kept": "2"}
        async with s.post(url + "/v1/chat/completions", json=chat(), headers=h) as r:
            assert r.status == 200
            assert "x-toposerve-backend" not in r.headers  # pod addresses stay private by default
            assert r.headers["x-toposerve-route-reason"] == st.R_ROUND_ROBIN
    sent = {k.lower() for k in ups[0].headers[-1]}
    assert "x-kept" in sent and "x-secret-hop" not in sent


def test_parse_request_is_total_on_odd_json() -> None:
    cfg = RouterConfig()
    est = st.TokenEstimator()
    odd = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": 5}, {"text": None}, {"text": "ok"}]},
            {"role": 7, "content": {"x": 1}},
            "not a message",
        ],
        "max_tokens": 10**400,
        "n": 10**50,
        "stream": "false",
        "user": "u" * 100_000,
    }
    p = parse_request("/v1/chat/completions", odd, {}, est, cfg)
    assert not p.stream and p.text_chars == len("user\nok\n\n\n")
    assert p.request.max_tokens <= 2**24 * 128
    mem = st.RoutingMemory()
    backends = [st.BackendState("a"), st.BackendState("b")]
    d = st.choose(st.AUTO, p.request, backends, mem, cfg.routing, 0.0)  # no OverflowError
    assert d is not None
    st.commit(mem, st.AUTO, p.request, d, cfg.routing, 0.0)
    assert all(len(k) == 32 for k in mem.sessions._map)
    for stream, want in (
        ("true", True),
        (True, True),
        (1, True),
        ("false", False),
        (0, False),
        (None, False),
    ):
        assert (
            parse_request("/v1/completions", {"prompt": "x", "stream": stream}, {}, est, cfg).stream is want
        )
    assert parse_request("/v1/completions", {"prompt": [1, True, 3]}, {}, est, cfg).request.prompt_tokens >= 0


async def test_an_upstream_that_never_answers_gets_one_504_without_retry_or_blame(harness: Harness) -> None:
    router, url, ups = await harness(
        2, cfg=RouterConfig(strategy=st.ROUND_ROBIN, read_timeout_s=0.2), mode="hang"
    )
    status, text = await _post(url + "/v1/chat/completions", chat())
    err = json.loads(text)["error"]
    assert status == 504 and err["type"] == "GatewayTimeoutError"
    assert len(ups[0].received) + len(ups[1].received) == 1
    assert all(b.health.failures == 0 for b in router.backends.values())
    await eventually(lambda: ledger_idle(router))


def test_affinity_key_is_the_conversation_root() -> None:
    """Every turn of a conversation carries its root's key; conversations that share only a
    system prompt do not; completions key on their first block; no prefix strategy or homes off
    (the default), no key."""
    cfg, est = RouterConfig(routing=st.Config(w_home=2.0)), st.TokenEstimator()
    system = {"role": "system", "content": "shared system prompt " * 20}

    def chat(*turns: str) -> st.Request:
        msgs: list[dict[str, str]] = [system]
        for i, t in enumerate(turns):
            msgs.append({"role": "assistant" if i % 2 else "user", "content": t})
        return parse_request("/v1/chat/completions", {"messages": msgs}, {}, est, cfg).request

    first, later = chat("question one " * 20), chat("question one " * 20, "answer", "follow-up")
    assert first.affinity is not None and first.affinity == later.affinity
    assert first.affinity_blocks == len(first.block_hashes)  # the whole first turn is the root
    assert chat("question two " * 20).affinity != first.affinity
    only_system = chat()
    assert only_system.affinity is not None and only_system.affinity_blocks > 0
    body = {"prompt": "p" * 300}
    c1 = parse_request("/v1/completions", body, {}, est, cfg).request
    c2 = parse_request("/v1/completions", {"prompt": "p" * 128 + "q" * 500}, {}, est, cfg).request
    assert c1.affinity == c2.affinity and c1.affinity_blocks == 1
    assert parse_request("/v1/completions", body, {}, est, cfg, need_hashes=False).request.affinity is None
    assert parse_request("/v1/completions", {"prompt": ""}, {}, est, cfg).request.affinity is None
    assert parse_request("/v1/completions", body, {}, est, RouterConfig()).request.affinity is None


def test_tune_gc_freezes_start_up_and_raises_gen0_and_zero_leaves_the_gc_alone() -> None:
    before = gc.get_threshold()
    try:
        gc.unfreeze()
        tune_gc(0)
        assert gc.get_threshold() == before and gc.get_freeze_count() == 0
        tune_gc(12_345)
        assert gc.get_threshold() == (12_345, before[1], before[2])
        assert gc.get_freeze_count() > 1000  # this process's imports, out of every collection
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
