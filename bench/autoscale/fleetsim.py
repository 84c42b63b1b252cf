"""A discrete-time, in-process simulation of one LLMDeployment's replicas under an autoscaler.

Why a simulation: the trace is days long; replayed in real time through mock engines it would take
days, and even at a high time scale the 2-core dev box could not run several policies side by side.
So the engines are simulated here, one-second ticks, with their timing and memory taken from the
mock engine's pure model (``toposerve.mockengine.timing``):

* KV capacity per replica: ``default_num_gpu_blocks(gpu) x block_size`` tokens (what vLLM profiles:
  usable GPU memory less the weights and activations); at most ``max_num_seqs`` sequences;
* prefill: ``TimingModel.prefill_time(prompt)``, one prompt at a time per replica (FCFS behind the
  prompts already admitted), so TTFT = queue wait + prefill wait + prefill;
* decode: continuous batching, every running sequence gets one token per
  ``TimingModel.decode_step_time(batch, context tokens)``; prefill time is taken out of the next
  tick's decode time (one GPU does both);
* admission reserves the request's whole KV (prompt + output) and waits FCFS when it does not fit
  (no preemption, unlike vLLM under pressure); the KV usage a replica reports is what its running
  sequences hold now (prompt + tokens generated so far) over its capacity, like
  ``vllm:kv_cache_usage_perc``; waiting and running counts are ``vllm:num_requests_*``.

Replicas (pods) take ``startup_s`` to load the model (with ``startup_sigma`` > 0, each pod draws its
own from a log-normal with that median and sigma, seeded per run, the same for every policy) and count GPU time from creation to deletion
(starting, standby and draining included). The router sends each request to the in-rotation replica
with the fewest waiting requests, then the least KV reserved; a request that waits longer than
``timeout_s`` for admission is dropped (the client gave up). A deleted replica leaves rotation and
finishes what it holds. The autoscaler under test sees per-pod metrics averaged over a window
(Prometheus ``avg_over_time``) every ``period`` seconds and sets the number of serving replicas
(spec.replicas) and of warm standby pods; pods are relabelled with toposerve's own
``standby.relabel``, deleted in the ReplicaSet's order (not ready first, then youngest).
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Protocol

from daytrace import DAY, Trace

from toposerve.autoscale.standby import Pod, relabel
from toposerve.mockengine.timing import TimingModel, default_num_gpu_blocks, gpu_weight_for

SCRAPE_S = 5.0  # Prometheus scrape interval
RECORD_S = 60.0  # resolution of the fleet history the forecast reads and of the timeline


@dataclass(frozen=True)
class EngineModel:
    """One replica's capacity and timing, from the mock engine's model of ``gpu``."""

    gpu: str
    timing: TimingModel
    kv_tokens: int
    startup_s: float = 300.0  # model load: pod created -> ready (the median with startup_sigma > 0)
    promote_s: float = 5.0  # standby relabelled -> the router sends it traffic
    max_num_seqs: int = 256
    block_size: int = 16
    startup_sigma: float = 0.0  # log-normal sigma of each pod's model load; 0: every load is startup_s

    @classmethod
    def for_gpu(
        cls, gpu: str, startup_s: float = 300.0, promote_s: float = 5.0, startup_sigma: float = 0.0
    ) -> EngineModel:
        weight, known = gpu_weight_for(gpu)
        if not known:
            raise ValueError(f"gpu: unknown GPU type {gpu!r} (see toposerve.api.gpus)")
        if startup_s < 0 or promote_s < 0 or startup_sigma < 0:
            raise ValueError("startup_s, promote_s and startup_sigma must be >= 0")
        blocks = default_num_gpu_blocks(gpu)
        return cls(
            gpu,
            TimingModel(gpu_weight=weight),
            blocks * 16,
            startup_s,
            promote_s,
            startup_sigma=startup_sigma,
        )

    def startup_quantile(self, q: float) -> float:
        """The q-quantile of a pod's model load (the figure toposerve's measured start-up plans with)."""
        if self.startup_sigma <= 0:
            return self.startup_s
        return self.startup_s * math.exp(self.startup_sigma * NormalDist().inv_cdf(q))


@dataclass(frozen=True)
class PodView:
    """One live pod as an autoscaler sees it; metric means are None without samples."""

    name: str
    standby: bool
    ready: bool
    age: float
    kv: float | None
    waiting: float | None
    running: float | None
    decode_rate: float | None = None  # decode tokens/s over the window (vllm:generation_tokens_total)


@dataclass(frozen=True)
class RouterView:
    """What toposerve's router sees, at the moment of the observation (router/demand.py's figures).

    Expected decode tokens are the router's learned mean output (of finished requests), never the
    request's true length, which no router knows in advance."""

    short_s: float  # the short window, seconds
    long_s: float
    arrivals_short: int  # requests that entered routing within the window
    arrivals_long: int
    prompt_short: int  # their prompt tokens
    prompt_long: int
    expected_decode: float  # learned mean decode tokens per request
    in_flight: int  # sent to an engine and not finished (running + waiting on engines)
    in_flight_prompt: int  # their prompt tokens
    held: int  # held at the router (no replica in rotation)


