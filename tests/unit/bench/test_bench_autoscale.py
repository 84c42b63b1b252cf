"""bench/autoscale: the simulation keeps its books, and the policies are driven the way they claim.

Short traces only (minutes to a few hours of simulated time); nothing here measures wall time.
"""

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

from toposerve.controller import autoscaler as loop  # noqa: E402

# run.py under a name of its own: other benches have a run.py too.
_spec = importlib.util.spec_from_file_location("bench_autoscale_run", BENCH / "run.py")
assert _spec is not None and _spec.loader is not None
run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run)

ENGINE = fleetsim.EngineModel.for_gpu("L4", startup_s=120.0)


def flat_trace(
    rps: float, seconds: float, seed: int = 3, spike: tuple[float, float, float] | None = None
) -> daytrace.Trace:
    """A constant-rate trace (plus an optional (start, end, factor) spike) of ``seconds``."""
    import random

    rng = random.Random(seed)
    arrival: list[float] = []
    t = 0.0
    while True:
        r = rps * (spike[2] if spike and spike[0] <= t < spike[1] else 1.0)
        t += rng.expovariate(r)
        if t >= seconds:
            break
        arrival.append(t)
    n = len(arrival)
    cfg = daytrace.TraceConfig(days=1)
    spikes = (daytrace.Spike(spike[0], spike[1]),) if spike else ()
    return daytrace.Trace(arrival, [rng.randint(200, 2000) for _ in range(n)],
                          [rng.randint(20, 300) for _ in range(n)], spikes, cfg, (1.0,))  # fmt: skip


def toposerve(**over: object) -> scalers.Toposerve:
    spec: dict[str, object] = {
        "minReplicas": 1,
        "maxReplicas": 8,
        "warmStandby": 1,
        "startupGraceSeconds": 120,
    }
    spec.update(over)
    return scalers.Toposerve(spec)


# ---- the trace ---------------------------------------------------------------------------------


def test_trace_is_deterministic_for_a_seed_and_differs_across_seeds() -> None:
    a = daytrace.generate(daytrace.TraceConfig(days=1, seed=5, peak_rps=0.5))
    b = daytrace.generate(daytrace.TraceConfig(days=1, seed=5, peak_rps=0.5))
    c = daytrace.generate(daytrace.TraceConfig(days=1, seed=6, peak_rps=0.5))
    assert (a.arrival, a.prompt, a.output, a.spikes) == (b.arrival, b.prompt, b.output, b.spikes)
    assert a.arrival != c.arrival


def test_trace_is_day_shaped_with_its_spikes_inside_the_day() -> None:
    cfg = daytrace.TraceConfig(days=2, seed=2, peak_rps=1.0, night_rps=0.1, spikes_per_day=1)
    tr = daytrace.generate(cfg)
    assert tr.arrival == sorted(tr.arrival) and tr.arrival[-1] < 2 * daytrace.DAY
    night = sum(1 for t in tr.arrival if (t % daytrace.DAY) < 5 * 3600)
    noon = sum(1 for t in tr.arrival if 10 * 3600 <= (t % daytrace.DAY) < 11 * 3600)
    assert noon / 3600 > 5 * night / (5 * 3600)  # the plateau is far busier than the night
    assert len(tr.spikes) == 2
    for s in tr.spikes:
        assert 8 <= (s.start % daytrace.DAY) / 3600 <= 20 and s.end - s.start == cfg.spike_seconds
    assert all(cfg.prompt_clip[0] <= p <= cfg.prompt_clip[1] for p in tr.prompt)


