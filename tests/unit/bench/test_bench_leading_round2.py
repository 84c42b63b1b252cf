"""bench/autoscale, issue 25 round 2: the start-up phase model (cold / warm), the Azure trace's
scaling and replay, the z tuning hook around the product's decide(), the HPA's down window and
the GPU-hours of a span. Short traces; no wall-time assertions."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[3] / "bench" / "autoscale"
sys.path.insert(0, str(BENCH))

import azuretrace  # noqa: E402
import fleetsim  # noqa: E402
import scalers  # noqa: E402
import startup_phases  # noqa: E402

from toposerve.autoscale import decision  # noqa: E402
from toposerve.mockengine.startup import plan  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_autoscale_leading_r2", BENCH / "leading.py")
assert _spec is not None and _spec.loader is not None
leading = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(leading)


def test_cold_and_warm_start_up_follow_the_mock_engines_phases() -> None:
    cold, warm = startup_phases.phases(False), startup_phases.phases(True)
    assert [n for n, _ in cold] == ["download", "load", "compile", "graphs"]
    assert [n for n, _ in warm] == ["load", "compile-cached", "graphs"]  # weights on the node, graphs cached
    m = startup_phases.startup_model()
    assert startup_phases.startup_seconds(False) == pytest.approx(
        sum(p.seconds for p in plan(m, False, False))
    )
    # 15 GiB at 0.5 GB/s + 2 GB/s, 240 s compile + 60 s graphs; warm: 24 s cached compile
    assert startup_phases.startup_seconds(False) == pytest.approx(340.3, abs=0.1)
    assert startup_phases.startup_seconds(True) == pytest.approx(92.1, abs=0.1)


def _args(**kw: object) -> argparse.Namespace:
    base: dict[str, object] = dict(startup=300.0, startup_sigma=0.25, startup_model="phases", leading="{}",
                                   max_replicas=12, hpa_down=300.0, warm_all=False)  # fmt: skip
    base.update(kw)
    return argparse.Namespace(**base)


def test_only_toposerve_with_the_lever_starts_warm() -> None:
    warm = json.dumps({"startup": "warm"})
    assert leading.engine_for("hpa-kv", _args(leading=warm)).startup_s == pytest.approx(340.3, abs=0.1)
    assert leading.engine_for("request-count", _args(leading=warm)).startup_s == pytest.approx(340.3, abs=0.1)
    assert leading.engine_for("toposerve-leading", _args()).startup_s == pytest.approx(340.3, abs=0.1)
    assert leading.engine_for("toposerve-leading", _args(leading=warm)).startup_s == pytest.approx(
        92.1, abs=0.1
    )
    assert leading.engine_for("hpa-kv", _args(startup_model="lognormal")).startup_s == 300.0
    assert leading.engine_for("hpa-kv", _args(warm_all=True)).startup_s == pytest.approx(92.1, abs=0.1)


def test_azure_trace_is_stretched_to_the_plateau_and_played_twice() -> None:
    rows = azuretrace.read("conv")
    assert len(rows) == 19_366 and rows == sorted(rows)
    k = azuretrace.stretch(rows)
    span = rows[-1][0] - rows[0][0]
    tokens = sum(p + o for _, p, o in rows)
    assert tokens / (span * k) == pytest.approx(azuretrace.PLATEAU_TOKENS_PER_S)
    trace, period = azuretrace.load("conv", seed=1)
    assert len(trace) == 2 * len(rows) and period > rows[-1][0] * k
    assert trace.arrival == sorted(trace.arrival) and trace.arrival[len(rows)] >= period
    assert trace.prompt[: len(rows)] == [p for _, p, _ in rows] == trace.prompt[len(rows) :]
    assert trace.spikes == ()


def test_z_hook_swaps_the_products_z_only_inside_the_call() -> None:
    seen: list[object] = []
    orig = decision.demand_replicas

    class Probe(scalers.ToposerveLeading):
        def inputs(self, obs, history):  # type: ignore[no-untyped-def]
            seen.append(decision.demand_replicas)
            return super().inputs(obs, history)

    spec = {"minReplicas": 1, "maxReplicas": 4, "targetKVCacheUtilization": 0.5, "syncPeriodSeconds": 5}
    engine = fleetsim.EngineModel.for_gpu("L4", startup_s=60.0)
    p = Probe(spec, engine.kv_tokens, short_s=15.0, z=None)
    obs = fleetsim.Observation(now=100.0, current=1, pods=(), inflight=0, router=None)
    p.decide(obs, fleetsim.FleetHistory())
    assert seen and seen[0] is not orig and decision.demand_replicas is orig
    assert seen[0].keywords == {"z": None}  # type: ignore[attr-defined]
    seen.clear()
    Probe(spec, engine.kv_tokens).decide(obs, fleetsim.FleetHistory())
    assert seen == [orig]


def test_hpa_down_window_is_the_knob() -> None:
    assert scalers.KVHpa(1, 4, 0.5).cfg.down.window == 300.0
    assert scalers.KVHpa(1, 4, 0.5, down_window_s=120.0).cfg.down.window == 120.0


def test_gpu_hours_between_counts_the_span_only() -> None:
    tl = {"pods": [1.0] * 60 + [3.0] * 60}  # one pod for an hour, then three
    assert leading.gpu_hours_between(tl, 3600.0, 7200.0) == 3.0
    assert leading.gpu_hours_between(tl, 0.0, 3600.0) == 1.0
    assert math.isclose(leading.gpu_hours_between(tl, 1800.0, 5400.0), 2.0)
