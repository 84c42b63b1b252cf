"""Between the decision and the API (pure): metrics answers -> samples, status.autoscaling <->
history, a decision -> status and Event text.

Bad answers are data too: a NaN, an unparsable value or a missing pod is a missing sample (which
forbids a scale-down), never an exception that would stop the loop.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from toposerve.autoscale import promql
from toposerve.autoscale.decision import Decision, History, Replica

Buckets = tuple[tuple[float, float], ...]  # (upper bound le, cumulative count), ascending, +Inf last


@dataclass(frozen=True)
class PodSample:
    kv: float | None = None
    waiting: float | None = None
    running: float | None = None
    ttft_buckets: Buckets = ()  # vllm:time_to_first_token_seconds, cumulative since the engine started


@dataclass(frozen=True)
class TTFT:
    """The deployment's TTFT quantile over the window, or why there is none."""

    seconds: float | None = None
    idle: bool = False  # fresh data, no request started in the window: nothing to say, nothing missing


@dataclass(frozen=True)
class Reading:
    """One read of a metrics source for one deployment."""

    source: str  # "prometheus" or "scrape"
    ok: bool  # the source answered (a pod without data is a missing sample, not a failure)
    pods: Mapping[str, PodSample]
    error: str = ""


def _number(raw: Any) -> float | None:
    try:
        x = float(raw)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def parse_vector(result: Any, label: str = "pod") -> dict[str, float]:
    """A Prometheus instant-vector result ([{metric: {pod}, value: [t, "v"]}]) -> {pod: value};
    entries without the label, or with a value that is not a finite number, are left out."""
    out: dict[str, float] = {}
    if not isinstance(result, list):
        return out
    for item in result:
        if not isinstance(item, dict):
            continue
        metric, value = item.get("metric"), item.get("value")
        if not isinstance(metric, dict) or not isinstance(value, list | tuple) or len(value) != 2:
            continue
        key, x = metric.get(label), _number(value[1])
        if isinstance(key, str) and x is not None:
            out[key] = x
    return out


def vector_sum(result: Any) -> float | None:
    """The sum of an instant vector's finite values (labels ignored); None for no usable value."""
    values = [x for item in result if isinstance(item, dict) and isinstance(v := item.get("value"), list | tuple)
              and len(v) == 2 and (x := _number(v[1])) is not None] if isinstance(result, list) else []  # fmt: skip
    return sum(values) if values else None


def parse_metrics_gauge(text: str, name: str) -> float | None:
    """The sum of one gauge's samples in a /metrics text; None when absent or unparsable."""
    total: float | None = None
    try:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == name and (x := _number(s.value)) is not None:
                    total = (total or 0.0) + x
    except Exception:  # malformed text: no value
        return None
    return total


def parse_matrix(result: Any) -> list[float]:
    """A range-query result ([{metric, values: [[t, "v"], ...]}]) -> every finite value, in order."""
    out: list[float] = []
    if not isinstance(result, list):
        return out
    for item in result:
        values = item.get("values") if isinstance(item, dict) else None
        for pair in values if isinstance(values, list) else []:
            if isinstance(pair, list | tuple) and len(pair) == 2 and (x := _number(pair[1])) is not None:
                out.append(x)
    return out


def prometheus_samples(
    kv: Mapping[str, float],
    waiting: Mapping[str, float],
    running: Mapping[str, float],
    last_seen: Mapping[str, float],
    now: float,
    stale_after: float,
) -> dict[str, PodSample]:
    """Per pod: the windowed means, kept only when the pod's newest sample is fresh."""
    out: dict[str, PodSample] = {}
    for pod in set(kv) | set(waiting) | set(running):
        seen = last_seen.get(pod)
        if seen is None or now - seen > stale_after:
            continue
        out[pod] = PodSample(kv.get(pod), waiting.get(pod), running.get(pod))
    return out


