"""Demand and service-rate arithmetic for the autoscaler's leading signal.

Why here: the router sees every request before an engine does, so its arrival rate leads the
engines' KV usage by the whole queueing delay. The autoscaler scrapes these figures every few
seconds and turns demand (tokens/s arriving) over supply (tokens/s one replica serves at the
batch it was seen at) into replicas. Kept pure (clocks are arguments, no I/O) so that windows,
expiry and counter resets are tested exactly; `proxy.py` feeds it and exports it.

Memory is fixed per pool: one ring of one-second buckets (`Ring`) sized to the longest window,
so a rate costs O(1) per event, O(window) per scrape, and never grows with traffic.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

SHORT_WINDOW_S = 5
# The autoscaler's leading window: in bench/autoscale a 5 s rate scaled up on Poisson noise, 15 s
# kept most of the lead (docs/benchmarks.md, "Leading signal"); 5 s stays for dashboards.
LEADING_WINDOW_S = 15
LONG_WINDOW_S = 60
WINDOWS: tuple[int, ...] = (SHORT_WINDOW_S, LEADING_WINDOW_S, LONG_WINDOW_S)
SERVICE_WINDOW_S = 60  # engines' counters move once per poll (1 s): a minute smooths batches
MIN_SPAN_S = 1.0  # a rate is never taken over less than one bucket (a fresh router's first second)

# vLLM 0.33.0 series the router reads from each engine's /metrics (summed over a pod's series:
# one per `engine` with data parallelism; max for KV usage, a share of one cache).
GENERATION_TOKENS = "vllm:generation_tokens_total"
PROMPT_TOKENS = "vllm:prompt_tokens_total"
RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
KV_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")


class Ring:
    """Per-second sums of `columns` quantities over the last `size` seconds.

    A slot remembers which absolute second it holds; a stale slot is zeroed when reused and
    skipped when read, so no sweep is needed and an idle ring reads 0, never stale values.
    """

    __slots__ = ("_sec", "cols", "size")

    def __init__(self, size: int, columns: int) -> None:
        if size < 1 or columns < 1:
            raise ValueError("a ring needs at least one slot and one column")
        self.size = size
        self.cols: list[list[float]] = [[0.0] * size for _ in range(columns)]
        self._sec = [-(1 << 62)] * size  # no second yet

    def slot(self, now: float) -> int:
        """Index of the bucket for `now` (zeroed first when it held an older second)."""
        s = math.floor(now)
        i = s % self.size
        if self._sec[i] != s:
            self._sec[i] = s
            for col in self.cols:
                col[i] = 0.0
        return i

    def sums(self, now: float, window: int) -> list[float]:
        """Column sums over the buckets of the last `window` seconds, the current one included."""
        if not 1 <= window <= self.size:
            raise ValueError(f"window {window} outside 1..{self.size}")
        s = math.floor(now)
        out = [0.0] * len(self.cols)
        for sec in range(s - window + 1, s + 1):
            i = sec % self.size
            if self._sec[i] == sec:
                for c, col in enumerate(self.cols):
                    out[c] += col[i]
        return out

    def last_second(self) -> int:
        """The latest second any bucket holds (very negative when none)."""
        return max(self._sec)


def span(now: float, window: int, since: float) -> float:
    """Seconds that `Ring.sums(now, window)` covers: from the start of its oldest bucket to now
    (window - 1 whole seconds plus the current one's elapsed part), but not before `since` (the
    counting began: a fresh router has not been blind to earlier traffic, it had none), and at
    least `MIN_SPAN_S`. Dividing by this, not by `window`, keeps the rate unbiased mid-second."""
    covered = now - (math.floor(now) - window + 1)
    return max(min(covered, now - since), MIN_SPAN_S)


def common_pool(pools: Iterable[str]) -> str:
    """The pool a request that cannot be routed yet is counted in: the one pool its candidates
    share, else "" (no pool known: zero replicas, or several pools it could go to)."""
    found: str | None = None
    for p in pools:
        if found is None:
            found = p
        elif p != found:
            return ""
    return found or ""


# ------------------------------------------------------------------------------------- arrivals

_REQ, _PROMPT, _DECODE = 0, 1, 2


@dataclass(frozen=True, slots=True)
class ArrivalRates:
    """Per-second arrival rates of one pool over one window."""

    requests: float
    prompt_tokens: float
    decode_tokens: float


class PoolDemand:
    """One pool's arrivals (windowed and cumulative) and what it has in flight."""

    __slots__ = ("decode_tokens", "in_flight", "in_flight_tokens", "prompt_tokens", "requests", "ring")

    def __init__(self) -> None:
        self.ring = Ring(LONG_WINDOW_S, 3)
        self.requests = 0  # cumulative, for Prometheus' own rate()
        self.prompt_tokens = 0
        self.decode_tokens = 0
        self.in_flight = 0
        self.in_flight_tokens = 0


