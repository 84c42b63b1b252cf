"""The streaming reverse proxy: the I/O shell around the pure strategies.

Per request it parses the OpenAI body once (prompt text -> token estimate and chained block
hashes; max_tokens; session id), snapshots backend load, asks `strategies.choose`, charges the
ledger, and relays the upstream response chunk by chunk as it arrives (no buffering: TTFT through
the router is the engine's TTFT plus one hop). Everything that can go wrong is handled here:

- connect failures and 5xx *before the first byte* are retried once on another backend, and
  only once: a request that makes engines fail must not walk the fleet;
- a stream that breaks after bytes reached the client ends with an SSE error event (streams) or
  an aborted connection (non-streams), never a silently truncated success;
- passive outlier ejection plus active `/health` probes decide health (`health.py`: failures
  the request caused are not blamed on the backend, ejection never empties the fleet, probes
  re-admit); `/metrics` of each engine is scraped for KV-cache usage and queue length;
- every error the router itself answers is an OpenAI-style JSON body (`error_body`), logged
  once: 4xx at INFO, upstream trouble at WARNING, a router bug at ERROR with its traceback;
- when every healthy backend is saturated, requests wait in a bounded queue, then get 429 with
  Retry-After; with no healthy backend at all, 503 with Retry-After, unless the deployment may
  scale from zero (``--hold-at-zero``): then requests are held, bounded in time and count, while
  the autoscaler starts a replica on ``toposerve_router_held_requests``;
- a client that goes away cancels the handler, which closes the upstream request and releases
  exactly what the request had charged (`LoadLedger`).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import socket
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, cast

import aiohttp
from aiohttp import web
from aiohttp.http_exceptions import ContentEncodingError
from aiohttp.web_protocol import RequestPayloadError
from multidict import CIMultiDictProxy
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from toposerve.kvevents import hashing
from toposerve.router import adapters as ad
from toposerve.router import demand as dm
from toposerve.router import health as hl
from toposerve.router import lora as lr
from toposerve.router import strategies as st
from toposerve.router.endpoints import BackendSpec
from toposerve.router.errors import error_body
from toposerve.router.frontdoor import BodyBudget, Gate, GuardedRunner, Limits
from toposerve.router.kvindex import KVEventsOptions, KVIndex, hashed_apart
from toposerve.router.upstream import (
    ConnectFailed,
    ReadTimeout,
    UpstreamClosed,
    UpstreamError,
    UpstreamPool,
    UpstreamResponse,
)

log = logging.getLogger("toposerve.router")

STRATEGY_HEADER = "x-toposerve-strategy"
SESSION_HEADER = "x-session-id"
BACKEND_HEADER = "x-toposerve-backend"
REASON_HEADER = "x-toposerve-route-reason"

# RFC 9110 7.6.1: hop-by-hop fields, plus whatever the `Connection` field names (`hop_by_hop`).
# Content-Length and Host are recomputed by the upstream client / the response.
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
        # the router has read the whole body: an upstream 100 Continue would only cost a round trip
        "expect",
    }
)
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


# Bounds on what a request may ask for in routing arithmetic (the engine rejects more anyway):
# a 400-digit max_tokens must not overflow a float in the scorer.
MAX_TOKENS_BOUND = 1 << 24
MAX_N_BOUND = 128
_TRUE_STRINGS = frozenset({"true", "t", "yes", "y", "on", "1"})


def hop_by_hop(headers: Mapping[str, str] | Any) -> frozenset[str]:
    """Lower-cased names not to forward: the fixed set plus those listed in `Connection`."""
    named: set[str] = set()
    getall = getattr(headers, "getall", None)
    values = getall("Connection", ()) if getall is not None else [headers.get("Connection", "")]
    for v in values:
        named.update(t.strip().lower() for t in v.split(",") if t.strip())
    return _HOP_BY_HOP | named if named else _HOP_BY_HOP


def lax_bool(v: object) -> bool:
    """Truthiness as vLLM's pydantic models read a bool field: the string "false" is False."""
    if isinstance(v, str):
        return v.strip().lower() in _TRUE_STRINGS
    return v is True or (isinstance(v, int) and v == 1)


@dataclass
class Backend:
    """Runtime state of one backend (owned by the event loop; no locks needed)."""

    spec: BackendSpec
    health: hl.HealthState = field(default_factory=hl.HealthState)
    draining: bool = False
    removed: bool = False  # gone from discovery; dropped once its in-flight requests end
    kv_usage: float = 0.0
    waiting: int = 0
    kv_capacity_tokens: int = 0  # from vllm:cache_config_info; 0 until scraped (or never exported)
    kv_block_size: int = 0  # the same metric's block_size: how the engine cuts prompts into blocks

    def healthy(self, now: float) -> bool:
        return self.health.healthy(now)


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
    # An idle upstream connection is closed after this: below the engine's own idle limit (vLLM:
    # uvicorn with VLLM_HTTP_TIMEOUT_KEEP_ALIVE, 5 s), so the router never sends on a connection
    # the engine is closing at that moment.
    upstream_keepalive_s: float = 4.0
    eject_after: int = 3  # consecutive blamed failures before ejection (connect failure: at once)
    eject_base_s: float = 5.0
    eject_max_s: float = 60.0
    max_ejection_percent: float = 50.0  # of the backends in service; the last one is never ejected
    queue_timeout_s: float = 5.0
    max_queue: int = 1024
    # Scale from zero: with no replica to take a request, hold it this long for one to appear
    # (0: answer 503 at once), at most max_held at a time; the held count is a metric the
    # autoscaler scales 0 -> 1 on.
    hold_at_zero_s: float = 0.0
    max_held: int = 256
    retry_after_s: int = 1
    session_header: str = SESSION_HEADER
    gpu_weighting: bool = True  # off: every backend weighs 1.0 whatever its GPU
    expose_backend: bool = False  # x-toposerve-backend on responses reveals pod addresses: opt-in
    # the front door (frontdoor.py): slow or greedy clients
    header_timeout_s: float = 10.0  # first byte of a request to the end of its headers
    body_timeout_s: float = 60.0  # reading the whole body
    keepalive_timeout_s: float = 75.0  # idle keep-alive connection
    max_connections: int = 4096  # open client connections; more are answered 503 and closed
    max_connections_per_client: int = 1024  # from one source IP; 0: no per-client cap
    max_body_bytes: int = 64 * 1024 * 1024
    # Request-body bytes held at once across all connections (a body counts until its request
    # ends: it is kept for a retry); past it, 503. Why: 8 bodies of 60 MB took RSS to 1.2 GB.
    max_buffered_body_bytes: int = 256 * 1024 * 1024
    # A client that takes no bytes of a response for this long is cut off (0: never). Why: a
    # relay that cannot write stops reading its upstream, so a client that stops reading would
    # hold an engine's sequence and KV cache until TCP gives up. Like nginx's send_timeout
    # (60 s by default there too), it bounds one write, not the whole response.
    write_timeout_s: float = 60.0
    # Routing on the engines' KV-cache events (kvindex.py; off by default)
    kv_events: KVEventsOptions = field(default_factory=KVEventsOptions)
    # LoRA adapters loaded at run time (lora.py, adapters.py; the names come from set_adapters)
    adapters: lr.Options = field(default_factory=lr.Options)

    @property
    def health(self) -> hl.HealthConfig:
        return hl.HealthConfig(
            eject_after=self.eject_after,
            base_s=self.eject_base_s,
            max_s=self.eject_max_s,
            max_ejection_percent=self.max_ejection_percent,
        )


@dataclass
class _Parsed:
    text_chars: int
    request: st.Request
    stream: bool
    kv_keys: list[int] | None = None  # the prompt's engine block keys (KV-event routing)
    kv_block_size: int = 0
    adapter: str | None = None  # the LoRA adapter the request names (adapters.py)
    adapter_retry: bool = False  # an engine's 404 for it: re-place and retry (not relay)


@dataclass
class Pick:
    """A request picked for another proxy to send (`Router.pick`): its backends in order, primary
    first, and the load it holds here until `Router.finish_pick`."""

    backends: list[str]
    strategy: str
    request: st.Request
    ticket: st.Ticket
    pool: str
    adapter: str | None = None
    done: bool = False
    # the prefix blocks the pick added to the primary's memory (taken back if another served it)
    fresh_blocks: tuple[int, ...] = ()


def tokenize_body(path: str, body: Mapping[str, Any]) -> dict[str, Any] | list[int] | None:
    """What to ask an engine's ``POST /tokenize`` so that its ids are the ones the request will be
    served with: the chat fields that change the rendering, or the completion's prompt. A prompt
    given as token ids is its own answer (the list); None when there is no one prompt to tokenize
    (a batch of prompts, or a body the engine will refuse anyway)."""
    if path.endswith("/chat/completions"):
        if not isinstance(body.get("messages"), list):
            return None
        keep = (
            "model",
            "messages",
            "add_generation_prompt",
            "continue_final_message",
            "add_special_tokens",
            "chat_template",
            "chat_template_kwargs",
            "tools",
            "mm_processor_kwargs",
        )
        return {k: body[k] for k in keep if k in body}
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and all(type(x) is int for x in prompt):
        return cast(list[int], prompt)
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        return None
    out: dict[str, Any] = {"prompt": prompt}
    for k in ("model", "add_special_tokens"):
        if k in body:
            out[k] = body[k]
    return out