@dataclass(frozen=True)
class Observation:
    now: float
    current: int  # spec.replicas: the serving replicas asked for
    pods: tuple[PodView, ...]  # live pods (deleted ones excluded)
    inflight: int  # running + waiting on every live pod, plus requests held by the router
    router: RouterView | None = None  # only for policies with ``router_windows``


class Policy(Protocol):
    name: str
    period: float  # seconds between decisions
    standby: int  # warm standby pods kept beside the serving ones (read after each decide)

    def initial(self) -> int:
        """Serving replicas at t=0 (they start loaded)."""
        ...

    def decide(self, obs: Observation, history: FleetHistory) -> int:
        """Serving replicas wanted now."""
        ...


@dataclass
class Engine:
    name: str
    created: float
    ready_at: float
    rotation_at: float  # when the router starts sending it requests
    standby: bool = False
    draining: bool = False
    d: float = 0.0  # decode tokens each running sequence has had, cumulative (the fluid clock)
    heap: list[tuple[float, int]] = field(default_factory=list)  # (d at finish, request)
    running: int = 0
    sum_prompt: int = 0
    sum_start: float = 0.0  # sum of d at admission over running sequences
    reserved: int = 0  # KV tokens reserved by running sequences
    waiting: deque[int] = field(default_factory=deque)
    pf_free: float = 0.0  # the prefill is busy until then
    debt: float = 0.0  # prefill seconds not yet taken out of decode time
    samples: deque[tuple[float, float, int, int, float]] = field(
        default_factory=deque
    )  # (t, kv, waiting, running, gen)
    gen: float = 0.0  # decode tokens generated, cumulative (vllm:generation_tokens_total)
    # heterogeneous fleets (hetero.py): this pod's replica model and USD/h; None/0: the fleet's
    model: EngineModel | None = None
    price: float = 0.0

    def ready(self, now: float) -> bool:
        return now >= self.ready_at

    def context(self) -> float:
        return self.sum_prompt + self.running * self.d - self.sum_start


