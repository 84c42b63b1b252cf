"""The router's front door: bounds on what one client can hold, and JSON for malformed HTTP.

Why: aiohttp's server lets a client take as long as it likes over its request headers (only the
keep-alive timer, an hour by default, ends that), opens as many connections as file descriptors
allow, and answers malformed HTTP with a plain-text 400 logged as an ERROR with a traceback. A
slowloris client (many connections, a header byte now and then) then holds the router's memory
and descriptors, and anyone scanning the port fills the logs. Here:

- a connection must finish each request's headers within `header_timeout_s` of the request's
  first byte (of the connection's opening, for the first request), else it gets a 408 and is
  closed; an idle kept-alive connection is governed by `keepalive_timeout_s` instead;
- at most `max_connections` are open; one more is answered 503 (`Retry-After`) and closed;
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
from aiohttp.web_protocol import RequestHandler

from toposerve.router.errors import error_body, raw_error_response

log = logging.getLogger("toposerve.router")


@dataclass(frozen=True)
class Limits:
    header_timeout_s: float = 10.0
    keepalive_timeout_s: float = 75.0
    max_connections: int = 4096


class Gate:
    """Connection bookkeeping shared by all connections of one listener (read by /metrics)."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.open = 0
        self.refused = 0
        self.header_timeouts = 0
        self.write_timeouts = 0  # counted by the relay's write deadline (proxy.Router)
        self.bad_http = 0


class _GuardedHandler(RequestHandler):
    """aiohttp's connection protocol plus the connection cap and the header deadline."""

    def __init__(self, manager: web.Server, *, gate: Gate, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._gate = gate
        self._admitted = False
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        g = self._gate
        if g.open >= g.limits.max_connections:
            g.refused += 1
            t = cast(asyncio.Transport, transport)
            t.write(raw_error_response(503, "too many connections", retry_after=1))
            t.close()
            return
        g.open += 1
        self._admitted = True
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self._admitted:
            return
        self._admitted = False
        self._gate.open -= 1
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self._admitted:
            return
        if self._header_timer is None and not self._busy():
            self._arm()  # the first byte of the next request on a kept-alive connection
        super().data_received(data)
        if self._busy():
            self._disarm()  # the request head is complete: the handler owns the clock now

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
        peer = self.transport.get_extra_info("peername") if self.transport is not None else None
        return str(peer[0]) if isinstance(peer, tuple) and peer else "?"

    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """Malformed HTTP (and, in principle, errors escaping the app) as JSON, logged once."""
        if status >= 500:
            log.error("HTTP server error %d", status, exc_info=exc)
            text = "internal router error"
        else:
            self._gate.bad_http += 1
            # aiohttp's parser messages span lines (a caret under the bad byte): keep one line
            text = " ".join(f"malformed HTTP request: {message or exc or status}".split())
            log.info("%d from %s: %s", status, self._peer(), text)
        if request.writer.output_size > 0:
            raise ConnectionError("response already started")
        resp = web.json_response(error_body(status, text[:512]), status=status)
        resp.force_close()
        return resp


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