def _part_text(content: object) -> str:
    """Text of a message's `content`: a string, or the string `text` of its parts (others skipped)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(t for p in content if isinstance(p, Mapping) and isinstance(t := p.get("text"), str))
    return ""


def _prompt_text(path: str, body: Mapping[str, Any]) -> tuple[str, int | None]:
    """Text whose prefix the engine caches, in order; plus an exact token count when given ids.

    Tolerant of any JSON: routing must not fail on a body the engine will reject with a 400.
    """
    if path.endswith("/chat/completions"):
        out: list[str] = []
        messages = body.get("messages")
        for m in messages if isinstance(messages, list) else ():
            if not isinstance(m, Mapping):
                continue
            role = m.get("role")
            out.append(f"{role if isinstance(role, str) else ''}\n{_part_text(m.get('content'))}\n")
        return "".join(out), None
    prompt = body.get("prompt", "")
    if isinstance(prompt, str):
        return prompt, None
    if isinstance(prompt, list) and prompt and all(type(x) is int for x in prompt):
        return " ".join(map(str, prompt)), len(prompt)
    if isinstance(prompt, list):
        return "".join(x for x in prompt if isinstance(x, str)), None
    return "", None


def _affinity_root(path: str, body: Mapping[str, Any], text: str, block_chars: int) -> str:
    """The part of a prompt that every turn of its conversation repeats: the routing home's key.

    Chat: the messages up to and including the first one that is not a system or developer
    message (the system prompt alone is shared by many conversations and would pile them on one
    backend). Completions carry no turns, so their first block stands in.
    """
    if path.endswith("/chat/completions"):
        messages = body.get("messages")
        out: list[str] = []
        for m in messages if isinstance(messages, list) else ():
            if not isinstance(m, Mapping):
                continue
            role = m.get("role")
            out.append(f"{role if isinstance(role, str) else ''}\n{_part_text(m.get('content'))}\n")
            if role not in ("system", "developer"):
                break
        return "".join(out)
    return text[:block_chars]


def _bounded_int(v: object, bound: int) -> int | None:
    """A positive JSON integer (not a bool), clamped to `bound`; None otherwise."""
    if type(v) is not int or v <= 0:
        return None
    return min(v, bound)


def parse_request(
    path: str,
    body: Mapping[str, Any],
    headers: Mapping[str, str],
    est: st.TokenEstimator,
    cfg: RouterConfig,
    need_hashes: bool = True,
) -> _Parsed:
    text, exact = _prompt_text(path, body)
    mt = _bounded_int(body.get("max_completion_tokens"), MAX_TOKENS_BOUND) or _bounded_int(
        body.get("max_tokens"), MAX_TOKENS_BOUND
    )
    max_tokens = mt or cfg.default_max_tokens
    n = _bounded_int(body.get("n"), MAX_N_BOUND)
    if n is not None and n > 1:
        max_tokens *= n
    user = body.get("user")
    # Any length is fine here: the session table stores a fixed-size digest of it.
    session = headers.get(cfg.session_header) or (user if isinstance(user, str) and user else None)
    prompt_tokens = exact if exact is not None else est.estimate(len(text))
    hashes = st.block_hashes(text, cfg.block_chars) if need_hashes else ()
    affinity, affinity_blocks = None, 0
    if need_hashes and text and cfg.routing.w_home > 0:  # homes are opt-in: no digest otherwise
        root = _affinity_root(path, body, text, cfg.block_chars)
        affinity, affinity_blocks = st.affinity_key(root), len(root) // cfg.block_chars
    req = st.Request(prompt_tokens, max_tokens, hashes, session, affinity, affinity_blocks)
    return _Parsed(len(text), req, lax_bool(body.get("stream")))


def parse_kv_capacity(text: str) -> int | None:
    """Tokens the engine's KV cache holds (`num_gpu_blocks` x `block_size` of vLLM's
    `vllm:cache_config_info`), or None when the page does not say."""
    for line in text.splitlines():
        if not line.startswith("vllm:cache_config_info{"):
            continue
        labels = dict(
            kv.split("=", 1) for kv in line[line.index("{") + 1 : line.rindex("}")].split(",") if "=" in kv
        )
        try:
            blocks = int(labels.get("num_gpu_blocks", "").strip('"'))
            size = int(labels.get("block_size", "").strip('"'))
        except ValueError:
            return None
        return blocks * size if blocks > 0 and size > 0 else None
    return None


def parse_block_size(text: str) -> int | None:
    """The engine's KV block size in tokens (``block_size`` of `vllm:cache_config_info`)."""
    for line in text.splitlines():
        if line.startswith("vllm:cache_config_info{"):
            for kv in line[line.index("{") + 1 : line.rindex("}")].split(","):
                name, _, value = kv.partition("=")
                if name.strip() == "block_size":
                    try:
                        size = int(value.strip().strip('"'))
                    except ValueError:
                        return None
                    return size if size > 0 else None
    return None


def parse_engine_metrics(text: str) -> tuple[float | None, int | None]:
    """(kv_cache_usage 0..1, requests waiting) from a vLLM /metrics page, summed over label sets
    (KV usage: the highest). Accepts the older `vllm:gpu_cache_usage_perc` name too. The probe
    loop reads the whole `demand.parse_engine_page` (token counters, running requests)."""
    page = dm.parse_engine_page(text)
    return page.kv_usage, page.waiting


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
        self.lora = lr.LoraMetrics(r)
        r.register(_BackendCollector(router))
        # What the client-facing port serves: the same metrics without the `backend` label, whose
        # values are pod addresses (the full registry is served on --metrics-port only).
        self.public = CollectorRegistry(auto_describe=False)
        self.public.register(_WithoutBackend(r))
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}

    def child(self, metric: Any, *values: str) -> Any:
        """`metric.labels(*values)`, remembered: prometheus_client's lookup (lock, tuple, dict) is
        a measurable share of a short request's CPU. The label sets are the ones Prometheus keeps
        anyway (backends x strategies x codes), so the cache holds no more than the registry."""
        key = (id(metric), values)
        c = self._children.get(key)
        if c is None:
            c = self._children[key] = metric.labels(*values)
        return c


class _WithoutBackend(Collector):
    """A registry's metrics with the `backend` label dropped, its series merged: summed (counts,
    loads, healthy backends), the highest KV usage, the earliest `_created` timestamp."""

    _HIGHEST = frozenset({"toposerve_router_backend_kv_cache_usage"})

    def __init__(self, full: CollectorRegistry) -> None:
        self.full = full

    def collect(self) -> Iterator[Metric]:
        for fam in self.full.collect():
            if not any("backend" in s.labels for s in fam.samples):
                yield fam
                continue
            merged: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
            for smp in fam.samples:
                key = (smp.name, tuple((k, v) for k, v in smp.labels.items() if k != "backend"))
                old = merged.get(key)
                if old is None:
                    merged[key] = smp.value
                elif smp.name.endswith("_created"):
                    merged[key] = min(old, smp.value)
                elif fam.name in self._HIGHEST:
                    merged[key] = max(old, smp.value)
                else:
                    merged[key] = old + smp.value
            out = Metric(fam.name, fam.documentation, fam.type, fam.unit)
            for (name, labels), value in merged.items():
                out.add_sample(name, dict(labels), value)
            yield out


class _BackendCollector(Collector):
    """Per-backend load read at scrape time, so the hot path updates no gauges."""

    def __init__(self, router: Router) -> None:
        self.router = router

    def collect(self) -> Iterator[Metric]:
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
        yield from _kv_metrics(self.router, now)
        yield from _lora_metrics(self.router)
        g = self.router.gate
        yield GaugeMetricFamily("toposerve_router_connections_open", "Open client connections.", value=g.open)
        yield GaugeMetricFamily(
            "toposerve_router_held_requests",
            "Requests held for a replica to appear (scale from zero; the autoscaler reads it).",
            value=self.router.held,
        )
        for name, help_, value in (
            ("connections_refused", "Connections refused at --max-connections.", g.refused),
            ("header_timeouts", "Connections closed for slow request headers.", g.header_timeouts),
            (
                "write_timeouts",
                "Connections closed for a client that took no response bytes.",
                g.write_timeouts,
            ),
            ("bad_http_requests", "Malformed HTTP requests answered 4xx.", g.bad_http),
        ):
            yield CounterMetricFamily(f"toposerve_router_{name}", help_, value=value)
        yield CounterMetricFamily(
            "toposerve_router_client_connections_refused",
            "Connections refused at --max-connections-per-client (one source IP's share).",
            value=g.refused_per_client,
        )
        yield CounterMetricFamily(
            "toposerve_router_body_budget_refused",
            "Requests answered 503 at --max-buffered-body-bytes.",
            value=self.router.bodies.refused,
        )
        yield GaugeMetricFamily(
            "toposerve_router_buffered_body_bytes",
            "Request-body bytes held now (counted against --max-buffered-body-bytes).",
            value=self.router.bodies.used,
        )
        yield from _demand_metrics(self.router, now)


def _kv_metrics(router: Router, now: float) -> Iterator[Metric]:
    """KV-event routing (docs/router.md, "Routing on KV-cache events"); nothing when it is off.
    Per-backend gauges: the client port serves them summed (stale engines, blocks indexed)."""
    kv = router.kvindex
    if kv is None:
        return
    stale = GaugeMetricFamily(
        "toposerve_router_kv_index_stale",
        "1 while the backend's KV-event index is not trusted (routing uses the approximation).",
        labels=["backend"],
    )
    blocks = GaugeMetricFamily(
        "toposerve_router_kv_index_blocks",
        "Cached blocks in the backend's KV-event index.",
        labels=["backend"],
    )
    batches = CounterMetricFamily(
        "toposerve_router_kv_index_batches",
        "KV-event batches applied (live and replayed).",
        labels=["backend"],
    )
    resyncs = CounterMetricFamily(
        "toposerve_router_kv_index_resyncs",
        "Catch-ups through the replay socket, by cause (gap, restart, reconnect, rebuild).",
        labels=["backend", "kind"],
    )
    for url, feed in list(kv.feeds.items()):
        stale.add_metric([url], 1.0 if feed.stale(now) else 0.0)
        blocks.add_metric([url], len(feed.index))
        batches.add_metric([url], feed.batches)
        for kind, n in feed.resyncs.items():
            resyncs.add_metric([url, kind], n)
    yield from (stale, blocks, batches, resyncs)
    fallbacks = CounterMetricFamily(
        "toposerve_router_kv_index_fallbacks",
        "Requests scored (wholly or for some backends) on the approximate prefix index, by why.",
        labels=["reason"],
    )
    for reason, n in kv.fallbacks.items():
        fallbacks.add_metric([reason], n)
    yield fallbacks


def _lora_metrics(router: Router) -> Iterator[Metric]:
    """Adapters per backend (docs/router.md, "LoRA adapters"); nothing while none is in play."""
    lora: lr.AdapterManager | None = getattr(router, "lora", None)  # None: while it is built
    if lora is None or not lora.active:
        return
    held = GaugeMetricFamily(
        "toposerve_router_backend_lora_adapters",
        "Adapters registered on the backend, as the router last saw them.",
        labels=["backend"],
    )
    slots = GaugeMetricFamily(
        "toposerve_router_backend_lora_slots",
        "Adapters the router keeps registered on the backend at most (--adapter-slots or max_lora).",
        labels=["backend"],
    )
    for url in list(router.backends):
        e = lora.engines.get(url)
        held.add_metric([url], len(e.registered) if e is not None else 0)
        slots.add_metric([url], lora.slots(url))
    yield from (held, slots)
    yield GaugeMetricFamily(
        "toposerve_router_lora_adapters", "Adapters in the router's spec.", value=len(lora.spec)
    )


