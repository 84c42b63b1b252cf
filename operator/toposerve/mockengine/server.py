"""The aiohttp shell around the pure core: HTTP routes, the engine loop, faults and shutdown.

The engine loop runs the scheduler step by step, each step ending ``duration * time_scale`` after
it began (its own Python work included), then makes that step's tokens visible to the request
handlers. The simulated clock advances by
step durations while busy (so metrics are in simulated seconds and do not depend on how busy
this CPU is) and catches up with wall time / time_scale when idle.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import logging
import os
import socket
import time
import uuid
from collections import OrderedDict, defaultdict, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from toposerve.kvevents.publisher import KVEventsConfig, ZmqPublisher
from toposerve.kvevents.wire import KVEventBatch
from toposerve.mockengine.faults import Fate, FaultConfig, FaultInjector
from toposerve.mockengine.lora import Adapter, AdapterLoadError, LoRAConfig, LoRASlots, read_adapter
from toposerve.mockengine.metrics import CONTENT_TYPE, EngineMetrics
from toposerve.mockengine.protocol import (
    DONE,
    APIError,
    ChunkFormatter,
    GenerationParams,
    completion_body,
    dumps,
    parse_chat,
    parse_completion,
    sanitize_message,
    usage,
)
from toposerve.mockengine.scheduler import Request, Scheduler, SchedulerConfig, Status
from toposerve.mockengine.startup import Caches, StartupModel, compile_dir, hub_dir
from toposerve.mockengine.startup import run as startup_run
from toposerve.mockengine.timing import TimingModel, default_num_gpu_blocks, gpu_weight_for
from toposerve.mockengine.tokenizer import MockTokenizer, TextGenerator, render_chat

log = logging.getLogger("toposerve.mockengine")
VERSION = "0.1.0-mock"


@dataclass
class EngineConfig:
    """Everything the mock engine can be told; defaults model one H100 serving an 8B model."""

    model: str = "mock-model"
    served_model_names: list[str] = field(default_factory=list)
    gpu_type: str = "H100"
    tensor_parallel_size: int = 1
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    num_gpu_blocks: int | None = None  # None: derived from the GPU's memory
    block_size: int = 16
    max_model_len: int = 8192
    enable_prefix_caching: bool = True
    kv_events: KVEventsConfig | None = None  # vLLM's --kv-events-config (None: off)
    time_scale: float = 1.0
    seed: int = 0
    max_waiting: int = 4096
    default_output_range: tuple[int, int] = (16, 256)
    tp_efficiency: float = 0.75
    decode_base_s: float = 0.012
    decode_s_per_seq: float = 0.0002
    s_per_context_token: float = 6e-8
    prefill_s_per_token: float = 5e-5
    deprecated_gpu_cache_metric: bool = False
    faults: FaultConfig = field(default_factory=FaultConfig)
    # vLLM 0.33.0's --shutdown-timeout: 0 (its default) aborts in-flight requests on SIGTERM,
    # N > 0 finishes them for up to N s (see Engine.begin_shutdown).
    shutdown_timeout_s: int = 0
    # /admin/* and /reset_prefix_cache change the engine's behaviour: off unless enabled, like
    # vLLM's dev-mode-only endpoints; with a token they also need `Authorization: Bearer TOKEN`.
    admin: bool = False
    admin_token: str | None = None
    # LoRA (vLLM 0.33.0's --enable-lora, --max-loras, ... plus the mock's timing; lora.py)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    # start-up phases (download, load, compile, graphs; startup.py): none modelled by default
    startup: StartupModel = field(default_factory=StartupModel)
    # where they look for and leave their caches: vLLM's HF_HOME and VLLM_CACHE_ROOT (None: the
    # environment, with vLLM's defaults ~/.cache/huggingface and ~/.cache/vllm)
    hf_home: Path | None = None
    cache_root: Path | None = None
    # VLLM_ALLOW_RUNTIME_LORA_UPDATING: None reads the environment as vLLM's envs.py does
    # ("1" or "true", any case, stripped); tests set it here instead
    allow_runtime_lora_updating: bool | None = None

    @property
    def runtime_lora_updating(self) -> bool:
        if self.allow_runtime_lora_updating is not None:
            return self.allow_runtime_lora_updating
        return os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "0").strip().lower() in ("1", "true")

    @property
    def names(self) -> list[str]:
        return self.served_model_names or [self.model]

    def startup_caches(self) -> Caches:
        """Where the weights and the compiled graphs of this configuration are kept (startup.py)."""
        home = self.hf_home or Path(os.environ.get("HF_HOME") or Path.home() / ".cache/huggingface")
        root = self.cache_root or Path(os.environ.get("VLLM_CACHE_ROOT") or Path.home() / ".cache/vllm")
        # what vLLM's key depends on, as far as the mock has it: the model and its compiled shapes
        factors = f"{self.model}|tp={self.tensor_parallel_size}|gpu={self.gpu_type}|len={self.max_model_len}"
        return Caches(weights=hub_dir(home, self.model), compiled=compile_dir(root, factors))


@dataclass(eq=False)
class _Handle:
    req: Request
    event: asyncio.Event = field(default_factory=asyncio.Event)
    visible: int = 0
    done: bool = False
    error: APIError | None = None  # the engine died under it (shutdown deadline passed)


class Engine:
    """Scheduler + metrics + faults, driven by an asyncio loop; the HTTP routes talk to this."""

    def __init__(self, cfg: EngineConfig, clock: Callable[[], float] = time.monotonic) -> None:
        weight, known = gpu_weight_for(cfg.gpu_type)
        if not known:
            log.warning("unknown GPU type %r: timing with throughput weight 1.0", cfg.gpu_type)
        self.cfg = cfg
        blocks = cfg.num_gpu_blocks or default_num_gpu_blocks(
            cfg.gpu_type, cfg.tensor_parallel_size, cfg.block_size
        )
        self.max_model_len = min(cfg.max_model_len, blocks * cfg.block_size)
        if self.max_model_len < cfg.max_model_len:
            log.warning(
                "max_model_len lowered to %d: the KV cache holds only %d blocks", self.max_model_len, blocks
            )
        self.timing = TimingModel(
            gpu_weight=weight,
            tensor_parallel_size=cfg.tensor_parallel_size,
            tp_efficiency=cfg.tp_efficiency,
            decode_base_s=cfg.decode_base_s,
            decode_s_per_seq=cfg.decode_s_per_seq,
            s_per_context_token=cfg.s_per_context_token,
            prefill_s_per_token=cfg.prefill_s_per_token,
        )
        self.sched_config = SchedulerConfig(
            max_num_seqs=cfg.max_num_seqs,
            max_num_batched_tokens=max(cfg.max_num_batched_tokens, cfg.block_size),
            num_gpu_blocks=blocks,
            block_size=cfg.block_size,
            max_model_len=self.max_model_len,
            enable_prefix_caching=cfg.enable_prefix_caching,
            kv_events=bool(cfg.kv_events and cfg.kv_events.publishes),
            max_loras=cfg.lora.max_loras if cfg.lora.enabled else 0,
        )
        self.tokenizer = MockTokenizer()
        self.generator = TextGenerator(cfg.seed)
        self.scheduler = Scheduler(self.sched_config, self.timing, self.tokenizer)
        self.scheduler.slowdown = cfg.faults.slowdown
        self.faults = FaultInjector(cfg.faults, cfg.seed)
        cache_info = {
            "block_size": cfg.block_size,
            "num_gpu_blocks": blocks,
            "num_cpu_blocks": 0,
            "cache_dtype": "auto",
            "enable_prefix_caching": cfg.enable_prefix_caching,
            "gpu_memory_utilization": 0.9,
            "prefix_caching_hash_algo": "sha256",  # vLLM 0.33.0's default, as kvevents/hashing.py
        }
        self.metrics = EngineMetrics(
            cfg.names[0],
            cache_info,
            cfg.deprecated_gpu_cache_metric,
            cfg.lora.max_loras if cfg.lora.enabled else None,
        )
        self.metrics.observe_state(self.scheduler)
        # KV-cache events: one batch per engine step that stored, evicted or cleared blocks, on a
        # ZeroMQ PUB socket in vLLM 0.33.0's format (kvevents/), as vLLM's scheduler publishes them.
        self.kv_publisher = ZmqPublisher(cfg.kv_events) if cfg.kv_events and cfg.kv_events.publishes else None
        self._clock = clock
        self._t0 = clock()
        self.sim_now = 0.0
        self._wake = asyncio.Event()
        self._release = asyncio.Event()  # frees hung requests (fault cleared or shutdown)
        self._handles: dict[str, _Handle] = {}
        self._ids = itertools.count()
        self.draining = False  # shutting down: new requests are aborted at once (begin_shutdown)
        self.dead = False  # the shutdown deadline passed: what was left got EngineDeadError
        self.crashed = False
        self.inflight = 0
        self.steps = 0
        # LoRA. Engine side (LoRASlots, keyed by int id) and API side (``loras``: the adapters
        # served by name, vLLM's OpenAIServingModels.lora_requests) are apart as in vLLM: an
        # unloaded adapter keeps its slots until LRU evicts it.
        self.lora_slots: LoRASlots | None = None
        if cfg.lora.enabled:
            cfg.lora.validate()
            self.lora_slots = LoRASlots(
                cfg.lora.max_loras, cfg.lora.cpu_slots, cfg.lora.load_s, cfg.lora.swap_s
            )
        self.scheduler.lora_slots = self.lora_slots
        self.loras: dict[str, tuple[Adapter, str]] = {}  # name -> (adapter, parent model)
        self.lora_locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._lora_ids = itertools.count(1)  # models/serving.py lora_id_counter.inc(1)
        self._lora_busy: OrderedDict[str, set[Request]] = OrderedDict()  # vllm:lora_requests_info
        self._jobs: deque[tuple[Callable[[], float], asyncio.Future[None]]] = deque()
        self._load_static_loras()

    # -- LoRA ----------------------------------------------------------------------------------
    def next_lora_id(self) -> int:
        return next(self._lora_ids)

    def engine_error(self, message: str) -> str:
        """How an exception inside add_lora reaches the API server: v1/engine/core.py
        _invoke_utility_method prefixes "Call to add_lora method failed: "; with several workers
        (tp > 1) v1/executor/multiproc_executor.py wraps the worker's error first."""
        if self.cfg.tensor_parallel_size > 1:
            message = (
                f"Worker failed with error '{message}', please check the stack trace above for the root cause"
            )
        return f"Call to add_lora method failed: {message}"

    def _lora_job(self, a: Adapter, load_inplace: bool) -> Callable[[], float]:
        def job() -> float:
            if self.lora_slots is None:  # v1/worker/lora_model_runner_mixin.py _ensure_lora_enabled
                raise AdapterLoadError("LoRA is not enabled. Use --enable-lora to enable LoRA.")
            a.rank = read_adapter(a.name, a.path, self.cfg.lora.hub_dir, self.cfg.lora.max_lora_rank)
            return self.lora_slots.add(a, load_inplace)

        return job

    def _load_static_loras(self) -> None:
        """--lora-modules, loaded at startup in order (models/serving.py init_static_loras: any
        failure stops the server with that error's message). Startup time is not modelled."""
        for m in self.cfg.lora.modules:
            if m.name in self.cfg.names:
                raise ValueError(f"The lora adapter '{m.name}' conflicts with a served base model.")
            if m.name in self.loras:
                raise ValueError(
                    f"The lora adapter '{m.name}' has already been loaded. If you want to load the "
                    "adapter in place, set 'load_inplace' to True."
                )
            a = Adapter(self.next_lora_id(), m.name, m.path)
            try:
                self._lora_job(a, False)()
            except AdapterLoadError as e:
                raise ValueError(
                    sanitize_message(e.message if e.not_found else self.engine_error(e.message))
                ) from None
            parent = m.base_model_name if m.base_model_name in self.cfg.names else self.cfg.names[0]
            self.loras[m.name] = (a, parent)

    async def add_lora(self, a: Adapter, load_inplace: bool = False) -> None:
        """The engine's add_lora utility call: it runs in the engine loop between two steps and
        holds the loop for the load's time (vLLM's EngineCore serves utility calls in the same
        thread as its steps, so every running stream pauses while an adapter loads)."""
        if self.crashed:
            raise APIError(500, "the engine loop has crashed")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._catch_up()
        self._jobs.append((self._lora_job(a, load_inplace), fut))
        self._wake.set()
        await fut

    async def _run_job(self) -> None:
        job, fut = self._jobs.popleft()
        try:
            took = job()
        except AdapterLoadError as e:
            if not fut.done():
                fut.set_exception(e)
            return
        self.sim_now += took
        if took > 0 and self.cfg.time_scale > 0:
            await asyncio.sleep(took * self.cfg.time_scale)
        if not fut.done():
            fut.set_result(None)

    def lora_busy(self) -> list[str]:
        """Adapters with a request waiting or running, in the order each last became busy
        (v1/metrics/stats.py LoRARequestStates: an adapter's entry goes when its last request
        finishes and comes back at the end with its next one)."""
        for name in list(self._lora_busy):
            reqs = self._lora_busy[name]
            reqs.difference_update([r for r in reqs if r.finished])
            if not reqs:
                del self._lora_busy[name]
        return list(self._lora_busy)

    def lora_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "enabled": self.lora_slots is not None,
            "runtime_updating": self.cfg.runtime_lora_updating,
            "served": [
                {"name": n, "id": a.int_id, "path": a.path, "rank": a.rank, "parent": p}
                for n, (a, p) in self.loras.items()
            ],
            "busy": self.lora_busy(),
        }
        if self.lora_slots is not None:
            state.update(self.lora_slots.state())
        return state

    def publish_kv_events(self) -> None:
        events = self.scheduler.blocks.take_events()
        if events and self.kv_publisher is not None:
            self.kv_publisher.publish(KVEventBatch(ts=time.time(), events=events))

    # -- the loop ------------------------------------------------------------------------------
    def _catch_up(self) -> None:
        """While idle, simulated time follows wall time (scaled); while busy, only steps move it."""
        if self.cfg.time_scale > 0 and not self.scheduler.has_work:
            self.sim_now = max(self.sim_now, (self._clock() - self._t0) / self.cfg.time_scale)

    async def run(self) -> None:
        """The engine loop; if it ever crashes the engine turns unready, like a dead vLLM worker."""
        try:
            await self._loop()
        except Exception:
            log.exception("engine loop crashed; reporting unready")
            self.crashed = True
            for h in self._handles.values():
                h.done = True
                h.event.set()
            while self._jobs:
                _, fut = self._jobs.popleft()
                if not fut.done():
                    fut.set_exception(APIError(500, "the engine loop has crashed"))

    async def _loop(self) -> None:
        sched = self.scheduler
        # Real-time pacing by deadline: a step ends `duration x time_scale` after it started, the
        # mock's own work for it (scheduling, block hashing, the handlers' writes) included.
        # Why: the timing model gives a GPU step's whole time, of which the host's scheduling is
        # a part (vLLM's step times are measured end to end), so sleeping the whole duration
        # *after* the work made every step longer than modelled by the mock's Python time and the
        # loop's wake-up lateness, more so on a busy machine (measured: a stream's pieces drifted
        # ~60 us per step later when a proxy shared the cores, bench/router/timeline.py).
        # Lateness is made up by at most one step's time (the next sleep is shortened), so a
        # stall does not make the engine race through steps back to back.
        due: float | None = None  # when the current step ends, in the clock's time
        while True:
            if self._jobs:  # utility calls (add_lora) run between steps, before the next one
                await self._run_job()
                due = None
                continue
            if not sched.has_work:
                self._wake.clear()
                await self._wake.wait()
                due = None
                continue
            started = self._clock()
            stats = sched.step(self.sim_now)
            self.publish_kv_events()
            self.steps += 1
            self.sim_now = stats.end
            length = stats.duration * self.cfg.time_scale
            due = (started if due is None else max(due, started - length)) + length
            delay = due - self._clock()
            await asyncio.sleep(delay if delay > 0 else 0)
            for req in stats.updated:
                h = self._handles.get(req.req_id)
                if h is not None:
                    h.visible = len(req.output_pieces)
                    h.done = req.finished
                    h.event.set()
            self.metrics.observe_step(stats)
            self.metrics.observe_state(sched)
            if self.lora_slots is not None:
                self.metrics.observe_lora(self.lora_busy())
            if stats.duration == 0 and sched.has_work and not self._jobs:
                # Nothing fits (e.g. every block pinned): wait for an arrival or abort instead of spinning.
                self._wake.clear()
                await self._wake.wait()
                due = None

    def submit(self, params: GenerationParams, lora: Adapter | None = None) -> _Handle:
        if self.crashed:
            raise APIError(500, "the engine loop has crashed")
        if len(self.scheduler.waiting) >= self.cfg.max_waiting:
            raise APIError(503, f"overloaded: {len(self.scheduler.waiting)} requests waiting")
        limit = self.max_model_len
        # Tokenize at most limit + 1 tokens: past that the answer is a 400 whatever the rest holds.
        ids = (
            params.prompt_ids
            if params.prompt_ids is not None
            else self.tokenizer.encode(params.prompt_text or "", limit)
        )
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        wanted = len(ids) + (params.max_tokens or 0)
        if len(ids) >= limit or wanted > limit:
            over = "at least " if params.prompt_ids is None and len(ids) > limit else ""
            raise APIError(
                400,
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{over}{wanted} tokens ({over}{len(ids)} in the messages, {params.max_tokens or 0} in the "
                "completion). Please reduce the length of the messages or completion.",
                param="messages" if params.prompt_text is not None else "prompt",
            )
        req_id = f"{next(self._ids)}-{uuid.uuid4().hex[:12]}"
        req = self.scheduler.make_request(
            req_id, ids, params.max_tokens, self.generator, params.seed, self.cfg.default_output_range
        )
        req.lora = lora
        req.cache_salt = params.cache_salt
        if self.draining:
            # vLLM 0.33.0 EngineCore._reject_add_in_shutdown: a request that arrives while the engine
            # shuts down (either mode) is finished at once with finish_reason "abort" and no tokens;
            # the HTTP server still listens, so the client gets a 200 with an empty answer.
            req.status, req.finish_reason = Status.ABORTED, "abort"
            self.metrics.observe_abort()
            h = _Handle(req, done=True)
            h.event.set()
            return h
        self._catch_up()
        self.scheduler.add(req, self.sim_now)
        if lora is not None:
            self._lora_busy.setdefault(lora.name, set()).add(req)
        h = _Handle(req)
        self._handles[req_id] = h
        self.metrics.observe_state(self.scheduler)
        self._wake.set()
        return h

    def begin_shutdown(self) -> None:
        """SIGTERM, as vLLM 0.33.0 handles it (entrypoints/launchers/launcher.py handle_shutdown ->
        v1/engine/core.py EngineCore._handle_shutdown): with --shutdown-timeout 0 ("abort", the
        default) every unfinished request is finished at once with finish_reason "abort" (a stream
        gets that finish chunk and [DONE] after the tokens it already had); with N > 0 ("drain")
        they go on. Either way new requests are aborted at once (submit) and /health stays 200
        (the engine is not dead); the HTTP server keeps listening until the engine has stopped."""
        self.draining = True
        self.stop_hangs()
        if self.cfg.shutdown_timeout_s == 0:
            self._abort_all()

    def _abort_all(self) -> None:
        for h in list(self._handles.values()):
            if not h.req.finished and self.scheduler.abort(h.req.req_id, self.sim_now) is not None:
                self.metrics.observe_abort()
                h.done = True
                h.event.set()
        self.metrics.observe_state(self.scheduler)

    def die(self) -> None:
        """The drain's deadline passed: vLLM's process manager kills EngineCore
        (v1/engine/utils.py CoreEngineProcManager.shutdown), and each request still running gets
        EngineDeadError, which the OpenAI server streams as an error event before [DONE]
        (entrypoints/openai/chat_completion/serving.py) or answers with a 500."""
        self.dead = True
        for h in list(self._handles.values()):
            if not h.req.finished:
                self.scheduler.abort(h.req.req_id, self.sim_now)
                h.error = APIError(
                    500, "EngineCore encountered an issue. See stack trace (above) for the root cause."
                )
                h.done = True
                h.event.set()

    def release(self, h: _Handle) -> None:
        """Forget a handle; abort its request if it is still in the scheduler (client went away)."""
        self._handles.pop(h.req.req_id, None)
        if not h.req.finished and self.scheduler.abort(h.req.req_id, self.sim_now) is not None:
            self.metrics.observe_abort()
            self.metrics.observe_state(self.scheduler)
            self._wake.set()

    def set_faults(self, cfg: FaultConfig) -> None:
        self.faults.config = cfg
        self.scheduler.slowdown = cfg.slowdown
        if cfg.hang_rate == 0:
            self._release.set()
            self._release = asyncio.Event()

    async def hang(self) -> None:
        await self._release.wait()

    def stop_hangs(self) -> None:
        self._release.set()


# -- HTTP ----------------------------------------------------------------------------------------
ENGINE_KEY = web.AppKey("engine", Engine)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(e: APIError) -> web.Response:
    # ASCII-escaped: messages echo client text (a model name), which may hold lone surrogates
    return web.json_response(e.body(), status=e.status)


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        return await handler(request)
    except APIError as e:
        return _error(e)
    except web.HTTPException as e:  # unknown route or method: still an OpenAI-shaped body
        if e.status < 400:
            raise
        return _error(APIError(e.status, f"{e.reason}: {request.method} {request.path}"))
    except (asyncio.CancelledError, ConnectionError):
        raise
    except Exception:  # a bug: still JSON for the client, the traceback for us (once)
        log.exception("error on %s %s", request.method, request.path)
        return _error(APIError(500, "internal error in the mock engine"))


async def _json(request: web.Request) -> Any:
    try:
        return await request.json()
    except (ValueError, RecursionError):  # RecursionError: nested deeper than Python's stack
        raise APIError(400, "request body is not valid JSON") from None


async def _check_model(engine: Engine, model: str | None) -> tuple[str, Adapter | None]:
    """The served name and adapter a request's ``model`` names, as vLLM 0.33.0's
    entrypoints/serve/engine/serving.py _check_model decides: a base model name, a loaded adapter,
    or (with runtime LoRA updating) an adapter whose load is under way: resolve_lora waits on the
    adapter name's lock, which load_lora_adapter holds while loading. Anything else is a 404."""
    if model is None:
        return engine.cfg.names[0], None
    if model in engine.cfg.names:
        return model, None
    if model in engine.loras:
        return model, engine.loras[model][0]
    if engine.cfg.runtime_lora_updating and model:
        async with engine.lora_locks[model]:
            if model in engine.loras:
                return model, engine.loras[model][0]
            engine.next_lora_id()  # resolve_lora takes an id before asking its (here no) resolvers
    raise APIError(
        404,
        sanitize_message(
            f"The model `{model}` does not exist. Valid aliases: {', '.join(engine.cfg.names)}."
        ),
        param="model",
    )


def _check_text(text: str | None) -> None:
    """Lone UTF-16 surrogates (legal as JSON escapes, not as Unicode text) are a 400, as in vLLM,
    whose JSON parser rejects them; they must never reach the tokenizer as a 500."""
    if text is None:
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise APIError(400, f"the prompt is not valid Unicode: {e.reason} at character {e.start}") from None


async def _generate(request: web.Request, chat: bool) -> web.StreamResponse:
    engine = request.app[ENGINE_KEY]
    body = await _json(request)
    params = parse_chat(body, chat_renderer(body)) if chat else parse_completion(body)
    model, lora = await _check_model(engine, params.model)
    _check_text(params.prompt_text)
    if engine.faults.poisoned(params.prompt_text):
        raise APIError(engine.faults.config.fail_status, "injected failure: poisoned prompt")
    fate = engine.faults.fate()
    if fate is Fate.FAIL:
        raise APIError(engine.faults.config.fail_status, "injected failure")
    if fate is Fate.HANG:
        await engine.hang()
        raise APIError(503, "injected hang released")
    h = engine.submit(params, lora)
    engine.inflight += 1
    try:
        if params.stream:
            return await _stream(request, engine, h, params, chat, model, fate)
        return await _unary(request, engine, h, chat, model, fate)
    finally:
        engine.inflight -= 1
        engine.release(h)


def _req_id(chat: bool, h: _Handle) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + h.req.req_id


def _kill_connection(request: web.Request) -> None:
    if request.transport is not None:
        request.transport.abort()


async def _unary(
    request: web.Request, engine: Engine, h: _Handle, chat: bool, model: str, fate: Fate
) -> web.StreamResponse:
    while not h.done:
        await h.event.wait()
        h.event.clear()
        if fate is Fate.DIE and h.visible >= engine.faults.config.die_after_tokens:
            _kill_connection(request)
            raise asyncio.CancelledError  # the connection is gone; nothing to send
    req = h.req
    if h.error is not None:
        raise h.error
    if not req.finished:  # the engine loop crashed under it
        raise APIError(500, "the engine loop has crashed")
    u = usage(len(req.prompt_ids), len(req.output_ids), max(req.num_cached_tokens, 0))
    body = completion_body(
        chat,
        _req_id(chat, h),
        int(time.time()),
        model,
        "".join(req.output_pieces),
        req.finish_reason or "stop",
        u,
    )
    return web.json_response(body, dumps=dumps)


async def _stream(
    request: web.Request,
    engine: Engine,
    h: _Handle,
    params: GenerationParams,
    chat: bool,
    model: str,
    fate: Fate,
) -> web.StreamResponse:
    resp = web.StreamResponse(
        headers={"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
    )
    await resp.prepare(request)
    fmt = ChunkFormatter(chat, _req_id(chat, h), int(time.time()), model, params.include_usage)
    try:
        if chat:
            await resp.write(fmt.role())
        sent = 0
        die_at = engine.faults.config.die_after_tokens if fate is Fate.DIE else -1
        req = h.req
        while True:
            await h.event.wait()
            h.event.clear()
            upto = h.visible
            if die_at >= 0 and upto >= die_at:
                upto = die_at
            if upto > sent:
                await resp.write("".join(fmt.token(p) for p in req.output_pieces[sent:upto]).encode())
                sent = upto
            if die_at >= 0 and sent >= die_at:
                _kill_connection(request)
                raise asyncio.CancelledError
            if h.done and h.error is not None:  # the engine died: an error event, then [DONE]
                await resp.write(b"data: " + dumps(h.error.body()).encode() + b"\n\n" + DONE)
                await resp.write_eof()
                return resp
            if h.done:
                if not req.finished:  # the engine loop crashed: end the stream without [DONE]
                    _kill_connection(request)
                    raise asyncio.CancelledError
                break
        tail = fmt.finish(req.finish_reason or "stop")
        if params.include_usage:
            tail += fmt.usage(len(req.prompt_ids), len(req.output_ids), max(req.num_cached_tokens, 0))
        await resp.write(tail + DONE)
        await resp.write_eof()
    except ConnectionResetError:  # the client hung up: the caller aborts the request
        log.debug("client went away mid-stream: %s", h.req.req_id)
    return resp


async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=False)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=True)


