"""bench/autoscale, issue 25: start-up drawn from a distribution, the simulated router's view, the
toposerve-leading policy and leading.py's curve arithmetic. Short traces; no wall-time assertions."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[3] / "bench" / "autoscale"
sys.path.insert(0, str(BENCH))

import daytrace  # noqa: E402
import fleetsim  # noqa: E402
import scalers  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_autoscale_leading", BENCH / "leading.py")
assert _spec is not None and _spec.loader is not None
leading = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(leading)

ENGINE = fleetsim.EngineModel.for_gpu("L4", startup_s=120.0)


def flat_trace(rps: float, seconds: float, spike: tuple[float, float, float] | None = None) -> daytrace.Trace:
    import random

    rng = random.Random(3)
    arrival: list[float] = []
    t = 0.0
    while True:
        t += rng.expovariate(rps * (spike[2] if spike and spike[0] <= t < spike[1] else 1.0))
        if t >= seconds:
            break
        arrival.append(t)
    n = len(arrival)
    spikes = (daytrace.Spike(spike[0], spike[1]),) if spike else ()
    return daytrace.Trace(arrival, [rng.randint(200, 2000) for _ in range(n)],
                          [rng.randint(20, 300) for _ in range(n)], spikes, daytrace.TraceConfig(days=1), (1.0,))  # fmt: skip


SPEC: dict[str, object] = {"minReplicas": 1, "maxReplicas": 8, "startupGraceSeconds": 300,
                           "targetKVCacheUtilization": 0.5, "syncPeriodSeconds": 5}  # fmt: skip


def lead(**kw: object) -> scalers.ToposerveLeading:
    return scalers.ToposerveLeading(dict(SPEC), ENGINE.kv_tokens, **kw)  # type: ignore[arg-type]


# ---- start-up distribution ------------------------------------------------------------------


def test_startup_draws_are_seeded_log_normal_around_the_median() -> None:
    model = fleetsim.EngineModel.for_gpu("L4", startup_s=300.0, startup_sigma=0.25)
    tr = flat_trace(0.01, 60)

    def loads(seed: int) -> list[float]:
        f = fleetsim.Fleet(tr, model, scalers.FixedMax(1), seed=seed)
        return [f._new_engine(0.0, loaded=False).ready_at for _ in range(400)]

    a, b, c = loads(7), loads(7), loads(8)
    assert a == b and a != c
    med = sorted(a)[len(a) // 2]
    assert 250 < med < 360 and min(a) < 300 < max(a)
    assert model.startup_quantile(0.5) == pytest.approx(300.0)
    assert model.startup_quantile(0.9) == pytest.approx(300.0 * math.exp(0.25 * 1.2815515655446004))
    fixed = fleetsim.Fleet(tr, ENGINE, scalers.FixedMax(1), seed=7)
    assert {fixed._new_engine(0.0, loaded=False).ready_at for _ in range(5)} == {120.0}
    with pytest.raises(ValueError, match="startup_sigma"):
        fleetsim.EngineModel.for_gpu("L4", startup_sigma=-1)


# ---- the router's view and the engines' counters ----------------------------------------------


def test_router_view_counts_arrivals_in_flight_and_decode_rate() -> None:
    tr = flat_trace(1.0, 900)
    p = lead()
    fleet = fleetsim.Fleet(tr, ENGINE, p, until=900)
    fleet.run()
    obs = fleet.observe(900.0)
    r = obs.router
    assert r is not None and (r.short_s, r.long_s) == (5.0, 60.0)
    assert r.arrivals_long == sum(1 for t in tr.arrival if 840 < t < 900)
    assert r.arrivals_short == sum(1 for t in tr.arrival if 895 < t < 900)
    assert r.in_flight + r.held == obs.inflight
    assert 20 <= r.expected_decode <= 300  # learned from finished requests, not told
    busy = [pod for pod in obs.pods if pod.running]
    assert busy and all(pod.decode_rate is not None and pod.decode_rate > 0 for pod in busy)
    # a policy without router windows gets no router view (and pays nothing for it)
    plain = fleetsim.Fleet(tr, ENGINE, scalers.FixedMax(1), until=60)
    assert plain.observe(0.0).router is None


def test_leading_policy_builds_demand_and_drives_decide() -> None:
    tr = flat_trace(0.3, 3 * 3600, spike=(3600.0, 4200.0, 6.0))
    p = lead(demand_headroom=0.5)
    assert p.cfg.demand_headroom == 0.5 and p.period == 5.0
    fleet = fleetsim.Fleet(tr, ENGINE, p, until=3 * 3600)
    res = fleet.run()
    d = p.demand(fleet.observe(3 * 3600.0))
    assert d is not None and d.kv_tokens_per_replica == ENGINE.kv_tokens
    assert d.decode_tokens_per_replica is not None and d.batch is not None
    serving = res.timeline["serving"]
    assert max(serving[60:80]) > max(serving[30:60])  # the spike scaled it up
    assert serving[-1] < max(serving[60:80])  # and it came back down


def test_leading_scales_up_before_the_kv_policy_on_a_step() -> None:
    """The step's arrivals reach the router at once; KV usage, averaged over a minute, lags."""
    tr = flat_trace(0.3, 2 * 3600, spike=(3600.0, 7200.0, 6.0))

    def first_up(p: fleetsim.Policy) -> int:
        res = fleetsim.Fleet(tr, ENGINE, p, until=2 * 3600).run()
        pods = res.timeline["pods"]
        base = max(pods[50:60])
        return next(m for m in range(60, len(pods)) if pods[m] > base)

    kv_only = scalers.Toposerve({**SPEC, "syncPeriodSeconds": 5})
    assert first_up(lead()) <= first_up(kv_only)


# ---- the report's arithmetic ------------------------------------------------------------------


def test_frontier_and_interpolation() -> None:
    pts = [(100.0, 500.0), (120.0, 100.0), (110.0, 600.0), (150.0, 10.0), (160.0, 20.0)]
    curve = leading.frontier(pts)
    assert curve == [(100.0, 500.0), (120.0, 100.0), (150.0, 10.0)]
    assert leading.gpu_hours_at(curve, 300.0) == pytest.approx(110.0)
    assert leading.gpu_hours_at(curve, 600.0) == 100.0  # the cheapest point already does
    assert leading.gpu_hours_at(curve, 5.0) is None  # not reached
    assert leading.missed_at(curve, 135.0) == pytest.approx(55.0)
    assert leading.missed_at(curve, 90.0) is None and leading.missed_at(curve, 200.0) == 10.0
