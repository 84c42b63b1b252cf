"""The mock engine over HTTP: OpenAI wire format, metrics, errors, faults, shutdown, interop.

Servers run in-process on 127.0.0.1 with a free port and ``time_scale=0`` (no sleeping) unless
a test needs requests to stay in flight; nothing asserts on wall-clock durations.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import SimpleNamespace
from typing import Any
from unittest import mock

import aiohttp
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from toposerve.mockengine import server as server_mod
from toposerve.mockengine.faults import FaultConfig
from toposerve.mockengine.server import Engine, EngineConfig, MockServer

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
USAGE_NULL = ',"usage":null}\n\n'


@asynccontextmanager
async def serve(**kw: Any) -> AsyncIterator[MockServer]:
    kw.setdefault("model", MODEL)
    kw.setdefault("time_scale", 0.0)
    kw.setdefault("num_gpu_blocks", 1024)
    kw.setdefault("admin", True)
    server = await MockServer(EngineConfig(**kw)).start()
    try:
        yield server
    finally:
        await server.stop()


async def post(s: aiohttp.ClientSession, url: str, body: Any) -> tuple[int, Any]:
    async with s.post(url, json=body) as r:
        return r.status, await r.json()


async def raw_stream(s: aiohttp.ClientSession, url: str, body: Any) -> tuple[aiohttp.ClientResponse, bytes]:
    async with s.post(url, json=body) as r:
        return r, await r.read()


def metrics_map(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def metric(m: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    labels.setdefault("model_name", MODEL)
    return m[(name, tuple(sorted(labels.items())))]


async def scrape(s: aiohttp.ClientSession, base: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with s.get(base + "/metrics") as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return metrics_map(await r.text())


async def wait_for(pred: Any, what: str) -> None:
    for _ in range(2000):
        if await pred():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"never happened: {what}")


# -- streaming wire format ----------------------------------------------------------------------------


async def test_chat_stream_is_byte_exact_openai_shape() -> None:
    async with serve() as srv, aiohttp.ClientSession() as s:
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Say hi"}],
            "max_tokens": 3,
            "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": 0.7,  # unknown-to-the-mock fields are accepted
            "some_vendor_field": {"x": 1},
        }
        resp, data = await raw_stream(s, srv.url + "/v1/chat/completions", body)
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/event-stream; charset=utf-8"
        text = data.decode()
        m = re.match(
            r'data: \{"id":"(chatcmpl-[^"]+)","object":"chat\.completion\.chunk","created":(\d+),', text
        )
        assert m, text[:200]
        rid, created = m.group(1), m.group(2)
        head = f'data: {{"id":"{rid}","object":"chat.completion.chunk","created":{created},"model":"{MODEL}",'

        def chunk(choice: str) -> str:
            return (
                f'{head}"choices":[{{"index":0,{choice},"logprobs":null,"finish_reason":null}}]' + USAGE_NULL
            )

        events = text.split("\n\n")
        pieces = [json.loads(e[len("data: ") :])["choices"][0]["delta"]["content"] for e in events[1:4]]
        expected = (
            chunk('"delta":{"role":"assistant","content":""}')
            + "".join(chunk('"delta":{"content":' + json.dumps(p) + "}") for p in pieces)
            + f'{head}"choices":[{{"index":0,"delta":{{}},"logprobs":null,"finish_reason":"length"}}]'
            + USAGE_NULL
            + f'{head}"choices":[],"usage":{{"prompt_tokens":13,"completion_tokens":3,"total_tokens":16,'
            '"prompt_tokens_details":{"cached_tokens":0}}}\n\n'
            "data: [DONE]\n\n"
        )
        assert text == expected
        assert all(p for p in pieces)


async def test_completion_stream_without_usage_has_no_usage_key() -> None:
    async with serve() as srv, aiohttp.ClientSession() as s:
        body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 4, "stream": True}
        _, data = await raw_stream(s, srv.url + "/v1/completions", body)
        events = data.decode().split("\n\n")
        assert events[-2:] == ["data: [DONE]", ""]
        chunks = [json.loads(e[6:]) for e in events[:-2]]
        assert len(chunks) == 5  # 4 tokens + the finish chunk
        for c in chunks:
            assert list(c) == ["id", "object", "created", "model", "choices"]
            assert c["object"] == "text_completion"
            assert list(c["choices"][0]) == ["index", "text", "logprobs", "finish_reason"]
        assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * 4 + ["length"]
        assert chunks[-1]["choices"][0]["text"] == ""
        # the streamed text equals the non-streamed text for the same (seeded) request
        _, full = await post(s, srv.url + "/v1/completions", {**body, "stream": False})
        assert "".join(c["choices"][0]["text"] for c in chunks) == full["choices"][0]["text"]


async def test_non_streaming_bodies_and_token_counts() -> None:
    async with serve() as srv, aiohttp.ClientSession() as s:
        st, chat = await post(
            s,
            srv.url + "/v1/chat/completions",
            {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
        )
        assert st == 200
        assert chat["object"] == "chat.completion" and chat["id"].startswith("chatcmpl-")
        choice = chat["choices"][0]
        assert choice["message"]["role"] == "assistant" and choice["finish_reason"] == "stop"
        u = chat["usage"]
        assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
        async with s.post(
            srv.url + "/tokenize", json={"model": MODEL, "prompt": choice["message"]["content"]}
        ) as r:
            assert (await r.json())["count"] == u["completion_tokens"]


# -- prefix cache in usage and metrics ---------------------------------------------------------------


async def test_repeated_prompt_hits_prefix_cache_in_usage_and_metrics() -> None:
    async with serve() as srv, aiohttp.ClientSession() as s:
        prompt = "You are a meticulous assistant. " * 40 + "Question one?"
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 2}
        before = await scrape(s, srv.url)
        _, first = await post(s, srv.url + "/v1/completions", body)
        _, second = await post(s, srv.url + "/v1/completions", body)
        after = await scrape(s, srv.url)
        n = first["usage"]["prompt_tokens"]
        assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert cached == (n - 1) // 16 * 16 and cached > 0.8 * n
        queries = metric(after, "vllm:prefix_cache_queries_total") - metric(
            before, "vllm:prefix_cache_queries_total"
        )
        hits = metric(after, "vllm:prefix_cache_hits_total") - metric(before, "vllm:prefix_cache_hits_total")
        assert queries == 2 * n and hits == cached


# -- metrics -------------------------------------------------------------------------------------------


async def test_metrics_have_vllm_names_and_model_label() -> None:
    async with serve() as srv, aiohttp.ClientSession() as s:
        await post(s, srv.url + "/v1/completions", {"model": MODEL, "prompt": "hello world", "max_tokens": 5})
        m = await scrape(s, srv.url)
        for name in (
            "vllm:num_requests_running",
            "vllm:num_requests_waiting",
            "vllm:kv_cache_usage_perc",
            "vllm:prefix_cache_queries_total",
            "vllm:prefix_cache_hits_total",
            "vllm:prompt_tokens_total",
            "vllm:generation_tokens_total",
            "vllm:num_preemptions_total",
        ):
            assert (name, (("model_name", MODEL),)) in m, name
        assert metric(m, "vllm:generation_tokens_total") == 5
        assert metric(m, "vllm:prompt_tokens_total") == 2
        assert metric(m, "vllm:request_success_total", finished_reason="length") == 1
        for h in (
            "vllm:time_to_first_token_seconds",
            "vllm:inter_token_latency_seconds",
            "vllm:e2e_request_latency_seconds",
            "vllm:request_queue_time_seconds",
        ):
            assert metric(m, h + "_count") == 1 or h == "vllm:inter_token_latency_seconds"
        assert metric(m, "vllm:inter_token_latency_seconds_count") == 4
        assert metric(m, "vllm:time_to_first_token_seconds_bucket", le="2560.0") == 1
        info = [k for k in m if k[0] == "vllm:cache_config_info"]
        assert len(info) == 1
        labels = dict(info[0][1])
        assert labels["block_size"] == "16" and labels["num_gpu_blocks"] == "1024"
        assert not any(k[0] == "vllm:gpu_cache_usage_perc" for k in m)


async def test_h100_mock_reports_faster_decode_than_a100_mock() -> None:
    """End to end through /metrics: same settings and request, only --gpu-type differs.

    With time_scale 0 the simulated clock moves only by modelled step times, so the metric
    values are exact model quantities, not wall-clock measurements.
    """
    body = {"model": MODEL, "prompt": "benchmark me " * 50, "max_tokens": 33}
    itl, ttft = {}, {}
    for gpu in ("H100", "A100-80GB"):
        async with serve(gpu_type=gpu) as srv, aiohttp.ClientSession() as s:
            st, _ = await post(s, srv.url + "/v1/completions", body)
            assert st == 200
            m = await scrape(s, srv.url)
            itl[gpu] = metric(m, "vllm:inter_token_latency_seconds_sum") / 32
            ttft[gpu] = metric(m, "vllm:time_to_first_token_seconds_sum")
    assert itl["A100-80GB"] / itl["H100"] == pytest.approx(1.6)
    assert ttft["A100-80GB"] / ttft["H100"] == pytest.approx(1.6)
    assert 0.005 < itl["H100"] < 0.010  # ~7.6 ms per decode step for one sequence on an H100


async def test_deprecated_gpu_cache_metric_behind_flag() -> None:
    async with serve(deprecated_gpu_cache_metric=True) as srv, aiohttp.ClientSession() as s:
        m = await scrape(s, srv.url)
        assert metric(m, "vllm:gpu_cache_usage_perc") == metric(m, "vllm:kv_cache_usage_perc") == 0.0


async def test_two_engines_in_one_process_keep_separate_metrics() -> None:
    async with serve(served_model_names=["a"]) as a, serve(served_model_names=["b"]) as b:
        async with aiohttp.ClientSession() as s:
            await post(s, a.url + "/v1/completions", {"model": "a", "prompt": "x y z", "max_tokens": 3})
            ma, mb = await scrape(s, a.url), await scrape(s, b.url)
        assert ma[("vllm:generation_tokens_total", (("model_name", "a"),))] == 3
        assert mb[("vllm:generation_tokens_total", (("model_name", "b"),))] == 0


async def test_running_waiting_and_kv_usage_under_concurrent_load_then_back_to_zero() -> None:
    # time_scale > 0 keeps requests in flight long enough to be observed; nothing here is timed.
    async with serve(max_num_seqs=2, time_scale=0.02) as srv, aiohttp.ClientSession() as s:
        body = {"model": MODEL, "prompt": "long context " * 600, "max_tokens": 60}
        tasks = [asyncio.create_task(post(s, srv.url + "/v1/completions", body)) for _ in range(5)]
        seen: dict[str, float] = {"running": 0, "waiting": 0, "kv": 0}

        async def loaded() -> bool:
            m = await scrape(s, srv.url)
            seen["running"] = max(seen["running"], metric(m, "vllm:num_requests_running"))
            seen["waiting"] = max(seen["waiting"], metric(m, "vllm:num_requests_waiting"))
            seen["kv"] = max(seen["kv"], metric(m, "vllm:kv_cache_usage_perc"))
            return seen["running"] == 2 and seen["waiting"] >= 2

        await wait_for(loaded, "2 running and >= 2 waiting")
        results = await asyncio.gather(*tasks)
        assert all(st == 200 for st, _ in results)
        assert seen["kv"] > 0.05
        m = await scrape(s, srv.url)
        assert metric(m, "vllm:num_requests_running") == 0
        assert metric(m, "vllm:num_requests_waiting") == 0
        assert metric(m, "vllm:kv_cache_usage_perc") == 0
        assert metric(m, "vllm:request_queue_time_seconds_sum") > 0  # some of them waited


# -- other endpoints ---------------------------------------------------------------------------------


async def test_models_health_tokenize_detokenize_version() -> None:
    async with (
        serve(served_model_names=["alias-a", "alias-b"], max_model_len=4096) as srv,
        aiohttp.ClientSession() as s,
    ):
        async with s.get(srv.url + "/v1/models") as r:
            models = await r.json()
        assert models["object"] == "list"
        assert [m["id"] for m in models["data"]] == ["alias-a", "alias-b"]
        assert models["data"][0]["root"] == MODEL and models["data"][0]["max_model_len"] == 4096
        async with s.get(srv.url + "/health") as r:
            assert r.status == 200
        st, tok = await post(s, srv.url + "/tokenize", {"model": "alias-b", "prompt": "Hello, world"})
        assert st == 200 and tok["count"] == 3 and tok["max_model_len"] == 4096
        st, de = await post(s, srv.url + "/detokenize", {"model": "alias-b", "tokens": tok["tokens"]})
        assert de["prompt"] == "Hello, world"
        st, chat_tok = await post(s, srv.url + "/tokenize", {"messages": [{"role": "user", "content": "hi"}]})
        assert st == 200 and chat_tok["count"] > 1
        async with s.get(srv.url + "/version") as r:
            assert "version" in await r.json()


# -- errors -------------------------------------------------------------------------------------------


def assert_error(status: int, body: Any, expected_status: int, etype: str) -> None:
    assert status == expected_status
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == etype and body["error"]["code"] == expected_status
    assert body["error"]["message"]


async def test_openai_shaped_errors() -> None:
    async with serve(max_model_len=256) as srv, aiohttp.ClientSession() as s:
        url = srv.url + "/v1/completions"
        st, b = await post(s, url, {"model": "nope", "prompt": "x"})
        assert_error(st, b, 404, "NotFoundError")
        st, b = await post(s, url, {"model": MODEL})
        assert_error(st, b, 400, "BadRequestError")
        assert b["error"]["param"] == "prompt"
        st, b = await post(s, url, {"model": MODEL, "prompt": "x", "max_tokens": "ten"})
        assert_error(st, b, 400, "BadRequestError")
        st, b = await post(s, url, {"model": MODEL, "prompt": "word " * 300})
        assert_error(st, b, 400, "BadRequestError")
        assert "maximum context length is 256" in b["error"]["message"]
        st, b = await post(s, url, {"model": MODEL, "prompt": "word " * 200, "max_tokens": 100})
        assert_error(st, b, 400, "BadRequestError")
        st, b = await post(s, srv.url + "/v1/chat/completions", {"model": MODEL, "messages": []})
        assert_error(st, b, 400, "BadRequestError")
        async with s.post(url, data=b"{not json", headers={"Content-Type": "application/json"}) as r:
            assert_error(r.status, await r.json(), 400, "BadRequestError")
        async with s.get(srv.url + "/v1/embeddings") as r:
            assert_error(r.status, await r.json(), 404, "NotFoundError")
        async with s.get(url) as r:
            assert_error(r.status, await r.json(), 405, "APIError")


async def test_503_when_waiting_queue_exceeds_bound() -> None:
    async with serve(max_num_seqs=1, max_waiting=1, time_scale=1.0) as srv, aiohttp.ClientSession() as s:
        url = srv.url + "/v1/completions"
        body = {"model": MODEL, "prompt": "hold the slot", "max_tokens": 5000, "stream": True}
        # Streams hold their slot until we hang up; the second one queues behind the first.
        streams = [await s.post(url, json=body), await s.post(url, json=body)]

        async def queued() -> bool:
            async with s.get(srv.url + "/admin/state") as r:
                st = await r.json()
            return bool(st["running"] == 1 and st["waiting"] == 1)

        await wait_for(queued, "one running, one waiting")
        st, b = await post(s, url, {**body, "stream": False, "max_tokens": 1})
        assert_error(st, b, 503, "ServiceUnavailableError")
        assert "overloaded" in b["error"]["message"]
        for r in streams:
            r.close()
        await wait_for(lambda: _idle(srv), "hung-up streams are aborted")


# -- faults ---------------------------------------------------------------------------------------------


async def test_fault_flags_and_admin_endpoint() -> None:
    async with serve(faults=FaultConfig(fail_rate=1.0, fail_status=500)) as srv, aiohttp.ClientSession() as s:
        url = srv.url + "/v1/completions"
        body = {"model": MODEL, "prompt": "x", "max_tokens": 2}
        st, b = await post(s, url, body)
        assert_error(st, b, 500, "InternalServerError")
        async with s.delete(srv.url + "/admin/faults") as r:
            assert (await r.json())["fail_rate"] == 0.0
        st, _ = await post(s, url, body)
        assert st == 200

        st, cfg = await post(s, srv.url + "/admin/faults", {"unready": True, "slowdown": 3})
        assert st == 200 and cfg["unready"] is True and cfg["slowdown"] == 3.0
        async with s.get(srv.url + "/health") as r:
            assert r.status == 503
        assert srv.engine is not None and srv.engine.scheduler.slowdown == 3.0
        st, b = await post(s, srv.url + "/admin/faults", {"fail_rate": 7})
        assert_error(st, b, 400, "BadRequestError")
        await post(s, srv.url + "/admin/faults", {"unready": False})
        async with s.get(srv.url + "/health") as r:
            assert r.status == 200


async def test_die_mid_stream_cuts_the_connection() -> None:
    async with (
        serve(faults=FaultConfig(die_rate=1.0, die_after_tokens=2)) as srv,
        aiohttp.ClientSession() as s,
    ):
        body = {"model": MODEL, "prompt": "x", "max_tokens": 20, "stream": True}
        got = b""
        with pytest.raises(aiohttp.ClientError):
            async with s.post(srv.url + "/v1/completions", json=body) as r:
                assert r.status == 200
                async for line in r.content:
                    got += line
        assert got.count(b"data: {") == 2 and b"[DONE]" not in got
        with pytest.raises(aiohttp.ClientError):
            await post(s, srv.url + "/v1/completions", {**body, "stream": False})
        assert srv.engine is not None
        await wait_for(lambda: _idle(srv), "aborted requests leave the scheduler")
        m = await scrape(s, srv.url)
        assert metric(m, "vllm:kv_cache_usage_perc") == 0
        assert metric(m, "vllm:request_success_total", finished_reason="abort") == 2
        assert metric(m, "vllm:request_success_total", finished_reason="length") == 0


async def _idle(srv: MockServer) -> bool:
    assert srv.engine is not None
    return not srv.engine.scheduler.has_work and srv.engine.inflight == 0


async def test_hang_until_fault_cleared() -> None:
    async with serve(faults=FaultConfig(hang_rate=1.0)) as srv, aiohttp.ClientSession() as s:
        task = asyncio.create_task(post(s, srv.url + "/v1/completions", {"model": MODEL, "prompt": "x"}))
        await asyncio.sleep(0.05)
        assert not task.done()
        async with s.delete(srv.url + "/admin/faults"):
            pass
        st, b = await task
        assert_error(st, b, 503, "ServiceUnavailableError")


# -- socket options and shutdown ------------------------------------------------------------------------


async def test_tcp_nodelay_is_set() -> None:
    async with serve() as srv, aiohttp.ClientSession() as s, s.get(srv.url + "/admin/state") as r:
        assert (await r.json())["tcp_nodelay"] is True


def _finish_reasons(data: bytes) -> list[str]:
    events = [json.loads(line[6:]) for line in data.split(b"\n\n") if line.startswith(b"data: {")]
    return [c["finish_reason"] for e in events for c in e.get("choices", []) if c.get("finish_reason")]


async def test_drain_mode_finishes_inflight_aborts_new_requests_and_stays_healthy() -> None:
    """--shutdown-timeout N > 0, as vLLM 0.33.0: in-flight requests finish; a request that comes
    in meanwhile is answered 200 with finish_reason "abort" and no tokens (EngineCore's
    _reject_add_in_shutdown); /health stays 200; the listener closes once the engine stopped."""
    # time_scale 2: the 30 tokens take about 0.7 s, time for the requests made during the drain
    cfg = EngineConfig(model=MODEL, time_scale=2, num_gpu_blocks=256, shutdown_timeout_s=30)
    srv = await MockServer(cfg).start()
    async with aiohttp.ClientSession() as s:
        body = {"model": MODEL, "prompt": "x", "max_tokens": 30, "stream": True}
        resp = await s.post(srv.url + "/v1/completions", json=body)
        first = await resp.content.readline()
        assert first.startswith(b"data: {")
        shutdown = asyncio.create_task(srv.shutdown())
        await asyncio.sleep(0.05)
        async with s.get(srv.url + "/health") as h:
            assert h.status == 200
        st, late = await post(
            s,
            srv.url + "/v1/chat/completions",
            {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
        )
        assert st == 200 and late["choices"][0]["finish_reason"] == "abort"
        assert late["choices"][0]["message"]["content"] == "" and late["usage"]["completion_tokens"] == 0
        rest = await resp.content.read()
        data = first + rest
        assert data.endswith(b"data: [DONE]\n\n") and _finish_reasons(data) == ["length"]
        assert data.count(b'"text":') == 31  # 30 tokens and the finish chunk
        assert await shutdown == 0
        with pytest.raises(aiohttp.ClientConnectionError):
            async with s.get(srv.url + "/health"):
                pass


async def test_abort_mode_cuts_inflight_streams_with_finish_reason_abort() -> None:
    """--shutdown-timeout 0 (vLLM's default): in-flight requests are finished at once with
    finish_reason "abort" after the tokens they had (EngineCore._handle_shutdown, mode=abort)."""
    srv = await MockServer(EngineConfig(model=MODEL, time_scale=0.02, num_gpu_blocks=256)).start()
    async with aiohttp.ClientSession() as s:
        body = {"model": MODEL, "prompt": "x", "max_tokens": 200, "stream": True}
        resp = await s.post(srv.url + "/v1/completions", json=body)
        first = await resp.content.readline()
        shutdown = asyncio.create_task(srv.shutdown())
        data = first + await resp.content.read()
        assert data.endswith(b"data: [DONE]\n\n") and _finish_reasons(data) == ["abort"]
        assert data.count(b'"text":') < 100
        assert await shutdown == 0


async def test_drain_deadline_kills_the_engine_under_what_is_left() -> None:
    """Past --shutdown-timeout vLLM's process manager kills EngineCore: a stream still running
    gets an error event and [DONE], a non-streamed request a 500; shutdown reports them."""
    cfg = EngineConfig(model=MODEL, time_scale=0.05, num_gpu_blocks=256, shutdown_timeout_s=1)
    srv = await MockServer(cfg).start()
    async with aiohttp.ClientSession() as s:
        body = {"model": MODEL, "prompt": "x", "max_tokens": 2000, "stream": True}
        resp = await s.post(srv.url + "/v1/completions", json=body)
        first = await resp.content.readline()
        unary = asyncio.create_task(post(s, srv.url + "/v1/completions", {**body, "stream": False}))
        await asyncio.sleep(0.1)
        shutdown = asyncio.create_task(srv.shutdown())
        data = first + await resp.content.read()
        error = json.loads(data.split(b"\n\n")[-3][6:])
        assert error["error"]["code"] == 500 and data.endswith(b"data: [DONE]\n\n")
        st, b = await unary
        assert_error(st, b, 500, "InternalServerError")
        assert await shutdown == 2


@pytest.mark.parametrize("timeout", [None, 30])
def test_sigterm_aborts_or_drains_as_told_and_exits_zero(timeout: int | None) -> None:
    """The real CLI process: ready, SIGTERM with a stream in flight; without --shutdown-timeout
    (vLLM's default 0) the stream ends at once with finish_reason abort, with 30 it completes;
    exit 0 either way."""
    flag = "" if timeout is None else f"'--shutdown-timeout', '{timeout}', "
    code = (
        "import sys; from toposerve.cli import main; "
        "sys.exit(main(['mock-engine', '--host', '127.0.0.1', '--port', '0', '--model', 'm', "
        f"{flag}'--gpu-type', 'SomeFutureGPU', '--time-scale', '0.02', '--num-gpu-blocks', '128']))"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(60, proc.kill)  # a wedged child must not hang the suite
    watchdog.start()
    try:
        assert proc.stderr is not None
        port = None
        lines = []
        for line in proc.stderr:
            lines.append(line)
            found = re.search(r"on http://127\.0\.0\.1:(\d+)", line)
            if found:
                port = int(found.group(1))
                break
        assert port, "".join(lines)
        assert any("unknown GPU type 'SomeFutureGPU'" in x for x in lines)

        async def client() -> bytes:
            async with aiohttp.ClientSession() as s:
                body = {"model": "m", "prompt": "x", "max_tokens": 25, "stream": True}
                async with s.post(f"http://127.0.0.1:{port}/v1/completions", json=body) as r:
                    first = await r.content.readline()
                    proc.send_signal(signal.SIGTERM)
                    return first + await r.content.read()

        data = asyncio.run(client())
        assert data.endswith(b"data: [DONE]\n\n")
        if timeout is None:
            assert _finish_reasons(data) == ["abort"] and data.count(b'"text":') < 26
        else:
            assert _finish_reasons(data) == ["length"] and data.count(b'"text":') == 26
        assert proc.wait(timeout=30) == 0
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- interop: the openai SDK, unchanged -------------------------------------------------------------------


async def test_openai_sdk_chat_stream_and_completions() -> None:
    async with serve(served_model_names=["llama"]) as srv:
        client = openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        try:
            models = await client.models.list()
            assert [m.id for m in models.data] == ["llama"]

            chat = await client.chat.completions.create(
                model="llama", messages=[{"role": "user", "content": "Hello!"}], max_tokens=8
            )
            assert chat.choices[0].finish_reason == "length"
            assert chat.usage is not None and chat.usage.completion_tokens == 8
            assert chat.choices[0].message.content

            stream = await client.chat.completions.create(
                model="llama",
                messages=[{"role": "user", "content": "Hello!"}],
                max_tokens=8,
                stream=True,
                stream_options={"include_usage": True},
            )
            parts, finish, usage = [], None, None
            async for chunk in stream:
                if chunk.choices:
                    parts.append(chunk.choices[0].delta.content or "")
                    finish = chunk.choices[0].finish_reason or finish
                if chunk.usage:
                    usage = chunk.usage
            assert "".join(parts) == chat.choices[0].message.content  # same seed, same prompt
            assert finish == "length"
            assert usage is not None and usage.completion_tokens == 8
            assert usage.prompt_tokens_details is not None
            assert usage.prompt_tokens_details.cached_tokens == 0  # 6 prompt tokens: no full block

            comp = await client.completions.create(
                model="llama", prompt="The capital of France is", max_tokens=4
            )
            assert comp.usage is not None and comp.usage.completion_tokens == 4

            with pytest.raises(openai.NotFoundError):
                await client.completions.create(model="other", prompt="x", max_tokens=1)
            with pytest.raises(openai.BadRequestError):
                await client.completions.create(model="llama", prompt="x " * 9000, max_tokens=1)
        finally:
            await client.close()


# -- CLI contract -------------------------------------------------------------------------------------------


def test_cli_accepts_the_renderer_flags_and_defaults_model_an_h100_8b() -> None:
    from toposerve.cli import build_parser
    from toposerve.mockengine.cli import config_from_args

    argv = ["mock-engine", "--host", "10.1.2.3", "--port", "8000", "--model", "llama-8b", "--gpu-type",
            "A100-80GB", "--tensor-parallel-size", "2", "--max-model-len", "16384"]  # fmt: skip
    cfg = config_from_args(build_parser().parse_args(argv))
    assert isinstance(cfg, EngineConfig)
    assert (cfg.gpu_type, cfg.tensor_parallel_size, cfg.max_model_len, cfg.names) == (
        "A100-80GB", 2, 16384, ["llama-8b"]
    )  # fmt: skip
    d = config_from_args(build_parser().parse_args(["mock-engine", "--fail-rate", "0.1", "--slowdown", "2"]))
    assert isinstance(d, EngineConfig)
    assert (d.gpu_type, d.block_size, d.max_num_seqs, d.num_gpu_blocks, d.time_scale) == (
        "H100",
        16,
        256,
        None,
        1.0,
    )
    assert d.faults == FaultConfig(fail_rate=0.1, slowdown=2.0)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["mock-engine", "--fail-rate", "1.5"])


async def test_engine_loop_crash_turns_the_engine_unready(monkeypatch: pytest.MonkeyPatch) -> None:
    async with serve() as srv, aiohttp.ClientSession() as s:
        assert srv.engine is not None

        def boom(now: float) -> Any:
            raise RuntimeError("simulated engine bug")

        monkeypatch.setattr(srv.engine.scheduler, "step", boom)
        st, b = await post(s, srv.url + "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 2})
        assert_error(st, b, 500, "InternalServerError")
        async with s.get(srv.url + "/health") as r:
            assert r.status == 503


class _Stop(Exception):
    pass


async def test_steps_are_paced_by_deadline_with_the_mocks_own_work_inside(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A step lasts its modelled time in all, the mock's own work for it included; a late wake-up
    is made up on the next sleep, a stall by at most one step, and an idle gap starts afresh.
    (Before: the whole duration was slept after the work, so every step ran long.) A fake clock
    and a fake sleep: nothing here waits."""
    now = [100.0]
    engine = Engine(EngineConfig(model=MODEL, time_scale=1.0), clock=lambda: now[0])
    # (modelled duration, the mock's own work in it, work left after it?)
    plan = iter([(0.010, 0.003, True), (0.010, 0.003, True), (0.010, 0.050, True), (0.010, 0.002, True),
                 (0.010, 0.001, False), (0.010, 0.004, True)])  # fmt: skip
    work = [True]

    class Sched:
        blocks = SimpleNamespace(take_events=lambda: [])

        @property
        def has_work(self) -> bool:
            return work[0]

        def step(self, sim_now: float) -> Any:
            d, busy, more = next(plan)
            now[0] += busy
            work[0] = more
            return SimpleNamespace(duration=d, end=sim_now + d, updated=[])

    sleeps: list[float] = []

    async def fake_sleep(delay: float) -> None:
        sleeps.append(round(delay, 6))
        now[0] += delay + 0.001  # every wake-up comes 1 ms late
        if len(sleeps) == 6:
            raise _Stop

    async def idle_then_work() -> None:  # the engine waits for work: 5 s of idle, then a request
        now[0] += 5.0
        work[0] = True

    monkeypatch.setattr(engine, "scheduler", Sched())
    monkeypatch.setattr(engine, "metrics", mock.Mock())
    monkeypatch.setattr(engine._wake, "wait", idle_then_work)
    monkeypatch.setattr(server_mod.asyncio, "sleep", fake_sleep)
    with pytest.raises(_Stop):
        await engine._loop()
    # 10 ms steps: 3 ms of work -> 7 ms sleep; the next makes up the 1 ms late wake-up (6); a
    # 50 ms stall -> no sleep, and the step after it runs without one too (one step made up, not
    # four); the last before the idle gap is on time again (6); after the gap it starts afresh
    assert sleeps == [0.007, 0.006, 0.0, 0.0, 0.006, 0.006]


# -- hostile input and protection ------------------------------------------------------------------------


async def test_lone_surrogate_is_a_400_not_a_500() -> None:
    async with serve() as srv, aiohttp.ClientSession() as s:
        content = '"hi \\ud800 there"'  # the JSON escape of a lone surrogate, as a client sends it
        raw = f'{{"model": "{MODEL}", "messages": [{{"role": "user", "content": {content}}}]}}'
        for path in ("/v1/chat/completions", "/tokenize"):
            async with s.post(srv.url + path, data=raw, headers={"Content-Type": "application/json"}) as r:
                assert_error(r.status, await r.json(), 400, "BadRequestError")
        # the tokenizer itself never raises on them either
        assert srv.engine is not None and len(srv.engine.tokenizer.encode("a \ud800 b")) == 3


async def test_content_that_vllm_types_otherwise_is_a_400_as_in_vllm() -> None:
    """vLLM's pydantic model refuses a text part whose `text` is not a string and a `content`
    that is neither a string nor a list; the mock served them (200)."""
    bad_contents: list[Any] = [
        [{"type": "text", "text": 12}],
        [{"type": "text", "text": None}],
        [{"type": "text", "text": "ok"}, {"type": "text", "text": ["x"]}],
        5,
        {"text": "hi"},
    ]
    async with serve() as srv, aiohttp.ClientSession() as s:
        for content in bad_contents:
            body = {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": content}]}
            st, b = await post(s, srv.url + "/v1/chat/completions", body)
            assert_error(st, b, 400, "BadRequestError")
            assert b["error"]["param"] == "messages", b
        # what vLLM accepts still works: text parts, non-text parts next to them, null content
        for content in (
            [{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "x"}}],
            None,
        ):
            msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": content}]
            st, b = await post(
                s, srv.url + "/v1/chat/completions", {"model": MODEL, "max_tokens": 2, "messages": msgs}
            )
            assert st == 200 and b["choices"], b


async def test_huge_prompt_is_tokenized_only_up_to_the_context_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    async with serve(max_model_len=2048) as srv, aiohttp.ClientSession() as s:
        assert srv.engine is not None
        seen: list[int] = []
        encode = srv.engine.tokenizer.encode

        def counting(text: str, limit: int | None = None) -> list[int]:
            ids = encode(text, limit)
            seen.append(len(ids))
            return ids

        monkeypatch.setattr(srv.engine.tokenizer, "encode", counting)
        prompt = "word " * 2_000_000  # 10 MB, two million tokens
        st, b = await post(
            s, srv.url + "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 1}
        )
        assert_error(st, b, 400, "BadRequestError")
        assert "at least 2050" in b["error"]["message"]
        assert seen == [2049]  # stopped one past the limit instead of walking ten megabytes


async def test_deeply_nested_json_and_odd_content_parts_are_400() -> None:
    async with serve() as srv, aiohttp.ClientSession() as s:
        deep = "[" * 100_000 + "]" * 100_000
        async with s.post(srv.url + "/v1/completions", data=deep) as r:
            assert_error(r.status, await r.json(), 400, "BadRequestError")
        body = {"model": MODEL, "max_tokens": 2, "messages": [
            {"role": "user", "content": [{"type": "text", "text": 7}, {"type": "text", "text": None}]}
        ]}  # fmt: skip
        st, b = await post(s, srv.url + "/v1/chat/completions", body)
        assert_error(st, b, 400, "BadRequestError")  # as vLLM's pydantic model answers


async def test_poisoned_prompt_fails_every_time_others_succeed() -> None:
    async with (
        serve(faults=FaultConfig(poison="QUERY-OF-DEATH", fail_status=500)) as srv,
        aiohttp.ClientSession() as s,
    ):
        url = srv.url + "/v1/completions"
        for _ in range(3):
            st, b = await post(s, url, {"model": MODEL, "prompt": "x QUERY-OF-DEATH y", "max_tokens": 2})
            assert_error(st, b, 500, "InternalServerError")
        st, _ = await post(s, url, {"model": MODEL, "prompt": "fine", "max_tokens": 2})
        assert st == 200
        st, cfg = await post(s, srv.url + "/admin/faults", {"poison": ""})
        assert st == 200 and cfg["poison"] == ""
        st, b = await post(s, srv.url + "/admin/faults", {"poison": 3})
        assert_error(st, b, 400, "BadRequestError")


async def test_admin_endpoints_are_off_by_default_and_take_a_token() -> None:
    async with serve(admin=False) as srv, aiohttp.ClientSession() as s:
        for method, path in (
            ("POST", "/admin/faults"),
            ("GET", "/admin/state"),
            ("POST", "/reset_prefix_cache"),
        ):
            async with s.request(method, srv.url + path, json={"unready": True}) as r:
                assert_error(r.status, await r.json(), 404, "NotFoundError")
        async with s.get(srv.url + "/health") as r:
            assert r.status == 200
    async with serve(admin=False, admin_token="s3cret") as srv, aiohttp.ClientSession() as s:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            async with s.post(srv.url + "/admin/faults", json={"unready": True}, headers=headers) as r:
                assert_error(r.status, await r.json(), 401, "AuthenticationError")
        async with s.get(srv.url + "/health") as r:
            assert r.status == 200  # the refused calls changed nothing
        auth = {"Authorization": "Bearer s3cret"}
        async with s.post(srv.url + "/admin/faults", json={"unready": True}, headers=auth) as r:
            assert r.status == 200
        async with s.get(srv.url + "/health") as r:
            assert r.status == 503


def test_cli_binds_loopback_by_default_and_reads_the_admin_token(monkeypatch: pytest.MonkeyPatch) -> None:
    from toposerve.cli import build_parser
    from toposerve.mockengine.cli import config_from_args

    monkeypatch.delenv("TOPOSERVE_MOCK_ADMIN_TOKEN", raising=False)
    args = build_parser().parse_args(["mock-engine"])
    assert args.host == "127.0.0.1"
    cfg = config_from_args(args)
    assert isinstance(cfg, EngineConfig) and not cfg.admin and cfg.admin_token is None
    monkeypatch.setenv("TOPOSERVE_MOCK_ADMIN_TOKEN", "t0k")
    cfg = config_from_args(build_parser().parse_args(["mock-engine", "--poison", "boom"]))
    assert isinstance(cfg, EngineConfig) and cfg.admin_token == "t0k" and cfg.faults.poison == "boom"
    cfg = config_from_args(build_parser().parse_args(["mock-engine", "--enable-admin"]))
    assert isinstance(cfg, EngineConfig) and cfg.admin


async def test_health_delay_answers_late_but_healthy_only_while_busy() -> None:
    """--health-delay: idle, /health answers at once; while a request runs it is 200 after the
    delay (what a busy API server loop does), so a 0.1 s probe gives up first."""
    async with (
        serve(faults=FaultConfig(health_delay=0.3), time_scale=1.0) as srv,
        aiohttp.ClientSession() as s,
    ):
        async with s.get(srv.url + "/health", timeout=aiohttp.ClientTimeout(total=0.2)) as r:
            assert r.status == 200  # idle: no delay
        body = {"model": MODEL, "prompt": "keep busy", "max_tokens": 5000, "stream": True}
        stream = await s.post(srv.url + "/v1/completions", json=body)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        async with s.get(srv.url + "/health") as r:
            assert r.status == 200
        assert loop.time() - t0 >= 0.3
        with pytest.raises(asyncio.TimeoutError):  # a 0.1 s probe gives up first
            async with s.get(srv.url + "/health", timeout=aiohttp.ClientTimeout(total=0.1)):
                pass
        stream.close()
        await wait_for(lambda: _idle(srv), "the hung-up stream is aborted")
    with pytest.raises(ValueError, match="health_delay"):
        FaultConfig(health_delay=-1)
