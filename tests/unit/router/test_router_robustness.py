"""Robustness suite: hostile and malformed traffic through the router to real mock engines.

Each test sends one family of bad input (the cases of issue 11 and a seeded fuzzed corpus),
asserts the status and the OpenAI JSON error shape of every answer, and then asserts that the
fleet still serves normal traffic with every backend in rotation. The last test replays it all
and checks that the process's RSS comes back within a bound, and that nothing was logged as an
ERROR. Everything runs in-process on 127.0.0.1; no assertion depends on timing (timeouts are
configured short so that the tests finish quickly, and the tests wait for their effect).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import random
import socket
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from toposerve.mockengine.faults import FaultConfig
from toposerve.mockengine.server import EngineConfig, MockServer
from toposerve.router import strategies as st
from toposerve.router.endpoints import BackendSpec
from toposerve.router.frontdoor import GuardedRunner
from toposerve.router.proxy import Router, RouterConfig, serve

POISON = "QUERY-OF-DEATH"
MODEL = "m"
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
HANG_GUARD_S = 60  # only so that a broken build fails instead of hanging; never what is tested


@dataclass
class Fleet:
    router: Router
    url: str
    host: str
    port: int
    engines: list[MockServer]


def _engine_config(seed: int, time_scale: float = 0.0) -> EngineConfig:
    return EngineConfig(
        model=MODEL,
        time_scale=time_scale,
        num_gpu_blocks=2048,
        max_model_len=4096,
        seed=seed,
        faults=FaultConfig(poison=POISON, fail_status=500),
    )


@contextlib.asynccontextmanager
async def _fleet(
    n: int = 2, time_scale: float = 0.0, sndbuf: int = 0, **cfg: Any
) -> AsyncIterator[tuple[Fleet, list[Any]]]:
    """Engines and a router on 127.0.0.1, stopped on the way out (with whatever the test adds to
    the closers, e.g. a restarted engine); ``sndbuf``: the router's client sockets get that send
    buffer (inherited from the listening socket), so that a client that stops reading blocks the
    relay after kilobytes rather than after the megabytes Linux autotunes on loopback."""
    engines = []
    for i in range(n):
        engines.append(await MockServer(_engine_config(i, time_scale)).start())
    defaults: dict[str, Any] = dict(
        strategy=st.AUTO,
        expose_backend=True,
        header_timeout_s=0.3,
        body_timeout_s=0.3,
        max_body_bytes=32 * 1024 * 1024,
        max_connections=256,
    )
    defaults.update(cfg)
    router = Router([BackendSpec(e.url) for e in engines], RouterConfig(**defaults))
    if sndbuf:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        sock.bind(("127.0.0.1", 0))
        runner = GuardedRunner(router.app(False), router.gate, access_log=None, handler_cancellation=True)
        await runner.setup()
        await web.SockSite(runner, sock).start()
    else:
        runner = await serve(router, "127.0.0.1", 0, probe=False)
    port = runner.addresses[0][1]
    closers: list[Any] = list(engines)
    try:
        yield Fleet(router, f"http://127.0.0.1:{port}", "127.0.0.1", port, engines), closers
    finally:
        await runner.cleanup()
        for e in closers:
            await e.stop()


@pytest.fixture
async def fleet() -> AsyncIterator[Fleet]:
    async with _fleet() as (f, _):
        yield f


async def post(url: str, body: Any = None, data: bytes | None = None, **kw: Any) -> tuple[int, Any]:
    """POST and return (status, parsed JSON body): every answer must be JSON."""
    async with aiohttp.ClientSession() as s:
        if data is None:
            data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json", **kw.pop("headers", {})}
        async with s.post(url, data=data, headers=headers, **kw) as r:
            raw = await r.read()
    if b"data: " in raw[:6]:  # a stream: return its events
        return r.status, [e for e in raw.split(b"\n\n") if e.strip()]
    return r.status, json.loads(raw)


def assert_error(status: int, doc: Any, expected: int | tuple[int, ...]) -> None:
    allowed = (expected,) if isinstance(expected, int) else expected
    assert status in allowed, (status, doc)
    err = doc["error"]
    assert isinstance(err["message"], str) and isinstance(err["type"], str) and err["code"] == status


async def raw_exchange(f: Fleet, payload: bytes) -> bytes:
    """Send raw bytes on a fresh connection; read everything until the server closes."""
    reader, writer = await asyncio.open_connection(f.host, f.port)
    try:
        writer.write(payload)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), HANG_GUARD_S)
    finally:
        writer.close()


def parse_raw(resp: bytes) -> tuple[int, dict[str, str], Any]:
    head, _, body = resp.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:] if ":" in ln)}
    return status, headers, json.loads(body)


def chat(text: str = "hello there", **kw: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 4, **kw}


async def assert_fleet_serves_normally(f: Fleet) -> None:
    """Probes pass, nothing is ejected, /health is 200, and round-robin reaches every backend."""
    await f.router.probe_all()
    for b in f.router.backends.values():
        assert b.health.probe_ok and not b.health.ejected(time.monotonic()), b.spec.url
    async with aiohttp.ClientSession() as s:
        async with s.get(f.url + "/health") as r:
            assert r.status == 200
        seen = set()
        for i in range(2 * len(f.engines)):
            h = {"x-toposerve-strategy": "round-robin"}
            async with s.post(f.url + CHAT, json=chat(f"normal {i}"), headers=h) as r:
                assert r.status == 200
                assert (await r.json())["choices"][0]["message"]["content"]
                seen.add(r.headers["x-toposerve-backend"])
            body = {"model": MODEL, "prompt": "hi", "stream": True}
            async with s.post(f.url + COMPLETIONS, json=body, headers=h) as r:
                assert r.status == 200 and (await r.read()).endswith(b"data: [DONE]\n\n")
                seen.add(r.headers["x-toposerve-backend"])
    assert seen == {e.url for e in f.engines}
    for _ in range(200):  # in-flight accounting drains (the last stream's handler may still be closing)
        if f.router.ledger.backends() == []:
            break
        await asyncio.sleep(0.01)
    assert f.router.ledger.backends() == []


# ------------------------------------------------------------------------------------ issue 11 cases


async def test_poisoned_requests_never_empty_the_fleet(fleet: Fleet) -> None:
    for _ in range(fleet.router.cfg.eject_after * 4):
        status, doc = await post(fleet.url + CHAT, chat(f"x {POISON} y"))
        assert_error(status, doc, 500)  # the engine's own error, passed on
        assert "poisoned" in doc["error"]["message"]
    total = sum(e.engine.inflight == 0 for e in fleet.engines if e.engine is not None)
    assert total == len(fleet.engines)
    await assert_fleet_serves_normally(fleet)


async def test_each_crash_input_of_the_issue_gets_a_json_answer(fleet: Fleet) -> None:
    u = fleet.url
    # a lone UTF-16 surrogate: the engine's 400, relayed
    raw = b'{"model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": "a \\ud800 b"}]}'
    assert_error(*await post(u + CHAT, data=raw), 400)
    # a content part with a non-string text: routed fine; the engine (vLLM, and the mock like it)
    # answers 400, relayed
    parts = {"role": "user", "content": [{"type": "text", "text": 12}, {"type": "text", "text": ["x"]}]}
    assert_error(*await post(u + CHAT, {"model": MODEL, "max_tokens": 2, "messages": [parts]}), 400)
    # max_tokens with 400 digits: no OverflowError in routing; the engine says it is too long
    assert_error(
        *await post(u + CHAT, data=b'{"model":"m","messages":[],"max_tokens":' + b"9" * 400 + b"}"), 400
    )
    assert_error(*await post(u + CHAT, chat(max_tokens=int("9" * 400))), 400)
    # JSON nested deeper than the stack
    assert_error(*await post(u + CHAT, data=b"[" * 200_000 + b"]" * 200_000), 400)
    assert_error(*await post(u + CHAT, data=b'{"a":' * 100_000 + b"1" + b"}" * 100_000), 400)
    # stream "false" is not a stream (the mock, strict, answers 400 without streaming)
    status, doc = await post(u + CHAT, chat(stream="false"))
    assert_error(status, doc, 400)
    # not JSON, not an object
    for bad in (b"{nope", b"[]", b"1", b'"x"', b"null", b"\xff\xfe", b""):
        assert_error(*await post(u + CHAT, data=bad), 400)
    # routes and methods the router does not serve, an unknown strategy, a body too big
    assert_error(*await post(u + "/v1/nothing", {}), 404)
    async with aiohttp.ClientSession() as s, s.get(u + CHAT) as r:
        assert_error(r.status, await r.json(), 405)
    assert_error(*await post(u + CHAT, chat(), headers={"x-toposerve-strategy": "z" * 4000}), 400)
    assert_error(*await post(u + CHAT, data=b" " * (33 * 1024 * 1024)), 413)
    # a 20 MB prompt: routed (bounded hashing), the engine tokenizes a bounded prefix and says 400
    status, doc = await post(u + COMPLETIONS, {"model": MODEL, "prompt": "word " * 4_000_000})
    assert_error(status, doc, 400)
    await assert_fleet_serves_normally(fleet)


async def test_session_keys_are_bounded_by_size_count_and_time(fleet: Fleet) -> None:
    sessions = fleet.router.memory.sessions
    sessions.max_sessions = 50
    for i in range(120):
        status, _ = await post(fleet.url + CHAT, chat(user=f"{i}-" + "u" * 64_000))
        assert status == 200
        if i % 40 == 0:
            h = {"x-session-id": "h" * 7000}
            assert (await post(fleet.url + CHAT, chat(), headers=h))[0] == 200
    assert len(sessions) <= 50
    assert all(len(k) == 32 for k in sessions._map)
    await assert_fleet_serves_normally(fleet)


async def test_malformed_http_is_answered_in_json_and_not_logged_as_an_error(
    fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    cases = [
        b"GARBAGE\r\n\r\n",
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 20_000 + b"\r\n\r\n",
        b"GET / HTTP/9.9\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(64)),  # a TLS hello
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ]
    for payload in cases:
        resp = await raw_exchange(fleet, payload)
        status, headers, doc = parse_raw(resp)
        assert 400 <= status < 500, (payload[:40], status)
        assert headers["content-type"].startswith("application/json")
        assert_error(status, doc, status)
    bad = [r.getMessage() for r in caplog.records if "malformed HTTP" in r.getMessage()]
    assert len(bad) == len(cases) and all("\n" not in m for m in bad)  # once each, one line
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]
    await assert_fleet_serves_normally(fleet)


async def test_slowloris_headers_and_bodies_are_cut_off(fleet: Fleet) -> None:
    gate = fleet.router.gate
    # many connections that start a request and never finish its headers
    conns = []
    for _ in range(30):
        reader, writer = await asyncio.open_connection(fleet.host, fleet.port)
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        conns.append((reader, writer))
    # a normal client is served meanwhile
    assert (await post(fleet.url + CHAT, chat()))[0] == 200
    for reader, writer in conns:
        resp = await asyncio.wait_for(reader.read(), HANG_GUARD_S)  # the router closes them
        status, _, doc = parse_raw(resp)
        assert_error(status, doc, 408)
        writer.close()
    assert gate.header_timeouts >= 30
    # a connection that sends nothing at all is closed the same way
    reader, writer = await asyncio.open_connection(fleet.host, fleet.port)
    assert parse_raw(await asyncio.wait_for(reader.read(), HANG_GUARD_S))[0] == 408
    writer.close()
    # headers complete, body trickles: 408 from the body deadline, connection closed
    resp = await raw_exchange(
        fleet,
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b'Content-Length: 1000\r\n\r\n{"model":',
    )
    status, _, doc = parse_raw(resp)
    assert_error(status, doc, 408)
    # idle kept-alive connections are not cut by the header deadline: a second request after a
    # pause (longer than header_timeout_s) on the same connection works
    async with aiohttp.ClientSession() as s:
        for _ in range(2):
            async with s.post(fleet.url + CHAT, json=chat()) as r:
                assert r.status == 200
            await asyncio.sleep(fleet.router.cfg.header_timeout_s * 2)
    for _ in range(500):
        if gate.open <= 1:
            break
        await asyncio.sleep(0.01)
    assert gate.open <= 1  # every slow connection was released
    await assert_fleet_serves_normally(fleet)


async def _stream_request(
    f: Fleet, rcvbuf: int, max_tokens: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw streamed completion on a connection with a small receive window (nothing read yet)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect: sets the window
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (f.host, f.port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=rcvbuf)  # no read-ahead either
    body = json.dumps({"model": MODEL, "prompt": "hi", "stream": True, "max_tokens": max_tokens}).encode()
    head = (
        f"POST {COMPLETIONS} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n"
    )
    writer.write(head.encode() + b"Content-Length: %d\r\n\r\n" % len(body) + body)
    await writer.drain()
    return reader, writer


async def _read_all(reader: asyncio.StreamReader, pause: float = 0.0, every: int = 0) -> bytes:
    """Read until the server closes; with ``pause``, stop reading for that long after each
    ``every`` bytes (a client that reads in bursts)."""
    data, since_pause = b"", 0
    with contextlib.suppress(ConnectionResetError):
        while chunk := await asyncio.wait_for(reader.read(1 << 16), HANG_GUARD_S):
            data += chunk
            since_pause += len(chunk)
            if pause and since_pause >= every:
                since_pause = 0
                await asyncio.sleep(pause)
    return data


async def test_a_client_that_stops_reading_is_cut_off_and_its_engine_slot_freed() -> None:
    """A stream nobody reads: the relay's write blocks, so it stops reading the engine; without a
    write deadline the engine's sequence (and its KV cache) would be held until TCP gives up."""
    async with _fleet(write_timeout_s=0.5, sndbuf=4096) as (f, _):
        # ~3,800 SSE events (~670 KB): far more than the two small socket buffers and the relay's
        # 64 KiB write buffer
        reader, writer = await _stream_request(f, 4096, 3800)
        for _ in range(int(HANG_GUARD_S / 0.05)):
            if f.router.gate.write_timeouts:
                break
            await asyncio.sleep(0.05)
        assert f.router.gate.write_timeouts == 1
        data = await _read_all(reader)  # what was buffered, then the reset: the stream is cut short
        assert data.startswith(b"HTTP/1.1 200") and b"data: [DONE]" not in data
        writer.close()
        for _ in range(int(HANG_GUARD_S / 0.05)):  # the engine saw its client go: nothing in flight
            if not f.router.ledger.backends() and all(e.engine.scheduler.running == [] for e in f.engines):
                break
            await asyncio.sleep(0.05)
        assert f.router.ledger.backends() == []
        assert all(e.engine.scheduler.running == [] for e in f.engines)
        async with aiohttp.ClientSession() as s, s.get(f.url + "/metrics") as r:
            assert "toposerve_router_write_timeouts_total 1.0" in await r.text()
        await assert_fleet_serves_normally(f)
        assert f.router.gate.write_timeouts == 1