class Demand:
    """Arrivals and in-flight work per pool. `since`: when counting began (the router's start)."""

    def __init__(self, since: float) -> None:
        self.since = since
        self.pools: dict[str, PoolDemand] = {}

    def _pool(self, pool: str) -> PoolDemand:
        p = self.pools.get(pool)
        if p is None:
            p = self.pools[pool] = PoolDemand()
        return p

    def arrive(self, pool: str, prompt_tokens: int, decode_tokens: int, now: float) -> None:
        """One request entered routing (counted once, whatever then happens to it)."""
        p = self.pools.get(pool) or self._pool(pool)
        ring = p.ring
        i = ring.slot(now)
        ring.cols[_REQ][i] += 1
        ring.cols[_PROMPT][i] += prompt_tokens
        ring.cols[_DECODE][i] += decode_tokens
        p.requests += 1
        p.prompt_tokens += prompt_tokens
        p.decode_tokens += decode_tokens

    def sent(self, pool: str, tokens: int) -> None:
        """A request was sent to an engine of `pool`, charged `tokens` (prompt + expected decode)."""
        p = self.pools.get(pool) or self._pool(pool)
        p.in_flight += 1
        p.in_flight_tokens += tokens

    def finished(self, pool: str, tokens: int) -> None:
        """The request `sent` with the same arguments ended, however it ended."""
        p = self.pools.get(pool)
        if p is None:  # pruned while it ran cannot happen (in flight keeps it); be safe anyway
            return
        p.in_flight -= 1
        p.in_flight_tokens -= tokens

    def rates(self, pool: str, window: int, now: float) -> ArrivalRates:
        p = self.pools.get(pool)
        if p is None:
            return ArrivalRates(0.0, 0.0, 0.0)
        req, prompt, decode = p.ring.sums(now, window)
        d = span(now, window, self.since)
        return ArrivalRates(req / d, prompt / d, decode / d)

    def prune(self, now: float, keep: Iterable[str] = ()) -> None:
        """Forget pools with nothing in flight and no arrival within the long window, except
        `keep` (pools that still have backends): pool names come and go with discovery, and a
        forgotten one's counters restart at 0 (a counter reset, which rate() absorbs)."""
        kept = set(keep)
        horizon = math.floor(now) - LONG_WINDOW_S
        for name in [n for n, p in self.pools.items() if n not in kept and p.in_flight == 0]:
            if self.pools[name].ring.last_second() <= horizon:
                del self.pools[name]


# ------------------------------------------------------------------------------------ service


@dataclass(frozen=True, slots=True)
class EngineSample:
    """What one poll of an engine's /metrics said (None: the page does not have the series)."""

    kv_usage: float | None = None
    waiting: int | None = None
    running: float | None = None
    generation_tokens: float | None = None  # cumulative counter
    prompt_tokens: float | None = None  # cumulative counter


def parse_engine_page(text: str) -> EngineSample:
    """One line scan of a vLLM /metrics page: KV usage (highest series), waiting and running
    requests and the token counters (summed over a pod's series). Not the full exposition
    parser: this runs every probe interval per backend."""
    kv: float | None = None
    waiting = running = gen = prompt = None
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
        if name in KV_USAGE:
            kv = max(kv or 0.0, value)
        elif name == WAITING:
            waiting = (waiting or 0.0) + value
        elif name == RUNNING:
            running = (running or 0.0) + value
        elif name == GENERATION_TOKENS:
            gen = (gen or 0.0) + value
        elif name == PROMPT_TOKENS:
            prompt = (prompt or 0.0) + value
    return EngineSample(kv, int(waiting) if waiting is not None else None, running, gen, prompt)