def _model_card(
    id: str, created: int, root: str | None, parent: str | None, max_model_len: int | None
) -> dict[str, Any]:
    """vLLM 0.33.0's ModelCard with one ModelPermission (entrypoints/serve/engine/protocol.py),
    fields in their order."""
    permission = {
        "id": f"modelperm-{uuid.uuid4().hex}",
        "object": "model_permission",
        "created": created,
        "allow_create_engine": False,
        "allow_sampling": True,
        "allow_logprobs": True,
        "allow_search_indices": False,
        "allow_view": True,
        "allow_fine_tuning": False,
        "organization": "*",
        "group": None,
        "is_blocking": False,
    }
    return {
        "id": id,
        "object": "model",
        "created": created,
        "owned_by": "vllm",
        "root": root,
        "parent": parent,
        "max_model_len": max_model_len,
        "permission": [permission],
    }


async def models(request: web.Request) -> web.Response:
    """Base models first (root: the model path), then the loaded adapters in load order (root:
    the lora_path as given, parent: its base model, max_model_len null), as vLLM 0.33.0's
    entrypoints/openai/models/serving.py show_available_models lists them."""
    engine = request.app[ENGINE_KEY]
    created = int(time.time())
    data = [
        _model_card(name, created, engine.cfg.model, None, engine.max_model_len) for name in engine.cfg.names
    ]
    data += [_model_card(name, created, a.path, parent, None) for name, (a, parent) in engine.loras.items()]
    return web.json_response({"object": "list", "data": data}, dumps=dumps)


