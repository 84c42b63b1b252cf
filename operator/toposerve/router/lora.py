"""LoRA adapters at run time: the router's I/O around the pure placement (adapters.py).

The router loads adapters on the engines itself, through vLLM 0.33.0's
``POST /v1/load_lora_adapter`` {"lora_name", "lora_path"} and ``POST /v1/unload_lora_adapter``
{"lora_name"} (engines started with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``, no static
``--lora-modules``, no resolver plugin). What vLLM answers (entrypoints/openai/models/serving.py):

- load: 200 and a plain-text "Success: ..."; 400 "The lora adapter 'X' has already been loaded"
  (idempotent here: another router replica, or an earlier try, loaded it: success); 404
  "Loading lora X failed: No adapter found for PATH"; 500 with the engine's exception for
  anything else (a rank above --max-lora-rank, a corrupt file); 404 ``{"detail": "Not Found"}``
  when the engine does not allow run-time updates at all.
- unload: 200 "Success: ..."; 404 "The lora adapter 'X' cannot be found." (gone already:
  success here). Unloading only removes the name from the server's registry; a request already
  running on the adapter keeps its own reference and finishes.
- ``GET /v1/models`` lists each registered adapter as a card with ``parent`` (its base model)
  and ``root`` (the path it was loaded from); that, re-read every ``refresh_s``, is the truth the
  router places on (two router replicas load on the same engines).

`AdapterManager` keeps per engine what it knows (registered adapters, the engine's
running/waiting adapters and ``max_lora`` from ``vllm:lora_requests_info``, loads in flight,
this router's requests in flight per adapter, its record of use for the LRU) and runs the
loads and unloads: one load per (engine, adapter) at a time, requests that need it wait for that
one; unloads of removed adapters only once no request of this router uses them there.

Sources vLLM cannot fetch (``https://``, ``s3://``, ``hf://org/repo@revision``: docs/lora.md) are
staged first: the router asks the stager sidecar of that engine's pod (``POST /stage``, port
STAGE_PORT, toposerve/adapterstage) and loads the directory it answers, which is
``staged_path(stage_root, source)`` on the pod's model cache. So the path the engine lists for
such an adapter is known in advance, and placement compares registrations against it as for
any other path. A staging failure is a load failure (``lastError``, ``AdaptersLoaded``), with the
stager's message naming the source and the cause.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from prometheus_client import CollectorRegistry, Counter, Histogram

from toposerve.adapterstage.sources import STAGE_PORT, STAGE_ROOT, needs_staging, staged_path, stager_url
from toposerve.router import adapters as ad

log = logging.getLogger("toposerve.router.lora")

LOAD_PATH = "/v1/load_lora_adapter"
STAGE_PATH = "/stage"
UNLOAD_PATH = "/v1/unload_lora_adapter"

# why a load happened / an unload (metrics labels: small closed sets)
L_REQUEST = "request"  # a request found no replica holding its adapter
L_SPREAD = "spread"  # a hot adapter's holders are all above the load bound
L_RELOAD = "reload"  # the engine lost what this router had registered there (a restart)
U_REMOVED = "removed"  # gone from the spec
U_STALE = "stale"  # registered under a path the spec no longer names
U_EVICTED = "evicted"  # made room for another adapter (LRU)
U_SURPLUS = "surplus"  # more registered than the slots

_LOAD_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


@dataclass(frozen=True, slots=True)
class Options:
    slots: int = 0  # adapters kept registered per engine (its max_cpu_loras); 0: its max_lora
    load_timeout_s: float = 120.0  # one load_lora_adapter call (reads the adapter from disk)
    refresh_s: float = 5.0  # how often each engine's /v1/models is re-read
    # after an adapter failed to load by its own fault (4xx: no such source, rank too high), its
    # requests get that answer again for this long without a new load (a typo'd adapter under
    # load would otherwise cost a load, and a disk read, per request)
    failure_backoff_s: float = 10.0
    placement: ad.Config = field(default_factory=ad.Config)
    # the engine pods' stager sidecar (render/objects.py renders it with these values)
    stage_port: int = STAGE_PORT
    stage_root: str = STAGE_ROOT
    stage_timeout_s: float = 1800.0  # one staging: a download of up to a few GB


@dataclass(frozen=True, slots=True)
class CallResult:
    """What one load/unload call came to. ``ok`` includes the idempotent answers."""

    ok: bool
    status: int = 200
    message: str = ""
    body: dict[str, Any] | None = None  # the engine's OpenAI error envelope, when it sent one
    kind: str = ""  # for failures: the status code, "unreachable" or "timeout"


def _error_message(status: int, raw: bytes) -> tuple[str, dict[str, Any] | None]:
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError, UnicodeDecodeError):
        return raw[:512].decode("utf-8", "replace"), None
    if isinstance(doc, dict) and isinstance(doc.get("error"), dict):
        msg = doc["error"].get("message")
        return (msg if isinstance(msg, str) else str(msg)), doc
    if isinstance(doc, dict) and "detail" in doc:  # FastAPI's own 404/422
        return str(doc["detail"]), None
    return raw[:512].decode("utf-8", "replace"), None


async def _post(
    session: aiohttp.ClientSession, url: str, path: str, doc: Mapping[str, Any], timeout_s: float
) -> CallResult:
    try:
        async with session.post(
            url + path, json=dict(doc), timeout=aiohttp.ClientTimeout(total=timeout_s)
        ) as r:
            raw = await r.read()
            if r.status == 200:
                return CallResult(True, 200, raw[:512].decode("utf-8", "replace"))
            msg, body = _error_message(r.status, raw)
            return CallResult(False, r.status, msg, body, str(r.status))
    except TimeoutError:
        return CallResult(False, 504, f"no answer within {timeout_s:g}s", None, "timeout")
    except (aiohttp.ClientError, OSError) as e:
        return CallResult(False, 502, f"unreachable: {e!r}"[:256], None, "unreachable")


async def load_adapter(
    session: aiohttp.ClientSession, url: str, name: str, path: str, timeout_s: float
) -> CallResult:
    """Register `name` (read from `path` as the engine sees it) on the engine at `url`."""
    res = await _post(session, url, LOAD_PATH, {"lora_name": name, "lora_path": path}, timeout_s)
    if not res.ok and res.status == 400 and "has already been loaded" in res.message:
        return CallResult(True, 200, res.message)
    return res


async def stage_adapter(
    session: aiohttp.ClientSession, url: str, source: str, expected: str, port: int, timeout_s: float
) -> CallResult:
    """Have the stager in the pod of the engine at `url` put `source` on its cache; ok when it
    answers the directory `expected` (``staged_path``: what the router will load)."""
    stager = stager_url(url, port)
    res = await _post(session, stager, STAGE_PATH, {"source": source}, timeout_s)
    if not res.ok:
        where = "" if res.body is not None else f" (stager {stager})"
        return CallResult(
            False, res.status, f"staging {source} failed{where}: {res.message}", res.body, f"stage-{res.kind}"
        )
    try:
        doc = json.loads(res.message)
        path = doc["path"]
    except (ValueError, KeyError, TypeError):
        return CallResult(
            False,
            502,
            f"staging {source}: the stager {stager} answered {res.message[:200]!r}",
            None,
            "stage-502",
        )
    if path != expected:
        return CallResult(
            False, 502, f"staging {source}: the stager put it at {path}, the router loads {expected} "
            f"(its --root must be {expected.rsplit('/', 1)[0]})", None, "stage-502",
        )  # fmt: skip
    return CallResult(True, 200, path)


async def unload_adapter(session: aiohttp.ClientSession, url: str, name: str, timeout_s: float) -> CallResult:
    res = await _post(session, url, UNLOAD_PATH, {"lora_name": name}, timeout_s)
    if not res.ok and res.status == 404 and "cannot be found" in res.message:
        return CallResult(True, 200, res.message)
    return res


async def read_models(
    session: aiohttp.ClientSession, url: str, timeout_s: float
) -> tuple[dict[str, str], list[str]] | None:
    """(adapters registered name -> path, base model ids) from the engine's /v1/models."""
    try:
        async with session.get(url + "/v1/models", timeout=aiohttp.ClientTimeout(total=timeout_s)) as r:
            if r.status != 200:
                return None
            doc = json.loads(await r.read())
    except (TimeoutError, aiohttp.ClientError, OSError, ValueError, RecursionError):
        return None
    return ad.parse_models(doc)