async def test_a_slow_reader_that_keeps_reading_is_not_cut_off() -> None:
    """The deadline bounds one write, not the response: a reader that pauses, each pause well
    within the deadline, gets the whole stream although the pauses add up to more."""
    async with _fleet(write_timeout_s=2.0, sndbuf=4096) as (f, _):
        reader, writer = await _stream_request(f, 8192, 3800)  # ~670 KB
        t0 = time.monotonic()
        # 0.4 s pauses after each 64 KiB: ~4 s of pauses in all, twice the deadline, while no
        # single write waits much longer than one pause (the deadline is 5x that)
        data = await _read_all(reader, pause=0.4, every=64 * 1024)
        writer.close()
        assert data.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")  # the last event, then the chunked end
        assert time.monotonic() - t0 > 1.5 * f.router.cfg.write_timeout_s  # longer than the deadline
        assert f.router.gate.write_timeouts == 0


async def test_connection_cap_refuses_with_503_and_recovers() -> None:
    async with _fleet(max_connections=4, header_timeout_s=600) as (f, _):
        held = [await asyncio.open_connection(f.host, f.port) for _ in range(4)]
        for _ in range(500):
            if f.router.gate.open == 4:
                break
            await asyncio.sleep(0.01)
        assert f.router.gate.open == 4
        # sends nothing: the answer comes at accept (a request still in flight could meet a reset)
        status, headers, doc = parse_raw(await raw_exchange(f, b""))
        assert_error(status, doc, 503)
        assert headers["retry-after"] == "1"
        for _, w in held:
            w.close()
        for _ in range(500):
            if f.router.gate.open == 0:
                break
            await asyncio.sleep(0.01)
        await assert_fleet_serves_normally(f)
        assert f.router.gate.refused == 1