# -- LoRA endpoints (vLLM 0.33.0 entrypoints/serve/lora/, entrypoints/openai/models/serving.py) --
def _validation_error(detail: str, param: str | None) -> APIError:
    """A request that fails pydantic validation, as vLLM's validation_exception_handler answers it
    (entrypoints/serve/exception_handling/handlers/validation.py): 400, type "Bad Request". The
    message lists the error like pydantic's does (its exact text is approximated)."""
    return APIError(
        400, sanitize_message(f"1 validation error:\n  {detail}"), param=param, err_type="Bad Request"
    )


_PYDANTIC_TRUE = {"1", "on", "t", "true", "y", "yes"}
_PYDANTIC_FALSE = {"0", "f", "false", "n", "no", "off"}


async def _lora_body(request: web.Request, fields: dict[str, tuple[type, bool]]) -> dict[str, Any]:
    """Parse LoadLoRAAdapterRequest / UnloadLoRAAdapterRequest (entrypoints/serve/lora/protocol.py)
    with pydantic's lax rules: str fields must be strings, bools accept true/false, 0/1 and
    pydantic's yes/no words, ints reject bools; unknown fields are ignored. The route first
    insists on Content-Type application/json (entrypoints/serve/utils/api_utils.py
    validate_json_request)."""
    if request.content_type != "application/json":
        raise _validation_error("Unsupported Media Type: Only 'application/json' is allowed", None)
    try:
        body = await request.json()
    except (ValueError, RecursionError):
        raise _validation_error(
            "{'type': 'json_invalid', 'loc': 'body', 'msg': 'JSON decode error'}", "body"
        ) from None
    if not isinstance(body, dict):
        raise _validation_error(
            "{'type': 'model_attributes_type', 'loc': 'body', 'msg': 'Input should be a valid dictionary "
            f"or object to extract fields from', 'input': {str(body)[:200]!r}}}",
            "body",
        )
    out: dict[str, Any] = {}
    for name, (kind, required) in fields.items():
        loc = f"body.{name}"
        if name not in body:
            if required:
                raise _validation_error(
                    f"{{'type': 'missing', 'loc': '{loc}', 'msg': 'Field required'}}", loc
                )
            continue
        v = body[name]
        if kind is str and not isinstance(v, str):
            raise _validation_error(
                f"{{'type': 'string_type', 'loc': '{loc}', 'msg': 'Input should be a valid string'}}", loc
            )
        if kind is bool and not isinstance(v, bool):
            if isinstance(v, int) and v in (0, 1):
                v = bool(v)
            elif isinstance(v, str) and v.strip().lower() in _PYDANTIC_TRUE | _PYDANTIC_FALSE:
                v = v.strip().lower() in _PYDANTIC_TRUE
            else:
                raise _validation_error(
                    f"{{'type': 'bool_parsing', 'loc': '{loc}', 'msg': 'Input should be a valid boolean, "
                    "unable to interpret input'}",
                    loc,
                )
        if kind is int and v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise _validation_error(
                f"{{'type': 'int_type', 'loc': '{loc}', 'msg': 'Input should be a valid integer'}}", loc
            )
        out[name] = v
    return out


