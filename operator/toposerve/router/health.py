"""Backend health as pure decisions: passive outlier ejection, active probes, blame for failures.

Why a separate pure module: the rules decide whether client input can take capacity away, so
they must be exact and testable without sockets or clocks (`now` is always an argument). The
proxy feeds it outcomes and probe results; it answers "is this backend in rotation".

The rules, and the failures they prevent:

- **Blame.** A request can make an engine fail (vLLM 500s on some inputs). A 5xx or a dropped
  connection before the first response byte therefore counts against a backend only when the
  same request then *succeeded* on another backend (`blame`). When both attempts fail, the
  request is the likely cause and nobody is blamed; when there was no second opinion, nobody is
  blamed either. A refused connection is always the backend's: the request never reached it.
  A stream that breaks after bytes went out is counted (no retry happens, so it cannot spread).
- **No compounding.** Failures of a backend that is already ejected (requests that were in
  flight when it crashed) are ignored: one outage is one ejection, held `base_s` (5 s), doubling
  only when a backend fails again after being re-admitted without a success in between.
- **Probes re-admit.** A successful `/health` probe ends an ejection when the backend was
  unreachable, or when a probe has failed since the ejection began (it went down and came
  back: a restart). An ejection for 5xx answers while `/health` stayed 200 serves its hold:
  that is exactly the engine whose health endpoint does not see its failures.
- **A slow probe is a busy engine.** vLLM answers `/health` on the event loop that streams, so
  under a long prefill or thousands of streams it answers late. A probe that *times out* takes a
  backend out of rotation only after `PROBE_TIMEOUTS_DOWN` in a row (about as long as the
  rendered readiness probe tolerates: 3 misses); a refusal or a non-200 answer does at once.
  One timeout of a busy engine used to take it out, and with a loaded fleet all at once (seen
  as "503 no healthy backend" on the local cluster's two cores).
- **Never empty the fleet.** Like Envoy's `max_ejection_percent`: at most that share of the
  backends in service (probe-healthy, not draining) may be ejected at once, and never the last
  one. Probes, not client traffic, decide when a fleet has nothing left.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

# Failure kinds (also the `kind` label of toposerve_router_errors_total).
UNREACHABLE = "connect"  # refused / connect timeout: never the request's fault
DISCONNECT = "disconnect"  # connection dropped before a response: maybe the request's
STATUS_5XX = "status_5xx"  # a 5xx before the first byte: maybe the request's
STREAM_BROKEN = "stream_broken"  # broke after bytes went out: counted (no retry spreads it)
TIMEOUT = "timeout"  # no answer in time: not retried, not blamed (probes catch a hung engine)

# Consecutive /health probe timeouts before a backend is taken out of rotation (refusals and
# non-200 answers: at once).
PROBE_TIMEOUTS_DOWN = 3

# Outcomes of one attempt of one request.
OK = "ok"  # 1xx-3xx answer: the backend did its job
CLIENT_ERROR = "client_error"  # 4xx: the request's problem, the backend is fine


@dataclass(frozen=True, slots=True)
class HealthConfig:
    eject_after: int = 3  # consecutive counted failures before ejection (unreachable: at once)
    base_s: float = 5.0
    max_s: float = 60.0
    max_ejection_percent: float = 50.0


@dataclass(slots=True)
class HealthState:
    """One backend's health memory (mutated only by the functions below)."""

    probe_ok: bool = True  # optimistic until the first probe says otherwise
    failures: int = 0  # consecutive counted failures
    ejections: int = 0  # ejections without a success in between: the back-off exponent
    ejected_until: float = 0.0
    eject_kind: str = ""
    probe_failed_since_eject: bool = False
    probe_timeouts: int = 0  # consecutive probe timeouts (a busy engine answers /health late)

    def ejected(self, now: float) -> bool:
        return now < self.ejected_until

    def healthy(self, now: float) -> bool:
        return self.probe_ok and not self.ejected(now)


def blame(outcomes: Sequence[str]) -> list[bool]:
    """Which attempts of one request count as failures of their backend.

    `outcomes` lists each attempt in order: a failure kind, `OK` or `CLIENT_ERROR`. A
    pre-first-byte failure (5xx, disconnect) is blamed only if a later attempt got `OK`.
    """
    later_ok = False
    out = [False] * len(outcomes)
    for i in range(len(outcomes) - 1, -1, -1):
        o = outcomes[i]
        if o in (UNREACHABLE, STREAM_BROKEN):
            out[i] = True
        elif o in (STATUS_5XX, DISCONNECT):
            out[i] = later_ok
        later_ok = later_ok or o == OK
    return out


def may_eject(
    states: Mapping[str, HealthState],
    in_service: Collection[str],
    backend: str,
    now: float,
    cfg: HealthConfig,
) -> bool:
    """The ejection cap: ejecting `backend` keeps at least one backend, and within the percentage.

    `in_service` are the backends that would take traffic but for ejection (probe-healthy, not
    draining); the count includes `backend` itself.
    """
    pool = set(in_service) | {backend}
    n = len(pool)
    ejected = sum(1 for b in pool if b != backend and states[b].ejected(now))
    allowed = math.floor(n * max(cfg.max_ejection_percent, 0.0) / 100.0 + 1e-9)
    return ejected + 1 <= allowed and n - ejected - 1 >= 1


def record_failure(
    states: Mapping[str, HealthState],
    in_service: Collection[str],
    backend: str,
    kind: str,
    now: float,
    cfg: HealthConfig,
) -> float | None:
    """Count one (blamed) failure; returns the hold in seconds when it ejects the backend."""
    s = states[backend]
    if s.ejected(now):
        return None  # the same outage seen again by requests that were in flight: no compounding
    s.failures += 1
    if kind != UNREACHABLE and s.failures < cfg.eject_after:
        return None
    if not may_eject(states, in_service, backend, now, cfg):
        s.failures = min(s.failures, cfg.eject_after)
        return None
    s.failures = 0
    s.ejections += 1
    hold = min(cfg.base_s * 2.0 ** min(s.ejections - 1, 32), cfg.max_s)
    s.ejected_until = now + hold
    s.eject_kind = kind
    s.probe_failed_since_eject = False
    return hold


def record_success(s: HealthState, now: float) -> None:
    """A backend answered: its failure streak ends, and its back-off once it is back in rotation."""
    s.failures = 0
    if s.ejections and not s.ejected(now):
        s.ejections = 0


def record_probe(s: HealthState, ok: bool, now: float, timed_out: bool = False) -> bool:
    """Apply one `/health` result (``timed_out``: no answer within the probe timeout, which is
    not ``ok``); returns True when it re-admitted an ejected backend."""
    if timed_out and not ok:
        s.probe_timeouts += 1
        if s.probe_ok and s.probe_timeouts < PROBE_TIMEOUTS_DOWN:
            return False  # busy, not down (yet): it stays as it was
    else:
        s.probe_timeouts = 0
    s.probe_ok = ok
    if not ok:
        if s.ejected(now):
            s.probe_failed_since_eject = True
        return False
    if s.ejected(now) and (s.eject_kind == UNREACHABLE or s.probe_failed_since_eject):
        s.ejected_until = now
        s.failures = 0
        return True
    return False
