"""The router's upstream client (router/upstream.py) against scripted raw-socket servers.

The servers write exact bytes (not an HTTP library's choice of framing), so each framing the
client must read is written out here from RFC 9112: Content-Length (6.3 rule 6), chunked (7.1,
with sizes, extensions and trailers split anywhere across TCP reads), read-until-close (6.3 rule
8), interim 1xx answers (RFC 9110 15.2), and the ways a server breaks off. No assertion depends
on timing except the read timeout's own, which waits for a deadline to pass, never for speed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

from toposerve.router.upstream import (
    _HIGH_WATER,
    ConnectFailed,
    ReadTimeout,
    UpstreamClosed,
    UpstreamPool,
    UpstreamResponse,
    _request_head,
)

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter, bytes], Awaitable[None]]


@dataclass
class Server:
    """Accepts connections; reads each request (head + Content-Length body) and runs `script`."""

    script: Script
    url: str = ""
    requests: list[bytes] = field(default_factory=list)
    connections: int = 0
    closed_by_peer: int = 0  # connections the client closed (EOF seen while waiting for a request)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    self.closed_by_peer += 1
                    return
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                body = await reader.readexactly(length)
                self.requests.append(head + body)
                await self.script(reader, writer, body)
                if writer.is_closing():
                    return
        except ConnectionError:
            return
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def serving(script: Script) -> AsyncIterator[Server]:
    srv = Server(script)
    server = await asyncio.start_server(srv.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    srv.url = f"http://127.0.0.1:{port}"
    try:
        yield srv
    finally:
        server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 2)


@contextlib.asynccontextmanager
async def pool(read_timeout_s: float = 30.0, keepalive_s: float = 30.0) -> AsyncIterator[UpstreamPool]:
    p = UpstreamPool(connect_timeout_s=2.0, read_timeout_s=read_timeout_s, keepalive_s=keepalive_s)
    p.start()
    try:
        yield p
    finally:
        await p.close()


def writes(*parts: bytes, close: bool = False, pause: float = 0.0) -> Script:
    """A script that answers every request with `parts`, each written and drained separately."""

    async def script(_r: asyncio.StreamReader, w: asyncio.StreamWriter, _body: bytes) -> None:
        for p in parts:
            w.write(p)
            await w.drain()
            if pause:
                await asyncio.sleep(pause)
        if close:
            w.close()

    return script


async def body_of(r: UpstreamResponse) -> bytes:
    out = []
    while chunk := await r.readany():
        out.append(chunk)
    assert r.at_eof()
    return b"".join(out)


def chunked(data: bytes, sizes: list[int], ext: bool = False, trailer: bool = False) -> bytes:
    """`data` in chunked coding with the given chunk sizes (the rest in one last chunk)."""
    out, i = [], 0
    for n in [*sizes, len(data)]:
        piece = data[i : i + n]
        i += len(piece)
        if piece:
            out.append(f"{len(piece):x}{';x=y' if ext else ''}\r\n".encode() + piece + b"\r\n")
        if i >= len(data):
            break
    out.append(b"0\r\n" + (b"X-Trailer: 1\r\n" if trailer else b"") + b"\r\n")
    return b"".join(out)


OK_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"


async def test_request_bytes_and_content_length_answer_reuse_the_connection() -> None:
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: b\r\n\r\nhello"
    async with serving(writes(ok)) as srv, pool() as p:
        for _ in range(3):
            r = await p.request(srv.url, "POST", "/v1/completions", {"Content-Type": "x/y"}, b"{}")
            async with r:
                assert (r.status, r.headers["x-a"]) == (200, "b")
                assert await body_of(r) == b"hello"
        assert srv.connections == 1  # kept alive and reused
        host = srv.url.removeprefix("http://")
        assert (
            srv.requests[0]
            == (
                f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: x/y\r\n"
                "Content-Length: 2\r\n\r\n{}"
            ).encode()
        )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=hs.binary(min_size=0, max_size=3000),
    sizes=hs.lists(hs.integers(1, 700), max_size=8),
    cuts=hs.lists(hs.integers(1, 4000), max_size=12),
    ext=hs.booleans(),
    trailer=hs.booleans(),
)
def test_chunked_bodies_arrive_whole_however_the_bytes_are_cut(
    data: bytes, sizes: list[int], cuts: list[int], ext: bool, trailer: bool
) -> None:
    wire = OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + chunked(data, sizes, ext, trailer)
    edges = sorted({0, len(wire), *(c for c in cuts if c < len(wire))})
    parts = [wire[a:b] for a, b in itertools.pairwise(edges)]

    async def main() -> None:
        async with serving(writes(*parts)) as srv, pool() as p:
            for _ in range(2):  # and the connection is whole again for the next request
                async with await p.request(srv.url, "POST", "/v1/x", {}, b"q") as r:
                    assert r.status == 200
                    assert await body_of(r) == data
            assert srv.connections == 1

    asyncio.run(main())


async def test_body_without_length_ends_with_the_connection_and_is_not_reused() -> None:
    script = writes(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\npart one,", b" part two", close=True)
    async with serving(script) as srv, pool() as p:
        for _ in range(2):
            async with await p.request(srv.url, "POST", "/", {}, b"") as r:
                assert await body_of(r) == b"part one, part two"
        assert srv.connections == 2
        assert p.idle_connections() == []


async def test_interim_1xx_answers_are_skipped() -> None:
    script = writes(
        b"HTTP/1.1 100 Continue\r\n\r\n",
        b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n",
        b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok",
        pause=0.05,  # each in its own read: the client must wait past the interim ones
    )
    async with serving(script) as srv, pool() as p, await p.request(srv.url, "POST", "/", {}, b"") as r:
        assert r.status == 201 and "link" not in r.headers
        assert await body_of(r) == b"ok"


async def test_error_answers_are_read_up_to_a_limit() -> None:
    body = b'{"error": {"message": "' + b"x" * 5000 + b'"}}'
    head = f"HTTP/1.1 500 Internal Server Error\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    async with serving(writes(head, body[:100], body[100:])) as srv, pool() as p:
        async with await p.request(srv.url, "POST", "/", {}, b"") as r:
            assert r.status == 500 and await r.read(64) == body[:64]
        async with await p.request(srv.url, "POST", "/", {}, b"") as r:
            assert await r.read(1 << 20) == body


async def test_refused_connection_is_connect_failed() -> None:
    async with serving(writes()) as srv:
        url = srv.url
    async with pool() as p:  # the port is closed now
        with pytest.raises(ConnectFailed):
            await p.request(url, "POST", "/", {}, b"")
        with pytest.raises(ConnectFailed):
            await p.request("ftp://example/", "POST", "/", {}, b"")


@pytest.mark.parametrize(
    "parts",
    [
        [],  # closed without a byte
        [b"HTTP/1.1 200 OK\r\nContent-Le"],  # closed inside the head
        [b"SSH-2.0-OpenSSH_9.6\r\n"],  # not HTTP at all
    ],
    ids=["nothing", "half a head", "not http"],
)
async def test_broken_answers_before_the_head_are_upstream_closed(parts: list[bytes]) -> None:
    async with serving(writes(*parts, close=True)) as srv, pool() as p:
        with pytest.raises(UpstreamClosed):
            await p.request(srv.url, "POST", "/", {}, b"")
        assert p.idle_connections() == []


@pytest.mark.parametrize(
    "rest",
    [
        b"Content-Length: 100\r\n\r\nonly this",  # shorter than it said
        b"Transfer-Encoding: chunked\r\n\r\n9\r\nonly this\r\n",  # no last chunk
        b"Transfer-Encoding: chunked\r\n\r\n9\r\nonly this\r\nzz\r\n",  # a bad chunk size
    ],
    ids=["short content-length", "unterminated chunked", "bad chunk size"],
)
async def test_a_body_broken_off_gives_its_bytes_then_the_error(rest: bytes) -> None:
    async with serving(writes(OK_HEAD + rest, close=True)) as srv, pool() as p:
        async with await p.request(srv.url, "POST", "/", {}, b"") as r:
            assert await r.readany() == b"only this"
            with pytest.raises(UpstreamClosed):
                await r.readany()
        assert p.idle_connections() == []


async def test_no_answer_within_the_read_timeout() -> None:
    async def silent(_r: asyncio.StreamReader, _w: asyncio.StreamWriter, _b: bytes) -> None:
        await asyncio.sleep(30)

    async with serving(silent) as srv, pool(read_timeout_s=0.2) as p:
        with pytest.raises(ReadTimeout):
            await p.request(srv.url, "POST", "/", {}, b"")


async def test_a_stalled_body_times_out_but_a_slow_one_does_not() -> None:
    head = OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n"
    slow = writes(head, *(b"1\r\na\r\n" for _ in range(6)), b"0\r\n\r\n", pause=0.1)
    async with (
        serving(slow) as srv,
        pool(read_timeout_s=0.4) as p,
        await p.request(srv.url, "POST", "/", {}, b"") as r,
    ):
        assert await body_of(r) == b"a" * 6  # 0.6 s in all, never 0.4 s without a byte

    async def stall(_r: asyncio.StreamReader, w: asyncio.StreamWriter, _b: bytes) -> None:
        w.write(head + b"1\r\na\r\n")
        await w.drain()
        await asyncio.sleep(30)

    async with (
        serving(stall) as srv,
        pool(read_timeout_s=0.2) as p,
        await p.request(srv.url, "POST", "/", {}, b"") as r,
    ):
        assert await r.readany() == b"a"
        with pytest.raises(ReadTimeout):
            await r.readany()


async def test_an_answer_given_up_early_closes_its_connection() -> None:
    """How the engine learns its client went: the connection closes at once, it is not pooled.
    The engine here sends one chunk and then only listens, so nothing but the close can tell it."""
    gone = asyncio.Event()

    async def one_then_listen(r: asyncio.StreamReader, w: asyncio.StreamWriter, _b: bytes) -> None:
        w.write(OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n1\r\na\r\n")
        await w.drain()
        with contextlib.suppress(ConnectionError):
            await r.read()  # b"" at the client's EOF
        gone.set()
        w.close()

    async with serving(one_then_listen) as srv, pool() as p:
        async with await p.request(srv.url, "POST", "/", {}, b"") as r:
            assert await r.readany() == b"a"
        assert p.idle_connections() == []
        await asyncio.wait_for(gone.wait(), 10)


async def test_a_reader_that_falls_behind_stops_the_socket_being_read() -> None:
    big = b"z" * (8 * _HIGH_WATER)
    head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(big)}\r\n\r\n".encode()
    async with (
        serving(writes(head, big)) as srv,
        pool() as p,
        await p.request(srv.url, "POST", "/", {}, b"") as r,
    ):
        await asyncio.sleep(0.3)  # the server writes while nobody reads
        # the buffer stops at the high-water mark plus one socket read (at most 256 KiB)
        assert r._buf_len <= _HIGH_WATER + 256 * 1024
        assert r._conn._paused
        assert await body_of(r) == big


async def test_idle_connections_expire_and_closed_ones_are_not_reused() -> None:
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    async with serving(writes(ok)) as srv, pool(keepalive_s=0.2) as p:
        async with await p.request(srv.url, "POST", "/", {}, b"") as r:
            await body_of(r)
        assert len(p.idle_connections()) == 1
        await asyncio.sleep(0.5)  # past the keep-alive: the sweep closes it
        assert p.idle_connections() == []
        async with await p.request(srv.url, "POST", "/", {}, b"") as r:
            assert await body_of(r) == b"ok"
        assert srv.connections == 2

    async with serving(writes(ok, close=True)) as srv, pool() as p:  # the server closes after each
        for _ in range(2):
            async with await p.request(srv.url, "POST", "/", {}, b"") as r:
                assert await body_of(r) == b"ok"
            await asyncio.sleep(0.05)  # its FIN arrives
        assert srv.connections == 2


async def test_a_pooled_connection_that_fails_on_send_is_upstream_closed() -> None:
    """A kept connection whose transport refuses the write (closed under us between reads):
    the request fails as a disconnect, which the proxy retries elsewhere, never as a 500."""
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    async with serving(writes(ok)) as srv, pool() as p:
        async with await p.request(srv.url, "POST", "/", {}, b"") as r:
            await body_of(r)
        (conn,) = p.idle_connections()
        assert conn.transport is not None

        def refuse(_data: object) -> None:
            raise RuntimeError("unable to perform operation on <TCPTransport closed=True>")

        conn.transport.writelines = refuse  # type: ignore[method-assign]
        with pytest.raises(UpstreamClosed, match="before the request was sent"):
            await p.request(srv.url, "POST", "/", {}, b"")
        assert p.idle_connections() == []


def test_header_fields_cannot_split_the_request() -> None:
    assert _request_head("POST", "/p", "h:1", {"A": "b"}, 3) == (
        b"POST /p HTTP/1.1\r\nHost: h:1\r\nA: b\r\nContent-Length: 3\r\n\r\n"
    )
    for bad in ({"A": "b\r\nX: y"}, {"A\nB": "c"}, {"A: b": "c"}):
        with pytest.raises(ValueError, match="not allowed"):
            _request_head("POST", "/p", "h", bad, 0)