async def test_an_engine_crash_ejects_once_and_its_restart_is_re_admitted_by_the_probe() -> None:
    async with _fleet(time_scale=0.05) as (f, closers):
        victim = f.engines[0]
        port = victim.port
        async with aiohttp.ClientSession() as s:
            h = {"x-toposerve-strategy": "round-robin"}
            body = {"model": MODEL, "prompt": "a long answer", "max_tokens": 3000, "stream": True}
            streams = []
            for _ in range(8):  # four long streams in flight on each engine
                r = await s.post(f.url + COMPLETIONS, json=body, headers=h)
                await r.content.readuntil(b"\n\n")
                streams.append(r)
            await victim.stop()  # the crash: its streams break, its port refuses
            for r in streams:
                with contextlib.suppress(aiohttp.ClientError):
                    await asyncio.wait_for(r.read(), HANG_GUARD_S)
                r.close()
                await asyncio.sleep(0)
            # requests keep coming while it is down: all served by the other engine
            for i in range(6):
                async with s.post(f.url + CHAT, json=chat(f"during {i}")) as r:
                    assert r.status == 200
        b = f.router.backends[victim.url]
        assert b.health.ejected(time.monotonic()) and b.health.ejections == 1  # once, not per failure
        assert b.health.ejected_until - time.monotonic() <= f.router.cfg.eject_base_s
        await f.router.probe_all()  # down: the probe fails too
        assert not b.health.probe_ok
        restarted = await MockServer(_engine_config(0), port=port).start()
        closers.append(restarted)
        await f.router.probe_all()  # up again: re-admitted at once, not after the hold
        assert b.healthy(time.monotonic())
        f.engines[0] = restarted
        await assert_fleet_serves_normally(f)