def _invalid(message: str) -> APIError:
    return APIError(400, sanitize_message(message), err_type="InvalidUserInput")


def _success(text: str) -> web.Response:
    # vLLM answers `Response(status_code=200, content=...)`: the bare text, no JSON
    return web.Response(status=200, text=text)


async def load_lora_adapter(request: web.Request) -> web.Response:
    """POST /v1/load_lora_adapter {lora_name, lora_path, load_inplace=false, is_3d_lora_weight=false}:
    models/serving.py load_lora_adapter under the name's lock: the request checks
    (_check_load_lora_adapter_request), then the engine's add_lora (its load time passes in the
    engine loop), then the name is served."""
    engine = request.app[ENGINE_KEY]
    body = await _lora_body(
        request,
        {
            "lora_name": (str, True),
            "lora_path": (str, True),
            "load_inplace": (bool, False),
            "is_3d_lora_weight": (bool, False),
        },
    )
    name, path, inplace = body["lora_name"], body["lora_path"], body.get("load_inplace", False)
    async with engine.lora_locks[name]:
        if not name or not path:
            raise _invalid("Both 'lora_name' and 'lora_path' must be provided.")
        if name in engine.cfg.names:
            raise _invalid(f"The lora adapter '{name}' conflicts with a served base model.")
        if not inplace and name in engine.loras:
            raise _invalid(
                f"The lora adapter '{name}' has already been loaded. If you want to load the adapter "
                "in place, set 'load_inplace' to True."
            )
        previous = engine.loras.get(name)
        a = Adapter(previous[0].int_id if previous else engine.next_lora_id(), name, path)
        try:
            await engine.add_lora(a, inplace)
        except AdapterLoadError as e:
            if e.not_found:  # LoRAAdapterNotFoundError: NotFoundError, no param
                raise APIError(404, sanitize_message(e.message), err_type="NotFoundError") from None
            raise APIError(
                500, sanitize_message(engine.engine_error(e.message)), err_type="InternalServerError"
            ) from None
        # a name loaded again in place keeps its place in /v1/models (a dict key re-set)
        engine.loras[name] = (a, engine.cfg.names[0])
        log.info("Loaded new LoRA adapter: name '%s', path '%s'", name, path)
        return _success(f"Success: LoRA adapter '{name}' added successfully.")


