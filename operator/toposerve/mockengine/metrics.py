"""vLLM's Prometheus metrics, with the current names, buckets and the ``model_name`` label.

The router and the autoscaler read these exact series from real vLLM, so the mock must expose the
same names: ``vllm:kv_cache_usage_perc`` (which replaced ``vllm:gpu_cache_usage_perc``; the old
name is available behind a flag for older routers), token-valued prefix-cache counters, and the
latency histograms with vLLM v1's bucket boundaries. Each engine owns a ``CollectorRegistry`` so
several engines can live in one test process.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from toposerve.mockengine.scheduler import Scheduler, StepStats

TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)
ITL_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
REQUEST_LATENCY_BUCKETS = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class EngineMetrics:
    """All series of one engine; fed from :class:`StepStats` and the scheduler's state."""

    def __init__(
        self,
        model_name: str,
        cache_config: Mapping[str, object],
        deprecated_gpu_cache_metric: bool = False,
        max_loras: int | None = None,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r, lbl = self.registry, ["model_name"]
        self.model_name = model_name
        self.running = Gauge(
            "vllm:num_requests_running", "Number of requests in model execution batches.", lbl, registry=r
        )
        self.waiting = Gauge(
            "vllm:num_requests_waiting", "Number of requests waiting to be processed.", lbl, registry=r
        )
        self.kv_usage = Gauge(
            "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", lbl, registry=r
        )
        self.gpu_cache_usage: Gauge | None = None
        if deprecated_gpu_cache_metric:
            self.gpu_cache_usage = Gauge(
                "vllm:gpu_cache_usage_perc",
                "GPU KV-cache usage. 1 means 100 percent usage (deprecated).",
                lbl,
                registry=r,
            )
        self.prefix_queries = Counter(
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.",
            lbl,
            registry=r,
        )
        self.prefix_hits = Counter(
            "vllm:prefix_cache_hits",
            "Prefix cache hits, in terms of number of cached tokens.",
            lbl,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "vllm:prompt_tokens", "Number of prefill tokens processed.", lbl, registry=r
        )
        self.generation_tokens = Counter(
            "vllm:generation_tokens", "Number of generation tokens processed.", lbl, registry=r
        )
        self.preemptions = Counter(
            "vllm:num_preemptions", "Cumulative number of preemption from the engine.", lbl, registry=r
        )
        self.success = Counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            [*lbl, "finished_reason"],
            registry=r,
        )
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            lbl,
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "vllm:inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            lbl,
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            lbl,
            buckets=REQUEST_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue = Histogram(
            "vllm:request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            lbl,
            buckets=REQUEST_LATENCY_BUCKETS,
            registry=r,
        )
        info = Gauge(
            "vllm:cache_config_info",
            "Information of the LLMEngine CacheConfig",
            sorted(cache_config),
            registry=r,
        )
        info.labels(**{k: str(v) for k, v in cache_config.items()}).set(1)
        # Pre-create the children so every series exists (at zero) before the first request.
        m = model_name
        self._children = (self.running.labels(m), self.waiting.labels(m), self.kv_usage.labels(m))
        self._queries, self._hits = self.prefix_queries.labels(m), self.prefix_hits.labels(m)
        self._prompt, self._gen = self.prompt_tokens.labels(m), self.generation_tokens.labels(m)
        self._preempt = self.preemptions.labels(m)
        self._ttft, self._itl, self._e2e, self._queue = (
            self.ttft.labels(m),
            self.itl.labels(m),
            self.e2e.labels(m),
            self.queue.labels(m),
        )
        for reason in ("stop", "length", "abort"):
            self.success.labels(m, reason)
        # vLLM 0.33.0 v1/metrics/loggers.py: only with --enable-lora; no model_name label; one
        # series per distinct label set, never removed, each set to the wall-clock time
        # (set_to_current_time) whenever an engine step's stats carry that set, so the newest
        # series is the one with the largest value. No series before the first step.
        self.max_loras = max_loras
        self.lora_info: Gauge | None = None
        if max_loras is not None:
            self.lora_info = Gauge(
                "vllm:lora_requests_info",
                "Running stats on lora requests.",
                ["max_lora", "waiting_lora_adapters", "running_lora_adapters"],
                registry=r,
            )

    def observe_step(self, s: StepStats) -> None:
        if s.prefix_queries:
            self._queries.inc(s.prefix_queries)
            self._hits.inc(s.prefix_hits)
        if s.prompt_tokens:
            self._prompt.inc(s.prompt_tokens)
        if s.generation_tokens:
            self._gen.inc(s.generation_tokens)
        if s.preemptions:
            self._preempt.inc(s.preemptions)
        for v in s.ttft:
            self._ttft.observe(v)
        for v in s.itl:
            self._itl.observe(v)
        for v in s.queue_time:
            self._queue.observe(v)
        for v in s.e2e:
            self._e2e.observe(v)
        for req in s.finished:
            self.success.labels(self.model_name, req.finish_reason or "stop").inc()

    def observe_abort(self) -> None:
        """A request dropped before finishing (client hung up, injected death)."""
        self.success.labels(self.model_name, "abort").inc()

    def observe_state(self, sched: Scheduler) -> None:
        running, waiting, kv = self._children
        running.set(len(sched.running))
        waiting.set(len(sched.waiting))
        kv.set(sched.blocks.usage)
        if self.gpu_cache_usage is not None:
            self.gpu_cache_usage.labels(self.model_name).set(sched.blocks.usage)

    def observe_lora(self, adapters: list[str], now: float | None = None) -> None:
        """One engine step's ``vllm:lora_requests_info``. ``adapters``: the adapters with a request
        waiting or running, in the order each last became busy. vLLM 0.33.0 puts that same list in
        *both* labels (v1/metrics/stats.py LoRARequestStates.update_scheduler_stats fills
        waiting_lora_adapters and running_lora_adapters with every tracked adapter, whatever its
        count; loggers.py joins the keys with ",")."""
        if self.lora_info is None:
            return
        joined = ",".join(adapters)
        self.lora_info.labels(
            max_lora=str(self.max_loras), waiting_lora_adapters=joined, running_lora_adapters=joined
        ).set(time.time() if now is None else now)

    def render(self) -> bytes:
        return generate_latest(self.registry)
