"""The relay's byte path: what a client reads through the router is exactly what the engine sent.

The relay writes one client chunk per upstream read and sends the last bytes together with the
end of the response (docs/router.md, "Relay"); these tests pin that neither ever splits, merges,
reorders or drops a byte a client may read, whatever the engine's write pattern, and that the
accounting (TTFT, usage, ledger) still sees every stream. Upstreams are scripted aiohttp apps on
127.0.0.1; no assertion depends on timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web

from toposerve.router import strategies as st
from toposerve.router.endpoints import BackendSpec
from toposerve.router.proxy import Router, RouterConfig, _ends_stream, serve


def sse(*events: str) -> bytes:
    return b"".join(f"data: {e}\n\n".encode() for e in events)


USAGE = json.dumps({"choices": [], "usage": {"prompt_tokens": 40, "completion_tokens": 3}})
STREAM = (
    sse(
        *(
            json.dumps({"choices": [{"delta": {"content": f"tok{i} é\\n"}}]}, ensure_ascii=False)
            for i in range(3)
        )
    )
    + sse(USAGE)
    + b"data: [DONE]\n\n"
)


def cut(data: bytes, *at: int) -> list[bytes]:
    """`data` split at the given offsets (the engine's separate writes)."""
    edges = [0, *sorted(at), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges) if b > a]


# engine write patterns: one write; one per event; splits inside `data: `, inside the blank line
# and inside a multi-byte character; [DONE] alone; usage and [DONE] together; byte by byte
first_event_end = STREAM.index(b"\n\n") + 2
SPLITS = {
    "one write": [STREAM],
    "per event": [e + b"\n\n" for e in STREAM.split(b"\n\n") if e],
    "mid marker": cut(STREAM, 3, first_event_end + 2),
    "mid blank line": cut(STREAM, first_event_end - 1, STREAM.index(b"tok1")),
    "mid utf-8": cut(STREAM, STREAM.index("é".encode()) + 1),
    "done alone": cut(STREAM, len(STREAM) - len(b"data: [DONE]\n\n")),
    "done split": cut(STREAM, len(STREAM) - 3),
    "byte by byte": [STREAM[i : i + 1] for i in range(len(STREAM))],
}


@dataclass
class Scripted:
    """A fake engine that sends `pieces` as separate writes (draining between them)."""

    pieces: list[bytes] = field(default_factory=list)
    stream: bool = True
    after: bytes = b""  # sent after the pieces (e.g. bytes after [DONE]), once `hold` is set
    hold: asyncio.Event = field(default_factory=asyncio.Event)
    abort_at_end: bool = False  # drop the connection instead of ending the chunked body
    served: int = 0
    cookies_seen: list[str] = field(default_factory=list)

    async def completion(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        self.served += 1
        self.cookies_seen.append(request.headers.get("Cookie", ""))
        ctype = "text/event-stream" if self.stream else "application/json"
        resp = web.StreamResponse(headers={"Content-Type": ctype})
        resp.set_cookie("engine-session", f"client-{self.served}")
        await resp.prepare(request)
        for p in self.pieces:
            await resp.write(p)
            await asyncio.sleep(0)  # let each piece reach the socket on its own (not guaranteed)
        if self.after:
            await self.hold.wait()
            await resp.write(self.after)
        if self.abort_at_end:
            assert request.transport is not None
            request.transport.abort()
            return resp
        await resp.write_eof()
        return resp

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.completion)
        return app


@pytest.fixture
async def relay(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Router, str, Scripted]]:
    engine = Scripted()
    er = web.AppRunner(engine.app())
    await er.setup()
    await web.TCPSite(er, "127.0.0.1", 0).start()
    # a host name where a test needs one (aiohttp's cookie jar ignores cookies from IP addresses)
    host = getattr(request, "param", "127.0.0.1")
    eurl = f"http://{host}:{er.addresses[0][1]}"
    router = Router([BackendSpec(eurl)], RouterConfig(strategy=st.ROUND_ROBIN))
    rr = await serve(router, "127.0.0.1", 0, probe=False)
    yield router, f"http://127.0.0.1:{rr.addresses[0][1]}", engine
    engine.hold.set()
    await rr.cleanup()
    await er.cleanup()


async def fetch(
    url: str, stream: bool = True, session: aiohttp.ClientSession | None = None
) -> tuple[int, bytes, list[bytes]]:
    """Status, whole body, and the body as the client's reads saw it."""
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    async with contextlib.AsyncExitStack() as stack:
        s = session or await stack.enter_async_context(aiohttp.ClientSession())
        async with s.post(url + "/v1/chat/completions", json=body) as r:
            reads = [c async for c in r.content.iter_any()]
            return r.status, b"".join(reads), reads
    raise AssertionError("unreachable")


async def settled(router: Router) -> None:
    for _ in range(500):  # the ledger is released once the upstream is drained
        if router.ledger.backends() == []:
            return
        await asyncio.sleep(0.01)
    assert router.ledger.backends() == []