# ------------------------------------------------------------------------------------ fuzzed corpus


def _fuzz_corpus(seed: int, n: int) -> list[tuple[str, bytes]]:
    """Seeded mutations of valid requests: wrong types, huge and odd values, cuts, junk bytes."""
    rng = random.Random(seed)
    odd_values: list[Any] = [
        None, True, False, 0, -1, 1.5, 10**30, -(10**30), "", "x" * 5000, "\ud800", [], {}, [1, "a", None],
        {"text": 3}, [{"type": "text", "text": None}], float("inf"), "false", "true", "9" * 50,
    ]  # fmt: skip
    keys = ["model", "messages", "prompt", "max_tokens", "max_completion_tokens", "n", "stream",
            "stream_options", "user", "seed", "temperature", "content", "role", "text"]  # fmt: skip
    out: list[tuple[str, bytes]] = []
    for _ in range(n):
        path = rng.choice([CHAT, COMPLETIONS])
        body: Any = (
            chat(f"fuzz {rng.random()}")
            if path == CHAT
            else {"model": MODEL, "prompt": "fuzz", "max_tokens": 3}
        )
        for _ in range(rng.randint(1, 4)):
            op = rng.random()
            if op < 0.45 and isinstance(body, dict):
                body[rng.choice(keys)] = rng.choice(odd_values)
            elif (
                op < 0.6
                and isinstance(body, dict)
                and isinstance(body.get("messages"), list)
                and body["messages"]
            ):
                m = body["messages"][0]
                if isinstance(m, dict):
                    m[rng.choice(["role", "content", "name"])] = rng.choice(odd_values)
            elif op < 0.7 and isinstance(body, dict) and body:
                body.pop(rng.choice(list(body)))
            elif op < 0.75:
                body = rng.choice([[body], "x", 7, None])
        try:
            data = json.dumps(body, ensure_ascii=rng.random() < 0.5).encode("utf-8", "surrogatepass")
        except ValueError:
            data = b"{"
        cut = rng.random()
        if cut < 0.1:
            data = data[: rng.randrange(len(data) + 1)]
        elif cut < 0.15:
            data = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
        out.append((path, data))
    return out