def parse_metrics_text(text: str) -> PodSample:
    """vLLM's /metrics text -> the three gauges and the TTFT buckets; garbage -> empty.

    A pod's engine series (one per engine with data parallelism, and per model_name) are combined
    as Prometheus is asked to (promql.WITHIN_POD): KV usage averaged, request counts and TTFT
    buckets summed."""
    found: dict[str, list[float]] = {}
    buckets: dict[float, float] = {}
    bucket_name = f"{promql.TTFT}_bucket"
    try:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name in promql.WITHIN_POD:
                    x = _number(s.value)
                    if x is not None:
                        found.setdefault(s.name, []).append(x)
                elif s.name == bucket_name:
                    le, n = _le(s.labels.get("le")), _number(s.value)
                    if le is not None and n is not None:
                        buckets[le] = buckets.get(le, 0.0) + n
    except Exception:  # the parser raises ValueError and others on malformed text
        return PodSample()
    combined = {
        name: (sum(xs) / len(xs) if promql.WITHIN_POD[name] == "avg" else sum(xs))
        for name, xs in found.items()
    }
    return PodSample(
        combined.get(promql.KV),
        combined.get(promql.WAITING),
        combined.get(promql.RUNNING),
        tuple(sorted(buckets.items())),
    )


def _le(raw: Any) -> float | None:
    try:
        x = float(raw)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


# ---- TTFT from histogram buckets ------------------------------------------------------------------


def histogram_quantile(q: float, buckets: Buckets) -> float | None:
    """Prometheus' histogram_quantile on cumulative buckets: linear inside the bucket the rank
    falls in (from 0 for the first), the highest finite bound when it falls in +Inf; None without
    observations or without a +Inf bucket."""
    if not buckets or not math.isinf(buckets[-1][0]) or not 0 <= q <= 1:
        return None
    total = buckets[-1][1]
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if math.isinf(le):
                return lower
            if count == below:
                return le
            return lower + (le - lower) * (rank - below) / (count - below)
        lower, below = le, count
    return lower


def bucket_delta(before: Buckets, after: Buckets) -> Buckets:
    """The observations between two reads of one pod's buckets; a counter that went down (the
    engine restarted) counts from zero, as Prometheus' rate does."""
    prev = dict(before)
    if any(n < prev.get(le, 0.0) for le, n in after):
        return after
    return tuple((le, n - prev.get(le, 0.0)) for le, n in after)


def summed(parts: Iterable[Buckets]) -> Buckets:
    out: dict[float, float] = {}
    for b in parts:
        for le, n in b:
            out[le] = out.get(le, 0.0) + n
    return tuple(sorted(out.items()))


def ttft_of(window: Buckets, quantile: float) -> TTFT:
    """The TTFT over a window of bucket deltas: idle when nothing was observed."""
    if window and math.isinf(window[-1][0]) and window[-1][1] <= 0:
        return TTFT(None, idle=True)
    return TTFT(histogram_quantile(quantile, window))


# ---- pods -> replicas -------------------------------------------------------------------------


def _ready(pod: Mapping[str, Any]) -> bool:
    for c in (pod.get("status") or {}).get("conditions") or []:
        if c.get("type") == "Ready":
            return bool(c.get("status") == "True")
    return False


def replicas(
    pods: Iterable[Mapping[str, Any]],
    samples: Mapping[str, PodSample],
    now: float,
    created: Mapping[str, float],
) -> tuple[Replica, ...]:
    """Serving replicas as the decision sees them; terminating pods are gone already.
    ``created``: pod name -> creation time (seconds, same clock as ``now``)."""
    out: list[Replica] = []
    for pod in pods:
        meta = pod.get("metadata") or {}
        if meta.get("deletionTimestamp"):
            continue
        name = str(meta.get("name"))
        s = samples.get(name, PodSample())
        age = max(0.0, now - created.get(name, now))
        out.append(Replica(name, _ready(pod), age, s.kv, s.waiting, s.running))
    return tuple(sorted(out, key=lambda r: r.name))


# ---- status.autoscaling <-> history -------------------------------------------------------------


def _pairs(items: Any) -> tuple[tuple[float, int], ...]:
    out: list[tuple[float, int]] = []
    for it in items or []:
        if isinstance(it, dict):
            t, n = _number(it.get("time")), it.get("replicas")
            if t is not None and isinstance(n, int):
                out.append((t, n))
    return tuple(out)