def counter_delta(prev: float | None, cur: float | None) -> float | None:
    """Increase of a counter between two polls; None when either side lacks it or it went down
    (the engine restarted: what it counted since is over an unknown part of the interval, so the
    interval is dropped and `cur` becomes the new base)."""
    if prev is None or cur is None or cur < prev or math.isinf(cur):
        return None
    return cur - prev


# ring columns of ServiceRates
_GEN, _GEN_S, _PR, _PR_S, _RUN, _RUN_S = range(6)


@dataclass(frozen=True, slots=True)
class ServiceRate:
    """One pool's engines over the service window, averaged over replica-seconds observed."""

    decode_tokens_per_replica: float  # tokens/s one ready replica generated
    prompt_tokens_per_replica: float | None  # None: no engine exported vllm:prompt_tokens_total
    running_per_replica: float | None  # mean vllm:num_requests_running over the same intervals
    replica_seconds: float  # observation behind the figures (e.g. 60 for one replica, whole window)


class ServiceRates:
    """Per-pool service rates learnt from consecutive polls of each engine's counters.

    Each poll of a ready engine closes an interval since its previous poll; the counters'
    increases and the interval's length (replica-seconds) go into the pool's ring at the poll's
    time, so a pool's rate is tokens over replica-seconds: the mean per ready replica. Intervals
    longer than `max_gap_s` (polls were skipped: the engine failed its probes) are dropped, as
    are intervals over a counter reset.
    """

    def __init__(self, max_gap_s: float = 10.0, window: int = SERVICE_WINDOW_S) -> None:
        self.max_gap_s = max_gap_s
        self.window = window
        self._last: dict[str, tuple[float, EngineSample]] = {}
        self.pools: dict[str, Ring] = {}

    def observe(self, backend: str, pool: str, now: float, sample: EngineSample, ready: bool = True) -> None:
        """One poll of `backend` (of `pool`) at `now`. Not ready (draining, down): only re-based."""
        prev = self._last.get(backend)
        self._last[backend] = (now, sample)
        if prev is None or not ready:
            return
        dt = now - prev[0]
        if not 0 < dt <= self.max_gap_s:
            return
        gen = counter_delta(prev[1].generation_tokens, sample.generation_tokens)
        prompt = counter_delta(prev[1].prompt_tokens, sample.prompt_tokens)
        if gen is None and prompt is None:
            return
        ring = self.pools.get(pool)
        if ring is None:
            ring = self.pools[pool] = Ring(self.window, 6)
        i = ring.slot(now)
        c = ring.cols
        if gen is not None:
            c[_GEN][i] += gen
            c[_GEN_S][i] += dt
            if sample.running is not None:  # the batch at which that throughput was seen
                c[_RUN][i] += sample.running * dt
                c[_RUN_S][i] += dt
        if prompt is not None:
            c[_PR][i] += prompt
            c[_PR_S][i] += dt

    def forget(self, backend: str) -> None:
        self._last.pop(backend, None)

    def rate(self, pool: str, now: float) -> ServiceRate | None:
        """None when no ready engine of `pool` reported its generation counter in the window:
        nothing is known, which is not the same as 0 tokens/s."""
        ring = self.pools.get(pool)
        if ring is None:
            return None
        s = ring.sums(now, self.window)
        if s[_GEN_S] <= 0:
            return None
        return ServiceRate(
            decode_tokens_per_replica=s[_GEN] / s[_GEN_S],
            prompt_tokens_per_replica=s[_PR] / s[_PR_S] if s[_PR_S] > 0 else None,
            running_per_replica=s[_RUN] / s[_RUN_S] if s[_RUN_S] > 0 else None,
            replica_seconds=s[_GEN_S],
        )

    def prune(self, now: float, keep: Iterable[str] = ()) -> None:
        """Forget pools with no observation in the window that have no backend any more."""
        kept = set(keep)
        horizon = math.floor(now) - self.window
        for name in [n for n in self.pools if n not in kept]:
            if self.pools[name].last_second() <= horizon:
                del self.pools[name]
