"""The router's front door: bounds on what one client can hold, and JSON for malformed HTTP.

Why: aiohttp's server lets a client take as long as it likes over its request headers (only the
keep-alive timer, an hour by default, ends that), opens as many connections as file descriptors
allow, and answers malformed HTTP with a plain-text 400 logged as an ERROR with a traceback. A
slowloris client (many connections, a header byte now and then) then holds the router's memory
and descriptors, and anyone scanning the port fills the logs. Here:

- a connection must finish each request's headers within `header_timeout_s` of the request's
  first byte (of the connection's opening, for the first request), else it gets a 408 and is
  closed; an idle kept-alive connection is governed by `keepalive_timeout_s` instead;
- at most `max_connections` are open, and at most `max_connections_per_client` from one source
  IP (so one client's thousands of idle connections cannot take every slot); one more is answered
  503 (`Retry-After`) and closed;
- a request head is bounded as a whole (`max_head_bytes`), and once the parser has rejected a
  connection's bytes it is fed no more: aiohttp's parser, fed more bytes after an error, builds a
  new error whose message quotes each whole read (hundreds of KiB per read, queued until the 400
  is written), which is what made RSS grow with every refused 4 MB header;
- the body has its own deadline, enforced by the handler (`RouterConfig.body_timeout_s`);
- malformed HTTP is answered with the OpenAI JSON envelope and logged at INFO in one line.

It hooks in by subclassing aiohttp's `RequestHandler` (the per-connection protocol) and handing
the listening site a factory for it; the application, its middlewares and shutdown are unchanged.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, cast

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler, _ErrInfo

from toposerve.router.errors import error_body, raw_error_response

log = logging.getLogger("toposerve.router")


@dataclass(frozen=True)
class Limits:
    header_timeout_s: float = 10.0
    keepalive_timeout_s: float = 75.0
    max_connections: int = 4096
    max_connections_per_client: int = 256  # per source IP; 0: no per-client cap
    # A whole request head (request line and headers). aiohttp bounds each line (8190 bytes) and
    # the count (128), which still lets one head hold ~1 MiB; nginx's default is 32 KiB.
    max_head_bytes: int = 64 * 1024


class Gate:
    """Connection bookkeeping shared by all connections of one listener (read by /metrics)."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.open = 0
        self.per_client: dict[str, int] = {}  # source IP -> open connections
        self.refused = 0
        self.refused_per_client = 0
        self.header_timeouts = 0
        self.write_timeouts = 0  # counted by the relay's write deadline (proxy.Router)
        self.bad_http = 0