@dataclass
class FleetHistory:
    """Per-minute sums over serving pods of KV usage and waiting requests (what Prometheus keeps)."""

    kv: list[float] = field(default_factory=list)
    waiting: list[float] = field(default_factory=list)

    def mean(self, series: Sequence[float], end: float, window: float) -> float | None:
        """Mean of the minutes in (end - window, end]; None when there is no data there."""
        hi = min(len(series), int(end // RECORD_S))
        lo = max(0, math.ceil((end - window) / RECORD_S))
        if hi <= lo:
            return None
        return sum(series[lo:hi]) / (hi - lo)

    def range_query(
        self, now: float, offset: float, period: float, lookback: int, window: float
    ) -> tuple[list[float], list[float]]:
        """``sum(avg_over_time(m[window]))`` at ``now + offset - k x period``, k = lookback..1, for KV
        usage and waiting (as ``PrometheusSource.history``: points without data are absent)."""
        kv: list[float] = []
        wait: list[float] = []
        for k in range(lookback, 0, -1):
            x = now + offset - k * period
            a, b = self.mean(self.kv, x, window), self.mean(self.waiting, x, window)
            if a is not None:
                kv.append(a)
            if b is not None:
                wait.append(b)
        return kv, wait


@dataclass
class Result:
    policy: str
    ttft: list[float]  # per request, NaN when it never got a first token
    dropped: list[bool]
    served: int
    dropped_count: int
    unfinished: int  # admitted or waiting when the simulation ended
    gpu_seconds: float
    gpu_seconds_by_day: list[float]
    scale_events: int  # changes of spec.replicas
    pod_starts: int  # model loads (pods created after t=0)
    promotions: int
    timeline: dict[str, list[float]]  # per RECORD_S: pods, serving, ready_serving, kv_mean, waiting
    usd_by_day: list[float] = field(default_factory=list)  # GPU-dollars (Engine.price), per day


class Fleet:
    """Runs one policy against one trace."""

    def __init__(
        self,
        trace: Trace,
        engine: EngineModel,
        policy: Policy,
        timeout_s: float = 120.0,
        metrics_window_s: float = 60.0,
        dt: float = 1.0,
        until: float | None = None,
        seed: int = 0,
    ) -> None:
        if dt <= 0 or timeout_s <= 0 or metrics_window_s <= 0:
            raise ValueError("dt, timeout_s and metrics_window_s must be > 0")
        self.trace, self.model, self.policy = trace, engine, policy
        self.timeout_s, self.window, self.dt = timeout_s, metrics_window_s, dt
        self.until = trace.duration if until is None else until
        n = len(trace)
        self.ttft = [math.nan] * n
        self.dstart = [0.0] * n
        self.dropped = [False] * n
        self.served = 0
        self.engines: list[Engine] = []
        self.held: deque[int] = deque()
        self.history = FleetHistory()
        self.current = 0
        self.scale_events = self.pod_starts = self.promotions = 0
        self._seq = 0
        self._prefill: Callable[[int], float] = engine.timing.prefill_time
        self._rng = random.Random(seed)  # start-up draws (same seed for every policy of a run)
        # the router's view: arrivals of the longest window a policy asks for, learned output mean
        self.router_windows: tuple[float, float] | None = getattr(policy, "router_windows", None)
        self._recent: deque[int] = deque()
        self._out_sum, self._out_n = 256.0, 1  # prior: one request of 256 decode tokens

    # ---- pods ---------------------------------------------------------------------------------
    def _new_engine(self, now: float, loaded: bool) -> Engine:
        self._seq += 1
        load = self.model.startup_s
        if self.model.startup_sigma > 0:
            load *= math.exp(self._rng.gauss(0.0, self.model.startup_sigma))
        ready = now if loaded else now + load
        e = Engine(f"pod-{self._seq:05d}", created=now, ready_at=ready, rotation_at=ready)
        self.engines.append(e)
        return e

    def live(self) -> list[Engine]:
        return [e for e in self.engines if not e.draining]

    def _relabel(self, now: float, serving: int, standby: int) -> None:
        live = {e.name: e for e in self.live()}
        pods = [Pod(e.name, e.standby, e.ready(now), now - e.created) for e in live.values()]
        change = relabel(pods, serving, standby)
        for name in change.promote:
            e = live[name]
            e.standby = False
            e.samples.clear()  # its engine-labelled series starts now
            e.rotation_at = max(e.ready_at, now + self.model.promote_s)
            self.promotions += 1
        for name in change.demote:
            live[name].standby = True

    def scale(self, now: float, serving: int, standby: int) -> None:
        """spec.replicas := serving; the workload runs serving + standby pods (as the loop does:
        relabel the pods there are, then resize the workload, then relabel again)."""
        if serving != self.current:
            self.scale_events += 1
        self.current = serving
        self._relabel(now, serving, standby)
        live = self.live()
        want = serving + standby
        for _ in range(want - len(live)):
            self._new_engine(now, loaded=False)
            self.pod_starts += 1
        if len(live) > want:
            # ReplicaSet order: not ready first, then the youngest.
            for e in sorted(live, key=lambda e: (e.ready(now), -e.created))[: len(live) - want]:
                e.draining = True
        self._relabel(now, serving, standby)

    # ---- requests -----------------------------------------------------------------------------
    def _m(self, e: Engine) -> EngineModel:
        return e.model or self.model

    def _tick_hook(self, t0: float) -> None:
        """Called at the start of every tick before the decision (hetero.py: spot reclaims)."""

    def _start_pods(self, n: int) -> None:
        """The serving pods at t=0, loaded (hetero.py places them in pools)."""
        for _ in range(n):
            self._new_engine(0.0, loaded=True)
        self.current = n

    def _fits(self, e: Engine, rid: int) -> bool:
        need = self.trace.prompt[rid] + self.trace.output[rid]
        m = self._m(e)
        return e.running < m.max_num_seqs and e.reserved + need <= m.kv_tokens

    def _admit(self, e: Engine, rid: int, t: float, d_at: float) -> None:
        p, o = self.trace.prompt[rid], self.trace.output[rid]
        e.reserved += p + o
        e.running += 1
        e.sum_prompt += p
        e.sum_start += d_at
        self.dstart[rid] = d_at
        start = max(t, e.pf_free)
        pf = self._prefill(p) if e.model is None else e.model.timing.prefill_time(p)
        e.pf_free = start + pf
        e.debt += pf
        self.ttft[rid] = e.pf_free - self.trace.arrival[rid]
        heapq.heappush(e.heap, (d_at + o - 1, rid))  # the first token comes from the prefill

    def _release(self, e: Engine, rid: int) -> None:
        p, o = self.trace.prompt[rid], self.trace.output[rid]
        e.reserved -= p + o
        e.running -= 1
        e.sum_prompt -= p
        e.sum_start -= self.dstart[rid]
        self.served += 1
        self._out_sum += o
        self._out_n += 1

    def _drain_queue(self, e: Engine, t: float, d_at: float) -> None:
        arrival = self.trace.arrival
        while e.waiting and self._fits(e, e.waiting[0]):
            rid = e.waiting.popleft()
            self._admit(e, rid, max(t, arrival[rid]), d_at)

    def _expire(self, q: deque[int], now: float) -> None:
        arrival = self.trace.arrival
        while q and now - arrival[q[0]] > self.timeout_s:
            self.dropped[q.popleft()] = True

    def _route(self, rotation: Sequence[Engine]) -> Engine:
        return min(rotation, key=lambda e: (len(e.waiting), e.reserved / self._m(e).kv_tokens))

    # ---- observation --------------------------------------------------------------------------
    def observe(self, now: float) -> Observation:
        pods: list[PodView] = []
        inflight = len(self.held)
        for e in self.live():
            inflight += e.running + len(e.waiting)
            recent = [s for s in e.samples if s[0] > now - self.window]
            if e.ready(now) and recent:
                n = len(recent)
                kv = sum(s[1] for s in recent) / n
                waiting = sum(s[2] for s in recent) / n
                running = sum(s[3] for s in recent) / n
                span = recent[-1][0] - recent[0][0]
                rate = (recent[-1][4] - recent[0][4]) / span if span > 0 else None
                pods.append(PodView(e.name, e.standby, True, now - e.created, kv, waiting, running, rate))
            else:
                pods.append(PodView(e.name, e.standby, e.ready(now), now - e.created, None, None, None))
        return Observation(now, self.current, tuple(pods), inflight, self._router(now))

    def _router(self, now: float) -> RouterView | None:
        if self.router_windows is None:
            return None
        short, long = self.router_windows
        arrival, prompt = self.trace.arrival, self.trace.prompt
        while self._recent and arrival[self._recent[0]] <= now - long:
            self._recent.popleft()
        ns = ps = pl = 0
        for rid in self._recent:
            pl += prompt[rid]
            if arrival[rid] > now - short:
                ns += 1
                ps += prompt[rid]
        flight = flight_prompt = 0
        for e in self.live():
            flight += e.running + len(e.waiting)
            flight_prompt += e.sum_prompt + sum(prompt[r] for r in e.waiting)
        return RouterView(short, long, ns, len(self._recent), ps, pl, self._out_sum / self._out_n,
                          flight, flight_prompt, len(self.held))  # fmt: skip

    # ---- the loop -----------------------------------------------------------------------------
    def run(self) -> Result:
        tr, dt, cap = self.trace, self.dt, self.model.kv_tokens
        arrival, n = tr.arrival, len(tr)
        self._start_pods(self.policy.initial())
        for _ in range(self.policy.standby):
            self._new_engine(0.0, loaded=True).standby = True
        next_decide = self.policy.period
        next_scrape = 0.0
        next_record = RECORD_S
        acc_kv = acc_wait = 0.0
        acc_n = 0
        timeline: dict[str, list[float]] = {k: [] for k in ("pods", "serving", "kv_mean", "waiting")}
        tl_acc = [0.0, 0.0, 0.0, 0.0]
        tl_n = 0
        gpu_s = 0.0
        by_day = [0.0] * (math.ceil(self.until / DAY) or 1)
        usd_by_day = [0.0] * len(by_day)
        i = 0
        ticks = math.ceil(self.until / dt)
        for k in range(ticks):
            t0 = k * dt
            t1 = t0 + dt
            self._tick_hook(t0)
            if t0 >= next_decide:
                obs = self.observe(t0)
                serving = self.policy.decide(obs, self.history)
                self.scale(t0, serving, self.policy.standby)  # read after decide: it may follow the load
                next_decide += self.policy.period
            rotation = [e for e in self.engines if not e.draining and not e.standby and e.rotation_at <= t0]
            # Requests held while no replica was in rotation go out first.
            self._expire(self.held, t0)
            while self.held and rotation:
                rid = self.held.popleft()
                e = self._route(rotation)
                if not e.waiting and self._fits(e, rid):
                    self._admit(e, rid, t0, e.d)
                else:
                    e.waiting.append(rid)
            # Decode rate of this tick, from the batch at its start.
            rate: dict[str, float] = {}
            for e in self.engines:
                used = min(e.debt, dt)
                e.debt -= used
                if e.running:
                    step = self._m(e).timing.decode_step_time(e.running, int(e.context()))
                    rate[e.name] = (dt - used) / step
                    e.gen += e.running * rate[e.name]  # sequences finishing mid-tick: a slight over-count
                else:
                    rate[e.name] = 0.0
            # Arrivals of this tick.
            while i < n and arrival[i] < t1:
                rid = i
                i += 1
                if self.router_windows is not None:
                    self._recent.append(rid)
                need = tr.prompt[rid] + tr.output[rid]
                if need > cap:
                    self.dropped[rid] = True  # can never fit (vLLM rejects it)
                    continue
                if not rotation:
                    self.held.append(rid)
                    continue
                e = self._route(rotation)
                if not e.waiting and self._fits(e, rid):
                    dd = rate[e.name]
                    self._admit(e, rid, arrival[rid], e.d + dd * (arrival[rid] - t0) / dt)
                else:
                    e.waiting.append(rid)
            # Finishes of this tick; each frees KV for the queue at its own time.
            for e in self.engines:
                dd = rate[e.name]
                lim = e.d + dd
                while e.heap and e.heap[0][0] <= lim:
                    d_fin, rid = heapq.heappop(e.heap)
                    tf = t0 + (dt * (d_fin - e.d) / dd if dd > 0 else 0.0)
                    tf = min(t1, max(t0, tf))
                    self._release(e, rid)
                    self._drain_queue(e, tf, max(d_fin, e.d))
                e.d = lim
                self._drain_queue(e, t1, e.d)
                self._expire(e.waiting, t1)
            # Deleted replicas go away once empty.
            self.engines = [e for e in self.engines if not (e.draining and not e.running and not e.waiting)]
            gpu_s += len(self.engines) * dt
            by_day[min(len(by_day) - 1, int(t0 // DAY))] += len(self.engines) * dt
            usd_by_day[min(len(by_day) - 1, int(t0 // DAY))] += (
                sum(e.price for e in self.engines) * dt / 3600.0
            )
            if t1 >= next_scrape:
                next_scrape += SCRAPE_S
                for e in self.engines:
                    if e.ready(t1):
                        s = (t1, e.context() / self._m(e).kv_tokens, len(e.waiting), e.running, e.gen)
                        e.samples.append(s)
                        while e.samples and e.samples[0][0] <= t1 - self.window:
                            e.samples.popleft()
                serving = [e for e in self.engines if not e.draining and not e.standby and e.ready(t1)]
                acc_kv += sum(e.context() / self._m(e).kv_tokens for e in serving)
                acc_wait += sum(len(e.waiting) for e in serving)
                acc_n += 1
                tl_acc[0] += len(self.engines)
                tl_acc[1] += len(serving)
                tl_acc[2] += (
                    sum(e.context() / self._m(e).kv_tokens for e in serving) / len(serving)
                    if serving
                    else 0.0
                )
                tl_acc[3] += sum(len(e.waiting) for e in self.engines) + len(self.held)
                tl_n += 1
            if t1 >= next_record:
                next_record += RECORD_S
                self.history.kv.append(acc_kv / acc_n if acc_n else 0.0)
                self.history.waiting.append(acc_wait / acc_n if acc_n else 0.0)
                acc_kv = acc_wait = 0.0
                acc_n = 0
                for key, v in zip(("pods", "serving", "kv_mean", "waiting"), tl_acc, strict=True):
                    timeline[key].append(round(v / tl_n, 4) if tl_n else 0.0)
                tl_acc = [0.0, 0.0, 0.0, 0.0]
                tl_n = 0
        unfinished = len(self.held) + sum(e.running + len(e.waiting) for e in self.engines)
        return Result(
            policy=self.policy.name,
            ttft=self.ttft,
            dropped=self.dropped,
            served=self.served,
            dropped_count=sum(self.dropped),
            unfinished=unfinished,
            gpu_seconds=gpu_s,
            gpu_seconds_by_day=by_day,
            scale_events=self.scale_events,
            pod_starts=self.pod_starts,
            promotions=self.promotions,
            timeline=timeline,
            usd_by_day=usd_by_day,
        )
