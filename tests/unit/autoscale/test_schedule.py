"""Schedule windows: days, overnight windows, time zones and daylight saving."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from toposerve.api.spec import ScheduleWindow
from toposerve.autoscale.schedule import is_open, schedule_floor

OFFICE = ScheduleWindow(name="office", days=["Mon", "Tue", "Wed", "Thu", "Fri"], start="08:45", end="18:00",
                        time_zone="Europe/Paris", min_replicas=4)  # fmt: skip
NIGHT = ScheduleWindow(name="batch", days=["Fri"], start="22:00", end="06:00", min_replicas=2)


def utc(*a: int) -> datetime:
    return datetime(*a, tzinfo=UTC)


@pytest.mark.parametrize(
    ("window", "when", "open_"),
    [
        (OFFICE, utc(2026, 12, 7, 7, 45), True),  # Monday 08:45 Paris (UTC+1): opens
        (OFFICE, utc(2026, 12, 7, 7, 44), False),
        (OFFICE, utc(2026, 12, 7, 16, 59), True),
        (OFFICE, utc(2026, 12, 7, 17, 0), False),  # 18:00 Paris: closed (end is exclusive)
        (OFFICE, utc(2026, 12, 5, 10, 0), False),  # Saturday
        (OFFICE, utc(2026, 7, 6, 6, 45), True),  # summer: UTC+2, 08:45 Paris is 06:45 UTC
        (OFFICE, utc(2026, 7, 6, 7, 44, 59), True),
        (NIGHT, utc(2026, 12, 4, 23, 0), True),  # Friday 23:00
        (NIGHT, utc(2026, 12, 5, 5, 59), True),  # Saturday 05:59: the Friday window still open
        (NIGHT, utc(2026, 12, 5, 6, 0), False),
        (NIGHT, utc(2026, 12, 5, 23, 0), False),  # Saturday night: no window starts on Saturday
        (NIGHT, utc(2026, 12, 4, 21, 59), False),
    ],
)
def test_is_open(window: ScheduleWindow, when: datetime, open_: bool) -> None:
    assert is_open(window, when) is open_


def test_the_highest_open_floor_wins_and_is_named() -> None:
    late = ScheduleWindow(name="late", start="17:00", end="20:00", time_zone="Europe/Paris", min_replicas=6)
    assert schedule_floor([OFFICE, late], utc(2026, 12, 7, 16, 30)) == (6, "late")
    assert schedule_floor([OFFICE, late], utc(2026, 12, 7, 10, 0)) == (4, "office")
    assert schedule_floor([OFFICE, late], utc(2026, 12, 7, 22, 0)) == (0, "")
    assert schedule_floor([], utc(2026, 12, 7, 10, 0)) == (0, "")