class LoraMetrics:
    """The adapter families of the router's registry (the `backend` label is dropped on the
    client port, as for every family)."""

    def __init__(self, r: CollectorRegistry) -> None:
        self.loads = Counter(
            "toposerve_router_lora_loads",
            "Adapters loaded on an engine, by why: request (none held it), spread (its holders "
            "were all busy), reload (the engine lost it: a restart).",
            ["backend", "reason"],
            registry=r,
        )
        self.load_failures = Counter(
            "toposerve_router_lora_load_failures",
            "Adapter loads that failed, by the engine's status code (or unreachable, timeout).",
            ["backend", "kind"],
            registry=r,
        )
        self.unloads = Counter(
            "toposerve_router_lora_unloads",
            "Adapters unloaded from an engine, by why: removed (from the spec), stale (an older "
            "path), evicted (room for another), surplus (more than the slots).",
            ["backend", "reason"],
            registry=r,
        )
        self.evictions = Counter(
            "toposerve_router_lora_evictions",
            "Least recently used adapters unloaded to make room for another.",
            ["backend"],
            registry=r,
        )
        self.load_seconds = Histogram(
            "toposerve_router_lora_load_seconds",
            "Time of a successful load_lora_adapter call (an eviction's unload included).",
            buckets=_LOAD_BUCKETS,
            registry=r,
        )
        self.requests = Counter(
            "toposerve_router_lora_requests",
            "Requests naming an adapter, by outcome: hit (routed to a replica holding it), load "
            "(waited for a cold load), not_found (not in the spec), unavailable (no replica or "
            "slot), failed (its load failed).",
            ["outcome"],
            registry=r,
        )