async def unload_lora_adapter(request: web.Request) -> web.Response:
    """POST /v1/unload_lora_adapter {lora_name, lora_int_id=null}: models/serving.py
    unload_lora_adapter. vLLM 0.33.0 only forgets the name (it no longer routes to the adapter,
    /v1/models stops listing it); the engine is not told, so the adapter keeps its GPU/CPU slot
    until LRU evicts it, and requests already admitted with it finish with it. lora_int_id is
    accepted and ignored, as there."""
    engine = request.app[ENGINE_KEY]
    body = await _lora_body(request, {"lora_name": (str, True), "lora_int_id": (int, False)})
    name = body["lora_name"]
    async with engine.lora_locks[name]:
        if not name:
            raise _invalid("'lora_name' needs to be provided to unload a LoRA adapter.")
        if name not in engine.loras:
            raise APIError(
                404, sanitize_message(f"The lora adapter '{name}' cannot be found."), err_type="NotFoundError"
            )
        del engine.loras[name]
        log.info("Removed LoRA adapter: name '%s'", name)
        return _success(f"Success: LoRA adapter '{name}' removed successfully.")


async def health(request: web.Request) -> web.Response:
    engine = request.app[ENGINE_KEY]
    # Late only while the engine has work: vLLM 0.33.0 answers /health from an async handler on the
    # API server's event loop (entrypoints/serve/instrumentator/health.py: `await
    # client.check_health()`), the loop that also turns engine output into every stream's chunks,
    # so it is slow when that loop is busy with requests, not when it is idle.
    if engine.faults.config.health_delay and engine.scheduler.has_work:
        await asyncio.sleep(engine.faults.config.health_delay)
    if engine.dead or engine.crashed or engine.faults.config.unready:
        return web.Response(status=503)
    return web.Response(status=200)


