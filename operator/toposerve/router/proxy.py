"""The streaming reverse proxy: the I/O shell around the pure strategies.

Per request it parses the OpenAI body once (prompt text -> token estimate and chained block
hashes; max_tokens; session id), snapshots backend load, asks `strategies.choose`, charges the
ledger, and relays the upstream response chunk by chunk as it arrives (no buffering: TTFT through
the router is the engine's TTFT plus one hop). Everything that can go wrong is handled here:

- connect failures and 5xx *before the first byte* are retried once on another backend;
- a stream that breaks after bytes reached the client ends with an SSE error event (streams) or
  an aborted connection (non-streams), never a silently truncated success;
- passive outlier ejection (consecutive failures) plus active `/health` probes decide health;
  `/metrics` of each engine is scraped for KV-cache usage and queue length;
- when every healthy backend is saturated, requests wait in a bounded queue, then get 429 with
  Retry-After; with no healthy backend at all, 503 with Retry-After;
- a client that goes away cancels the handler, which closes the upstream request and releases
  exactly what the request had charged (`LoadLedger`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.tcp_helpers import tcp_nodelay
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from toposerve.router import strategies as st
from toposerve.router.endpoints import BackendSpec

log = logging.getLogger("toposerve.router")

STRATEGY_HEADER = "x-toposerve-strategy"
SESSION_HEADER = "x-session-id"
BACKEND_HEADER = "x-toposerve-backend"
REASON_HEADER = "x-toposerve-route-reason"

_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


@dataclass
class Backend:
    """Runtime state of one backend (owned by the event loop; no locks needed)."""

    spec: BackendSpec
    probe_ok: bool = True  # optimistic until the first probe says otherwise
    draining: bool = False
    removed: bool = False  # gone from discovery; dropped once its in-flight requests end
    failures: int = 0  # consecutive
    ejections: int = 0
    ejected_until: float = 0.0
    kv_usage: float = 0.0
    waiting: int = 0

    def healthy(self, now: float) -> bool:
        return self.probe_ok and now >= self.ejected_until


@dataclass
class RouterConfig:
    strategy: str = st.AUTO
    routing: st.Config = field(default_factory=st.Config)
    block_chars: int = st.DEFAULT_BLOCK_CHARS
    default_max_tokens: int = 256  # when a request sets none: a typical chat answer, not the context limit
    probe_interval_s: float = 1.0
    probe_timeout_s: float = 2.0
    connect_timeout_s: float = 3.0
    read_timeout_s: float = 600.0  # between two chunks of one response
    eject_after: int = 3  # consecutive 5xx / broken streams before ejection (connect failure: at once)
    eject_base_s: float = 5.0
    eject_max_s: float = 60.0
    queue_timeout_s: float = 5.0
    max_queue: int = 1024
    retry_after_s: int = 1
    session_header: str = SESSION_HEADER
    gpu_weighting: bool = True  # off: every backend weighs 1.0 whatever its GPU


@dataclass
class _Parsed:
    text_chars: int
    request: st.Request
    stream: bool


def _prompt_text(path: str, body: Mapping[str, Any]) -> tuple[str, int | None]:
    """Text whose prefix the engine caches, in order; plus an exact token count when given ids."""
    if path.endswith("/chat/completions"):
        out: list[str] = []
        for m in body.get("messages") or ():
            if not isinstance(m, Mapping):
                continue
            content = m.get("content")
            if isinstance(content, list):
                content = "".join(p.get("text", "") for p in content if isinstance(p, Mapping))
            out.append(f"{m.get('role', '')}\n{content or ''}\n")
        return "".join(out), None
    prompt = body.get("prompt", "")
    if isinstance(prompt, str):
        return prompt, None
    if isinstance(prompt, list) and prompt and all(isinstance(x, int) for x in prompt):
        return " ".join(map(str, prompt)), len(prompt)
    if isinstance(prompt, list):
        return "".join(x for x in prompt if isinstance(x, str)), None
    return "", None


def parse_request(
    path: str,
    body: Mapping[str, Any],
    headers: Mapping[str, str],
    est: st.TokenEstimator,
    cfg: RouterConfig,
    need_hashes: bool = True,
) -> _Parsed:
    text, exact = _prompt_text(path, body)
    mt = body.get("max_completion_tokens") or body.get("max_tokens")
    max_tokens = mt if isinstance(mt, int) and mt > 0 else cfg.default_max_tokens
    n = body.get("n")
    if isinstance(n, int) and n > 1:
        max_tokens *= n
    user = body.get("user")
    session = headers.get(cfg.session_header) or (user if isinstance(user, str) and user else None)
    prompt_tokens = exact if exact is not None else est.estimate(len(text))
    hashes = st.block_hashes(text, cfg.block_chars) if need_hashes else ()
    req = st.Request(prompt_tokens, max_tokens, hashes, session)
    return _Parsed(len(text), req, bool(body.get("stream")))


def parse_engine_metrics(text: str) -> tuple[float | None, int | None]:
    """(kv_cache_usage 0..1, requests waiting) from a vLLM /metrics page, summed over label sets.

    A line scan rather than the full exposition parser: this runs every second per backend.
    Accepts the older `vllm:gpu_cache_usage_perc` name too.
    """
    kv: float | None = None
    waiting: float | None = None
    for line in text.splitlines():
        if not line.startswith("vllm:"):
            continue
        brace = line.rfind("}")
        if brace >= 0:
            name, rest = line[: line.index("{")], line[brace + 1 :].split()
        else:
            name, *rest = line.split()
        try:
            value = float(rest[0])
        except (ValueError, IndexError):
            continue
        if math.isnan(value):
            continue
        if name in ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"):
            kv = max(kv or 0.0, value)
        elif name == "vllm:num_requests_waiting":
            waiting = (waiting or 0.0) + value
    return kv, (int(waiting) if waiting is not None else None)


class _Metrics:
    def __init__(self, router: Router) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "toposerve_router_requests",
            "Requests by backend, strategy and status code.",
            ["backend", "strategy", "code"],
            registry=r,
        )
        self.errors = Counter(
            "toposerve_router_errors", "Errors by backend and kind.", ["backend", "kind"], registry=r
        )
        self.decisions = Counter(
            "toposerve_router_decisions",
            "Routing decisions by strategy and reason.",
            ["strategy", "reason"],
            registry=r,
        )
        self.retries = Counter("toposerve_router_retries", "Requests retried on another backend.", registry=r)
        self.ejections = Counter(
            "toposerve_router_ejections", "Passive outlier ejections.", ["backend"], registry=r
        )
        self.ttft = Histogram(
            "toposerve_router_ttft_seconds",
            "Router-observed time to first byte of the response.",
            ["strategy"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "toposerve_router_e2e_seconds",
            "Router-observed end-to-end request latency.",
            ["strategy"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        r.register(_BackendCollector(router))


class _BackendCollector(Collector):
    """Per-backend load read at scrape time, so the hot path updates no gauges."""

    def __init__(self, router: Router) -> None:
        self.router = router

    def collect(self) -> Iterator[GaugeMetricFamily]:
        now = time.monotonic()
        fams = {
            "in_flight": GaugeMetricFamily(
                "toposerve_router_backend_in_flight",
                "Requests open per backend.",
                labels=["backend", "gpu_type"],
            ),
            "pending": GaugeMetricFamily(
                "toposerve_router_backend_pending_tokens",
                "Estimated outstanding tokens per backend.",
                labels=["backend", "gpu_type"],
            ),
            "healthy": GaugeMetricFamily(
                "toposerve_router_backend_healthy",
                "1 when the backend takes new requests.",
                labels=["backend", "gpu_type"],
            ),
            "kv": GaugeMetricFamily(
                "toposerve_router_backend_kv_cache_usage",
                "Scraped vllm:kv_cache_usage_perc.",
                labels=["backend", "gpu_type"],
            ),
        }
        for url, b in list(self.router.backends.items()):
            lab = [url, b.spec.gpu_type]
            fams["in_flight"].add_metric(lab, self.router.ledger.in_flight(url))
            fams["pending"].add_metric(lab, self.router.ledger.pending(url))
            fams["healthy"].add_metric(lab, 1.0 if b.healthy(now) and not b.draining else 0.0)
            fams["kv"].add_metric(lab, b.kv_usage)
        yield from fams.values()


class _Retryable(Exception):
    def __init__(self, kind: str, status: int = 502) -> None:
        super().__init__(kind)
        self.kind = kind
        self.status = status


class Router:
    """Holds backends, routing memory and the ledger; serves the OpenAI-compatible API."""

    def __init__(self, backends: Iterable[BackendSpec], cfg: RouterConfig | None = None) -> None:
        self.cfg = cfg or RouterConfig()
        if self.cfg.strategy not in st.STRATEGIES:
            raise ValueError(f"unknown strategy {self.cfg.strategy!r}; known: {', '.join(st.STRATEGIES)}")
        self.backends: dict[str, Backend] = {b.url: Backend(b) for b in backends}
        self.ledger = st.LoadLedger()
        self.memory = st.RoutingMemory()
        self.estimator = st.TokenEstimator()
        self.metrics = _Metrics(self)
        self._session: aiohttp.ClientSession | None = None
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._probe_task: asyncio.Task[None] | None = None
        self._probe_wakeup = asyncio.Event()

    # ---------------------------------------------------------------------------------- backend set

    def reconcile(self, desired: Mapping[str, tuple[BackendSpec, bool]]) -> None:
        """Apply discovery's view: url -> (spec, draining). Gone backends drain, then disappear."""
        for url, (spec, draining) in desired.items():
            b = self.backends.get(url)
            if b is None:
                self.backends[url] = Backend(spec, draining=draining)
                self._probe_wakeup.set()
            else:
                b.spec, b.draining, b.removed = spec, draining, False
        for url, b in list(self.backends.items()):
            if url not in desired:
                b.draining = b.removed = True
                self._drop_if_idle(url)
        self._wake_waiters()

    def _drop_if_idle(self, url: str) -> None:
        b = self.backends.get(url)
        if b is not None and b.removed and self.ledger.in_flight(url) == 0:
            del self.backends[url]
            self.memory.prefix.forget(url)

    def snapshot(self, exclude: Iterable[str] = ()) -> list[st.BackendState]:
        now = time.monotonic()
        skip = set(exclude)
        out = []
        for url, b in self.backends.items():
            s = b.spec
            out.append(
                st.BackendState(
                    id=url,
                    weight=s.weight if self.cfg.gpu_weighting else 1.0,
                    in_flight=self.ledger.in_flight(url),
                    pending_tokens=self.ledger.pending(url),
                    kv_usage=b.kv_usage,
                    waiting=b.waiting,
                    healthy=b.healthy(now) and url not in skip,
                    draining=b.draining,
                    long_context=s.long_context,
                    pool=s.pool,
                    gpu_type=s.gpu_type,
                )
            )
        return out

    # ---------------------------------------------------------------------------------- health

    def _record_failure(self, url: str, kind: str) -> None:
        b = self.backends.get(url)
        self.metrics.errors.labels(url, kind).inc()
        if b is None:
            return
        b.failures += 1
        if kind == "connect" or b.failures >= self.cfg.eject_after:
            b.ejections += 1
            b.failures = 0
            hold = min(self.cfg.eject_base_s * 2 ** (b.ejections - 1), self.cfg.eject_max_s)
            b.ejected_until = time.monotonic() + hold
            self.metrics.ejections.labels(url).inc()
            log.warning("ejected %s for %.1fs after %s", url, hold, kind)

    def _record_success(self, url: str) -> None:
        b = self.backends.get(url)
        if b is not None:
            b.failures = 0
            if b.ejections and time.monotonic() >= b.ejected_until:
                b.ejections = 0

    async def _probe_one(self, b: Backend) -> None:
        assert self._session is not None
        url = b.spec.url
        timeout = aiohttp.ClientTimeout(total=self.cfg.probe_timeout_s)
        try:
            async with self._session.get(url + "/health", timeout=timeout) as r:
                await r.read()
                ok = r.status == 200
        except (TimeoutError, aiohttp.ClientError, OSError):
            ok = False
        b.probe_ok = ok
        if not ok:
            return
        try:
            async with self._session.get(url + "/metrics", timeout=timeout) as r:
                if r.status == 200:
                    kv, waiting = parse_engine_metrics(await r.text())
                    if kv is not None:
                        b.kv_usage = kv
                    if waiting is not None:
                        b.waiting = waiting
        except (TimeoutError, aiohttp.ClientError, OSError, UnicodeDecodeError):
            pass

    async def probe_all(self) -> None:
        await asyncio.gather(*(self._probe_one(b) for b in list(self.backends.values())))
        self._wake_waiters()

    async def _probe_loop(self) -> None:
        while True:
            try:
                await self.probe_all()
            except Exception:  # a probe bug must not stop probing
                log.exception("probe round failed")
            self._probe_wakeup.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._probe_wakeup.wait(), self.cfg.probe_interval_s)

    # ---------------------------------------------------------------------------------- lifecycle

    async def start(self, probe: bool = True) -> None:
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=60, ttl_dns_cache=60)
        self._session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=self.cfg.connect_timeout_s, sock_read=self.cfg.read_timeout_s
            ),
            skip_auto_headers=("User-Agent",),
        )
        if probe:
            self._probe_task = asyncio.create_task(self._probe_loop())

    async def stop(self) -> None:
        if self._probe_task is not None:
            self._probe_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe_task
        if self._session is not None:
            await self._session.close()

    def app(self, probe: bool = True) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self.handle_completion)
        app.router.add_post("/v1/completions", self.handle_completion)
        app.router.add_get("/v1/models", self.handle_models)
        app.router.add_get("/health", self.handle_health)
        app.router.add_get("/metrics", self.handle_metrics)

        async def _startup(_: web.Application) -> None:
            await self.start(probe)

        async def _cleanup(_: web.Application) -> None:
            await self.stop()

        app.on_startup.append(_startup)
        app.on_cleanup.append(_cleanup)
        return app

    # ---------------------------------------------------------------------------------- queueing

    def _wake_waiters(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return

    async def _decide(self, strategy: str, req: st.Request, exclude: set[str]) -> st.Decision | web.Response:
        deadline = time.monotonic() + self.cfg.queue_timeout_s
        while True:
            snap = self.snapshot(exclude)
            if not any(st.is_eligible(b) for b in snap):
                return self._error(503, "no healthy backend", "no_backend", retry_after=True)
            now = time.monotonic()
            d = st.choose(strategy, req, snap, self.memory, self.cfg.routing, now)
            if d is not None:
                st.commit(self.memory, strategy, req, d, self.cfg.routing, now)
                self.metrics.decisions.labels(strategy, d.reason).inc()
                return d
            left = deadline - now
            if left <= 0 or len(self._waiters) >= self.cfg.max_queue:
                return self._error(429, "all backends are saturated", "saturated", retry_after=True)
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            try:
                await asyncio.wait_for(fut, min(left, self.cfg.probe_interval_s))
            except TimeoutError:
                pass
            finally:
                fut.cancel()
                with contextlib.suppress(ValueError):
                    self._waiters.remove(fut)

    def _error(self, status: int, message: str, kind: str, retry_after: bool = False) -> web.Response:
        self.metrics.errors.labels("", kind).inc()
        headers = {"Retry-After": str(self.cfg.retry_after_s)} if retry_after else None
        body = {"error": {"message": message, "type": kind, "code": status}}
        return web.json_response(body, status=status, headers=headers)

    # ---------------------------------------------------------------------------------- handlers

    async def handle_health(self, request: web.Request) -> web.Response:
        """The router's own readiness: 200 while it can take requests, whatever the backends do.

        Backends going away must not take the router out of its Service: clients then get a 503
        with Retry-After (or, at zero replicas, a held request) instead of a refused connection,
        and a fleet emptied by bad input cannot also empty the routers. Backend health is in the
        body and in the metrics."""
        healthy = sum(1 for b in self.snapshot() if st.is_eligible(b))
        return web.json_response({"status": "ok", "healthyBackends": healthy})

    async def handle_metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.metrics.registry), content_type="text/plain")

    async def handle_models(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        tried: set[str] = set()
        for _ in range(2):
            cands = [b for b in self.snapshot(tried) if st.is_eligible(b)]
            if not cands:
                break
            url = cands[0].id
            tried.add(url)
            try:
                async with self._session.get(url + "/v1/models") as r:
                    body = await r.read()
                    if r.status < 500:
                        return web.Response(body=body, status=r.status, content_type=r.content_type)
            except (TimeoutError, aiohttp.ClientError, OSError):
                self._record_failure(url, "connect")
        return self._error(503, "no healthy backend", "no_backend", retry_after=True)

    async def handle_completion(self, request: web.Request) -> web.StreamResponse:
        t0 = time.perf_counter()
        raw = await request.read()
        try:
            body = json.loads(raw)
            if not isinstance(body, dict):
                raise ValueError("body must be a JSON object")
        except ValueError as e:
            return self._error(400, f"invalid JSON body: {e}", "bad_request")
        strategy = request.headers.get(STRATEGY_HEADER) or self.cfg.strategy
        if strategy not in st.STRATEGIES:
            return self._error(
                400, f"unknown strategy {strategy!r}; known: {', '.join(st.STRATEGIES)}", "bad_request"
            )
        need_hashes = strategy in (st.PREFIX_AWARE, st.AUTO)
        parsed = parse_request(request.path, body, request.headers, self.estimator, self.cfg, need_hashes)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        tried: set[str] = set()
        for attempt in range(2):
            d = await self._decide(strategy, parsed.request, tried)
            if isinstance(d, web.Response):
                if attempt:  # we are here because the first backend failed: say so
                    return self._error(502, "upstream failed and no other backend is available", "upstream")
                return d
            tried.add(d.backend)
            try:
                return await self._forward(request, raw, headers, parsed, strategy, d, t0)
            except _Retryable as e:
                self._record_failure(d.backend, e.kind)
                if attempt == 0:
                    self.metrics.retries.inc()
                    continue
                return self._error(e.status, f"upstream failed: {e.kind}", "upstream")
        raise AssertionError("unreachable")

    async def _forward(
        self,
        request: web.Request,
        raw: bytes,
        headers: dict[str, str],
        parsed: _Parsed,
        strategy: str,
        d: st.Decision,
        t0: float,
    ) -> web.StreamResponse:
        assert self._session is not None
        url = d.backend
        req = parsed.request
        ticket = self.ledger.acquire(url, req.prompt_tokens, req.max_tokens)
        code = "error"
        try:
            try:
                upstream = await self._session.post(url + request.path, data=raw, headers=headers)
            except (TimeoutError, aiohttp.ClientConnectorError) as e:
                raise _Retryable("connect") from e
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as e:
                raise _Retryable("disconnect") from e
            async with upstream:
                if upstream.status >= 500:
                    await upstream.read()
                    raise _Retryable("status_5xx", upstream.status)
                if upstream.connection is not None and upstream.connection.transport is not None:
                    tcp_nodelay(upstream.connection.transport, True)
                out = web.StreamResponse(status=upstream.status)
                for k, v in upstream.headers.items():
                    if k.lower() not in _HOP_BY_HOP:
                        out.headers.add(k, v)
                if "Content-Length" in upstream.headers and not parsed.stream:
                    out.content_length = int(upstream.headers["Content-Length"])
                out.headers[BACKEND_HEADER] = url
                out.headers[REASON_HEADER] = d.reason
                code = str(upstream.status)
                await out.prepare(request)
                await self._relay(request, upstream, out, parsed, strategy, ticket, t0)
                self._record_success(url)
                return out
        finally:
            self.ledger.release(ticket)
            self.metrics.requests.labels(url, strategy, code).inc()
            self.metrics.e2e.labels(strategy).observe(time.perf_counter() - t0)
            self._drop_if_idle(url)
            self._wake_waiters()

    async def _relay(
        self,
        request: web.Request,
        upstream: aiohttp.ClientResponse,
        out: web.StreamResponse,
        parsed: _Parsed,
        strategy: str,
        ticket: st.Ticket,
        t0: float,
    ) -> None:
        first = True
        prev = tail = b""
        keep_body = not parsed.stream and upstream.status == 200
        body_parts: list[bytes] = []
        try:
            async for chunk in upstream.content.iter_any():
                if first:
                    first = False
                    self.metrics.ttft.labels(strategy).observe(time.perf_counter() - t0)
                    self.ledger.first_token(ticket)
                if parsed.stream:
                    self.ledger.output_tokens(ticket, chunk.count(b"data: "))
                    prev, tail = tail, chunk  # usage sits in the last event or the one before [DONE]
                elif keep_body and sum(map(len, body_parts)) < 4 << 20:
                    body_parts.append(chunk)
                await out.write(chunk)
        except (
            TimeoutError,
            aiohttp.ClientPayloadError,
            aiohttp.ServerDisconnectedError,
            aiohttp.ClientOSError,
        ) as e:
            self._record_failure(ticket.backend, "stream_broken")
            log.warning("stream from %s broke mid-way: %r", ticket.backend, e)
            if parsed.stream:
                err = {
                    "error": {
                        "message": "upstream stream broke mid-way",
                        "type": "upstream_error",
                        "code": 502,
                    }
                }
                await out.write(b"data: " + json.dumps(err).encode() + b"\n\n")
                await out.write_eof()
            else:
                # headers are out; abort so the client sees a failure, not a truncated success
                out.force_close()
                if request.transport is not None:
                    request.transport.abort()
            return
        await out.write_eof()
        self._learn_usage(parsed, prev + tail if parsed.stream else b"".join(body_parts))

    def _learn_usage(self, parsed: _Parsed, data: bytes) -> None:
        """Correct the chars-per-token estimate from the engine's reported prompt tokens."""
        i = data.rfind(b'"prompt_tokens"')
        if i < 0:
            return
        j = i + len(b'"prompt_tokens"')
        digits = data[j : j + 24].lstrip(b": ")
        n = 0
        for ch in digits:
            if 48 <= ch <= 57:
                n = n * 10 + ch - 48
            else:
                break
        self.estimator.observe(parsed.text_chars, n)


async def serve(router: Router, host: str, port: int, probe: bool = True) -> web.AppRunner:
    """Start serving; returns the runner (call `runner.cleanup()` to stop)."""
    runner = web.AppRunner(router.app(probe), access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True, backlog=2048)
    await site.start()
    return runner
