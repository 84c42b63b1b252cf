"""Start-up measured from pods (autoscale/startup.py), and the autoscaler planning with it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from toposerve.autoscale.startup import (
    LIMIT,
    StartupSample,
    merge,
    planning_startup,
    sample_of,
    summarize,
)

T0 = datetime(2026, 12, 7, 10, 0, tzinfo=UTC)


def ts(seconds: float) -> str:
    return (T0 + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")


def pod(name: str, scheduled: float | None = 2, started: float | None = 30, ready: float | None = 90,
        created: float = 0) -> dict[str, Any]:  # fmt: skip
    """A pod as the API server returns it: times in RFC 3339 at second precision."""
    conds = []
    if scheduled is not None:
        conds.append({"type": "PodScheduled", "status": "True", "lastTransitionTime": ts(scheduled)})
    conds.append({"type": "Ready", "status": "True" if ready is not None else "False",
                  "lastTransitionTime": ts(ready if ready is not None else created)})  # fmt: skip
    statuses = []
    if started is not None:
        statuses = [
            {"name": "istio-proxy", "state": {"running": {"startedAt": ts(1)}}},  # a sidecar first
            {"name": "engine", "state": {"running": {"startedAt": ts(started)}}, "restartCount": 0},
        ]
    return {
        "metadata": {"name": name, "creationTimestamp": ts(created)},
        "status": {"conditions": conds, "containerStatuses": statuses},
    }


def test_a_ready_pod_gives_its_phases() -> None:
    s = sample_of(pod("a"))
    assert s == StartupSample("a", 90.0, 2.0, 28.0, 60.0)  # the engine container's start, not the sidecar's
    assert s.to_status() == {"pod": "a", "totalSeconds": 90.0, "schedulingSeconds": 2.0,
                             "pullingSeconds": 28.0, "loadingSeconds": 60.0}  # fmt: skip
    assert StartupSample.from_status(s.to_status()) == s


def test_not_ready_or_odd_pods_give_no_phase_they_cannot_know() -> None:
    assert sample_of(pod("a", ready=None)) is None
    assert sample_of({"metadata": {"name": "x"}}) is None
    # restarted after Ready (liveness): the container start is after Ready, only the total is known
    assert sample_of(pod("b", started=200, ready=90)) == StartupSample("b", 90.0, 2.0)
    assert sample_of(pod("c", started=None)) == StartupSample("c", 90.0, 2.0)
    assert StartupSample.from_status({"pod": "x", "totalSeconds": "NaN"}) is None
    assert StartupSample.from_status({"totalSeconds": 3}) is None


def test_merge_samples_each_pod_once_and_keeps_the_last_ones() -> None:
    first = merge([], [pod("a"), pod("b", ready=None)])
    assert [s.pod for s in first] == ["a"]
    kept = [s.to_status() for s in first]
    # a's readiness flapped (its Ready time moved): not sampled again; b became Ready
    again = merge(kept, [pod("a", ready=500), pod("b", ready=40)])
    assert [(s.pod, s.total) for s in again] == [("a", 90.0), ("b", 40.0)]
    many = merge([], [pod(f"p{i}", ready=10 + i) for i in range(LIMIT + 5)])
    assert len(many) == LIMIT and many[0].pod == "p5"  # the oldest dropped first
    assert merge(["junk", {"pod": "z"}], []) == []  # type: ignore[list-item]


def test_summary_quantiles() -> None:
    samples = [
        StartupSample(f"p{i}", float(t), loading=float(t) / 2) for i, t in enumerate([10, 20, 30, 40, 100])
    ]
    s = summarize(samples)
    assert s is not None and (s.samples, s.p50, s.p90) == (5, 30.0, 76.0) and s.loading_p50 == 15.0
    assert s.scheduling_p50 is None and summarize([]) is None


@given(st.lists(st.floats(min_value=0, max_value=1e5), min_size=1, max_size=40))
def test_quantiles_are_ordered_and_within_the_samples(totals: list[float]) -> None:
    s = summarize([StartupSample(str(i), t) for i, t in enumerate(totals)])
    assert s is not None and min(totals) <= s.p50 <= s.p90 <= max(totals)


def pools(*entries: tuple[str, int, float]) -> list[dict[str, Any]]:
    return [
        {"name": n, "startup": {"samples": k, "p50Seconds": p90 / 2, "p90Seconds": p90}}
        for n, k, p90 in entries
    ]


@pytest.mark.parametrize(
    ("status_pools", "explicit", "seconds", "source"),
    [
        ([], False, 600.0, "no measured start-ups yet"),
        (pools(("a", 2, 40.0)), False, 600.0, "no measured start-ups yet"),  # too few
        (pools(("a", 3, 40.0)), False, 60.0, "measured: pool a p90 40 s over 3 start-ups x1.5"),
        (pools(("a", 5, 40.0), ("b", 4, 900.0)), False, 1350.0, "pool b"),  # the slowest pool
        (pools(("a", 5, 40.0)), True, 600.0, "startupGraceSeconds"),  # the spec said so
        ([{"name": "x", "startup": "junk"}, {"name": "y"}], False, 600.0, "no measured"),
    ],
)
def test_planning_startup(
    status_pools: list[dict[str, Any]], explicit: bool, seconds: float, source: str
) -> None:
    got, why = planning_startup(status_pools, 600.0, explicit)
    assert got == seconds and source in why