@pytest.mark.parametrize("bad", [{"days": 0}, {"peak_rps": 0}, {"spike_factor": 0.5}])
def test_trace_config_rejects_bad_input_naming_the_field(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        daytrace.TraceConfig(**bad)  # type: ignore[arg-type]


# ---- the simulation ----------------------------------------------------------------------------


def test_every_request_is_served_dropped_or_still_in_flight() -> None:
    tr = flat_trace(rps=2.0, seconds=1800)  # far more than one L4 replica takes: queues and drops
    res = fleetsim.Fleet(tr, ENGINE, scalers.FixedMax(1), timeout_s=30.0, until=1800).run()
    assert res.unfinished > 0 and res.dropped_count > 0 and res.served > 0
    assert res.served + res.dropped_count + res.unfinished == len(tr)
    # a dropped request never got a first token; every served one did
    assert all(math.isnan(x) for x, d in zip(res.ttft, res.dropped, strict=True) if d)
    assert sum(1 for x in res.ttft if not math.isnan(x)) >= res.served


def test_fixed_policy_gpu_hours_is_replicas_times_hours() -> None:
    tr = flat_trace(rps=0.5, seconds=7200)
    res = fleetsim.Fleet(tr, ENGINE, scalers.FixedMax(3), until=7200).run()
    assert res.gpu_seconds == pytest.approx(3 * 7200)
    assert res.scale_events == 0 and res.pod_starts == 0


def test_ttft_on_an_idle_replica_is_the_mock_engines_prefill_time() -> None:
    tr = flat_trace(rps=0.01, seconds=3600)  # requests far apart: nobody waits
    res = fleetsim.Fleet(tr, ENGINE, scalers.FixedMax(1), until=3600).run()
    for i in range(len(tr)):
        assert res.ttft[i] == pytest.approx(ENGINE.timing.prefill_time(tr.prompt[i]))


def test_kv_capacity_is_the_mock_engines_block_pool() -> None:
    from toposerve.mockengine.timing import default_num_gpu_blocks

    assert ENGINE.kv_tokens == default_num_gpu_blocks("L4") * 16
    with pytest.raises(ValueError, match="gpu"):
        fleetsim.EngineModel.for_gpu("no-such-gpu")


def test_overload_fills_the_kv_cache_and_queues() -> None:
    tr = flat_trace(rps=2.0, seconds=600)
    fleet = fleetsim.Fleet(tr, ENGINE, scalers.FixedMax(1), timeout_s=1000.0, until=600)
    fleet.run()
    obs = fleet.observe(600.0)
    (pod,) = obs.pods
    assert pod.kv is not None and pod.kv > 0.7
    assert pod.waiting is not None and pod.waiting > 5


def test_a_spike_raises_toposerve_replicas_and_they_come_back_down() -> None:
    tr = flat_trace(rps=0.3, seconds=3 * 3600, spike=(3600.0, 4200.0, 6.0))
    res = fleetsim.Fleet(tr, ENGINE, toposerve(), until=3 * 3600).run()
    serving = res.timeline["serving"]  # per minute
    before, during, after = max(serving[30:60]), max(serving[60:80]), serving[-1]
    assert during > before
    assert after < during  # the scale-down window let it go again
    assert res.promotions >= 1  # the warm standby went into rotation first


def test_a_load_sized_standby_grows_with_the_fleet_and_shrinks_back() -> None:
    """warmStandbyPercent 50: no standby at one replica, then one per two serving replicas through
    the spike (pods = serving + standby), and back to none when the fleet is back at one."""
    tr = flat_trace(rps=0.3, seconds=3 * 3600, spike=(3600.0, 4200.0, 6.0))
    p = toposerve(warmStandby=0, warmStandbyPercent=50)
    assert p.standby == 0
    res = fleetsim.Fleet(tr, ENGINE, p, until=3 * 3600).run()
    pods, serving = res.timeline["pods"], res.timeline["serving"]
    assert max(pods[30:60]) == max(serving[30:60]) == 1  # one replica, no standby
    peak = max(range(60, 100), key=lambda m: serving[m])
    assert serving[peak] >= 4 and pods[peak] > serving[peak]  # standby pods beside the serving ones
    assert p.standby == p.spec.standby_for(serving[-1])


def test_the_simulation_is_deterministic() -> None:
    tr = flat_trace(rps=0.6, seconds=5400, spike=(1800.0, 2400.0, 4.0))
    a = fleetsim.Fleet(tr, ENGINE, toposerve(), until=5400).run()
    b = fleetsim.Fleet(tr, ENGINE, toposerve(), until=5400).run()
    assert a.ttft == b.ttft or all(
        (math.isnan(x) and math.isnan(y)) or x == y for x, y in zip(a.ttft, b.ttft, strict=True)
    )
    assert (a.gpu_seconds, a.scale_events, a.timeline) == (b.gpu_seconds, b.scale_events, b.timeline)


# ---- the policies ------------------------------------------------------------------------------


def test_toposerve_takes_its_spec_through_the_products_validation() -> None:
    with pytest.raises(ValueError, match="minReplicas must be <= maxReplicas"):
        toposerve(minReplicas=9)
    p = toposerve(warmStandby=2)
    assert p.standby == 2 and p.cfg.max_replicas == 8


def test_bench_cadence_matches_the_operator_loop() -> None:
    assert scalers.FORECAST_REFRESH_SECONDS == loop.FORECAST_REFRESH_SECONDS
    assert scalers.PERIOD_SECONDS == loop.PERIOD_SECONDS


def test_forecast_floor_reads_yesterdays_demand_one_lead_ahead() -> None:
    hist = fleetsim.FleetHistory()
    minutes = 2 * 1440
    hist.kv = [0.0] * minutes
    hist.waiting = [0.0] * minutes
    for m in range(600, 660):  # yesterday 10:00-11:00: KV usage summing to 3.5 replicas
        hist.kv[m] = 3.5
    p = toposerve(forecast={"enabled": True, "lookback": 1, "leadSeconds": 600, "windowSeconds": 600})
    # 10:10 today: yesterday's 10:15-10:25 (the window centred one lead ahead) averaged 3.5
    at = daytrace.DAY + 10 * 3600 + 600.0
    assert p.forecast_floor(at, hist) == math.ceil(3.5 / 0.7)
    quiet = toposerve(forecast={"enabled": True, "lookback": 1, "leadSeconds": 600, "windowSeconds": 600})
    assert quiet.forecast_floor(daytrace.DAY + 3 * 3600, hist) == 0
    # with burstHeadroom the forecast floor is staffed as the reactive proposal is: 5 + 1 x sqrt(5)
    staffed = toposerve(burstHeadroom=1.0, forecast={"enabled": True, "lookback": 1, "leadSeconds": 600,
                                                     "windowSeconds": 600})  # fmt: skip
    assert staffed.cfg.burst_headroom == 1.0
    assert staffed.forecast_floor(at, hist) == math.ceil(3.5 / 0.7 + math.sqrt(3.5 / 0.7))


def test_hpa_calculator_counts_missing_pods_like_the_hpa() -> None:
    # scale-up: a pod without metrics counts 0 (dampens); scale-down: it counts as at target
    assert scalers.hpa_metric_replicas([0.9, 0.9], 0.7, 3, 1, 0.1) == 3
    assert scalers.hpa_metric_replicas([1.0, 1.0], 0.7, 2, 0, 0.1) == 3
    assert scalers.hpa_metric_replicas([0.2, 0.2], 0.7, 3, 1, 0.1) == 2
    assert scalers.hpa_metric_replicas([0.2, 0.2], 0.7, 2, 0, 0.1) == 1
    assert scalers.hpa_metric_replicas([0.7], 0.7, 2, 0, 0.1) == 2


def test_request_count_scales_on_average_in_flight_and_delays_scale_down() -> None:
    p = scalers.RequestCount(1, 10, target_requests=10, interval=15, window=30, scale_down_delay=30)
    obs = fleetsim.Observation(0.0, 1, (), inflight=45)
    assert p.decide(obs, fleetsim.FleetHistory()) == 5  # window [45]
    obs = fleetsim.Observation(15.0, 5, (), inflight=5)
    assert p.decide(obs, fleetsim.FleetHistory()) == 5  # (45 + 5) / 2 / 10 -> 3, but wait 2 lows
    obs = fleetsim.Observation(30.0, 5, (), inflight=5)
    assert p.decide(obs, fleetsim.FleetHistory()) == 1


def test_summary_counts_drops_as_slo_misses_and_reports_spike_absorption() -> None:
    tr = flat_trace(rps=0.3, seconds=3 * 3600, spike=(3600.0, 4200.0, 8.0))
    res = fleetsim.Fleet(tr, ENGINE, scalers.FixedMax(1), timeout_s=60.0, until=3 * 3600).run()
    s = run.summarize(tr, res, slo_s=2.0, start=0.0, end=3 * 3600)
    missed = sum(1 for x in res.ttft if math.isnan(x) or x > 2.0)
    assert s["slo_attainment"] == pytest.approx(1 - missed / len(tr))
    assert s["dropped"] == res.dropped_count > 0
    (absorb,) = s["spike_absorb_s"]
    assert 600 <= absorb <= 600 + 1800  # one replica cannot take an 8x spike: it lasts past its end


def test_targets_say_missed_when_a_competitor_setting_is_as_good_for_less() -> None:
    def row(slo: float, gpu: float) -> dict[str, float]:
        return {"slo_attainment": slo, "gpu_hours": gpu}

    p = {
        "fixed-max": row(1.0, 1000),
        "toposerve": row(0.995, 500),
        "request-count": row(0.90, 300),
        "request-count@0.4": row(0.99, 450),
        "request-count@0.3": row(0.999, 600),  # costlier and better: no verdict against toposerve
        "hpa-kv": row(0.92, 300),
        "hpa-kv@0.4": row(0.996, 480),  # as good for less: toposerve misses the target
    }
    t = run.targets(p, "toposerve")
    assert t["within_1pp_of_fixed"] and t["at_most_60pct_gpu_hours"]
    assert t["gpu_hours_share_of_fixed"] == 0.5 and t["slo_gap_vs_fixed_pp"] == pytest.approx(0.5)
    rc, hpa = t["vs_request-count"], t["vs_hpa-kv"]
    assert rc["same_target_slo_better"] and not rc["same_target_gpu_hours_le"]
    assert rc["dominated_by"] == [] and rc["iso_cost_setting"] == "request-count@0.3"
    assert rc["iso_cost_slo_better"] is False and not rc["met"]
    assert hpa["dominated_by"] == ["hpa-kv@0.4"] and not hpa["met"]
    p["request-count@0.3"] = row(0.99, 600)
    assert run.targets(p, "toposerve")["vs_request-count"]["met"] is True
    del p["request-count@0.3"]  # nothing spends as much and nothing dominates: undecided, not met
    assert run.targets(p, "toposerve")["vs_request-count"]["met"] is None