def history_from_status(status: Mapping[str, Any] | None) -> History:
    a = (status or {}).get("autoscaling") or {}
    return History(
        recommendations=_pairs(a.get("recommendations")),
        scale_ups=_pairs(a.get("scaleUps")),
        scale_downs=_pairs(a.get("scaleDowns")),
    )


def _samples(pairs: Sequence[tuple[float, int]]) -> list[dict[str, Any]]:
    return [{"time": round(t, 3), "replicas": n} for t, n in pairs]


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def status_of(
    d: Decision,
    reading: Reading,
    mode: str,
    now_rfc3339: str,
    previous: Mapping[str, Any] | None,
    held_requests: int = 0,
    forecast: int | None = None,
    ttft_slo: float | None = None,
    burst_headroom: float = 0.0,
    startup: tuple[float, str] | None = None,
) -> dict[str, Any]:
    """status.autoscaling for a decision (camelCase, as the CRD's status schema has it)."""
    prev = (previous or {}).get("autoscaling") or {}
    scaled = d.desired != d.current
    slo = (
        {"ttftSLOSeconds": ttft_slo, "ttftSeconds": _round(d.ttft), "ttftMissing": d.ttft_missing}
        if ttft_slo
        else {}
    )
    staffing = (
        {"kvLoadReplicas": _round(d.kv_load), "burstHeadroomReplicas": _round(d.headroom)}
        if burst_headroom
        else {}
    )
    demand = (
        {
            "demandReplicas": d.demand.replicas,
            "demandLoadReplicas": _round(d.demand.load),
            "demandWindow": d.demand.window,
            "demandExplanation": d.demand.explanation[:1024],
        }
        if d.demand is not None
        else {}
    )
    return {
        "mode": mode,
        "source": reading.source if reading.ok else f"{reading.source} (unavailable: {reading.error})"[:1024],
        "metricsAvailable": d.metrics_ok,
        "currentReplicas": d.current,
        "desiredReplicas": d.desired,
        "proposal": d.proposal,
        "reason": d.reason,
        "message": d.message,
        "floor": d.floor,
        "floorSource": d.floor_source,
        "forecast": forecast,
        **({"startupSeconds": round(startup[0], 1), "startupSource": startup[1]} if startup else {}),
        "signal": d.signal or None,
        "inputs": {
            "kvCacheUtilization": _round(d.kv),
            "waitingRequests": _round(d.waiting),
            "runningRequests": _round(d.running),
            "readyReplicas": d.ready,
            "startingReplicas": d.starting,
            "stuckReplicas": d.stuck,
            "missingMetrics": d.missing,
            "heldRequests": held_requests,
            **slo,
            **staffing,
            **demand,
        },
        "lastDecisionTime": now_rfc3339,
        "lastScaleTime": now_rfc3339 if scaled else prev.get("lastScaleTime"),
        "recommendations": _samples(d.history.recommendations),
        "scaleUps": _samples(d.history.scale_ups),
        "scaleDowns": _samples(d.history.scale_downs),
    }


def event_of(d: Decision, target_kv: float, ttft_slo: float | None = None) -> tuple[str, str]:
    """(reason, message) of the Event for a change of spec.replicas (the decision's message
    carries the burst headroom, when set)."""
    reason = "ScaledUp" if d.desired > d.current else "ScaledDown"
    kv = "n/a" if d.kv is None else f"{d.kv:.2f}"
    waiting = "n/a" if d.waiting is None else f"{d.waiting:.1f}"
    msg = (
        f"spec.replicas {d.current} -> {d.desired} ({d.reason}): {d.message}; kv-cache {kv} (target "
        f"{target_kv:.2f}), waiting {waiting}/replica"
    )
    if ttft_slo is not None:
        msg += f", TTFT {'n/a' if d.ttft is None else f'{d.ttft:.3f}s'} (SLO {ttft_slo:g}s)"
    msg += f", floor {d.floor} ({d.floor_source})"
    if d.promote:
        msg += f"; {d.promote} warm standby promoted"
    return reason, msg