_GENERATION_PROMPT = "<|assistant|>\n"  # what render_chat ends with


def _flag(body: Any, name: str, default: bool) -> bool:
    v = body.get(name, default) if isinstance(body, dict) else default
    if not isinstance(v, bool):
        raise APIError(400, f"{name} must be a boolean", param=name)
    return v


def chat_renderer(body: Any) -> Callable[[Any], str]:
    """The chat template with vLLM's ``add_generation_prompt`` (default true) and
    ``continue_final_message`` (default false; the last message left open, no generation prompt),
    shared by /v1/chat/completions and /tokenize so that both give the same ids: what the router
    hashes from /tokenize must be what the engine caches (docs/router.md, "Routing on KV-cache
    events"). Both true is a 400, as vLLM's ``check_generation_prompt`` answers."""
    add = _flag(body, "add_generation_prompt", True)
    cont = _flag(body, "continue_final_message", False)
    if add and cont and isinstance(body, dict) and "add_generation_prompt" in body:
        raise APIError(400, "Cannot set both `continue_final_message` and `add_generation_prompt` to True.")

    def render(messages: Any) -> str:
        text = render_chat(messages)
        if cont or not add:
            text = text.removesuffix(_GENERATION_PROMPT)
        if cont:
            text = text.removesuffix("\n")
        return text

    return render


