"""bench/autoscale/hetero.py (issue 25, target b): spot reclaims after the notice, the on-demand
cover, GPU-dollars at the catalog's spot price, the cost order's placement. Short traces in
simulated time; no wall-time assertions."""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[3] / "bench" / "autoscale"
sys.path.insert(0, str(BENCH))

import daytrace  # noqa: E402
import scalers  # noqa: E402

from toposerve.api.gpus import DEFAULT_CATALOG  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_autoscale_hetero", BENCH / "hetero.py")
assert _spec is not None and _spec.loader is not None
hetero = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = hetero  # its dataclasses look their module up
_spec.loader.exec_module(hetero)

L4 = hetero.engine("L4", 60.0, 0.0)
H100 = hetero.engine("H100", 60.0, 0.0)
L40S = hetero.engine("L40S", 60.0, 0.0)


def flat_trace(rps: float, seconds: float, out: int = 1000, seed: int = 3) -> daytrace.Trace:
    rng = random.Random(seed)
    arrival: list[float] = []
    t = 0.0
    while True:
        t += rng.expovariate(rps)
        if t >= seconds:
            break
        arrival.append(t)
    n = len(arrival)
    return daytrace.Trace(arrival, [500] * n, [out] * n, (), daytrace.TraceConfig(days=1), (1.0,))


class Probe(hetero.HeteroFleet):
    """Reclaims the first pod at ``at`` and records, per tick, which pods exist and which drain."""

    def __init__(self, *a: object, at: float, **kw: object) -> None:
        super().__init__(*a, **kw)  # type: ignore[arg-type]
        self.at = at
        self.seen: dict[float, dict[str, bool]] = {}

    def _start_pods(self, n: int) -> None:
        super()._start_pods(n)
        self.first = self.engines[0].name
        self.reclaim_at = {self.first: self.at}  # the only reclaim of the run

    def _tick_hook(self, t0: float) -> None:
        super()._tick_hook(t0)
        self.seen[t0] = {e.name: e.draining for e in self.engines}


def probe(cover: bool) -> Probe:
    pool = hetero.PoolSpec.for_gpu("l4", "L4", L4, spot=True)
    f = Probe(flat_trace(2.0, 400), [pool], scalers.FixedMax(2), split=False, cover=cover,
              reclaims_per_day=1e-9, notice_s=10.0, until=400.0, at=100.0)  # fmt: skip
    f.run()
    return f


def test_a_reclaimed_spot_pod_leaves_rotation_at_the_notice_and_dies_after_it() -> None:
    f = probe(cover=True)
    assert f.reclaims == 1
    assert f.first in f.seen[99.0] and not f.seen[99.0][f.first]
    assert f.seen[100.0][f.first] is True  # out of rotation at the notice
    assert f.first in f.seen[109.0]  # still finishing what it holds
    assert all(f.first not in pods for t, pods in f.seen.items() if t >= 110.0)
    # 1,000-token outputs on an L4 outlast a 10 s notice: the ones still running are missed
    assert f.killed_requests > 0
    assert sum(f.dropped) >= f.killed_requests
    # the spot replacement and the on-demand cover start at the notice
    new = set(f.seen[100.0]) - set(f.seen[99.0])
    assert len(new) == 2 and f.cover_starts == 1
    assert {f.spot[n] for n in new} == {True, False}


def test_competitors_get_no_cover() -> None:
    f = probe(cover=False)
    new = set(f.seen[100.0]) - set(f.seen[99.0])
    assert len(new) == 1 and f.cover_starts == 0 and f.spot[new.pop()]


def test_gpu_dollars_use_the_catalog_spot_price_above_the_baseline() -> None:
    g = DEFAULT_CATALOG.get("L4")
    for baseline, want in ((0, 2 * g.spot_hourly_price), (1, g.hourly_price + g.spot_hourly_price)):
        pool = hetero.PoolSpec.for_gpu("l4", "L4", L4, spot=True, on_demand_baseline=baseline)
        f = hetero.HeteroFleet(flat_trace(0.2, 3600, out=50), [pool], scalers.FixedMax(2), until=3600.0)
        res = f.run()
        assert res.usd_by_day[0] == pytest.approx(want)
        assert res.gpu_seconds == pytest.approx(2 * 3600)


def test_the_cost_order_puts_growth_on_the_cheapest_per_token_pool() -> None:
    # planner estimate: L40S spot 0.50 USD/h at 864 GB/s against H100 2.50 USD/h at 3,350 GB/s
    cheap = hetero.PoolSpec.for_gpu("cheap", "L40S", L40S, spot=True, max_replicas=3)
    fast = hetero.PoolSpec.for_gpu("fast", "H100", H100)
    f = hetero.HeteroFleet(flat_trace(0.2, 600, out=50), [cheap, fast], scalers.FixedMax(5), split=True,
                           until=600.0)  # fmt: skip
    f.run()
    assert len(f.members(cheap)) == 3 and len(f.members(fast)) == 2
    assert all(f.spot[e.name] for e in f.members(cheap))
