"""Schedule windows that raise the floor (pure): "weekdays 08:45-18:00 keep 4 replicas".

A window opens on each listed day at ``start`` in its time zone and closes at ``end``; an end at or
before the start closes the next day (22:00-06:00). Times are wall-clock times in the zone, so
daylight saving moves them with the clock, as people expect of office hours.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from toposerve.api.spec import WEEKDAYS, ScheduleWindow


def _hm(text: str) -> tuple[int, int]:
    h, m = text.split(":")
    return int(h), int(m)


def is_open(window: ScheduleWindow, now: datetime) -> bool:
    """Whether ``window`` is open at ``now`` (an aware datetime)."""
    local = now.astimezone(ZoneInfo(window.time_zone))
    start_h, start_m = _hm(window.start)
    end_h, end_m = _hm(window.end)
    # The window that may cover ``local`` started today or (overnight windows) yesterday.
    for back in (0, 1):
        day = local - timedelta(days=back)
        if WEEKDAYS[day.weekday()] not in window.days:
            continue
        opens = day.replace(hour=start_h, minute=start_m, second=0, microsecond=0)
        closes = day.replace(hour=end_h, minute=end_m, second=0, microsecond=0)
        if closes <= opens:
            closes += timedelta(days=1)
        if opens <= local < closes:
            return True
    return False


def schedule_floor(windows: Sequence[ScheduleWindow], now: datetime) -> tuple[int, str]:
    """The highest minReplicas of the open windows, and that window's name ((0, '') if none)."""
    best = (0, "")
    for w in windows:
        if is_open(w, now) and w.min_replicas > best[0]:
            best = (w.min_replicas, w.name)
    return best