class _GuardedHandler(RequestHandler):
    """aiohttp's connection protocol plus the connection cap and the header deadline."""

    def __init__(self, manager: web.Server, *, gate: Gate, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._gate = gate
        self._admitted = False
        self._client = ""
        self._header_timer: asyncio.TimerHandle | None = None
        self._head_bytes = 0  # of the request head being received
        self._rejected = False  # the parser refused this connection's bytes: feed it no more
        self._last_payload: StreamReader | None = None  # the body of the last parsed request

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        g = self._gate
        peer = transport.get_extra_info("peername")
        client = str(peer[0]) if isinstance(peer, tuple) and peer else "?"
        per_client_cap = g.limits.max_connections_per_client
        if g.open >= g.limits.max_connections:
            g.refused += 1
            self._refuse(transport, "too many connections")
            return
        if per_client_cap > 0 and g.per_client.get(client, 0) >= per_client_cap:
            g.refused_per_client += 1
            log.debug("refused a connection from %s: %d already open", client, per_client_cap)
            self._refuse(transport, "too many connections from this client")
            return
        g.open += 1
        g.per_client[client] = g.per_client.get(client, 0) + 1
        self._client = client
        self._admitted = True
        super().connection_made(transport)
        self._arm()

    @staticmethod
    def _refuse(transport: asyncio.BaseTransport, message: str) -> None:
        t = cast(asyncio.Transport, transport)
        t.write(raw_error_response(503, message, retry_after=1))
        t.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self._admitted:
            return
        self._admitted = False
        g = self._gate
        g.open -= 1
        left = g.per_client.get(self._client, 1) - 1
        if left > 0:
            g.per_client[self._client] = left
        else:
            g.per_client.pop(self._client, None)
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self._admitted or self._rejected:
            return  # a refused request's further bytes are dropped, never parsed or kept
        if self._header_timer is None and not self._busy():
            self._arm()  # the first byte of the next request on a kept-alive connection
        # Bytes count as head bytes unless the last request's body is still arriving.
        in_head = self._last_payload is None or self._last_payload.is_eof()
        queued = len(self._messages)
        super().data_received(data)
        if len(self._messages) > queued:  # a head was parsed (or refused) in this read
            msg, self._last_payload = self._messages[-1]
            self._head_bytes = 0
            if not isinstance(msg, _ErrInfo) and _head_size(msg) > self._gate.limits.max_head_bytes:
                # parsed whole within one read: refused all the same, by aiohttp's error path
                limit = self._gate.limits.max_head_bytes
                exc = HttpProcessingError(code=431, message=f"request head larger than {limit} bytes")
                msg = _ErrInfo(status=431, exc=exc, message=exc.message)
                self._messages[-1] = (msg, self._last_payload)
            if isinstance(msg, _ErrInfo):
                self._rejected = True  # its 4xx is queued; the connection closes once it is written
        elif in_head:
            self._head_bytes += len(data)
            if self._head_bytes > self._gate.limits.max_head_bytes:
                self._head_too_large()
                return
        if self._busy():
            self._disarm()  # the request head is complete: the handler owns the clock now

    def _head_too_large(self) -> None:
        """A head past `max_head_bytes`: 431 and close, without buffering or parsing the rest."""
        self._rejected = True
        self._disarm()
        self._gate.bad_http += 1
        limit = self._gate.limits.max_head_bytes
        log.info("431 from %s: request head larger than %d bytes", self._peer(), limit)
        if self.transport is not None:
            self.transport.write(raw_error_response(431, f"request head larger than {limit} bytes"))
        self.force_close()

    def _busy(self) -> bool:
        """A request head is parsed (queued or being handled).

        Reads two attributes of aiohttp's RequestHandler (3.9+ has both); the robustness suite's
        slowloris test fails if a future aiohttp renames them.
        """
        return bool(self._messages) or self._request_in_progress

    def _arm(self) -> None:
        if self._header_timer is None and self._gate.limits.header_timeout_s > 0:
            self._header_timer = self._loop.call_later(
                self._gate.limits.header_timeout_s, self._header_timeout
            )

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self._busy() or self.transport is None:
            return
        self._gate.header_timeouts += 1
        log.info("closed a connection from %s: request headers not complete in time", self._peer())
        self.transport.write(raw_error_response(408, "request headers not received in time"))
        self.force_close()

    def _peer(self) -> str:
        return self._client or "?"  # noted at connection_made: the transport may be gone by now

    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """Malformed HTTP (and, in principle, errors escaping the app) as JSON, logged once.

        A client that went away mid-request (its body cut short) is routine: one INFO line."""
        if isinstance(exc, ConnectionError):
            log.info("client %s went away mid-request: %s", self._peer(), exc)
            resp = web.Response(status=499)
            resp.force_close()
            return resp
        if status >= 500:
            log.error("HTTP server error %d", status, exc_info=exc)
            text = "internal router error"
        else:
            self._gate.bad_http += 1
            # aiohttp's parser messages span lines (a caret under the bad byte): keep one line
            # (bounded first: the parser's message may quote a whole read)
            detail = str(message or exc or status)[:1024]
            text = " ".join(f"malformed HTTP request: {detail}".split())
            log.info("%d from %s: %s", status, self._peer(), text)
        if request.writer.output_size > 0:
            raise ConnectionError("response already started")
        resp = web.json_response(error_body(status, text[:512]), status=status)
        resp.force_close()
        return resp


def _head_size(msg: RawRequestMessage) -> int:
    """Bytes of a parsed request head, near enough (the request line's method and version and
    each header's separators are counted as 4 bytes each)."""
    return len(msg.path) + sum(len(k) + len(v) + 4 for k, v in msg.raw_headers) + 16


class _Factory:
    """The protocol factory a listening site calls per accepted connection."""

    def __init__(self, server: web.Server, gate: Gate, kwargs: dict[str, Any]) -> None:
        self._server = server
        self._gate = gate
        self._kwargs = kwargs

    def __call__(self) -> RequestHandler:
        return _GuardedHandler(self._server, gate=self._gate, loop=asyncio.get_running_loop(), **self._kwargs)


class GuardedRunner(web.AppRunner):
    """An AppRunner whose sites create `_GuardedHandler` connections.

    Sites take `runner.server` as their protocol factory; the runner's own shutdown keeps using
    the real `web.Server` (which still tracks every connection, so graceful shutdown is intact).
    """

    def __init__(self, app: web.Application, gate: Gate, **kwargs: Any) -> None:
        super().__init__(app, keepalive_timeout=gate.limits.keepalive_timeout_s, **kwargs)
        self._gate = gate
        self._handler_kwargs = {"keepalive_timeout": gate.limits.keepalive_timeout_s, "access_log": None}

    @property
    def server(self) -> web.Server | None:
        inner = super().server
        if inner is None:
            return None
        return cast(web.Server, _Factory(inner, self._gate, self._handler_kwargs))


class BodyBudget:
    """Request-body bytes buffered across all connections, against one cap (0: none).

    Why: each body is held whole (parsed, and kept for a retry) until its request ends, so
    concurrent large bodies add up; one cap on the sum bounds the router's memory for them."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.used = 0
        self.refused = 0  # requests answered 503 because the sum would pass the cap

    def fits(self, n: int) -> bool:
        return self.cap <= 0 or self.used + n <= self.cap

    def take(self, n: int) -> bool:
        """Reserve `n` more bytes; False (nothing reserved) when they do not fit."""
        if not self.fits(n):
            return False
        self.used += n
        return True

    def give(self, n: int) -> None:
        self.used -= n
