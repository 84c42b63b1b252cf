"""Predictive pre-warm (pure): the floor the same time of day (or weekday) needed before.

Model loads take minutes, so a replica wanted at 09:00 must start before 09:00. From Prometheus
history, the demand one lead time ahead on each of the last N days (or weeks) is known; the floor
is what the busiest of those comparable slices needed: ceil(max(sum of KV usage) / target),
and likewise for waiting requests. Taking the busiest, not the mean, errs on the side of a warm
replica: the scale-down window removes an unneeded one later, while a missing one costs a
start-up time of bad latency.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def demand_floor(
    kv_sums: Sequence[float],
    waiting_sums: Sequence[float],
    target_kv: float,
    target_waiting: float,
    max_replicas: int,
) -> int:
    """Replicas the busiest comparable past slice needed (0 without history)."""
    kv = [x for x in kv_sums if math.isfinite(x) and x >= 0]
    waiting = [x for x in waiting_sums if math.isfinite(x) and x >= 0]
    need = 0.0
    if kv:
        need = max(need, max(kv) / target_kv)
    if waiting:
        need = max(need, max(waiting) / target_waiting)
    return min(max_replicas, math.ceil(round(need, 9)))


def slice_times(now: float, lead: float, period_s: float, lookback: int) -> tuple[float, float]:
    """(start, end) of the range query whose step is ``period_s``: the instants ``now + lead - k x
    period`` for k = lookback .. 1 (oldest first)."""
    return now + lead - lookback * period_s, now + lead - period_s
