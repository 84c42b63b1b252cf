"""Replicas from the router's demand (pure): a queueing rule in tokens, on a leading signal.

Why: the KV-cache metric lags. It is what engines already hold, averaged over a minute, decided
every 15 s, and capped at 100 % when a burst outruns the fleet, while a replica takes minutes to
load. The router sees every request before an engine does, so its arrival rate leads KV usage by
the whole time in system. This module turns the router's figures into replicas:

* **Little's law, in tokens.** Requests in decode N = lambda x W, with W = expected decode tokens
  / s (s = one sequence's decode speed at the observed batch: a replica's decode tokens/s over
  that batch), so N = (expected decode tokens/s arriving) / s, with no assumption on the length
  distribution. Resident KV = N x tau, tau = tokens per resident request, taken from what is in
  flight (prompt + expected decode of requests sent and not finished: the size-biased mean that
  Little's law in tokens needs, long requests stay longer), else from the window's arrivals.
  Load R = resident / (kvCacheTokensPerReplica x target KV utilization): replicas at target.
* **Leading up, lagging down.** R is computed on the short window (the routers' 15 s) and the
  long one (60 s), and on what is in flight now (plus held requests: a queue building up); the
  largest wins. A rise shows in the short window first; a fall shows only when the long window
  falls, so one quiet short window never removes a replica.
* **Only a significant rise leads** (``short_window_significant``). Arrivals are Poisson-like: a
  15 s window of 3.6 req/s holds 54 +- 7 requests, so taking max(short, long) as it comes scales
  up on noise, and the down window then holds every such replica for minutes (the benchmark's
  round 1 paid more GPU-hours for the lead than it saved, docs/benchmarks.md). The short window
  counts only when its arrivals exceed what the long window's rate predicts for it by more than
  z x sqrt(that prediction) (``SHORT_WINDOW_Z``): a real step (a 1.6x spike at that rate is about
  4.4 standard deviations in 15 s) still leads, a noisy window does not. The long window and the
  in-flight figure are never filtered.
* **Square-root staffing** (``decision.staffed``): ceil(R + beta x sqrt(R)), room for Poisson
  bursts that shrinks relative to the fleet as the fleet grows.

Tokens are counted at their reservation (prompt + expected decode), an upper bound of what vLLM
holds mid-decode, so at one target this rule is a little more conservative than the KV metric.
Any input that is NaN, infinite or negative, or an unknown service figure, gives no proposal: the
caller then decides on the engines' metrics alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Literal

Window = Literal["short", "long", "in-flight"]

# The routers' windows (router/demand.py LEADING_WINDOW_S and LONG_WINDOW_S; router_figures.py reads
# the 15 s figure as "short"): what a Demand's rates are averaged over unless it says otherwise.
SHORT_WINDOW_S = 15.0
LONG_WINDOW_S = 60.0
# The short window leads only when its arrivals exceed the long window's prediction by more than
# this many Poisson standard deviations (z = 3: a one-sided normal tail of about 1 in 740 windows;
# measured in docs/benchmarks.md "Leading signal, round 2").
SHORT_WINDOW_Z = 3.0


def staffed(load: float, beta: float) -> float:
    """Square-root staffing (Halfin-Whitt): replicas for an offered ``load`` (in replicas at
    target) are load + beta x sqrt(load). The headroom share beta / sqrt(load) shrinks as the
    fleet grows, because Poisson bursts grow with sqrt(load) while the mean grows with load: the
    same beta gives about the same chance of a queue at every fleet size, where a constant target
    starves small fleets and over-provisions big ones. (decision.py re-exports it.)"""
    if beta <= 0 or load <= 0:
        return max(load, 0.0)
    return load + beta * math.sqrt(load)


def _ceil(x: float) -> int:
    """ceil, blind to float noise (3 x 0.7 / 0.7 is 3, not 4)."""
    return math.ceil(round(x, 9))


@dataclass(frozen=True, kw_only=True)
class Demand:
    """What the deployment's routers see, summed over router replicas (plain floats)."""

    kv_tokens_per_replica: float  # KV-cache capacity of one replica, tokens (the planner's figure)
    arrivals_short: float  # requests/s entering routing, short window (~5 s)
    arrivals_long: float  # requests/s, long window (~60 s)
    prompt_tokens_short: float = 0.0  # prompt tokens/s arriving, short window
    prompt_tokens_long: float = 0.0  # prompt tokens/s arriving, long window
    decode_tokens_short: float = 0.0  # expected decode tokens/s arriving, short window
    decode_tokens_long: float = 0.0  # expected decode tokens/s arriving, long window
    in_flight: float = 0.0  # requests sent to an engine and not finished
    in_flight_tokens: float = 0.0  # prompt + expected decode tokens of those
    held: float = 0.0  # requests the router holds (no replica in rotation)
    short_window_s: float = SHORT_WINDOW_S  # what the *_short rates are averaged over (> 0)
    # Learned from the engines' counters; None until engines report (and while they are idle).
    decode_tokens_per_replica: float | None = None  # decode tokens/s one replica generated ...
    batch: float | None = None  # ... at this mean running batch (sequences per replica)


