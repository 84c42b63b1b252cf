"""How long a replica takes to start, measured from its pods (pure: pods are plain dicts).

A replica's start-up decides how far ahead capacity must be asked for, and for how long a
starting replica counts as "capacity on the way" before it is stuck. A configured constant is
wrong both ways: a 405B model from a cold cache takes tens of minutes, a small one from a model
image seconds. Each engine (leader) pod carries its own phases in the fields the kubelet and the
scheduler write (Kubernetes API reference, PodStatus / PodCondition / ContainerStateRunning):

* scheduling: ``metadata.creationTimestamp`` -> the ``PodScheduled`` condition turned True;
* pulling: scheduled -> the engine container's ``state.running.startedAt`` (image pull and the
  sandbox; volume mounts of image-volume weights are in here too);
* loading: started -> the ``Ready`` condition turned True (weights read, CUDA graphs captured or
  compiled, the first /health answered: the engine's own start-up).

A pod is sampled once, the first time it is seen Ready, and the last ``LIMIT`` samples per pool
are kept in status so that the figures survive operator restarts and scale-downs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

LIMIT = 20  # samples kept per pool: enough for a p90, small enough for status
MIN_SAMPLES = 3  # fewer start-ups say too little to replace the configured figure
ENGINE_CONTAINER = "engine"


@dataclass(frozen=True)
class StartupSample:
    pod: str
    total: float
    scheduling: float | None = None
    pulling: float | None = None
    loading: float | None = None

    def to_status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"pod": self.pod, "totalSeconds": round(self.total, 1)}
        for key, value in (("schedulingSeconds", self.scheduling), ("pullingSeconds", self.pulling),
                           ("loadingSeconds", self.loading)):  # fmt: skip
            if value is not None:
                out[key] = round(value, 1)
        return out

    @classmethod
    def from_status(cls, raw: Mapping[str, Any]) -> StartupSample | None:
        total = _float(raw.get("totalSeconds"))
        if not raw.get("pod") or total is None:
            return None
        return cls(str(raw["pod"]), total, _float(raw.get("schedulingSeconds")),
                   _float(raw.get("pullingSeconds")), _float(raw.get("loadingSeconds")))  # fmt: skip


@dataclass(frozen=True)
class StartupSummary:
    samples: int
    p50: float
    p90: float
    scheduling_p50: float | None
    pulling_p50: float | None
    loading_p50: float | None


def _float(raw: Any) -> float | None:
    try:
        x = float(raw)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) and x >= 0 else None


def _time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def _true_since(pod: Mapping[str, Any], kind: str) -> datetime | None:
    for c in (pod.get("status") or {}).get("conditions") or []:
        if c.get("type") == kind and c.get("status") == "True":
            return _time(c.get("lastTransitionTime"))
    return None


def _started(pod: Mapping[str, Any]) -> datetime | None:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    engine = next(
        (c for c in statuses if c.get("name") == ENGINE_CONTAINER), statuses[0] if statuses else None
    )
    return _time((((engine or {}).get("state") or {}).get("running") or {}).get("startedAt"))


def _seconds(a: datetime | None, b: datetime | None) -> float | None:
    if a is None or b is None:
        return None
    s = (b - a).total_seconds()
    return s if s >= 0 else None


def sample_of(pod: Mapping[str, Any]) -> StartupSample | None:
    """The pod's start-up, once it is Ready; None before (or without a creation time)."""
    meta = pod.get("metadata") or {}
    created, ready = _time(meta.get("creationTimestamp")), _true_since(pod, "Ready")
    total = _seconds(created, ready)
    if total is None or not meta.get("name"):
        return None
    scheduled, started = _true_since(pod, "PodScheduled"), _started(pod)
    loading = _seconds(started, ready)
    # A container restarted after Ready (a liveness restart) has a startedAt past the Ready time:
    # the phases then say nothing reliable, the total still does.
    if loading is None:
        return StartupSample(str(meta["name"]), total, _seconds(created, scheduled))
    return StartupSample(
        str(meta["name"]), total, _seconds(created, scheduled), _seconds(scheduled, started), loading
    )


def merge(
    recent: Iterable[Mapping[str, Any]], pods: Iterable[Mapping[str, Any]], limit: int = LIMIT
) -> list[StartupSample]:
    """The kept samples plus those of pods seen Ready for the first time, oldest dropped first.
    A pod already sampled is not sampled again (its Ready time moves when readiness flaps)."""
    kept = [s for s in (StartupSample.from_status(r) for r in recent if isinstance(r, Mapping)) if s]
    known = {s.pod for s in kept}
    for pod in pods:
        s = sample_of(pod)
        if s is not None and s.pod not in known:
            kept.append(s)
            known.add(s.pod)
    return kept[-limit:]


def _quantile(xs: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(xs)
    pos = q * (len(ordered) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize(samples: Sequence[StartupSample]) -> StartupSummary | None:
    if not samples:
        return None

    def p50(xs: list[float | None]) -> float | None:
        known = [x for x in xs if x is not None]
        return _quantile(known, 0.5) if known else None

    totals = [s.total for s in samples]
    return StartupSummary(
        samples=len(samples),
        p50=_quantile(totals, 0.5),
        p90=_quantile(totals, 0.9),
        scheduling_p50=p50([s.scheduling for s in samples]),
        pulling_p50=p50([s.pulling for s in samples]),
        loading_p50=p50([s.loading for s in samples]),
    )


def planning_startup(
    pools: Iterable[Mapping[str, Any]], configured: float, explicit: bool, margin: float = 1.5
) -> tuple[float, str]:
    """(seconds, where from) the autoscaler plans start-up with: an explicit startupGraceSeconds as
    written; else the slowest pool's measured p90 x ``margin`` once it has MIN_SAMPLES start-ups
    (a start-up a bit slower than the p90 is not yet stuck); else the configured default."""
    if explicit:
        return configured, "startupGraceSeconds"
    measured = [
        (float(p90), str(p.get("name")), int(n))
        for p in pools
        if isinstance(s := p.get("startup"), Mapping)
        and isinstance(n := s.get("samples"), int)
        and n >= MIN_SAMPLES
        and isinstance(p90 := s.get("p90Seconds"), int | float)
    ]
    if not measured:
        return configured, "startupGraceSeconds (no measured start-ups yet)"
    p90, pool, n = max(measured)
    return max(1.0, p90 * margin), f"measured: pool {pool} p90 {p90:g} s over {n} start-ups x{margin:g}"
