"""Predictive pre-warm (pure): the floor the same time of day (or weekday) needed before.

Model loads take minutes, so a replica wanted at 09:00 must start before 09:00. From Prometheus
history, the demand one lead time ahead on each of the last N days (or weeks) is known, each slice
already smoothed by ``avg_over_time`` over the forecast window. The floor is what a quantile of
those slices across days needed (``forecast.quantile``, default 0.5, the median): ceil(q-quantile
(sum of KV usage) / target), and likewise for waiting requests.

Why the median by default and not the busiest (quantile 1): the floor is for the recurring shape
of the day (the morning ramp), which shows on most days; a one-off spike, with its waiting-queue
backlog, shows on one day only, and the busiest slice would turn yesterday's spike into today's
floor at the same minute (up to maxReplicas, for ``lookback`` days). The reactive decision, not
the forecast, is what answers spikes. A higher quantile buys headroom for day-to-day variation (a
hot target with slow loads may want it) at the price of following outliers.

Why the slice is centred one lead ahead: the window of ``avg_over_time`` ends at its evaluation
time, so a query evaluated at ``now + lead`` averages demand from ``now + lead - window`` to
``now + lead``, centred half a window before the instant the lead is meant to reach.
``slice_offset`` moves the evaluation time to ``now + lead + window / 2``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from toposerve.api.spec import AutoscalingSpec
from toposerve.autoscale.decision import staffed


def _clean(xs: Sequence[float]) -> list[float]:
    return [x for x in xs if math.isfinite(x) and x >= 0]


def quantile(xs: Sequence[float], q: float) -> float:
    """The q-quantile of a non-empty sample, interpolated linearly between order statistics (0: the
    least, 0.5: the median, the mean of the middle two for an even count, 1: the largest)."""
    if not xs:
        raise ValueError("quantile of no samples")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {q}")
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    # clamped to its two order statistics: float rounding never carries it past the next one
    return min(max(s[lo] + (s[hi] - s[lo]) * (pos - lo), s[lo]), s[hi])


def demand_floor(
    kv_sums: Sequence[float],
    waiting_sums: Sequence[float],
    target_kv: float,
    target_waiting: float,
    max_replicas: int,
    q: float = 0.5,
    burst_headroom: float = 0.0,
) -> int:
    """Replicas the ``q``-quantile comparable past slice needed (0 without history); NaN, infinite
    and negative samples are left out. ``burst_headroom``: the KV term is square-root staffed
    (``decision.staffed``) as the reactive KV proposal is, so the pre-warmed floor is the fleet
    the reactive loop would settle on at that load."""
    kv, waiting = _clean(kv_sums), _clean(waiting_sums)
    need = 0.0
    if kv:
        need = max(need, staffed(quantile(kv, q) / target_kv, burst_headroom))
    if waiting:
        need = max(need, quantile(waiting, q) / target_waiting)
    return min(max_replicas, math.ceil(round(need, 9)))


def slice_offset(lead: float, window: float) -> float:
    """Seconds after ``now`` to evaluate each past slice at, so that its ``avg_over_time[window]``
    is centred ``lead`` seconds ahead (one start-up time by default)."""
    return lead + window / 2


def spec_slice_offset(a: AutoscalingSpec, startup_s: float | None = None) -> float:
    """``slice_offset`` for ``spec.autoscaling``: the lead is ``forecast.leadSeconds``, else one
    start-up time (``startup_s``, the measured one the loop plans with, else
    ``startupGraceSeconds``); for the operator's loop and bench/autoscale alike."""
    f = a.forecast
    startup = float(a.startup_grace_seconds if startup_s is None else startup_s)
    lead = startup if f.lead_seconds is None else float(f.lead_seconds)
    return slice_offset(lead, f.window_seconds)


def slice_times(now: float, offset: float, period_s: float, lookback: int) -> tuple[float, float]:
    """(start, end) of the range query whose step is ``period_s``: the instants ``now + offset - k x
    period`` for k = lookback .. 1 (oldest first)."""
    return now + offset - lookback * period_s, now + offset - period_s


def spec_demand_floor(a: AutoscalingSpec, kv_sums: Sequence[float], waiting_sums: Sequence[float]) -> int:
    """``demand_floor`` with the targets, max, quantile and headroom of ``spec.autoscaling``: one
    place that maps the spec to the forecast, for the operator's loop and bench/autoscale alike."""
    return demand_floor(
        kv_sums,
        waiting_sums,
        a.target_kv_cache_utilization,
        a.target_waiting_requests,
        a.max_replicas,
        a.forecast.quantile,
        a.burst_headroom,
    )