async def test_fuzzed_corpus_gets_json_answers_and_no_5xx(fleet: Fleet) -> None:
    corpus = _fuzz_corpus(seed=11, n=250)
    statuses: dict[int, int] = {}
    sem = asyncio.Semaphore(8)

    async def one(path: str, data: bytes) -> None:
        async with sem:
            status, doc = await post(fleet.url + path, data=data)
        statuses[status] = statuses.get(status, 0) + 1
        if status == 200:
            assert isinstance(doc, list) or doc["choices"], doc
        else:
            assert_error(status, doc, (400, 404, 413))

    await asyncio.gather(*(one(p, d) for p, d in corpus))
    assert sum(statuses.values()) == len(corpus)
    assert statuses.get(200, 0) > 0 and statuses.get(400, 0) > 0  # the corpus exercises both
    await assert_fleet_serves_normally(fleet)


# ------------------------------------------------------------------------------------ memory


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        import os

        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
async def test_rss_returns_within_a_bound_after_hostile_traffic(fleet: Fleet) -> None:
    # warm up: the allocator's high-water mark for one big request is not a leak
    await post(fleet.url + COMPLETIONS, {"model": MODEL, "prompt": "word " * 2_000_000})
    await post(fleet.url + CHAT, chat(user="w" * 500_000))
    gc.collect()
    before = _rss_bytes()
    # 300 distinct half-megabyte session ids (150 MB if the router kept them) and the fuzz corpus
    for i in range(300):
        await post(fleet.url + CHAT, chat(f"m {i % 7}", user=f"{i}" + "s" * 500_000))
    for path, data in _fuzz_corpus(seed=12, n=100):
        await post(fleet.url + path, data=data)
    gc.collect()
    grown = _rss_bytes() - before
    assert grown < 64 * 1024 * 1024, f"RSS grew by {grown / 2**20:.0f} MiB"
    await assert_fleet_serves_normally(fleet)


async def test_router_cli_accepts_all_interface_hosts() -> None:
    from toposerve.cli import build_parser

    for host in ("0.0.0.0", "::", "10.1.2.3"):
        args = build_parser().parse_args(["router", "--host", host, "--backends", "http://127.0.0.1:1"])
        assert args.host == host
    # and the server really listens there: "::" and "0.0.0.0" reached over loopback
    router = Router([BackendSpec("http://127.0.0.1:1")], RouterConfig())
    # "::" is dual-stack (asyncio alone would bind it IPv6-only and refuse IPv4 probes)
    for host, connect in (("0.0.0.0", "127.0.0.1"), ("::", "[::1]"), ("::", "127.0.0.1")):
        runner: web.AppRunner = await serve(router, host, 0, probe=False)
        try:
            port = runner.addresses[0][1]
            async with aiohttp.ClientSession() as s, s.get(f"http://{connect}:{port}/metrics") as r:
                assert r.status == 200
        finally:
            await runner.cleanup()
        router = Router([BackendSpec("http://127.0.0.1:1")], RouterConfig())