_ARRIVAL_GAUGES = (
    ("requests", "Requests that entered routing per second (held and queued ones included)."),
    ("prompt_tokens", "Prompt tokens (the router's estimate) of those requests per second."),
    ("decode_tokens", "Expected decode tokens (max_tokens as routed, x n, capped) per second."),
)


def _demand_metrics(router: Router, now: float) -> Iterator[Metric]:
    """The autoscaler's leading signal, per pool (docs/router.md, "Demand metrics"). No backend
    label: served as is on the client port. O(pools x window) per scrape."""
    ready: dict[str, int] = {}
    for b in list(router.backends.values()):
        ready[b.spec.pool] = ready.get(b.spec.pool, 0) + (1 if b.healthy(now) and not b.draining else 0)
    demand, service = router.demand, router.service
    demand.prune(now, ready)
    service.prune(now, ready)
    pools = sorted(set(ready) | set(demand.pools))
    gauges = {
        kind: GaugeMetricFamily(
            f"toposerve_router_arrival_{kind}_per_second", help_, labels=["pool", "window"]
        )
        for kind, help_ in _ARRIVAL_GAUGES
    }
    counters = {
        "requests": CounterMetricFamily(
            "toposerve_router_arrivals", "Requests that entered routing, cumulative.", labels=["pool"]
        ),
        "prompt_tokens": CounterMetricFamily(
            "toposerve_router_arrival_prompt_tokens",
            "Prompt tokens of arrivals, cumulative.",
            labels=["pool"],
        ),
        "decode_tokens": CounterMetricFamily(
            "toposerve_router_arrival_decode_tokens",
            "Expected decode tokens of arrivals, cumulative.",
            labels=["pool"],
        ),
    }
    in_flight = GaugeMetricFamily(
        "toposerve_router_in_flight_requests",
        "Requests sent to an engine of the pool and not finished.",
        labels=["pool"],
    )
    in_flight_tokens = GaugeMetricFamily(
        "toposerve_router_in_flight_tokens",
        "Prompt + expected decode tokens of the pool's in-flight requests.",
        labels=["pool"],
    )
    replicas = GaugeMetricFamily(
        "toposerve_router_pool_ready_replicas",
        "Backends of the pool that take new requests (probe-healthy, not ejected, not draining).",
        labels=["pool"],
    )
    for pool in pools:
        for w in dm.WINDOWS:
            r = demand.rates(pool, w, now)
            lab = [pool, f"{w}s"]
            gauges["requests"].add_metric(lab, r.requests)
            gauges["prompt_tokens"].add_metric(lab, r.prompt_tokens)
            gauges["decode_tokens"].add_metric(lab, r.decode_tokens)
        p = demand.pools.get(pool)
        counters["requests"].add_metric([pool], p.requests if p else 0)
        counters["prompt_tokens"].add_metric([pool], p.prompt_tokens if p else 0)
        counters["decode_tokens"].add_metric([pool], p.decode_tokens if p else 0)
        in_flight.add_metric([pool], p.in_flight if p else 0)
        in_flight_tokens.add_metric([pool], p.in_flight_tokens if p else 0)
        replicas.add_metric([pool], ready.get(pool, 0))
    yield from gauges.values()
    yield from counters.values()
    yield from (in_flight, in_flight_tokens, replicas)
    yield GaugeMetricFamily(
        "toposerve_router_queued_requests",
        "Requests waiting because every eligible backend is saturated (one queue per router).",
        value=router.queued,
    )
    window = [f"{service.window}s"]
    decode = GaugeMetricFamily(
        "toposerve_router_pool_decode_tokens_per_second_per_replica",
        "vllm:generation_tokens_total rate per ready replica (mean over replica-seconds polled).",
        labels=["pool", "window"],
    )
    prompt = GaugeMetricFamily(
        "toposerve_router_pool_prompt_tokens_per_second_per_replica",
        "vllm:prompt_tokens_total rate per ready replica (mean over replica-seconds polled).",
        labels=["pool", "window"],
    )
    running = GaugeMetricFamily(
        "toposerve_router_pool_running_requests_per_replica",
        "Mean vllm:num_requests_running over the intervals the decode rate was measured in.",
        labels=["pool", "window"],
    )
    seconds = GaugeMetricFamily(
        "toposerve_router_pool_observed_replica_seconds",
        "Replica-seconds of engine counter intervals behind the service-rate figures.",
        labels=["pool", "window"],
    )
    for pool in sorted(service.pools):
        sr = service.rate(pool, now)
        if sr is None:  # nothing known is not 0 tokens/s
            continue
        decode.add_metric([pool, *window], sr.decode_tokens_per_replica)
        seconds.add_metric([pool, *window], sr.replica_seconds)
        if sr.prompt_tokens_per_replica is not None:
            prompt.add_metric([pool, *window], sr.prompt_tokens_per_replica)
        if sr.running_per_replica is not None:
            running.add_metric([pool, *window], sr.running_per_replica)
    yield from (decode, prompt, running, seconds)


class _Retryable(Exception):
    def __init__(self, kind: str, status: int = 502, body: bytes | None = None) -> None:
        super().__init__(kind)
        self.kind = kind
        self.status = status
        self.body = body


class _GatewayTimeout(Exception):
    pass


class _AdapterMissing(Exception):
    """The engine answered 404 "does not exist" for the request's adapter: it no longer holds it
    (it restarted, or another router replica unloaded it)."""

    def __init__(self, body: bytes) -> None:
        super().__init__("adapter missing")
        self.body = body


class _RelayResponse(web.StreamResponse):
    """A StreamResponse whose status line and headers leave with the first body bytes, in one
    socket write instead of two (aiohttp's own `web.Response` does the same for whole bodies).
    On an aiohttp without the switch the headers go out at `prepare`, as before."""

    _send_headers_immediately = False


_SSE_DONE = b"data: [DONE]\n\n"  # the OpenAI stream's last event: nothing may follow it


def _ends_stream(chunk: bytes) -> bool:
    """True when `chunk` ends with a whole `data: [DONE]` event (at its start or after an event
    boundary; JSON events escape their newlines, so no event's text can end this way)."""
    return chunk == _SSE_DONE or chunk.endswith(b"\n\n" + _SSE_DONE)


@dataclass
class _Held:
    """Bytes of the body budget one request holds (given back when it ends)."""

    bytes: int = 0


class _BodyRefused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


_DECODED = frozenset({"gzip", "deflate", "br", "zstd"})  # what aiohttp's parser inflates


def _inflated(headers: CIMultiDictProxy[str]) -> bool:
    """Whether aiohttp's parser inflated the request body (it does for one of `_DECODED`)."""
    return any(v.isascii() and v.strip().lower() in _DECODED for v in headers.getall("Content-Encoding", ()))


async def _answer_and_close(request: web.Request, resp: web.Response) -> web.Response:
    """Send `resp` and close the connection now. Why: with a request body unread, aiohttp would
    otherwise linger (up to 10 s) reading it before closing."""
    resp.force_close()
    await resp.prepare(request)
    await resp.write_eof()
    if request.protocol is not None:
        request.protocol.force_close()
    return resp


def _payload_error_message(request: web.Request, e: RequestPayloadError) -> str:
    """What was wrong with a body aiohttp could not read, for the client's 400."""
    if isinstance(e.__cause__, ContentEncodingError):
        enc = request.headers.get("Content-Encoding", "?")
        return f"invalid {enc[:32]} body: it could not be decoded as Content-Encoding {enc[:32]}"
    return " ".join(f"invalid request body: {str(e)[:256]}".split())


_STARTED = web.RequestKey("toposerve_started", bool)  # response headers are out (or will be)
# What the relay saw of one request, for the gateway's per-model metrics (gateway.py)
TTFT_KEY = web.RequestKey("toposerve_ttft", float)  # seconds to the first response bytes
USAGE_KEY = web.RequestKey("toposerve_usage", tuple)  # (prompt, completion) tokens the engine reported
_ERROR_BODY_MAX = 64 * 1024  # of an upstream 5xx body kept to pass on
_USAGE_BODY_MAX = 4 << 20  # of a non-streamed body kept to learn the usage from
_USAGE_TAIL = 4096  # of a stream's end kept for its usage event (~250 bytes) and [DONE]