@pytest.mark.parametrize("split", list(SPLITS))
async def test_client_reads_byte_identical_streams_whatever_the_engine_writes(
    relay: tuple[Router, str, Scripted], split: str
) -> None:
    router, url, engine = relay
    engine.pieces = SPLITS[split]
    assert b"".join(engine.pieces) == STREAM
    for _ in range(3):  # and again on a reused upstream connection
        status, body, _ = await fetch(url)
        assert status == 200
        assert body == STREAM
    await settled(router)
    assert engine.served == 3
    # the usage event taught the estimator ("user\nhi\n" is 9 chars for 40 tokens)
    assert router.estimator.chars_per_token < 4.0
    assert 'strategy="round-robin"' in _metric_lines(router, "toposerve_router_ttft_seconds_count")


def _metric_lines(router: Router, name: str) -> str:
    from prometheus_client import generate_latest

    text = generate_latest(router.metrics.registry).decode()
    return "\n".join(line for line in text.splitlines() if line.startswith(name) and " 0.0" not in line)


async def test_non_streamed_bodies_arrive_whole_in_any_pieces(relay: tuple[Router, str, Scripted]) -> None:
    router, url, engine = relay
    doc = json.dumps({"choices": [{"message": {"content": "x" * 5000}}], "usage": {"prompt_tokens": 7}})
    raw = doc.encode()
    engine.stream = False
    for pieces in ([raw], cut(raw, 10, 2000, 4999), [raw[i : i + 700] for i in range(0, len(raw), 700)]):
        engine.pieces = pieces
        status, body, _ = await fetch(url, stream=False)
        assert status == 200 and body == raw
    await settled(router)


async def test_bytes_after_done_are_not_relayed_and_the_upstream_is_drained(
    relay: tuple[Router, str, Scripted],
) -> None:
    router, url, engine = relay
    engine.pieces = SPLITS["per event"]
    engine.after = b"data: late\n\n"  # no OpenAI engine does this; a client would never read it
    # the client is done at [DONE], while the upstream has not even ended its response: a relay
    # that waited for the upstream's end would hang here (the engine waits on `hold`)
    # (a client that keeps its connection: one that closes it cancels the request at once)
    async with aiohttp.ClientSession() as s:
        status, body, _ = await asyncio.wait_for(fetch(url, session=s), 60)
        assert status == 200 and body == STREAM
        assert router.ledger.backends() != []  # the upstream request is still open, being drained
        engine.hold.set()
        await settled(router)
        engine.after = b""
        status, body, _ = await fetch(url, session=s)  # the drained upstream connection is reused
        assert status == 200 and body == STREAM
    await settled(router)


async def test_an_upstream_that_breaks_after_done_is_a_clean_stream_and_not_blamed(
    relay: tuple[Router, str, Scripted],
) -> None:
    router, url, engine = relay
    engine.pieces = SPLITS["per event"]
    engine.abort_at_end = True
    status, body, _ = await fetch(url)
    assert status == 200 and body == STREAM  # no error event appended to a finished stream
    await settled(router)
    (backend,) = router.backends.values()
    assert backend.health.failures == 0
    assert 'kind="stream_broken"' not in _metric_lines(router, "toposerve_router_errors_total")


async def test_an_upstream_that_breaks_before_done_still_ends_with_an_error_event(
    relay: tuple[Router, str, Scripted],
) -> None:
    router, url, engine = relay
    engine.pieces = SPLITS["per event"][:2]  # two tokens, then the connection drops
    engine.abort_at_end = True
    status, body, _ = await fetch(url)
    assert status == 200 and body.startswith(b"".join(SPLITS["per event"][:2]))
    last = json.loads(body.rstrip(b"\n").rsplit(b"\n\n", 1)[-1].removeprefix(b"data: "))
    assert last["error"]["type"] == "upstream_error"
    await settled(router)


def test_ends_stream_only_on_a_whole_done_event() -> None:
    assert _ends_stream(b"data: [DONE]\n\n")
    assert _ends_stream(sse("{}") + b"data: [DONE]\n\n")
    assert not _ends_stream(b"data: [DONE]\n")  # the blank line is still to come
    assert not _ends_stream(b"xdata: [DONE]\n\n")  # not at an event boundary
    assert not _ends_stream(sse("{}"))


@pytest.mark.parametrize("relay", ["localhost"], indirect=True)
async def test_the_router_keeps_no_cookies_between_clients(relay: tuple[Router, str, Scripted]) -> None:
    router, url, engine = relay
    engine.pieces = [STREAM]
    for _ in range(2):  # two clients, each sent a cookie by the engine
        async with (
            aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as s,
            s.post(url + "/v1/chat/completions", json={"model": "m", "stream": True}) as r,
        ):
            assert r.status == 200 and "engine-session" in r.cookies  # relayed to its client
            await r.read()
    assert engine.cookies_seen == ["", ""]  # ... but never replayed by the router for the next
    await settled(router)


async def test_upstream_connections_have_nagle_off(relay: tuple[Router, str, Scripted]) -> None:
    """Small SSE writes must not wait for ACKs. The router sets TCP_NODELAY once per upstream
    connection (upstream.py), not per request (a syscall each); the event loops set it too. This
    fails if the connection is not kept or all of them ever stop."""
    router, url, engine = relay
    engine.pieces = [STREAM]
    status, _, _ = await fetch(url)
    assert status == 200
    await settled(router)
    assert router._upstream is not None
    pooled = router._upstream.idle_connections()
    assert pooled, "the upstream connection is kept for reuse"
    for proto in pooled:
        sock = proto.transport.get_extra_info("socket")
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