async def tokenize(request: web.Request) -> web.Response:
    """vLLM 0.33.0's ``POST /tokenize`` (entrypoints/serve/tokenize/): a completion-style
    ``{"prompt": str}`` or a chat-style ``{"messages": [...], "add_generation_prompt": true, ...}``
    request; ``{"count", "max_model_len", "tokens", "token_strs"}`` back. The ids are exactly
    those a completion or chat request with the same fields is served (and its blocks hashed)
    with. The mock's tokenizer has no special tokens, so ``add_special_tokens`` changes nothing."""
    engine = request.app[ENGINE_KEY]
    body = await _json(request)
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise APIError(400, "model must be a string", param="model")
    await _check_model(engine, model)
    _flag(body, "add_special_tokens", "messages" not in body)
    strs = body.get("return_token_strs", False)
    if strs is not None and not isinstance(strs, bool):
        raise APIError(400, "return_token_strs must be a boolean", param="return_token_strs")
    if "messages" in body:
        text = parse_chat(body, chat_renderer(body)).prompt_text or ""
    elif isinstance(body.get("prompt"), str):
        text = body["prompt"]
    else:
        raise APIError(400, "prompt (string) or messages is required", param="prompt")
    _check_text(text)
    ids = engine.tokenizer.encode(text, engine.max_model_len)
    if len(ids) > engine.max_model_len:
        # vLLM tokenizes any length here; the mock stops one past the limit (a 20 MB prompt
        # would stall its loop) and says so rather than answer a truncated list
        raise APIError(
            400,
            f"This model's maximum context length is {engine.max_model_len} tokens; the prompt is longer.",
            param="prompt",
        )
    token_strs = [engine.tokenizer.decode([i]) for i in ids] if strs else None
    return web.json_response(
        {"count": len(ids), "max_model_len": engine.max_model_len, "tokens": ids, "token_strs": token_strs},
        dumps=dumps,
    )


async def detokenize(request: web.Request) -> web.Response:
    engine = request.app[ENGINE_KEY]
    body = await _json(request)
    tokens = body.get("tokens") if isinstance(body, dict) else None
    if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
        raise APIError(400, "tokens must be a list of integers", param="tokens")
    return web.json_response({"prompt": engine.tokenizer.decode(tokens)}, dumps=dumps)


async def metrics(request: web.Request) -> web.Response:
    engine = request.app[ENGINE_KEY]
    engine.metrics.observe_state(engine.scheduler)
    return web.Response(body=engine.metrics.render(), headers={"Content-Type": CONTENT_TYPE})


async def version(request: web.Request) -> web.Response:
    return web.json_response({"version": VERSION}, dumps=dumps)


async def get_faults(request: web.Request) -> web.Response:
    return web.json_response(request.app[ENGINE_KEY].faults.config.as_dict(), dumps=dumps)


async def post_faults(request: web.Request) -> web.Response:
    engine = request.app[ENGINE_KEY]
    body = await _json(request)
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object")
    try:
        cfg = engine.faults.config.updated(body)
    except (ValueError, TypeError) as e:
        raise APIError(400, str(e)) from None
    engine.set_faults(cfg)
    return web.json_response(cfg.as_dict(), dumps=dumps)


