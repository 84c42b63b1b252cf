"""A lean HTTP/1.1 client for the router's one hot path: POST a body, relay the answer.

Why not aiohttp's ``ClientSession``: profiled at 50-200 streams, its request path (request and
response objects, header processing, the connector, timers) was a third of the router's busy CPU
(docs/benchmarks.md, "where the added latency goes"), for a proxy that needs none of cookies,
redirects, auth, proxies or decompression. This client keeps what a reverse proxy needs:

- one ``asyncio.Protocol`` per connection, the response parsed by ``httptools`` (llhttp, the
  parser of Node.js and of uvicorn, which vLLM serves with), so framing (Content-Length,
  chunked, read-until-close, 1xx interim answers) is decoded by the real thing, not by hand;
- a keep-alive pool per backend, last-in first-out (the warmest connection), idle connections
  closed after ``keepalive_s``: below the upstream's own idle limit, so that the router does
  not send on a connection the engine is closing (vLLM serves with uvicorn and
  ``VLLM_HTTP_TIMEOUT_KEEP_ALIVE``, 5 s by default: vllm/envs.py of the pinned vLLM 0.33.0);
- back-pressure: a response that buffers more than ``_HIGH_WATER`` bytes stops reading its
  socket until the relay catches up (a slow client slows its engine stream, as before);
- time limits without a timer per read: one sweep task stamps nothing on the hot path but two
  dict operations per wait, and fails reads that waited longer than ``read_timeout_s``;
- a response given up before its end closes its connection: that is how the engine learns its
  client went and frees the sequence (a pooled connection is only one whose answer was whole).

Errors are three kinds the proxy maps onto its retry and blame rules: `ConnectFailed` (nothing
was sent), `UpstreamClosed` (the engine closed or broke the connection, or answered bytes that
are not HTTP), `ReadTimeout` (connected, and nothing came for ``read_timeout_s``).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from collections import deque
from collections.abc import Mapping
from types import TracebackType

import httptools
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

_HIGH_WATER = 256 * 1024  # bytes a response buffers before its socket stops being read


class UpstreamError(Exception):
    """Base of the errors this client raises."""


class ConnectFailed(UpstreamError):
    """No connection (refused, unreachable, or not within the connect timeout): nothing was sent."""


class UpstreamClosed(UpstreamError):
    """The engine closed or reset the connection before the answer's end, or sent non-HTTP."""


class ReadTimeout(UpstreamError):
    """Connected, and no byte of the answer came for ``read_timeout_s``."""


_Header = tuple[str, str]


def _text(b: bytes) -> str:
    # as aiohttp decodes header bytes: UTF-8, anything else kept byte for byte
    return b.decode("utf-8", "surrogateescape")