@dataclass(frozen=True)
class Proposal:
    replicas: int  # ceil(load + headroom), clamped to max_replicas when given
    load: float  # R: replicas at the target KV utilization
    headroom: float  # beta x sqrt(R)
    window: Window  # which estimate of R was the largest
    explanation: str  # for status and Events


def _valid(d: Demand) -> bool:
    for f in fields(d):
        v = getattr(d, f.name)
        if v is None:
            continue
        if not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
            return False
    return d.kv_tokens_per_replica > 0 and d.short_window_s > 0


def short_window_significant(d: Demand, z: float | None = SHORT_WINDOW_Z) -> bool:
    """Whether the short window's arrivals are a rise, not Poisson noise around the long rate:
    n - mu > z x sqrt(max(mu, 1)), with n the short window's arrivals and mu what the long
    window's rate predicts for the same span. z None: no filter (any short window may lead)."""
    if z is None:
        return True
    n = d.arrivals_short * d.short_window_s
    mu = d.arrivals_long * d.short_window_s
    return n - mu > z * math.sqrt(max(mu, 1.0))


def _zero(d: Demand) -> bool:
    return (
        d.arrivals_short == 0
        and d.arrivals_long == 0
        and d.decode_tokens_short == 0
        and d.decode_tokens_long == 0
        and d.in_flight == 0
        and d.in_flight_tokens == 0
        and d.held == 0
    )


def _tokens_per_request(d: Demand, rate: float, prompt: float, decode: float) -> float:
    """tau: in-flight tokens per in-flight request (size-biased, as Little's law in tokens wants),
    else the mean of the window's arrivals."""
    if d.in_flight >= 1 and d.in_flight_tokens > 0:
        return d.in_flight_tokens / d.in_flight
    return (prompt + decode) / rate if rate > 0 else 0.0


def demand_replicas(
    d: Demand,
    target_kv: float,
    beta: float = 0.0,
    max_replicas: int | None = None,
    z: float | None = SHORT_WINDOW_Z,
) -> Proposal | None:
    """Replicas the router's demand asks for, or None when the inputs cannot say (see module).
    ``z``: the short window's significance test (``short_window_significant``; None: off)."""
    if not _valid(d) or not (0 < target_kv <= 1) or not math.isfinite(beta) or beta < 0:
        return None
    if z is not None and (not math.isfinite(z) or z < 0):
        return None
    cap = d.kv_tokens_per_replica * target_kv
    if _zero(d):
        return Proposal(0, 0.0, 0.0, "long", "router: no arrivals, nothing in flight or held: 0 replicas")
    rate, batch = d.decode_tokens_per_replica, d.batch
    if rate is None or batch is None or rate <= 0 or batch <= 0:
        return None  # no service figure yet: Little's law needs W
    per_seq = rate / batch  # decode tokens/s of one sequence at the observed batch
    loads: dict[Window, float] = {}
    detail: dict[Window, str] = {}
    estimates: tuple[tuple[Window, float, float, float], ...] = (
        ("short", d.arrivals_short, d.prompt_tokens_short, d.decode_tokens_short),
        ("long", d.arrivals_long, d.prompt_tokens_long, d.decode_tokens_long),
    )
    for w, lam, prompt, decode in estimates:
        n = decode / per_seq  # Little: lambda x (expected decode / per-sequence speed)
        tau = _tokens_per_request(d, lam, prompt, decode)
        loads[w] = n * tau / cap
        detail[w] = f"{lam:.2f} req/s -> {n:.1f} requests x {tau:.0f} tokens"
    tau_now = _tokens_per_request(d, d.arrivals_long, d.prompt_tokens_long, d.decode_tokens_long)
    loads["in-flight"] = (d.in_flight_tokens + d.held * tau_now) / cap
    detail["in-flight"] = f"{d.in_flight:g} in flight ({d.in_flight_tokens:.0f} tokens) + {d.held:g} held"
    significant = short_window_significant(d, z)
    # a short window within the noise around the long rate may not lead (reported, not used)
    candidates = {k: v for k, v in loads.items() if significant or k != "short"}
    window = max(candidates, key=lambda k: candidates[k])
    load = loads[window]
    want = _ceil(staffed(load, beta)) if load > 0 else 0
    if d.held > 0:
        want = max(want, 1)
    if max_replicas is not None:
        want = min(want, max(max_replicas, 0))
    headroom = staffed(load, beta) - load
    noise = "" if significant else f" within {z:g} sigma of the long rate, not used"
    windows = (
        f"short {loads['short']:.2f}{noise}, long {loads['long']:.2f}, in flight {loads['in-flight']:.2f}"
    )
    explanation = (
        f"router arrivals: {detail[window]} ({window} window; {windows}) "
        f"at {per_seq:.1f} tokens/s per sequence (batch {batch:.1f}) = {load:.2f} replicas at KV "
        f"{target_kv:g} of {d.kv_tokens_per_replica:.0f} tokens"
        + (f" + headroom {headroom:.2f} (beta {beta:g})" if beta > 0 else "")
        + f" -> {want}"
    )
    return Proposal(want, load, headroom, window, explanation)
