"""Findings of the hostile-input review of the router, each driven over loopback sockets.

gzip bodies, clients that leave mid-body, `Expect`, HTTP/1.0 streams, memory bounds (the body
budget, oversized heads, the per-client connection cap), backend addresses in /metrics, and
/health with no backend. Like the robustness suite, no assertion depends on timing: waits are
bounded only so that a broken build fails instead of hanging.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
from typing import Any

import aiohttp
import pytest
from test_router_robustness import (
    CHAT,
    COMPLETIONS,
    HANG_GUARD_S,
    MODEL,
    Fleet,
    _fleet,
    assert_error,
    assert_fleet_serves_normally,
    chat,
    parse_raw,
    post,
    raw_exchange,
)

from toposerve.router import proxy


async def _read_to_eof(reader: asyncio.StreamReader) -> bytes:
    """Everything until the server closes; a timeout here means it never closed."""
    return await asyncio.wait_for(reader.read(), HANG_GUARD_S)


async def _metric(f: Fleet, name: str) -> float:
    async with aiohttp.ClientSession() as s, s.get(f.url + "/metrics") as r:
        text = await r.text()
    (line,) = [ln for ln in text.splitlines() if ln.startswith(name + " ")]
    return float(line.split()[1])


async def _eventually(check: Any, what: str) -> None:
    for _ in range(int(HANG_GUARD_S / 0.01)):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(what)


# ------------------------------------------------------------------------------------ 1. gzip


async def test_a_gzip_body_is_forwarded_inflated_and_a_bad_one_is_a_400(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    async with _fleet() as (f, _):
        headers = {"Content-Encoding": "gzip"}
        # an engine that got the inflated body labelled gzip answered 500
        status, doc = await post(
            f.url + CHAT, data=gzip.compress(json.dumps(chat()).encode()), headers=headers
        )
        assert status == 200 and doc["choices"], doc
        # a plain body labelled gzip: the client's error, named, not "internal router error"
        status, doc = await post(f.url + CHAT, data=json.dumps(chat()).encode(), headers=headers)
        assert_error(status, doc, 400)
        assert "gzip" in doc["error"]["message"], doc
        assert [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info] == []
        await assert_fleet_serves_normally(f)


# ------------------------------------------------------------------------------------ 2. gone mid-body


async def test_a_client_that_leaves_mid_body_is_one_info_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with _fleet(body_timeout_s=HANG_GUARD_S) as (f, _):
        for _ in range(3):
            _reader, writer = await asyncio.open_connection(f.host, f.port)
            writer.write(f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{{".encode())
            await writer.drain()
            await _eventually(lambda: f.router.active == 1, "the request never reached its handler")
            writer.close()
            await _eventually(lambda: f.router.active == 0, "the handler never ended")
        await _eventually(
            lambda: sum("went away" in r.getMessage() for r in caplog.records) == 3, "no line per client"
        )
        gone = [r for r in caplog.records if "went away" in r.getMessage()]
        assert all(r.levelno == logging.INFO and r.exc_info is None for r in gone)
        assert [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info] == []


# ------------------------------------------------------------------------------------ 3. Expect


async def test_expect_is_answered_in_json_and_a_body_too_big_before_it_is_sent() -> None:
    async with _fleet() as (f, _):
        body = json.dumps(chat()).encode()
        head = f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\nConnection: close\r\n"
        status, headers, doc = parse_raw(
            await raw_exchange(f, (head + "Expect: foo\r\n\r\n").encode() + body)
        )
        assert headers["content-type"].startswith("application/json")
        assert_error(status, doc, 417)
        # over --max-body-bytes: 413 at once, no 100 Continue (the client need not send the body)
        reader, writer = await asyncio.open_connection(f.host, f.port)
        too_big = f.router.cfg.max_body_bytes + 1
        writer.write(
            f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: {too_big}\r\n\r\n".encode()
        )
        resp = await _read_to_eof(reader)  # the router answers and closes without the body
        writer.close()
        assert b"100 Continue" not in resp
        status, _, doc = parse_raw(resp)
        assert_error(status, doc, 413)
        # within the limit: 100 Continue, then the answer
        reader, writer = await asyncio.open_connection(f.host, f.port)
        writer.write((head + "Expect: 100-continue\r\n\r\n").encode())
        assert (
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HANG_GUARD_S)
            == b"HTTP/1.1 100 Continue\r\n\r\n"
        )
        writer.write(body)
        status, _, doc = parse_raw(await _read_to_eof(reader))
        writer.close()
        assert status == 200 and doc["choices"]


# ------------------------------------------------------------------------------------ 4. HTTP/1.0


async def test_an_http10_keepalive_stream_ends_with_the_connection() -> None:
    # keep-alive far beyond the read's guard: only a close right after the stream passes
    async with _fleet(keepalive_timeout_s=10 * HANG_GUARD_S) as (f, _):
        body = json.dumps({"model": MODEL, "prompt": "hi", "stream": True, "max_tokens": 3}).encode()
        reader, writer = await asyncio.open_connection(f.host, f.port)
        writer.write(
            f"POST {COMPLETIONS} HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        resp = await _read_to_eof(reader)  # EOF, not the keep-alive timeout
        writer.close()
        head, _, events = resp.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 200") and b"connection: close" in head.lower()
        assert events.endswith(b"data: [DONE]\n\n")


# ------------------------------------------------------------------------------------ 5. memory


def _body(pad: int) -> bytes:
    """A valid chat request of about `pad` bytes (the mock ignores unknown fields)."""
    return json.dumps({**chat(), "pad": "x" * pad}).encode()


async def test_buffered_bodies_are_capped_in_total() -> None:
    cap = 1 << 20
    async with _fleet(max_buffered_body_bytes=cap, max_body_bytes=4 * cap, body_timeout_s=HANG_GUARD_S) as (
        f,
        _,
    ):
        # one body larger than the whole budget: 413, before it is read
        assert_error(*await post(f.url + CHAT, data=_body(2 * cap)), 413)
        # a slow client holds most of the budget with a declared length
        _reader, writer = await asyncio.open_connection(f.host, f.port)
        held = (cap * 3) // 4
        writer.write(f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Length: {held}\r\n\r\n{{".encode())
        await writer.drain()
        await _eventually(lambda: f.router.bodies.used == held, "the slow body holds no budget")
        # meanwhile another body that does not fit: 503 with Retry-After; a small one is served
        async with aiohttp.ClientSession() as s:
            async with s.post(f.url + CHAT, data=_body(cap // 2)) as r:
                assert_error(r.status, await r.json(), 503)
                assert r.headers["Retry-After"] == "1"

            # chunked (no declared length): refused as its bytes arrive
            async def chunks() -> Any:
                for _ in range(8):
                    yield b" " * (cap // 16)
                yield json.dumps(chat()).encode()

            async with s.post(f.url + CHAT, data=chunks()) as r:
                assert_error(r.status, await r.json(), 503)
        assert (await post(f.url + CHAT, data=_body(1000)))[0] == 200
        assert await _metric(f, "toposerve_router_body_budget_refused_total") == 2
        writer.close()
        await _eventually(lambda: f.router.bodies.used == 0, "the budget was not given back")
        assert (await post(f.url + CHAT, data=_body(cap // 2)))[0] == 200
        await assert_fleet_serves_normally(f)


async def test_an_oversized_request_head_is_refused_without_keeping_it() -> None:
    async with _fleet() as (f, _):
        gate = f.router.gate
        # many headers each within aiohttp's per-line limit, ~100 KiB together: 431
        many = "".join(f"X-H{i}: {'a' * 1000}\r\n" for i in range(100))
        resp = await raw_exchange(f, f"GET /health HTTP/1.1\r\nHost: x\r\n{many}\r\n".encode())
        status, _, doc = parse_raw(resp)
        assert_error(status, doc, 431)
        # one 4 MB header: refused once, its bytes not parsed again (each read would have been
        # quoted in a new error message)
        before = gate.bad_http
        reader, writer = await asyncio.open_connection(f.host, f.port)
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (4 << 20) + b"\r\n\r\n")
        try:
            resp = await _read_to_eof(reader)
        except ConnectionResetError:  # closed with bytes unread: the answer may be lost to a reset
            resp = b""
        writer.close()
        if resp:
            assert parse_raw(resp)[0] in (400, 431)
        assert gate.bad_http == before + 1
        await assert_fleet_serves_normally(f)


async def test_one_client_cannot_take_every_connection() -> None:
    async with _fleet(max_connections_per_client=4) as (f, _):
        idle = [await asyncio.open_connection(f.host, f.port) for _ in range(4)]
        await _eventually(lambda: f.router.gate.per_client.get("127.0.0.1") == 4, "not all admitted")
        # the fifth from the same address: 503, closed
        status, _, doc = parse_raw(await raw_exchange(f, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"))
        assert_error(status, doc, 503)
        # another client (another source address) is served meanwhile
        conn = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
        async with aiohttp.ClientSession(connector=conn) as s:
            async with s.post(f.url + CHAT, json=chat()) as r:
                assert r.status == 200
            async with s.get(f.url + "/metrics") as r:
                assert "toposerve_router_client_connections_refused_total 1.0" in await r.text()
        for _, writer in idle:
            writer.close()
        await _eventually(lambda: "127.0.0.1" not in f.router.gate.per_client, "slots not given back")
        await assert_fleet_serves_normally(f)


# ------------------------------------------------------------------------------------ 6. /metrics


async def test_client_port_metrics_name_no_backend_and_the_metrics_port_does() -> None:
    async with _fleet() as (f, _):
        await assert_fleet_serves_normally(f)  # requests on every backend
        runner = await proxy.serve_metrics(f.router, "127.0.0.1", 0)
        try:
            async with aiohttp.ClientSession() as s:
                async with s.get(f.url + "/metrics") as r:
                    public = await r.text()
                async with s.get(f"http://127.0.0.1:{runner.addresses[0][1]}/metrics") as r:
                    full = await r.text()
        finally:
            await runner.cleanup()
        for e in f.engines:
            assert e.url not in public and e.url in full
        assert "backend=" not in public
        # the same series, merged over backends: 4 chat and 4 streamed answers, 200, round-robin
        (line,) = [ln for ln in public.splitlines() if ln.startswith("toposerve_router_requests_total{")]
        assert 'code="200"' in line and 'strategy="round-robin"' in line and line.endswith(" 8.0")
        assert 'toposerve_router_backend_healthy{gpu_type=""} 2.0' in public


# ------------------------------------------------------------------------------------ 7. /health


async def test_health_stays_200_with_no_healthy_backend_and_says_so() -> None:
    async with _fleet() as (f, _):
        for b in f.router.backends.values():
            b.health.probe_ok = False  # every probe failed (probing is off here)
        async with aiohttp.ClientSession() as s, s.get(f.url + "/health") as r:
            assert r.status == 200  # still Ready: a held request or a 503 + Retry-After, not a refusal
            assert await r.json() == {"status": "no_backends", "healthyBackends": 0}
        assert_error(*await post(f.url + CHAT, chat()), 503)