@dataclass
class EngineAdapters:
    """What the router knows of one engine's adapters."""

    registered: dict[str, str] = field(default_factory=dict)  # name -> path
    running: frozenset[str] = frozenset()
    waiting: frozenset[str] = frozenset()
    max_lora: int = 0  # from the gauge; 0: not seen
    placed: set[str] = field(default_factory=set)  # registered there by this router
    loading: dict[str, asyncio.Task[CallResult]] = field(default_factory=dict)
    unloading: set[str] = field(default_factory=set)
    in_use: dict[str, int] = field(default_factory=dict)  # this router's requests in flight
    listed_at: float = float("-inf")  # when /v1/models was last read (monotonic)
    changed_at: float = float("-inf")  # last local change: an older listing is not applied


class AdapterManager:
    """The adapter state of all engines and the calls that change it (one event loop)."""

    def __init__(self, opts: Options, metrics: LoraMetrics) -> None:
        self.opts = opts
        self.metrics = metrics
        self.spec: dict[str, str] = {}  # name -> the path the engines load (staged_path for URLs)
        self.sources: dict[str, str] = {}  # name -> the source as given (--adapter, the gateway)
        self.retired: set[str] = set()  # names this router had in its spec and no longer has
        self.engines: dict[str, EngineAdapters] = {}
        self.last_used: dict[tuple[str, str], float] = {}
        self.base_models: list[str] = []  # from the engines' /v1/models
        self.session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._changed = asyncio.Event()
        # adapter -> the last load failure's message (cleared by a successful load): status.gateway
        self.errors: dict[str, str] = {}
        # adapter -> (when, result) of its last 4xx load failure: answered again for a while
        self.failed_at: dict[str, tuple[float, CallResult]] = {}

    @property
    def active(self) -> bool:
        """Whether adapters are in play (any in the spec, or removed ones possibly still held)."""
        return bool(self.spec or self.retired)

    def engine(self, url: str) -> EngineAdapters:
        e = self.engines.get(url)
        if e is None:
            e = self.engines[url] = EngineAdapters()
        return e

    def forget(self, url: str) -> None:
        self.engines.pop(url, None)  # a load in flight there finishes on the dropped record
        for key in [k for k in self.last_used if k[0] == url]:
            del self.last_used[key]

    def slots(self, url: str) -> int:
        e = self.engines.get(url)
        return max(1, self.opts.slots or (e.max_lora if e is not None else 0) or 1)

    def report(self) -> dict[str, dict[str, Any]]:
        """Each spec adapter: on how many engines it is registered, and its last load error (None
        once a load succeeded). What /health says, and the operator writes to status.gateway."""
        return {
            name: {
                "replicas": sum(1 for e in self.engines.values() if name in e.registered),
                "lastError": self.errors.get(name),
            }
            for name in self.spec
        }

    def registered_names(self) -> set[str]:
        return {n for e in self.engines.values() for n in e.registered}

    # ------------------------------------------------------------------------------- the spec

    def engine_path(self, source: str) -> str:
        """What the engines load for `source`: the staged directory for a source to stage."""
        return staged_path(self.opts.stage_root, source) if needs_staging(source) else source

    def set_spec(self, adapters: Mapping[str, str]) -> None:
        new = dict(adapters)
        self.retired |= set(self.spec) - set(new)
        self.retired -= set(new)
        self.sources = new
        self.spec = {name: self.engine_path(source) for name, source in new.items()}
        self.notify()

    def resolve(self, model: object) -> str:
        if not self.active:
            return ad.BASE
        return ad.resolve_model(model, self.spec, self.retired, self.registered_names())

    # ------------------------------------------------------------------------------- observing

    def observe_metrics(self, url: str, text: str) -> None:
        info = ad.parse_lora_info(text)
        if info is None:
            return
        e = self.engine(url)
        e.running, e.waiting = info.running, info.waiting
        if info.max_lora > 0:
            e.max_lora = info.max_lora

    def due(self, url: str, now: float) -> bool:
        return now - self.engine(url).listed_at >= self.opts.refresh_s

    def observe_models(self, url: str, listing: tuple[dict[str, str], list[str]], started: float) -> None:
        """Apply a /v1/models read that began at `started` (skipped when the router changed
        the engine's adapters since: the listing may predate that change)."""
        e = self.engine(url)
        e.listed_at = started
        if started < e.changed_at:
            return
        registered, base = listing
        e.registered = {n: p for n, p in registered.items() if n not in e.unloading}
        if base:
            self.base_models = base

    def lost(self, url: str, name: str) -> None:
        """The engine answered 404 for a request on `name`: it does not hold it (a restart, or
        another router unloaded it). Forget it there and re-read the engine soon."""
        e = self.engine(url)
        e.registered.pop(name, None)
        e.listed_at = float("-inf")
        e.changed_at = time.monotonic()

    # ------------------------------------------------------------------------------- placing

    def state(self, url: str, eligible: bool, load: float) -> ad.ReplicaState:
        e = self.engine(url)
        return ad.ReplicaState(
            id=url,
            registered=e.registered,
            slots=self.slots(url),
            running=e.running,
            waiting=e.waiting,
            loading=frozenset(e.loading),
            in_use=e.in_use,
            load=load,
            eligible=eligible,
        )

    def place(self, name: str, states: list[ad.ReplicaState]) -> ad.Placement:
        return ad.place(name, self.spec, states, self.last_used, self.opts.placement)

    def use(self, url: str, name: str) -> None:
        """A request on `name` is sent to `url` (call `release` when it ends)."""
        e = self.engine(url)
        e.in_use[name] = e.in_use.get(name, 0) + 1
        self.last_used[(url, name)] = time.monotonic()

    def release(self, url: str, name: str) -> None:
        e = self.engines.get(url)
        if e is None:
            return
        n = e.in_use.get(name, 0) - 1
        if n > 0:
            e.in_use[name] = n
            return
        e.in_use.pop(name, None)
        self.notify()  # a slot may be evictable now, a removed adapter unloadable

    def notify(self) -> None:
        """Something changed that may let a waiting request place its adapter."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def changed(self, timeout_s: float) -> None:
        ev = self._changed
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ev.wait(), timeout_s)

    # ------------------------------------------------------------------------------- loading

    def start_load(self, url: str, name: str, evict: str | None, reason: str) -> asyncio.Task[CallResult]:
        """The load of `name` on `url` (the one in progress, or a new one after unloading
        `evict`). Synchronous up to the task's creation, so the next placement sees it."""
        e = self.engine(url)
        task = e.loading.get(name)
        if task is not None:
            return task
        path = self.spec[name]
        source = self.sources.get(name, path)
        keep: tuple[str, bool] | None = None  # the evictee's path and whether this router placed it
        if evict is not None:  # no request of this router routes to it from now on
            keep = (e.registered.pop(evict, ""), evict in e.placed)
            e.placed.discard(evict)
            e.unloading.add(evict)
        e.changed_at = time.monotonic()
        task = asyncio.create_task(self._load(url, name, path, evict, reason, keep, source))
        e.loading[name] = task
        return task

    async def ensure(self, url: str, name: str, evict: str | None, reason: str) -> CallResult:
        """Wait for `name` to be loaded on `url` (starting the load if none is in progress)."""
        task = self.start_load(url, name, evict, reason)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            me = asyncio.current_task()
            if task.cancelled() and (me is None or me.cancelling() == 0):  # the load, not us
                return CallResult(
                    False, 503, "the load was cancelled (the router is stopping)", None, "cancelled"
                )
            raise

    def spread(self, url: str, name: str) -> None:
        """Load a hot adapter on one more replica, in the background."""
        self._keep(self.start_load(url, name, None, L_SPREAD))

    async def _load(
        self,
        url: str,
        name: str,
        path: str,
        evict: str | None,
        reason: str,
        keep: tuple[str, bool] | None = None,
        source: str | None = None,
    ) -> CallResult:
        """Load `name`, and only once it loaded unload `evict` (the engine briefly registers one
        more adapter than the router's slots; vLLM's own CPU cache stays bounded by its LRU): an
        adapter that cannot load (a wrong source, too high a rank) never evicts a working one."""
        e = self.engine(url)
        t0 = time.monotonic()
        try:
            if self.session is None:
                return CallResult(False, 503, "the router is not started", None, "unreachable")
            if source is not None and source != path:  # staged first, on that engine's pod
                res = await stage_adapter(
                    self.session, url, source, path, self.opts.stage_port, self.opts.stage_timeout_s
                )
                if res.ok:
                    res = await load_adapter(self.session, url, name, path, self.opts.load_timeout_s)
            else:
                res = await load_adapter(self.session, url, name, path, self.opts.load_timeout_s)
            if res.ok:
                self.errors.pop(name, None)
                self.failed_at.pop(name, None)
                e.registered[name] = path
                e.placed.add(name)
                self.metrics.loads.labels(url, reason).inc()
                self.metrics.load_seconds.observe(time.monotonic() - t0)
                log.info("loaded adapter %s (%s) on %s: %s", name, path, url, reason)
                if evict is not None:
                    out = await unload_adapter(self.session, url, evict, self.opts.load_timeout_s)
                    if out.ok:
                        self.metrics.evictions.labels(url).inc()
                        self.metrics.unloads.labels(url, U_EVICTED).inc()
                        log.info("evicted adapter %s from %s for %s", evict, url, name)
                    else:  # the engine keeps it registered; its own CPU LRU still bounds memory
                        log.warning("unloading adapter %s from %s failed: %s", evict, url, out.message)
                        e.listed_at = float("-inf")
            else:
                self.errors[name] = f"{res.status} {res.message}"[:1024]
                if 400 <= res.status < 500:  # the adapter's own fault: not retried for a while
                    self.failed_at[name] = (time.monotonic(), res)
                self.metrics.load_failures.labels(url, res.kind).inc()
                log.warning(
                    "loading adapter %s (%s) on %s failed: %d %s", name, path, url, res.status, res.message
                )
                if evict is not None and keep is not None and keep[0]:  # nothing was evicted
                    e.registered[evict] = keep[0]
                    if keep[1]:
                        e.placed.add(evict)
            return res
        finally:
            if evict is not None:
                e.unloading.discard(evict)
            e.changed_at = time.monotonic()
            if e.loading.get(name) is asyncio.current_task():
                del e.loading[name]
            self.notify()

    def recent_failure(self, name: str, now: float) -> CallResult | None:
        """The adapter's last load failure when it was its own fault (4xx) and recent: answered
        again without a load, so a request stream for a broken adapter costs no load per request."""
        got = self.failed_at.get(name)
        if got is None or now - got[0] > self.opts.failure_backoff_s:
            return None
        return got[1]

    # ------------------------------------------------------------------------------- upkeep

    def upkeep(self, url: str, eligible: bool, load: float) -> None:
        """Unload what the engine should no longer hold (removed, stale, overflow; never while
        this router uses it there) and register again what a restart lost."""
        if not eligible or url not in self.engines:
            return
        e = self.engines[url]
        st = self.state(url, eligible, load)
        for name in ad.surplus(st, self.spec, self.retired, self.last_used):
            if name in e.unloading:
                continue
            path = e.registered.pop(name, None)
            why = (
                U_REMOVED
                if name in self.retired
                else U_STALE
                if name in self.spec and path != self.spec[name]
                else U_SURPLUS
            )
            e.placed.discard(name)
            e.unloading.add(name)
            e.changed_at = time.monotonic()
            self._keep(asyncio.create_task(self._unload(url, name, why)))
        for name in ad.reloads(self.state(url, eligible, load), e.placed, self.spec):
            log.info("%s lost adapter %s (restarted?): registering it again", url, name)
            self._keep(self.start_load(url, name, None, L_RELOAD))

    async def _unload(self, url: str, name: str, why: str) -> None:
        e = self.engine(url)
        try:
            if self.session is None:
                return
            res = await unload_adapter(self.session, url, name, self.opts.load_timeout_s)
            if res.ok:
                self.metrics.unloads.labels(url, why).inc()
                log.info("unloaded adapter %s from %s: %s", name, url, why)
            else:
                log.warning("unloading adapter %s from %s failed: %s", name, url, res.message)
                e.listed_at = float("-inf")  # re-read what it holds
        finally:
            e.unloading.discard(name)
            e.changed_at = time.monotonic()
            self.notify()

    def _keep(self, task: asyncio.Task[Any]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        tasks = list(self._tasks) + [t for e in self.engines.values() for t in e.loading.values()]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    # ------------------------------------------------------------------------------- /v1/models

    def model_cards(self, doc: object) -> object:
        """The engines' /v1/models answer with the adapters as this router serves them: every
        adapter of the spec (wherever it is loaded, or not yet), none other."""
        if not self.active or not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
            return doc
        cards = [c for c in doc["data"] if not (isinstance(c, Mapping) and c.get("parent"))]
        base = next((c.get("id") for c in cards if isinstance(c, Mapping)), None)
        created = int(time.time())
        for name, path in sorted(self.spec.items()):
            cards.append(
                {
                    "id": name,
                    "object": "model",
                    "created": created,
                    "owned_by": "vllm",
                    "root": path,
                    "parent": base,
                    "max_model_len": None,
                    "permission": [],
                }
            )
        return {**doc, "data": cards}


def parse_adapter_flags(values: Iterable[str]) -> dict[str, str]:
    """``NAME=PATH`` pairs (``--adapter``), in order; a repeated name keeps its last path."""
    out: dict[str, str] = {}
    for v in values:
        name, sep, path = v.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise ValueError(f"--adapter wants NAME=PATH, got {v!r}")
        out[name] = path
    return out