async def delete_faults(request: web.Request) -> web.Response:
    engine = request.app[ENGINE_KEY]
    engine.set_faults(FaultConfig())
    return web.json_response(engine.faults.config.as_dict(), dumps=dumps)


async def admin_state(request: web.Request) -> web.Response:
    """Debug view: scheduler state and whether this very connection has TCP_NODELAY set."""
    engine = request.app[ENGINE_KEY]
    sock = request.transport.get_extra_info("socket") if request.transport else None
    nodelay = bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)) if sock is not None else None
    s = engine.scheduler
    return web.json_response(
        {
            "running": len(s.running),
            "waiting": len(s.waiting),
            "kv_cache_usage": s.blocks.usage,
            "num_gpu_blocks": s.blocks.num_blocks,
            "cached_blocks": s.blocks.num_cached,
            "sim_time": engine.sim_now,
            "steps": engine.steps,
            "inflight": engine.inflight,
            "draining": engine.draining,
            "tcp_nodelay": nodelay,
            "gpu_type": engine.cfg.gpu_type,
            "speed": engine.timing.speed,
            "max_model_len": engine.max_model_len,
            "lora": engine.lora_state(),
        },
        dumps=dumps,
    )


async def reset_prefix_cache(request: web.Request) -> web.Response:
    engine = request.app[ENGINE_KEY]
    engine.scheduler.blocks.reset_prefix_cache()
    engine.publish_kv_events()  # AllBlocksCleared goes out now, not with the next step
    return web.Response(status=200)


def _admin(handler: Handler, token: str | None) -> Handler:
    """Guard an admin handler with a bearer token, when one is configured."""
    if not token:
        return handler
    expected = f"Bearer {token}".encode()

    async def guarded(request: web.Request) -> web.StreamResponse:
        given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(given, expected):
            raise APIError(401, "admin endpoints need Authorization: Bearer <token>")
        return await handler(request)

    return guarded


def build_app(engine: Engine) -> web.Application:
    app = web.Application(middlewares=[_errors], client_max_size=64 * 1024**2)
    app[ENGINE_KEY] = engine
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_post("/tokenize", tokenize)
    app.router.add_post("/detokenize", detokenize)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/version", version)
    if engine.cfg.runtime_lora_updating:  # entrypoints/serve/lora/api_router.py attach_router
        log.warning(
            "LoRA dynamic loading & unloading is enabled in the API server. "
            "This should ONLY be used for local development!"
        )
        app.router.add_post("/v1/load_lora_adapter", load_lora_adapter)
        app.router.add_post("/v1/unload_lora_adapter", unload_lora_adapter)
    if engine.cfg.admin or engine.cfg.admin_token:  # otherwise the routes do not exist (404)
        tok = engine.cfg.admin_token
        app.router.add_post("/reset_prefix_cache", _admin(reset_prefix_cache, tok))
        app.router.add_get("/admin/faults", _admin(get_faults, tok))
        app.router.add_post("/admin/faults", _admin(post_faults, tok))
        app.router.add_delete("/admin/faults", _admin(delete_faults, tok))
        app.router.add_get("/admin/state", _admin(admin_state, tok))

    async def _loop(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(engine.run())
        yield
        engine.stop_hangs()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if engine.kv_publisher is not None:
            engine.kv_publisher.close()

    app.cleanup_ctx.append(_loop)
    return app


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


class MockServer:
    """A running mock engine on host:port (port 0 picks a free one); used by the CLI and tests."""

    def __init__(self, cfg: EngineConfig, host: str = "127.0.0.1", port: int = 0) -> None:
        self.cfg = cfg
        self.host = host
        self.port = port
        self.engine: Engine | None = None
        self._runner: web.AppRunner | None = None
        self._site: web.BaseSite | None = None
        self.starting = False  # in the modelled start-up: listening, answering nothing

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def start(self) -> MockServer:
        """Bind, go through the modelled start-up (startup.py), then serve: as vLLM's run_server,
        the port listens from the start and answers nothing until the engine is up."""
        sock: socket.socket | None = None
        if self.cfg.startup.modelled:
            sock = socket.create_server((self.host, self.port), backlog=1024, family=_family(self.host))
            self.port = int(sock.getsockname()[1])
            self.starting = True
            try:
                await startup_run(self.cfg.startup, self.cfg.startup_caches(), self.cfg.time_scale)
            except BaseException:
                sock.close()
                raise
            finally:
                self.starting = False
        self.engine = Engine(self.cfg)
        self._runner = web.AppRunner(build_app(self.engine), access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site: web.BaseSite
        if sock is not None:
            site = web.SockSite(self._runner, sock)
        else:
            site = web.TCPSite(self._runner, self.host, self.port, backlog=1024)
        self._site = site
        await site.start()
        server = site._server
        if self.port == 0 and server is not None:
            sockets = getattr(server, "sockets", None) or []
            self.port = int(sockets[0].getsockname()[1])
        return self

    async def shutdown(self, flush_s: float = 5.0) -> int:
        """What vLLM 0.33.0 does on SIGTERM (Engine.begin_shutdown): abort or drain for up to
        --shutdown-timeout seconds while still listening, then, if requests are left, the engine
        dies under them; then the HTTP server closes. ``flush_s`` bounds the handlers' last writes.

        Returns how many requests were still in flight when the drain's deadline passed.
        """
        engine = self.engine
        assert engine is not None
        engine.begin_shutdown()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (engine.cfg.shutdown_timeout_s or flush_s)
        while engine.inflight and loop.time() < deadline:
            await asyncio.sleep(0.02)
        left = engine.inflight
        if left:
            engine.die()
            end = loop.time() + flush_s
            while engine.inflight and loop.time() < end:
                await asyncio.sleep(0.02)
        if self._site is not None:
            await self._site.stop()
        await self.stop()
        return left

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> MockServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