class UpstreamResponse:
    """One answer: status and headers once `UpstreamPool.request` returns, then the body."""

    __slots__ = ("_buf", "_buf_len", "_conn", "_eof", "_exc", "_waiter", "headers", "status")

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn
        self.status = 0
        self.headers: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())
        self._buf: deque[bytes] = deque()
        self._buf_len = 0
        self._eof = False  # the whole body is in (what is buffered is the rest)
        self._exc: UpstreamError | None = None
        self._waiter: asyncio.Future[None] | None = None

    # -- fed by the connection (synchronously, from data_received / connection_lost)

    def _feed(self, data: bytes) -> None:
        self._buf.append(data)
        self._buf_len += len(data)
        if self._buf_len > _HIGH_WATER:
            self._conn.pause()
        self._wake()

    def _feed_eof(self) -> None:
        self._eof = True
        self._wake()

    def _fail(self, exc: UpstreamError) -> None:
        if not self._eof and self._exc is None:
            self._exc = exc
            self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def _wait(self) -> None:
        w = self._waiter = self._conn.loop.create_future()
        waiting = self._conn.pool._waiting
        waiting[self] = time.monotonic()
        try:
            await w
        finally:
            self._waiter = None
            waiting.pop(self, None)

    # -- read by the relay

    async def readany(self) -> bytes:
        """Whatever body bytes have arrived (waiting for some), b"" at the end. Bytes that came
        before an error are returned before the error is raised."""
        while not self._buf:
            if self._exc is not None:
                raise self._exc
            if self._eof:
                return b""
            await self._wait()
        buf = self._buf
        data = buf.popleft() if len(buf) == 1 else b"".join(buf)
        buf.clear()
        self._buf_len = 0
        self._conn.resume()
        return data

    async def read(self, limit: int) -> bytes:
        """Up to `limit` bytes of the body (an error body to pass on): stops at the end or the limit."""
        parts: list[bytes] = []
        n = 0
        while n < limit and (chunk := await self.readany()):
            parts.append(chunk)
            n += len(chunk)
        return b"".join(parts)[:limit]

    def at_eof(self) -> bool:
        """True when the body is complete and every byte of it has been read."""
        return self._eof and not self._buf

    def close(self) -> None:
        """Done with the answer: a whole one hands its connection back to the pool, anything
        else closes it (the engine sees the client go)."""
        conn = self._conn
        if conn.response is not self:
            return
        conn.response = None
        if self._eof and self._exc is None and conn.reusable():
            conn.pool._put(conn)
        else:
            conn.abort()

    async def __aenter__(self) -> UpstreamResponse:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class _Connection(asyncio.Protocol):
    """One keep-alive connection to one backend, carrying one exchange at a time."""

    def __init__(self, pool: UpstreamPool, key: str, loop: asyncio.AbstractEventLoop) -> None:
        self.pool = pool
        self.key = key
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.response: UpstreamResponse | None = None
        self.closed = False
        self.idle_since = 0.0
        self._paused = False
        self._headers: list[_Header] = []
        self._head_done = False  # the current answer's status and headers are in
        self._interim = False  # the message being parsed is a 1xx interim answer
        self._until_close = False  # the body has no length: it ends when the connection does
        self._keep_alive = True
        self._parser = httptools.HttpResponseParser(self)

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.response is None:  # nothing asked: an engine talking out of turn
            self.abort()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._break(UpstreamClosed("upstream switched protocols"))
        except httptools.HttpParserError as e:
            self._break(UpstreamClosed(f"malformed response from upstream: {e}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        r = self.response
        if r is None:
            return
        if self._head_done and self._until_close and exc is None:
            r._feed_eof()  # a body without length ends with its connection
        else:
            r._fail(UpstreamClosed(f"upstream closed the connection{f': {exc}' if exc else ''}"))

    # -- httptools callbacks

    def on_message_begin(self) -> None:
        self._headers = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((_text(name), _text(value)))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200:  # 100 Continue, 103 Early Hints: the answer is still to come
            self._interim = True
            return
        r = self.response
        if r is None:
            return
        h = CIMultiDict(self._headers)
        r.status = status
        r.headers = CIMultiDictProxy(h)
        self._keep_alive = self._parser.should_keep_alive()
        te = h.get("Transfer-Encoding", "").lower()
        self._until_close = "Content-Length" not in h and "chunked" not in te and status not in (204, 304)
        self._head_done = True
        r._wake()

    def on_body(self, body: bytes) -> None:
        if self.response is not None:
            self.response._feed(body)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        if self.response is not None:
            self.response._feed_eof()

    # -- used by the pool and the response

    def send(self, head: bytes, body: bytes, response: UpstreamResponse) -> None:
        assert self.transport is not None
        self.response = response
        self._head_done = False
        self._interim = False
        self.transport.writelines((head, body) if body else (head,))

    async def head(self, response: UpstreamResponse) -> None:
        while not self._head_done:
            if response._exc is not None:
                raise response._exc
            if self.closed:
                raise UpstreamClosed("upstream closed the connection before answering")
            await response._wait()

    def reusable(self) -> bool:
        return self._keep_alive and not self.closed and not self._until_close

    def pause(self) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()

    def _break(self, exc: UpstreamError) -> None:
        if self.response is not None:
            self.response._fail(exc)
        self.abort()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


class UpstreamPool:
    """Keep-alive connections per backend (``http://host:port``), and the one sweep that times
    out reads and closes idle connections."""

    def __init__(self, connect_timeout_s: float, read_timeout_s: float, keepalive_s: float = 4.0) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.keepalive_s = keepalive_s
        self._idle: dict[str, list[_Connection]] = {}
        self._targets: dict[str, tuple[str, int, str, ssl.SSLContext | None]] = {}
        self._waiting: dict[UpstreamResponse, float] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._ssl: ssl.SSLContext | None = None

    def start(self) -> None:
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        for conns in self._idle.values():
            for c in conns:
                c.abort()
        self._idle.clear()

    def idle_connections(self) -> list[_Connection]:
        return [c for conns in self._idle.values() for c in conns if not c.closed]

    async def request(
        self, backend: str, method: str, path: str, headers: Mapping[str, str], body: bytes
    ) -> UpstreamResponse:
        """Send and wait for the answer's status and headers. `headers` must not carry Host,
        Content-Length or hop-by-hop fields (the proxy strips them); both are set here."""
        target = self._target(backend)
        head = _request_head(method, path, target[2], headers, len(body))
        conn = self._take(backend) or await self._connect(backend, target)
        r = UpstreamResponse(conn)
        try:
            conn.send(head, body, r)
        except (RuntimeError, OSError) as e:  # the transport closed under us (uvloop raises then)
            conn.response = None
            conn.abort()
            raise UpstreamClosed(f"upstream connection closed before the request was sent: {e}") from e
        try:
            await conn.head(r)
        except BaseException:
            conn.response = None
            conn.abort()
            raise
        return r

    # -- internals

    def _target(self, backend: str) -> tuple[str, int, str, ssl.SSLContext | None]:
        t = self._targets.get(backend)
        if t is None:
            u = URL(backend)
            if u.scheme not in ("http", "https") or not u.host:
                raise ConnectFailed(f"not an http(s) URL: {backend!r}")
            tls = None
            if u.scheme == "https":
                if self._ssl is None:
                    self._ssl = ssl.create_default_context()
                tls = self._ssl
            port = u.port or (443 if tls else 80)
            if len(self._targets) > 4096:  # backends come and go
                self._targets.clear()
            t = self._targets[backend] = (u.host, port, u.host_port_subcomponent or u.host, tls)
        return t

    def _take(self, backend: str) -> _Connection | None:
        conns = self._idle.get(backend)
        if not conns:
            return None
        now = time.monotonic()
        while conns:
            c = conns.pop()
            if self._reusable_now(c, now):
                return c
            c.abort()
        return None

    def _reusable_now(self, c: _Connection, now: float) -> bool:
        """An idle connection may carry a request: still open and idle for under ``keepalive_s``
        (the one rule for taking a connection and for the sweep's closing of idle ones)."""
        return not c.closed and now - c.idle_since < self.keepalive_s

    def _put(self, conn: _Connection) -> None:
        if self.keepalive_s <= 0:
            conn.abort()
            return
        conn.idle_since = time.monotonic()
        self._idle.setdefault(conn.key, []).append(conn)

    async def _connect(
        self, backend: str, target: tuple[str, int, str, ssl.SSLContext | None]
    ) -> _Connection:
        loop = asyncio.get_running_loop()
        host, port, _, tls = target
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, proto = await loop.create_connection(
                    lambda: _Connection(self, backend, loop),
                    host,
                    port,
                    ssl=tls,
                    server_hostname=host if tls else None,
                )
        except (OSError, TimeoutError, ssl.SSLError) as e:
            raise ConnectFailed(f"cannot connect to {backend}: {e!r}") from e
        assert proto.transport is not None
        sock = proto.transport.get_extra_info("socket")
        if sock is not None:  # small SSE writes must not wait for ACKs (the loops set it too)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return proto

    async def _sweep(self) -> None:
        limits = [t for t in (self.read_timeout_s, self.keepalive_s) if t > 0]
        period = min(1.0, max(min(limits, default=4.0) / 4, 0.01))
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            late = now - self.read_timeout_s
            for r, since in list(self._waiting.items()):
                if since < late:
                    r._fail(ReadTimeout(f"no answer from upstream within {self.read_timeout_s:g}s"))
            for key, conns in list(self._idle.items()):
                keep = []
                for c in conns:
                    if self._reusable_now(c, now):
                        keep.append(c)
                    else:
                        c.abort()
                if keep:
                    self._idle[key] = keep
                else:
                    del self._idle[key]


def _request_head(method: str, path: str, host: str, headers: Mapping[str, str], length: int) -> bytes:
    """The request line and fields. A CR or LF in a field would split the request (aiohttp's
    server refuses them in what clients send; this refuses them on its own too)."""
    parts = [f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n"]
    for k, v in headers.items():
        if "\r" in v or "\n" in v or "\r" in k or "\n" in k or ":" in k:
            raise ValueError(f"header {k[:64]!r}: CR, LF or ':' not allowed")
        parts.append(f"{k}: {v}\r\n")
    parts.append(f"Content-Length: {length}\r\n\r\n")
    return "".join(parts).encode("utf-8", "surrogateescape")