class Router:
    """Holds backends, routing memory and the ledger; serves the OpenAI-compatible API."""

    def __init__(
        self, backends: Iterable[BackendSpec], cfg: RouterConfig | None = None, discovering: bool = False
    ) -> None:
        self.cfg = cfg or RouterConfig()
        # With discovery: not ready until its first answer (reconcile). A router that took clients
        # before it knew its engines would answer each one 503 (seen when a new router replica
        # joined its Service under load, tests/cluster/test_production.py).
        self.discovering = discovering
        if self.cfg.strategy not in st.STRATEGIES:
            raise ValueError(f"unknown strategy {self.cfg.strategy!r}; known: {', '.join(st.STRATEGIES)}")
        self.backends: dict[str, Backend] = {b.url: Backend(b) for b in backends}
        self.ledger = st.LoadLedger()
        self.memory = st.RoutingMemory()
        self.estimator = st.TokenEstimator()
        self.gate = Gate(
            Limits(
                header_timeout_s=self.cfg.header_timeout_s,
                keepalive_timeout_s=self.cfg.keepalive_timeout_s,
                max_connections=self.cfg.max_connections,
                max_connections_per_client=self.cfg.max_connections_per_client,
            )
        )
        self.bodies = BodyBudget(self.cfg.max_buffered_body_bytes)
        self.held = 0  # requests waiting for a replica to exist (scale from zero)
        self.queued = 0  # requests waiting because every eligible backend is saturated
        # The autoscaler's leading signal (demand.py, docs/router.md "Demand metrics"): arrivals
        # and in-flight work per pool, and each pool's service rate from the engines' counters.
        self.demand = dm.Demand(time.monotonic())
        # the engines' real caches from their KV-cache events (None: off, the approximation only)
        self.kvindex: KVIndex | None = None
        self._tokenize_rr = 0
        self.service = dm.ServiceRates(max_gap_s=max(10.0, 5 * self.cfg.probe_interval_s))
        self._backends_changed = asyncio.Event()
        self.metrics = _Metrics(self)
        # LoRA adapters: what each engine holds, loads and unloads (lora.py)
        self.lora = lr.AdapterManager(self.cfg.adapters, self.metrics.lora)
        self._session: aiohttp.ClientSession | None = None
        # the completions' upstream client (upstream.py); probes and /v1/models use _session
        self._upstream: UpstreamPool | None = None
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._probe_task: asyncio.Task[None] | None = None
        self._probe_wakeup = asyncio.Event()
        # client transport -> when the relay's pending write to it began (write deadline)
        self._writing: dict[asyncio.BaseTransport, float] = {}
        self._watchdog: asyncio.Task[None] | None = None
        # Shutdown (begin_drain): requests being handled, and when the last one came in.
        self.active = 0
        self.last_request = time.monotonic()
        self.draining = False

    # ---------------------------------------------------------------------------------- shutdown

    def begin_drain(self) -> None:
        """SIGTERM: stop being ready (/health 503) and answer every request from now on with
        ``Connection: close``, so clients on a kept-alive connection leave after their answer
        instead of finding it closed under a new request. Requests keep being served, new
        connections too (a Service may still send some until its endpoints catch up)."""
        self.draining = True

    async def drained(self, quiet_s: float, timeout_s: float, poll_s: float = 0.1) -> bool:
        """Wait until nothing is in flight and no request came for ``quiet_s`` (an idle kept-alive
        connection the router then closes is one its client has not used for that long: httpx's
        default keep-alive expiry is 5 s), or ``timeout_s`` passed. True when drained in time."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while loop.time() < deadline:
            if self.active == 0 and time.monotonic() - self.last_request >= quiet_s:
                return True
            await asyncio.sleep(poll_s)
        return self.active == 0

    # ---------------------------------------------------------------------------------- adapters

    def set_adapters(self, adapters: Mapping[str, str]) -> None:
        """The LoRA adapters this router serves: name -> path as the engines read it (callable at
        any time: `--adapter` flags, the gateway's watches). A request whose ``model`` is one of
        them is placed on a replica holding it, loaded where none does (docs/router.md, "LoRA
        adapters"). A name dropped here is answered 404 from now on and unloaded from the
        engines once this router's requests on it there have ended; nothing in flight is cut."""
        self.lora.set_spec(adapters)
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # before start: the first probes do the upkeep
            return
        for url in list(self.backends):
            self._adapter_upkeep(url)

    def _adapter_states(self, exclude: Iterable[str]) -> list[ad.ReplicaState]:
        return [
            self.lora.state(s.id, st.is_eligible(s), s.in_flight / max(s.weight, 1e-9))
            for s in self.snapshot(exclude)
        ]

    def _adapter_upkeep(self, url: str) -> None:
        b = self.backends.get(url)
        if b is None or not self.lora.active:
            return
        now = time.monotonic()
        weight = b.spec.weight if self.cfg.gpu_weighting else 1.0
        load = self.ledger.in_flight(url) / max(weight, 1e-9)
        self.lora.upkeep(url, b.healthy(now) and not b.draining, load)

    async def _refresh_adapters(self, b: Backend) -> None:
        """Re-read which adapters the engine holds (every ``refresh_s``), then unload what it
        should not hold and register again what it lost."""
        assert self._session is not None
        url = b.spec.url
        now = time.monotonic()
        if self.lora.due(url, now):
            listing = await lr.read_models(self._session, url, self.cfg.probe_timeout_s)
            if listing is not None:
                self.lora.observe_models(url, listing, now)
        self._adapter_upkeep(url)

    async def _place_adapter(
        self, name: str, exclude: set[str], first: bool
    ) -> tuple[str, ...] | web.Response:
        """The replicas a request for adapter `name` may go to, loading it first where none
        holds it (adapters.place); or the error to answer. A failed load tries one other
        replica; with every slot pinned by requests in flight, it waits up to the queue timeout."""
        outcome = self.metrics.lora.requests
        deadline = time.monotonic() + self.cfg.queue_timeout_s
        failed: dict[str, lr.CallResult] = {}
        while True:
            if name not in self.lora.spec:  # removed while this request waited
                msg = f"The model `{name}` does not exist."
                return self._error(404, msg, "adapter_not_found", body=error_body(404, msg, "model"))
            p = self.lora.place(name, self._adapter_states(exclude | set(failed)))
            if (
                p.action == ad.LOAD
                and not failed
                and (recent := self.lora.recent_failure(name, time.monotonic()))
            ):
                failed["(recent)"] = recent  # its source is broken: the same answer, no new load
                break
            if p.action == ad.ROUTE:
                if p.load_on is not None:
                    self.lora.spread(p.load_on, name)
                if first:
                    self.metrics.child(outcome, "hit").inc()
                return p.targets
            if p.action == ad.LOAD:
                assert p.load_on is not None
                res = await self.lora.ensure(p.load_on, name, p.evict, lr.L_REQUEST)
                if res.ok:
                    if first:
                        self.metrics.child(outcome, "load").inc()
                    return (p.load_on,)
                failed[p.load_on] = res
                if len(failed) < 2:
                    continue
                break
            if p.reason == ad.P_NO_REPLICA and not failed:
                if self.cfg.hold_at_zero_s > 0 and not exclude:
                    refused = await self._hold(set(), self.cfg.hold_at_zero_s)
                    if refused is None:
                        continue
                    self.metrics.child(outcome, "unavailable").inc()
                    return refused
                self.metrics.child(outcome, "unavailable").inc()
                return self._error(503, "no healthy backend", "no_backend", retry_after=True)
            left = deadline - time.monotonic()
            if p.reason == ad.P_NO_SLOT and left > 0:
                await self.lora.changed(min(left, self.cfg.probe_interval_s))
                continue
            break
        if failed:
            self.metrics.child(outcome, "failed").inc()
            res = list(failed.values())[-1]
            status = res.status if 400 <= res.status < 600 else 502
            if res.body is not None:  # the engine's own error (vLLM's status and message)
                return self._error(
                    status, f"adapter {name} load failed: {res.message}", "adapter_load", body=res.body
                )
            msg = f"LoRA adapter `{name}` could not be loaded: {res.message}"
            return self._error(status, msg, "adapter_load", body=error_body(status, msg, "model"))
        self.metrics.child(outcome, "unavailable").inc()
        msg = f"no adapter slot is free for `{name}`: every replica's adapters serve requests in flight"
        return self._error(503, msg, "adapter_no_slot", retry_after=True)

    # ---------------------------------------------------------------------------------- backend set

    def reconcile(self, desired: Mapping[str, tuple[BackendSpec, bool]]) -> None:
        """Apply discovery's view: url -> (spec, draining). Gone backends drain, then disappear."""
        self.discovering = False
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
        self._sync_kv()
        self._wake_waiters()
        self._wake_held()

    def _drop_if_idle(self, url: str) -> None:
        b = self.backends.get(url)
        if b is not None and b.removed and self.ledger.in_flight(url) == 0:
            del self.backends[url]
            self.memory.prefix.forget(url)
            self.lora.forget(url)
            self.service.forget(url)
            self._sync_kv()

    async def set_kv_events(self, enabled: bool) -> None:
        """Turn routing on the engines' KV events on or off while running (a gateway member whose
        deployment's spec.routing.kvEvents changed): a new index subscribes to every backend and
        catches up by replay; turning it off closes the subscriptions and scores as before."""
        self.cfg = replace(self.cfg, kv_events=replace(self.cfg.kv_events, enabled=enabled))
        if enabled and self.kvindex is None and self._session is not None:
            self.kvindex = KVIndex(self.cfg.kv_events)
            self._sync_kv()
        elif not enabled and self.kvindex is not None:
            kvindex, self.kvindex = self.kvindex, None
            await kvindex.close()

    def _sync_kv(self) -> None:
        """Subscribe to every backend's KV events, and only to those (once started)."""
        if self.kvindex is not None:
            self.kvindex.sync({u: b.spec for u, b in self.backends.items()})

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

    def _in_service(self) -> list[str]:
        """Backends that would take traffic but for ejection: the base of the ejection cap."""
        return [u for u, b in self.backends.items() if b.health.probe_ok and not b.draining]

    def _record_failure(self, url: str, kind: str) -> None:
        """Count a failure that was blamed on the backend (see `health.blame`)."""
        b = self.backends.get(url)
        if b is None:
            return
        states = {u: x.health for u, x in self.backends.items()}
        hold = hl.record_failure(states, self._in_service(), url, kind, time.monotonic(), self.cfg.health)
        if hold is not None:
            self.metrics.ejections.labels(url).inc()
            log.warning("ejected %s for %.1fs after %s", url, hold, kind)

    def _record_success(self, url: str) -> None:
        b = self.backends.get(url)
        if b is not None:
            hl.record_success(b.health, time.monotonic())

    def _settle(self, attempts: list[tuple[str, str]]) -> None:
        """Blame or clear each backend a request tried, once its attempts are known."""
        for (url, outcome), blamed in zip(attempts, hl.blame([o for _, o in attempts]), strict=True):
            if outcome in (hl.OK, hl.CLIENT_ERROR):
                self._record_success(url)
            elif blamed and outcome != hl.UNREACHABLE:  # unreachable was counted when it happened
                self._record_failure(url, outcome)

    async def _probe_one(self, b: Backend) -> None:
        assert self._session is not None
        url = b.spec.url
        timeout = aiohttp.ClientTimeout(total=self.cfg.probe_timeout_s)
        timed_out = False
        try:
            async with self._session.get(url + "/health", timeout=timeout) as r:
                await r.read()
                ok = r.status == 200
        except TimeoutError:
            ok, timed_out = False, True
        except (aiohttp.ClientError, OSError):
            ok = False
        if hl.record_probe(b.health, ok, time.monotonic(), timed_out):
            log.info("re-admitted %s: its /health probe passes again", url)
        if not ok:
            return
        try:
            async with self._session.get(url + "/metrics", timeout=timeout) as r:
                if r.status == 200:
                    text = await r.text()
                    page = dm.parse_engine_page(text)
                    b.kv_capacity_tokens = parse_kv_capacity(text) or b.kv_capacity_tokens
                    b.kv_block_size = parse_block_size(text) or b.kv_block_size
                    if page.kv_usage is not None:
                        b.kv_usage = page.kv_usage
                    if page.waiting is not None:
                        b.waiting = page.waiting
                    if self.lora.active:
                        self.lora.observe_metrics(url, text)
                    now = time.monotonic()
                    ready = b.healthy(now) and not b.draining
                    self.service.observe(url, b.spec.pool, now, page, ready)
        except (TimeoutError, aiohttp.ClientError, OSError, UnicodeDecodeError):
            pass
        if self.lora.active:
            await self._refresh_adapters(b)

    async def probe_all(self) -> None:
        await asyncio.gather(*(self._probe_one(b) for b in list(self.backends.values())))
        self._wake_waiters()
        self._wake_held()

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
            # a proxy must not keep one client's cookies for the next (nor pay for a jar per request)
            cookie_jar=aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=self.cfg.connect_timeout_s, sock_read=self.cfg.read_timeout_s
            ),
            skip_auto_headers=("User-Agent",),
        )
        self._upstream = UpstreamPool(
            self.cfg.connect_timeout_s, self.cfg.read_timeout_s, self.cfg.upstream_keepalive_s
        )
        self._upstream.start()
        self.lora.session = self._session
        if self.cfg.kv_events.enabled and self.kvindex is None:
            self.kvindex = KVIndex(self.cfg.kv_events)
            self._sync_kv()
        if probe:
            self._probe_task = asyncio.create_task(self._probe_loop())
        if self.cfg.write_timeout_s > 0:
            self._watchdog = asyncio.create_task(self._write_watchdog())

    async def stop(self) -> None:
        for task in (self._probe_task, self._watchdog):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.lora.close()
        if self._session is not None:
            await self._session.close()
        if self._upstream is not None:
            await self._upstream.close()
        if self.kvindex is not None:
            kvindex, self.kvindex = self.kvindex, None
            await kvindex.close()

    async def _write_watchdog(self) -> None:
        """Abort client connections whose pending write is older than ``write_timeout_s``.

        One sweep for all streams instead of a timer per write: the relay only stamps the time
        before a write and clears it after (no task or timer per chunk on the hot path). The
        abort ends the relay's write with an error, which closes the upstream response, so the
        engine sees its client go and frees the sequence."""
        limit = self.cfg.write_timeout_s
        period = min(1.0, max(limit / 4, 0.01))
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            stalled = [t for t, since in self._writing.items() if now - since > limit]
            for transport in stalled:
                del self._writing[transport]
                self.gate.write_timeouts += 1
                peer = transport.get_extra_info("peername")
                log.info("client %s took no response bytes for %gs: connection closed", peer, limit)
                cast(asyncio.Transport, transport).abort()

    def app(self, probe: bool = True) -> web.Application:
        app = web.Application(client_max_size=self.cfg.max_body_bytes, middlewares=[self._errors])
        app.router.add_post("/v1/chat/completions", self.handle_completion, expect_handler=self._expect)
        app.router.add_post("/v1/completions", self.handle_completion, expect_handler=self._expect)
        app.router.add_get("/v1/models", self.handle_models)
        app.router.add_get("/health", self.handle_health)
        app.router.add_get("/metrics", self.handle_metrics)

        async def _closing(request: web.Request, response: web.StreamResponse) -> None:
            # HTTP/1.0 has no chunked coding: an answer of unknown length (a stream) ends only
            # with the connection. aiohttp 3.14 says so in no header and keeps the connection
            # (its local keep_alive=False is computed after it stored the flag), so the client
            # waited out the keep-alive timeout after [DONE].
            unframed = request.version < aiohttp.HttpVersion11 and response.content_length is None
            if self.draining or unframed:  # the client reconnects (elsewhere) after this answer
                response.force_close()
                # aiohttp 3.14 closes after the answer without saying so; said, a client does
                # not pick the connection for its next request in the meantime (RFC 9112 9.6)
                response.headers["Connection"] = "close"

        app.on_response_prepare.append(_closing)

        async def _startup(_: web.Application) -> None:
            await self.start(probe)

        async def _cleanup(_: web.Application) -> None:
            await self.stop()

        app.on_startup.append(_startup)
        app.on_cleanup.append(_cleanup)
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Whatever goes wrong before a response starts becomes one JSON error, logged once.
        Also counts the API requests in progress (not probes or scrapes) for the drain."""
        api = request.path.startswith("/v1/")
        if api:
            self.active += 1
            self.last_request = time.monotonic()
        try:
            resp: web.StreamResponse = await handler(request)
            return resp
        except web.HTTPException as e:  # unknown route (404), wrong method (405), body too big (413)
            if e.status < 400:
                raise
            resp = self._error(e.status, f"{e.reason}: {request.method} {request.path}", "http")
            if e.status == 405 and "Allow" in e.headers:
                resp.headers["Allow"] = e.headers["Allow"]
            return resp
        except (asyncio.CancelledError, ConnectionError):
            raise  # the client went away: aiohttp closes quietly
        except Exception:
            if request.get(_STARTED):  # headers are out: nothing to replace them with
                log.exception("router error mid-response on %s %s", request.method, request.path)
                raise ConnectionResetError("response aborted") from None
            log.exception("router error on %s %s", request.method, request.path)
            return self._error(500, "internal router error", "internal", logged=True)
        finally:
            if api:
                self.active -= 1

    # ---------------------------------------------------------------------------------- queueing

    def _wake_held(self) -> None:
        """The backend set or its health changed: every held request looks again."""
        self._backends_changed.set()
        self._backends_changed = asyncio.Event()

    async def _hold(self, exclude: set[str], hold_s: float) -> web.Response | None:
        """No replica can take the request (zero replicas, or none ready yet): wait, bounded in
        time and in count, for one to appear. None when one did; else the 503 to answer."""
        if self.held >= self.cfg.max_held:
            return self._error(
                503, "no replica is ready and the hold queue is full", "hold_full", retry_after=True
            )
        self.held += 1
        deadline = time.monotonic() + hold_s
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    if not self.cfg.hold_at_zero_s:
                        return self._error(503, "no healthy backend", "no_backend", retry_after=True)
                    msg = f"no replica became ready within {hold_s:g}s"
                    return self._error(503, msg, "hold_timeout", retry_after=True)
                changed = self._backends_changed
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(changed.wait(), min(left, self.cfg.probe_interval_s))
                if any(st.is_eligible(b) for b in self.snapshot(exclude)):
                    return None
        finally:
            self.held -= 1

    def _wake_waiters(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return

    def _capacity_blocks(self, url: str) -> int:
        """The backend's KV capacity in the router's prefix blocks (0: unknown)."""
        b = self.backends.get(url)
        if b is None or b.kv_capacity_tokens <= 0:
            return 0
        return max(1, int(b.kv_capacity_tokens * self.estimator.chars_per_token / self.cfg.block_chars))

    def _block_size(self) -> int:
        """The engines' KV block size: the flag, else the first one an engine reported."""
        if self.cfg.kv_events.block_size:
            return self.cfg.kv_events.block_size
        return next((b.kv_block_size for b in self.backends.values() if b.kv_block_size), 0)

    def _kv_request(
        self, req: st.Request, keys: list[int], block_size: int, snap: list[st.BackendState]
    ) -> st.Request:
        """`req` with what the engines' KV events say of its prefix (`st.KVMatch`)."""
        assert self.kvindex is not None
        ids = [b.id for b in snap if st.is_eligible(b)]
        sizes = {u: b.kv_block_size for u, b in self.backends.items()}
        scored = self.kvindex.score(keys, block_size, sizes, ids)
        if scored.stale:
            self.kvindex.fallbacks["stale"] += 1
        return replace(req, kv=st.KVMatch(scored.blocks, scored.matched))

    async def _token_ids(self, path: str, body: Mapping[str, Any], exclude: set[str]) -> list[int] | None:
        """The prompt's token ids from one healthy engine's ``/tokenize`` (the ids it will be
        served with), or None: no engine, no answer within the timeout, or no single prompt."""
        ask = tokenize_body(path, body)
        if ask is None or isinstance(ask, list):
            return ask
        now = time.monotonic()
        urls = [u for u, b in self.backends.items() if b.healthy(now) and not b.draining and u not in exclude]
        if not urls or self._session is None:
            return None
        self._tokenize_rr += 1
        url = urls[self._tokenize_rr % len(urls)]
        timeout = aiohttp.ClientTimeout(total=self.cfg.kv_events.tokenize_timeout_s)
        try:
            async with self._session.post(url + "/tokenize", json=ask, timeout=timeout) as r:
                if r.status != 200:
                    return None
                doc = await r.json()
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError):
            return None
        tokens = doc.get("tokens") if isinstance(doc, dict) else None
        if not isinstance(tokens, list) or not all(type(t) is int for t in tokens):
            return None
        return cast(list[int], tokens)

    def _arrive(self, pool: str, req: st.Request, now: float) -> None:
        """Count one arrival (demand.py): once per request, when routing first decides, holds,
        queues or refuses it, so held and queued requests count as demand while they wait."""
        self.demand.arrive(pool, req.prompt_tokens, req.max_tokens, now)

    async def _decide(
        self,
        strategy: str,
        req: st.Request,
        exclude: set[str],
        first: bool = True,
        kv_keys: list[int] | None = None,
        kv_block_size: int = 0,
        only: Iterable[str] | None = None,
    ) -> st.Decision | web.Response:
        """A backend for `req`, or the error to answer. `first`: the request's first attempt,
        which counts its arrival (a retry is the same demand). `only`: the backends it may go
        to (an adapter's holders); the strategy chooses among them."""
        deadline = time.monotonic() + self.cfg.queue_timeout_s
        counted = not first
        skip = exclude if only is None else exclude | (self.backends.keys() - set(only))
        while True:
            snap = self.snapshot(skip)
            if not any(st.is_eligible(b) for b in snap):
                if not counted:  # no replica to take it: the pool all known backends share, if one
                    self._arrive(dm.common_pool(b.pool for b in snap), req, time.monotonic())
                    counted = True
                # Scale from zero holds long. Otherwise, while a replica is draining, a first
                # attempt waits up to the queue timeout: a replica handing over to its successor (a
                # rollout, a drain) is marked draining in one EndpointSlice event and its successor
                # may arrive in the next, a gap of milliseconds that must not answer 503 (seen in
                # tests/cluster/test_production.py). No replica at all, or a retry: 503 at once.
                handover = not exclude and any(b.draining for b in self.backends.values())
                hold_s = self.cfg.hold_at_zero_s or (self.cfg.queue_timeout_s if handover else 0.0)
                if hold_s <= 0 or only is not None:  # an adapter's holders went: placed again
                    return self._error(503, "no healthy backend", "no_backend", retry_after=True)
                refused = await self._hold(exclude, hold_s)
                if refused is not None:
                    return refused
                continue
            now = time.monotonic()
            if kv_keys is not None:
                req = self._kv_request(req, kv_keys, kv_block_size, snap)
            d = st.choose(strategy, req, snap, self.memory, self.cfg.routing, now)
            if not counted:
                if d is not None:
                    self._arrive(self.backends[d.backend].spec.pool, req, now)
                else:  # every candidate is saturated: the pool they share, if one
                    eligible = [b for b in snap if st.is_eligible(b)]
                    narrowed, _ = st.long_context_filter(req, eligible, self.cfg.routing)
                    self._arrive(dm.common_pool(b.pool for b in narrowed), req, now)
                counted = True
            if d is not None:
                st.commit(
                    self.memory, strategy, req, d, self.cfg.routing, now, self._capacity_blocks(d.backend)
                )
                if kv_keys and self.kvindex is not None:
                    self.kvindex.routed(d.backend, kv_keys)
                self.metrics.child(self.metrics.decisions, strategy, d.reason).inc()
                return d
            left = deadline - now
            if left <= 0 or len(self._waiters) >= self.cfg.max_queue:
                return self._error(429, "all backends are saturated", "saturated", retry_after=True)
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            self.queued += 1
            try:
                await asyncio.wait_for(fut, min(left, self.cfg.probe_interval_s))
            except TimeoutError:
                pass
            finally:
                self.queued -= 1
                fut.cancel()
                with contextlib.suppress(ValueError):
                    self._waiters.remove(fut)

    def _error(
        self,
        status: int,
        message: str,
        kind: str,
        retry_after: bool = False,
        logged: bool = False,
        body: Mapping[str, Any] | None = None,
    ) -> web.Response:
        """An error answered by the router itself: OpenAI-shaped JSON, counted and logged once."""
        self.metrics.errors.labels("", kind).inc()
        if not logged:
            # 429 is routine load shedding (counted in metrics): DEBUG, or overload floods the log
            level = logging.DEBUG if status == 429 else logging.INFO if status < 500 else logging.WARNING
            log.log(level, "%d %s: %s", status, kind, message)
        headers = {"Retry-After": str(self.cfg.retry_after_s)} if retry_after else None
        return web.json_response(body or error_body(status, message), status=status, headers=headers)

    # ---------------------------------------------------------------------------------- handlers

    async def handle_health(self, request: web.Request) -> web.Response:
        """The router's own readiness: 200 while it can take requests, whatever the backends do.

        Backends going away must not take the router out of its Service: clients then get a 503
        with Retry-After (or, at zero replicas, a held request) instead of a refused connection,
        and neither a fleet emptied by bad input nor a crashed engine can also empty the routers.
        Backend health (active probes only; passive ejection is client-influenced) is in the body
        and in the metrics."""
        healthy = sum(1 for b in self.backends.values() if b.health.probe_ok and not b.draining)
        if self.discovering:  # starting: its engines not known yet
            return web.json_response({"status": "discovering", "healthyBackends": 0}, status=503)
        if self.draining:  # shutting down: out of the Service, still serving what comes
            return web.json_response({"status": "draining", "healthyBackends": healthy}, status=503)
        # Zero healthy backends stays 200 (docs/router.md, "Health"): the status says so.
        body: dict[str, Any] = {"status": "ok" if healthy else "no_backends", "healthyBackends": healthy}
        if self.lora.active:  # each adapter: engines holding it, last load error
            body["adapters"] = self.lora.report()
        return web.json_response(body)

    async def handle_metrics(self, request: web.Request) -> web.Response:
        """The client port's /metrics: no backend addresses (see `_WithoutBackend`)."""
        return web.Response(body=generate_latest(self.metrics.public), content_type="text/plain")

    async def handle_full_metrics(self, request: web.Request) -> web.Response:
        """--metrics-port's /metrics: every series, labelled by backend address."""
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
                    if r.status == 200 and self.lora.active:  # the spec's adapters, as served here
                        with contextlib.suppress(ValueError, RecursionError):
                            return web.json_response(self.lora.model_cards(json.loads(body)))
                    if r.status < 500:
                        return web.Response(body=body, status=r.status, content_type=r.content_type)
            except (TimeoutError, aiohttp.ClientConnectorError):
                self._record_failure(url, hl.UNREACHABLE)
            except (aiohttp.ClientError, OSError):
                pass
        return self._error(503, "no healthy backend", "no_backend", retry_after=True)

    def _body_refusal(self, length: int | None) -> tuple[int, str] | None:
        """(status, message) when a declared body length is refused before a byte of it is read."""
        if length is None:
            return None
        cap = self.bodies.cap
        limit = min(self.cfg.max_body_bytes, cap) if cap > 0 else self.cfg.max_body_bytes
        if length > limit:
            return 413, f"request body of {length} bytes is larger than {limit}"
        if not self.bodies.fits(length):
            return 503, "the router is buffering too many request bodies; retry"
        return None

    def _refuse_body(self, status: int, message: str) -> web.Response:
        if status == 503:
            self.bodies.refused += 1
        return self._error(status, message, "body_limit", retry_after=status == 503)

    async def _expect(self, request: web.Request) -> web.StreamResponse | None:
        """`Expect:` before the body is sent: refuse a body that will not fit at once (no
        `100 Continue`, so the client need not send it), an unknown expectation with JSON."""
        if request.version < aiohttp.HttpVersion11:
            return None  # HTTP/1.0 has no 100 Continue (RFC 9110 10.1.1): the body just follows
        expect = request.headers.get("Expect", "")
        if expect.strip().lower() != "100-continue":
            return self._error(417, f"unsupported Expect: {expect[:64]!r}", "bad_request")
        refusal = self._body_refusal(request.content_length)
        if refusal is not None:  # the body is not coming: nothing to wait for, close at once
            return await _answer_and_close(request, self._refuse_body(*refusal))
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the answer's own bytes have not started
        return None

    async def _read_body(self, request: web.Request, held: _Held) -> bytes | web.StreamResponse:
        """The whole body within `body_timeout_s` (a slow sender must not hold a slot forever),
        within `max_body_bytes`, and within the budget of all bodies buffered at once (`held`
        says what this one has reserved of it). Refusals are answered before a byte is read
        where the length is declared; aiohttp then drains the unread body (for at most its
        lingering time) without keeping it."""
        refusal = self._body_refusal(request.content_length)
        if refusal is not None:
            return self._refuse_body(*refusal)
        if request.content_length and self.bodies.take(request.content_length):
            held.bytes = request.content_length  # admitted whole: it will not be refused half-sent
        try:
            if request.content.is_eof():
                # All of it is in already (the usual case: a small body arrives with its headers),
                # so reading cannot wait: no deadline task and timer (wait_for's) per request.
                return await self._collect(request, held)
            return await asyncio.wait_for(self._collect(request, held), self.cfg.body_timeout_s)
        except _BodyRefused as e:
            return self._refuse_body(e.status, e.message)
        except RequestPayloadError as e:  # undecodable Content-Encoding, broken chunked framing
            # closed at once: aiohttp would linger reading the rest, and log the same error again
            resp = self._error(400, _payload_error_message(request, e), "bad_request")
            return await _answer_and_close(request, resp)
        except TimeoutError:
            msg = f"request body not received within {self.cfg.body_timeout_s:g}s"
            return await _answer_and_close(request, self._error(408, msg, "timeout"))

    async def _collect(self, request: web.Request, held: _Held) -> bytes:
        """Read the (decoded) body, reserving its bytes in the budget as they come: a declared
        length can understate it (gzip) or be absent (chunked)."""
        parts: list[bytes] = []
        total = 0
        while chunk := await request.content.readany():
            total += len(chunk)
            if total > self.cfg.max_body_bytes:
                raise _BodyRefused(413, f"request body larger than {self.cfg.max_body_bytes} bytes")
            if total > held.bytes:
                if not self.bodies.take(total - held.bytes):
                    if 0 < self.bodies.cap < total:
                        raise _BodyRefused(413, f"request body larger than {self.bodies.cap} bytes")
                    raise _BodyRefused(503, "the router is buffering too many request bodies; retry")
                held.bytes = total
            parts.append(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def handle_completion(self, request: web.Request) -> web.StreamResponse:
        held = _Held()
        try:
            return await self._completion(request, held)
        finally:
            self.bodies.give(held.bytes)

    async def _completion(self, request: web.Request, held: _Held) -> web.StreamResponse:
        t0 = time.perf_counter()
        raw = await self._read_body(request, held)
        if isinstance(raw, web.StreamResponse):
            return raw
        body = self._json_object(raw)
        if isinstance(body, web.Response):
            return body
        return await self._dispatch(request, raw, body, t0)

    async def _dispatch(
        self, request: web.Request, raw: bytes, body: dict[str, Any], t0: float
    ) -> web.StreamResponse:
        """Where a read, parsed request goes: this router's replicas (the gateway picks a member)."""
        return await self.route(request, raw, body, t0)

    def _json_object(self, raw: bytes) -> dict[str, Any] | web.Response:
        """The body as a JSON object, or the 400 that says why it is not one."""
        try:
            body = json.loads(raw)
            if not isinstance(body, dict):
                raise ValueError("body must be a JSON object")
        except (ValueError, RecursionError) as e:  # RecursionError: nesting deeper than Python's stack
            msg = "JSON nested too deeply" if isinstance(e, RecursionError) else str(e)
            return self._error(400, f"invalid JSON body: {msg}", "bad_request")
        return body

    async def route(
        self, request: web.Request, raw: bytes, body: dict[str, Any], t0: float
    ) -> web.StreamResponse:
        """Pick a replica for a request whose body is read and parsed, and relay it there. The
        gateway (gateway.py) calls this on the member router of the model the body names."""
        prepared = await self._prepare(request.path, request.headers, body)
        if isinstance(prepared, web.Response):
            return prepared
        strategy, parsed = prepared
        adapter = parsed.adapter
        skip = hop_by_hop(request.headers)
        if _inflated(request.headers):  # aiohttp inflated the body: forward it as it now is
            skip = skip | {"content-encoding"}
        headers = {k: v for k, v in request.headers.items() if k.lower() not in skip}
        tried: set[str] = set()
        attempts: list[tuple[str, str]] = []  # (backend, outcome) for `health.blame`
        last: _Retryable | None = None
        try:
            # At most one retry, on one other backend: a request that makes engines fail must not
            # walk the whole fleet (and its failures are not blamed unless the retry succeeds).
            for _attempt in range(2):
                only: tuple[str, ...] | None = None
                if adapter is not None:  # to a replica holding it, loaded there first if need be
                    placed = await self._place_adapter(adapter, tried, _attempt == 0)
                    if isinstance(placed, web.Response):
                        return placed if last is None else self._upstream_failed(last)
                    only = placed
                    parsed.adapter_retry = _attempt == 0
                d = await self._decide(
                    strategy, parsed.request, tried, _attempt == 0, parsed.kv_keys, parsed.kv_block_size, only
                )
                if isinstance(d, web.Response):
                    return d if last is None else self._upstream_failed(last)
                tried.add(d.backend)
                if adapter is not None:
                    self.lora.use(d.backend, adapter)  # pins it there: never evicted under a request
                try:
                    return await self._forward(request, raw, headers, parsed, strategy, d, t0, attempts)
                except _AdapterMissing as e:
                    # The engine lost it (restart, another router unloaded it): placed again,
                    # loaded again, once; the engine's 404 is the answer if that fails too.
                    log.info("%s no longer holds adapter %s: placing it again", d.backend, adapter)
                    assert adapter is not None
                    self.lora.lost(d.backend, adapter)
                    tried.discard(d.backend)
                    last = _Retryable(hl.CLIENT_ERROR, 404, e.body)
                except _GatewayTimeout:
                    self.metrics.errors.labels(d.backend, hl.TIMEOUT).inc()
                    msg = f"upstream did not answer within {self.cfg.read_timeout_s:g}s"
                    return self._error(504, msg, "upstream")
                except _Retryable as e:
                    attempts.append((d.backend, e.kind))
                    self.metrics.errors.labels(d.backend, e.kind).inc()
                    if e.kind == hl.UNREACHABLE:  # never the request's fault: count it now
                        self._record_failure(d.backend, e.kind)
                    last = e
                    if _attempt == 0:
                        self.metrics.retries.inc()
                finally:
                    if adapter is not None:
                        self.lora.release(d.backend, adapter)
                        self._adapter_upkeep(d.backend)
            assert last is not None
            return self._upstream_failed(last)
        finally:
            self._settle(attempts)

    async def _prepare(
        self, path: str, headers: Mapping[str, str], body: dict[str, Any]
    ) -> tuple[str, _Parsed] | web.Response:
        """The strategy and what routing reads of a request (`route` and `pick` alike), or the
        error to answer: an unknown strategy, an adapter no longer served."""
        strategy = headers.get(STRATEGY_HEADER) or self.cfg.strategy
        if strategy not in st.STRATEGIES:
            return self._error(
                400,
                f"unknown strategy {strategy[:64]!r}; known: {', '.join(st.STRATEGIES)}",
                "bad_request",
            )
        adapter: str | None = None
        if self.lora.active:  # LoRA adapters in play: what does `model` name?
            kind = self.lora.resolve(body.get("model"))
            if kind == ad.UNKNOWN:  # removed from the spec: as vLLM answers an unknown model
                self.metrics.child(self.metrics.lora.requests, "not_found").inc()
                msg = f"The model `{body.get('model')}` does not exist."
                return self._error(404, msg, "adapter_not_found", body=error_body(404, msg, "model"))
            if kind == ad.ADAPTER:
                adapter = cast(str, body["model"])
        need_hashes = strategy in (st.PREFIX_AWARE, st.AUTO)
        parsed = parse_request(path, body, headers, self.estimator, self.cfg, need_hashes)
        parsed.adapter = adapter
        if need_hashes and self.kvindex is not None:
            await self._kv_parse(path, body, parsed)
        return strategy, parsed

    # ------------------------------------------------------------------ picking for another proxy

    async def pick(
        self,
        path: str,
        headers: Mapping[str, str],
        body: dict[str, Any],
        only: Iterable[str] | None = None,
        fallbacks: int = 2,
    ) -> Pick | web.Response:
        """Backends for a request another proxy sends (the Endpoint Picker, router/epp/): the
        decision `route` makes (strategies, hold at zero, queueing, 429 when saturated), primary
        first, then up to `fallbacks` more the strategy ranks next (not committed). The request
        holds load on the primary until `finish_pick`; `only`: the backend URLs allowed (the
        data plane's subset: none eligible is 503 at once, never a hold)."""
        prepared = await self._prepare(path, headers, body)
        if isinstance(prepared, web.Response):
            return prepared
        strategy, parsed = prepared
        if parsed.adapter is not None:  # to a replica holding it, loaded there first if need be
            placed = await self._place_adapter(parsed.adapter, set(), True)
            if isinstance(placed, web.Response):
                return placed
            only = placed if only is None else [u for u in placed if u in set(only)]
        req = parsed.request
        allowed = None if only is None else tuple(only)
        d = await self._decide(strategy, req, set(), True, parsed.kv_keys, parsed.kv_block_size, allowed)
        if isinstance(d, web.Response):
            return d
        chosen = [d.backend]
        skip = set() if allowed is None else self.backends.keys() - set(allowed)
        now = time.monotonic()
        for _ in range(max(fallbacks, 0)):
            f = st.choose(
                strategy, req, self.snapshot(skip | set(chosen)), self.memory, self.cfg.routing, now
            )
            if f is None:
                break
            chosen.append(f.backend)
        if parsed.adapter is not None:
            self.lora.use(d.backend, parsed.adapter)  # pinned there until finish_pick
        b = self.backends.get(d.backend)
        p = Pick(chosen, strategy, req, self.ledger.acquire(d.backend, req.prompt_tokens, req.max_tokens),
                 b.spec.pool if b is not None else "", parsed.adapter)  # fmt: skip
        if strategy in (st.PREFIX_AWARE, st.AUTO) and parsed.kv_keys is None:
            p.fresh_blocks = req.block_hashes[d.matched_blocks :]  # matched: held before this pick
        self.demand.sent(p.pool, req.cost)
        self.active += 1
        self.last_request = time.monotonic()
        return p

    def served_pick(self, p: Pick, url: str) -> None:
        """The data plane says `url` served `p` (a fallback, after the primary failed): move its
        load there and remember the prefix and session there, so both stay true."""
        if p.done or url == p.ticket.backend or url not in self.backends:
            return
        old = p.ticket
        left = (old.prompt_left, old.output_left)  # what is still outstanding moves (release zeroes it)
        self.ledger.release(old)
        p.ticket = self.ledger.acquire(url, *left)
        self.memory.prefix.retract(p.fresh_blocks, old.backend)  # it never got the prompt
        now = time.monotonic()
        d = st.Decision(url, "epp_served")
        st.commit(self.memory, p.strategy, p.request, d, self.cfg.routing, now, self._capacity_blocks(url))
        self._drop_if_idle(old.backend)

    def finish_pick(self, p: Pick) -> None:
        """`p`'s response ended, or its stream broke: release its load. Idempotent."""
        if p.done:
            return
        p.done = True
        url = p.ticket.backend
        self.ledger.release(p.ticket)
        self.demand.finished(p.pool, p.request.cost)
        if p.adapter is not None:
            self.lora.release(p.backends[0], p.adapter)
            self._adapter_upkeep(p.backends[0])
        self.active -= 1
        self._drop_if_idle(url)
        self._wake_waiters()

    async def _kv_parse(self, path: str, body: Mapping[str, Any], parsed: _Parsed) -> None:
        """Token ids and engine block keys for KV-event routing; on any failure the request is
        scored as without it (the approximation), and counted."""
        assert self.kvindex is not None
        size = self._block_size()
        if size <= 0:
            self.kvindex.fallbacks["block_size"] += 1
            return
        if hashed_apart(path, body):  # images, audio, prompt embeddings: keys only the engine knows
            self.kvindex.fallbacks["multimodal"] += 1
            return
        ids = await self._token_ids(path, body, set())
        if ids is None or self.kvindex is None:
            if self.kvindex is not None:
                self.kvindex.fallbacks["tokenize"] += 1
            return
        # an adapter's blocks are hashed with its name and the path the engines loaded it from
        path_ = self.lora.spec.get(parsed.adapter) if parsed.adapter is not None else None
        extra = hashing.lora_extra_keys(parsed.adapter, path_) if parsed.adapter and path_ else None
        salt = body.get("cache_salt")  # vLLM salts the first block: another chain entirely
        parsed.kv_keys = self.kvindex.block_keys(
            ids, size, extra, salt if isinstance(salt, str) and salt else None
        )
        parsed.kv_block_size = size
        if ids:  # the exact prompt length, for load too
            parsed.request = replace(parsed.request, prompt_tokens=len(ids))

    def _upstream_failed(self, e: _Retryable) -> web.Response:
        """Every attempt failed before the first byte: pass on the engine's own error when it gave
        one (a 500 the request caused is the client's business), else a 502."""
        if e.body is not None:
            try:
                doc = json.loads(e.body)
            except (ValueError, RecursionError, UnicodeDecodeError):
                doc = None
            if isinstance(doc, dict) and isinstance(doc.get("error"), dict):
                return self._error(e.status, f"upstream {e.status} on every attempt", "upstream", body=doc)
            return self._error(e.status, f"upstream failed: {e.kind} {e.status}", "upstream")
        return self._error(502, f"upstream failed: {e.kind}", "upstream")

    async def _forward(
        self,
        request: web.Request,
        raw: bytes,
        headers: dict[str, str],
        parsed: _Parsed,
        strategy: str,
        d: st.Decision,
        t0: float,
        attempts: list[tuple[str, str]],
    ) -> web.StreamResponse:
        assert self._upstream is not None
        url = d.backend
        req = parsed.request
        ticket = self.ledger.acquire(url, req.prompt_tokens, req.max_tokens)
        b = self.backends.get(url)
        pool = b.spec.pool if b is not None else ""  # kept: a rediscovered spec may change it
        self.demand.sent(pool, req.cost)
        code = "error"
        try:
            try:
                upstream = await self._upstream.request(url, "POST", request.rel_url.raw_path, headers, raw)
            except ReadTimeout:
                # Connected, sent, and no answer within read_timeout_s: not retried (it would
                # double a long wait, and a request that hangs one engine may hang the next),
                # not blamed (no second opinion); a wholly hung engine fails its probes.
                attempts.append((url, hl.TIMEOUT))
                raise _GatewayTimeout() from None
            except ConnectFailed as e:
                raise _Retryable(hl.UNREACHABLE) from e
            except UpstreamClosed as e:
                raise _Retryable(hl.DISCONNECT) from e
            async with upstream:
                if upstream.status >= 500:
                    try:
                        err = await upstream.read(_ERROR_BODY_MAX)
                    except UpstreamError:
                        err = b""
                    raise _Retryable(hl.STATUS_5XX, upstream.status, err)
                if upstream.status == 404 and parsed.adapter_retry:
                    try:
                        err = await upstream.read(_ERROR_BODY_MAX)
                    except UpstreamError:
                        err = b""
                    attempts.append((url, hl.CLIENT_ERROR))
                    code = "404"
                    if b"does not exist" in err:
                        raise _AdapterMissing(err)
                    # another 404 (read to look at it): answered as it came
                    skip = hop_by_hop(upstream.headers)
                    missing = web.Response(body=err, status=404)
                    for k, v in upstream.headers.items():
                        if k.lower() not in skip:
                            missing.headers.add(k, v)
                    missing.headers[REASON_HEADER] = d.reason
                    return missing
                # Settle now, before relaying: an answer clears (or convicts) the backends this
                # request tried; a stream that then breaks is counted on its own.
                attempts.append((url, hl.OK if upstream.status < 400 else hl.CLIENT_ERROR))
                self._settle(attempts)
                attempts.clear()
                out = _RelayResponse(status=upstream.status)
                skip = hop_by_hop(upstream.headers)
                for k, v in upstream.headers.items():
                    if k.lower() not in skip:
                        out.headers.add(k, v)
                if "Content-Length" in upstream.headers and not parsed.stream:
                    with contextlib.suppress(ValueError):
                        out.content_length = int(upstream.headers["Content-Length"])
                if self.cfg.expose_backend:
                    out.headers[BACKEND_HEADER] = url
                out.headers[REASON_HEADER] = d.reason
                code = str(upstream.status)
                request[_STARTED] = True
                await out.prepare(request)
                await self._relay(request, upstream, out, parsed, strategy, ticket, t0)
                return out
        finally:
            self.ledger.release(ticket)
            self.demand.finished(pool, req.cost)
            self.metrics.child(self.metrics.requests, url, strategy, code).inc()
            self.metrics.child(self.metrics.e2e, strategy).observe(time.perf_counter() - t0)
            self._drop_if_idle(url)
            self._wake_waiters()

    async def _relay(
        self,
        request: web.Request,
        upstream: UpstreamResponse,
        out: web.StreamResponse,
        parsed: _Parsed,
        strategy: str,
        ticket: st.Ticket,
        t0: float,
    ) -> None:
        # Bytes pass through as they come, one client write per upstream read (a read takes
        # whatever has arrived, so events that came together leave together, never split or
        # merged differently than the bytes themselves); nothing is parsed per event. Streams
        # are only counted (`data: ` markers, a C-level scan) so the ledger sees output
        # progress; the last few KiB are kept (as chunks, not copied) for the usage the engine
        # reports at the end, in the last event or the one before [DONE].
        # The last bytes leave with the end of the response in one write: when the upstream is
        # at its end, or when a stream's chunk ends with `data: [DONE]` (the client is then done
        # at once; whatever the upstream still sends, its chunked-encoding end, is drained).
        first = True
        stream = parsed.stream
        writing = self._writing
        client = request.transport if self._watchdog is not None else None  # None: no deadline
        tail: deque[bytes] = deque()  # the stream's last chunks, at least _USAGE_TAIL bytes
        tail_len = 0
        keep_body = not stream and upstream.status == 200
        body_parts: list[bytes] = []
        kept = 0
        finished = False  # the client has the whole response
        try:
            while chunk := await upstream.readany():
                if first:
                    first = False
                    ttft = time.perf_counter() - t0
                    self.metrics.child(self.metrics.ttft, strategy).observe(ttft)
                    request[TTFT_KEY] = ttft
                    self.ledger.first_token(ticket)
                    if parsed.kv_keys and self.kvindex is not None and upstream.status == 200:
                        self.kvindex.expect(ticket.backend, parsed.kv_keys)
                if finished:  # bytes after [DONE]: no client may read them, so none are sent
                    log.debug("%s sent %d bytes after [DONE]; dropped", ticket.backend, len(chunk))
                    continue
                if stream:
                    self.ledger.output_tokens(ticket, chunk.count(b"data: "))
                    tail.append(chunk)
                    tail_len += len(chunk)
                    while tail_len - len(tail[0]) >= _USAGE_TAIL:
                        tail_len -= len(tail.popleft())
                elif keep_body and kept < _USAGE_BODY_MAX:  # a running total: no O(n^2) re-summing
                    body_parts.append(chunk)
                    kept += len(chunk)
                if client is not None:  # the write deadline: stamped here, swept by _write_watchdog
                    writing[client] = time.monotonic()
                if upstream.at_eof() or (stream and _ends_stream(chunk)):
                    finished = True
                    await out.write_eof(chunk)
                else:
                    await out.write(chunk)
                if client is not None:
                    writing.pop(client, None)
        except UpstreamError as e:
            if finished:  # the client has every event; only the upstream's framing end broke
                log.debug("stream from %s broke after [DONE]: %r", ticket.backend, e)
                self._learn_usage(parsed, b"".join(tail), request)
                return
            self.metrics.errors.labels(ticket.backend, hl.STREAM_BROKEN).inc()
            self._record_failure(ticket.backend, hl.STREAM_BROKEN)
            log.warning("stream from %s broke mid-way: %r", ticket.backend, e)
            if parsed.stream:
                err = {
                    "error": {
                        "message": "upstream stream broke mid-way",
                        "type": "upstream_error",
                        "code": 502,
                    }
                }
                await out.write_eof(b"data: " + json.dumps(err).encode() + b"\n\n")
            else:
                # headers are out; abort so the client sees a failure, not a truncated success
                out.force_close()
                if request.transport is not None:
                    request.transport.abort()
            return
        finally:
            if client is not None:  # a write that raised (the client went) left its stamp
                writing.pop(client, None)
        await out.write_eof()  # a no-op when the last bytes already carried the end
        self._learn_usage(parsed, b"".join(tail if parsed.stream else body_parts), request)

    def _learn_usage(self, parsed: _Parsed, data: bytes, request: web.Request | None = None) -> None:
        """Correct the chars-per-token estimate from the engine's reported prompt tokens, and keep
        the usage on the request (the gateway counts tokens per model from it)."""
        prompt = _usage_field(data, b'"prompt_tokens"')
        if prompt is None:
            return
        self.estimator.observe(parsed.text_chars, prompt)
        if request is not None:
            request[USAGE_KEY] = (prompt, _usage_field(data, b'"completion_tokens"') or 0)


def _usage_field(data: bytes, key: bytes) -> int | None:
    """The integer after the last `key` in a response's bytes (its usage block), or None."""
    i = data.rfind(key)
    if i < 0:
        return None
    digits = data[i + len(key) : i + len(key) + 24].lstrip(b": ")
    n = 0
    for ch in digits:
        if 48 <= ch <= 57:
            n = n * 10 + ch - 48
        else:
            break
    return n


GC_GEN0_THRESHOLD = 10_000  # Python's default is 700


def tune_gc(gen0_threshold: int = GC_GEN0_THRESHOLD) -> None:
    """Call once start-up is done. Why: with Python's defaults the cyclic collector was ~11 % of
    the router's CPU at 50-200 streams and paused the one event loop for up to ~50 ms (a full
    collection walks the ~54,000 objects imports leave behind), which every open stream waits
    out. Freezing start-up's objects takes them out of every later collection; a higher gen0
    threshold lets a request's short-lived objects die by reference counting before a
    collection would promote them. 0 leaves the collector as Python sets it."""
    if gen0_threshold <= 0:
        return
    gc.collect()  # not to freeze start-up's garbage
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(gen0_threshold, gen1, gen2)


def _dual_stack_socket(port: int) -> socket.socket | None:
    """A listening socket on [::]:port that also takes IPv4 (IPV6_V6ONLY off), or None without IPv6.

    asyncio always sets IPV6_V6ONLY on the sockets it binds, so `--host ::` would otherwise
    silently refuse IPv4: kubelet probes and clients on an IPv4 pod IP. vLLM (uvicorn) binds
    `::` dual-stack; the router does the same.
    """
    try:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    except OSError:
        return None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(("::", port))
    except OSError:
        sock.close()
        return None
    return sock


async def serve(router: Router, host: str, port: int, probe: bool = True) -> web.AppRunner:
    """Start serving on `host` (an address: 127.0.0.1, 0.0.0.0, :: (IPv6 and IPv4), a pod IP);
    returns the runner (call `runner.cleanup()` to stop). Connections go through the front door."""
    runner = GuardedRunner(router.app(probe), router.gate, access_log=None, handler_cancellation=True)
    await runner.setup()
    site: web.BaseSite
    sock = _dual_stack_socket(port) if host == "::" else None
    if sock is not None:
        site = web.SockSite(runner, sock, backlog=2048)
    else:
        site = web.TCPSite(
            runner, "0.0.0.0" if host == "::" else host, port, reuse_address=True, backlog=2048
        )
    await site.start()
    return runner


async def serve_metrics(router: Router, host: str, port: int) -> web.AppRunner:
    """The operators' port (--metrics-port): /metrics with every backend-labelled series. Kept
    off the client port, whose /metrics would otherwise list the engines' pod addresses."""
    app = web.Application()
    app.router.add_get("/metrics", router.handle_full_metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    sock = _dual_stack_socket(port) if host == "::" else None
    site: web.BaseSite
    if sock is not None:
        site = web.SockSite(runner, sock)
    else:
        site = web.TCPSite(runner, "0.0.0.0" if host == "::" else host, port, reuse_address=True)
    await site.start()
    return runner
