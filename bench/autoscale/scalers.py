"""The four autoscaling policies the benchmark compares.

* ``FixedMax``: maxReplicas all the time (the SLO reference and the GPU-hour ceiling).
* ``RequestCount``: KubeAI's rule: the moving average (over ``window``) of in-flight requests
  (running + waiting + held) divided by ``targetRequests``, rounded up; a scale-down only after
  ``scaleDownDelaySeconds`` of consecutive lower proposals. Written here from KubeAI's documented
  behaviour (defaults: 10 minute window, 30 s scale-down delay).
* ``KVHpa``: a Kubernetes HorizontalPodAutoscaler on one Pods metric, the KV-cache usage, with the
  API's default behaviour (scale up: no window, max(4 pods, 100 %) per 15 s; scale down: 300 s
  window, 100 % per 15 s) and 0.1 tolerance. The replica calculator is the HPA's
  ``calcPlainMetricReplicas`` for a non-CPU metric, written here (pods without a sample are
  "missing": 0 on a scale-up, the target on a scale-down); stabilization and rate limits call
  toposerve's ``stabilize``/``rate_limit``, which follow the HPA line for line (its own tests check
  them against the HPA's), so the HPA and toposerve share those and differ in what they decide on.
* ``Toposerve``: the product: ``Config.from_spec(AutoscalingSpec)`` and ``decide`` with the
  forecast floor (``forecast.spec_demand_floor`` over the simulated Prometheus history, refreshed
  every ``FORECAST_REFRESH_SECONDS`` like the operator's loop), schedule windows
  (``schedule.schedule_floor``) and warm standby (``standby.relabel``, in the fleet). Nothing of
  its policy is re-implemented here; this module only feeds it what the operator's loop would.
* ``ToposerveLeading``: the same, plus the router's demand (``Inputs.demand``,
  ``autoscale/queueing.py``): what the simulated router saw, as the real router exports it.
"""

from __future__ import annotations

import functools
import math
from collections import deque
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from fleetsim import FleetHistory, Observation

from toposerve.api.spec import AutoscalingSpec
from toposerve.autoscale import decision as _decision
from toposerve.autoscale import queueing as _queueing
from toposerve.autoscale.decision import (
    DEFAULT_DOWN_POLICIES,
    DEFAULT_UP_POLICIES,
    Config,
    History,
    Inputs,
    Replica,
    Rules,
    decide,
    rate_limit,
    record_scale,
    stabilize,
)
from toposerve.autoscale.forecast import spec_demand_floor, spec_slice_offset
from toposerve.autoscale.queueing import Demand
from toposerve.autoscale.schedule import schedule_floor

# Mirrors of the operator loop's cadence (toposerve.controller.autoscaler, which imports the Kubernetes
# client; the bench keeps to the pure modules). A unit test checks they still match.
FORECAST_REFRESH_SECONDS = 300.0
PERIOD_SECONDS = {"daily": 86400.0, "weekly": 7 * 86400.0}
EPOCH = datetime(2026, 11, 2, tzinfo=UTC)  # a Monday, 00:00 UTC: t=0 of the trace


class FixedMax:
    def __init__(self, replicas: int) -> None:
        if replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {replicas}")
        self.name, self.period, self.standby, self.replicas = "fixed-max", math.inf, 0, replicas

    def initial(self) -> int:
        return self.replicas

    def decide(self, obs: Observation, history: FleetHistory) -> int:
        return self.replicas


class RequestCount:
    def __init__(
        self,
        min_replicas: int,
        max_replicas: int,
        target_requests: float,
        interval: float = 15.0,
        window: float = 600.0,
        scale_down_delay: float = 30.0,
    ) -> None:
        if target_requests <= 0:
            raise ValueError(f"target_requests must be > 0, got {target_requests}")
        if not 1 <= min_replicas <= max_replicas:
            raise ValueError("need 1 <= min_replicas <= max_replicas")
        self.name, self.period, self.standby = "request-count", interval, 0
        self.min, self.max, self.target = min_replicas, max_replicas, target_requests
        self.samples: deque[int] = deque(maxlen=max(1, round(window / interval)))
        self.required_downs = max(1, math.ceil(scale_down_delay / interval))
        self.downs = 0

    def initial(self) -> int:
        return self.min

    def decide(self, obs: Observation, history: FleetHistory) -> int:
        self.samples.append(obs.inflight)
        avg = sum(self.samples) / len(self.samples)
        want = min(self.max, max(self.min, math.ceil(round(avg / self.target, 9))))
        if want < obs.current:
            self.downs += 1
            if self.downs < self.required_downs:
                return obs.current
        self.downs = 0
        return want


def hpa_metric_replicas(
    values: list[float], target: float, current: int, missing: int, tolerance: float
) -> int:
    """calcPlainMetricReplicas for a Pods metric: readiness only matters for CPU, so every pod with
    a sample counts; pods without one count 0 on a scale-up and the target on a scale-down."""
    if not values:
        return current
    ratio = sum(values) / len(values) / target
    if missing == 0:
        if 1 - tolerance <= ratio <= 1 + tolerance:
            return current
        return math.ceil(round(ratio * len(values), 9))
    samples = values + [target if ratio < 1.0 else 0.0] * missing
    new_ratio = sum(samples) / len(samples) / target
    if 1 - tolerance <= new_ratio <= 1 + tolerance or (ratio < 1.0 < new_ratio) or (ratio > 1.0 > new_ratio):
        return current
    new = math.ceil(round(new_ratio * len(samples), 9))
    if (new_ratio < 1.0 and new > current) or (new_ratio > 1.0 and new < current):
        return current
    return new


class KVHpa:
    def __init__(
        self,
        min_replicas: int,
        max_replicas: int,
        target_kv: float,
        tolerance: float = 0.1,
        down_window_s: float = 300.0,
    ) -> None:
        if not 0 < target_kv <= 1:
            raise ValueError(f"target_kv must be in (0, 1], got {target_kv}")
        if not 1 <= min_replicas <= max_replicas:
            raise ValueError("need 1 <= min_replicas <= max_replicas")
        self.name, self.period, self.standby = "hpa-kv", 15.0, 0
        self.cfg = Config(
            min_replicas=min_replicas,
            max_replicas=max_replicas,
            target_kv=target_kv,
            target_waiting=math.inf,
            tolerance=tolerance,
            up=Rules(0.0, DEFAULT_UP_POLICIES),
            down=Rules(down_window_s, DEFAULT_DOWN_POLICIES),  # the HPA's default 300 s
            startup_grace=0.0,
        )
        self.history = History()

    def initial(self) -> int:
        return self.cfg.min_replicas

    def decide(self, obs: Observation, history: FleetHistory) -> int:
        cfg, now, current = self.cfg, obs.now, obs.current
        values = [p.kv for p in obs.pods if p.kv is not None]
        missing = sum(1 for p in obs.pods if p.kv is None)
        proposal = hpa_metric_replicas(values, cfg.target_kv, current, missing, cfg.tolerance)
        recs = tuple((t, r) for t, r in self.history.recommendations if t > now - cfg.down.window)
        stabilized = stabilize(current, proposal, recs, now, cfg.up, cfg.down)
        hist = replace(self.history, recommendations=(*recs, (now, proposal)))
        desired, _ = rate_limit(current, stabilized, cfg.min_replicas, cfg.max_replicas, hist, cfg, now)
        desired = min(cfg.max_replicas, max(cfg.min_replicas, desired))
        hist = replace(
            hist,
            scale_ups=tuple((t, n) for t, n in hist.scale_ups if t > now - 15.0),
            scale_downs=tuple((t, n) for t, n in hist.scale_downs if t > now - 15.0),
        )
        self.history = record_scale(hist, now, current, desired)
        return desired


class Toposerve:
    def __init__(self, spec: dict[str, Any], name: str = "toposerve") -> None:
        """``spec``: spec.autoscaling as a user writes it (camelCase), validated by the product."""
        self.spec = AutoscalingSpec.model_validate({"enabled": True, **spec})
        a = self.spec
        # standby: what the workload runs beside spec.replicas, re-sized after each decision (the
        # fleet reads it after ``decide``, as the planner sizes the workloads after a scale)
        self.name, self.period = name, float(a.sync_period_seconds)
        self.standby = a.standby_for(a.min_replicas)
        self.cfg = Config.from_spec(a)
        self.history = History()
        self._forecast: tuple[float, int] | None = None
        self.last_floor_source = "minReplicas"
        self.last_signal = ""

    def initial(self) -> int:
        return self.cfg.min_replicas

    def forecast_floor(self, now: float, history: FleetHistory) -> int:
        f, a = self.spec.forecast, self.spec
        if not f.enabled:
            return 0
        if self._forecast and now - self._forecast[0] < FORECAST_REFRESH_SECONDS:
            return self._forecast[1]
        kv, waiting = history.range_query(
            now, spec_slice_offset(a), PERIOD_SECONDS[f.period], f.lookback, f.window_seconds
        )
        value = spec_demand_floor(a, kv, waiting)
        self._forecast = (now, value)
        return value

    def inputs(self, obs: Observation, history: FleetHistory) -> Inputs:
        now = obs.now
        floor, window = schedule_floor(self.spec.schedules, EPOCH + timedelta(seconds=now))
        serving = tuple(
            Replica(p.name, p.ready, p.age, p.kv, p.waiting, p.running) for p in obs.pods if not p.standby
        )
        return Inputs(
            now=now,
            current=obs.current,
            replicas=tuple(sorted(serving, key=lambda r: r.name)),
            standby_ready=sum(1 for p in obs.pods if p.standby and p.ready),
            schedule_floor=floor,
            schedule_name=window,
            forecast_floor=self.forecast_floor(now, history),
        )

    def decide(self, obs: Observation, history: FleetHistory) -> int:
        d = decide(self.cfg, self.inputs(obs, history), self.history)
        self.history = d.history
        self.standby = self.spec.standby_for(d.desired)
        self.last_floor_source = d.floor_source
        self.last_signal = d.signal
        return d.desired


class ToposerveLeading(Toposerve):
    """toposerve with the router's leading signal: ``Inputs.demand`` built from what the simulated
    router sees (arrivals over a short and a long window, requests in flight and held, the learned
    mean output) and the engines' counters (decode tokens/s per replica at the observed batch),
    passed to the product's ``decide`` beside the KV metrics. The fleet fills ``obs.router``
    because this policy has ``router_windows``. ``demand_headroom`` is the rule's beta
    (``Config.demand_headroom``; None: the spec's burstHeadroom)."""

    def __init__(
        self,
        spec: dict[str, Any],
        kv_tokens: int,
        short_s: float = 5.0,
        long_s: float = 60.0,
        demand_headroom: float | None = None,
        name: str = "toposerve-leading",
        z: float | str | None = "default",
    ) -> None:
        super().__init__(spec, name=name)
        # the short window's significance test (queueing.SHORT_WINDOW_Z); anything but "default"
        # replaces the product's z for this policy's decisions (a tuning hook; None: no filter)
        self.z = z
        if not 0 < short_s <= long_s:
            raise ValueError("need 0 < short_s <= long_s")
        self.router_windows = (short_s, long_s)
        self.kv_tokens = kv_tokens
        self.cfg = replace(self.cfg, demand_headroom=demand_headroom)
        self._service: tuple[float, float] | None = None  # last (decode tokens/s per replica, batch)

    def demand(self, obs: Observation) -> Demand | None:
        r = obs.router
        if r is None:
            return None
        busy = [p for p in obs.pods if not p.standby and p.decode_rate is not None and p.running]
        if busy:
            batch = sum(p.running or 0.0 for p in busy) / len(busy)
            rate = sum(p.decode_rate or 0.0 for p in busy) / len(busy)
            if batch >= 0.5 and rate > 0:  # an idle engine says nothing about its speed under load
                self._service = (rate, batch)
        short, long = r.short_s, min(r.long_s, max(obs.now, r.short_s))
        rate_s, rate_l = r.arrivals_short / short, r.arrivals_long / long
        return Demand(
            kv_tokens_per_replica=float(self.kv_tokens),
            arrivals_short=rate_s,
            arrivals_long=rate_l,
            prompt_tokens_short=r.prompt_short / short,
            prompt_tokens_long=r.prompt_long / long,
            decode_tokens_short=rate_s * r.expected_decode,
            decode_tokens_long=rate_l * r.expected_decode,
            in_flight=float(r.in_flight),
            in_flight_tokens=r.in_flight_prompt + r.in_flight * r.expected_decode,
            held=float(r.held),
            short_window_s=short,
            decode_tokens_per_replica=self._service[0] if self._service else None,
            batch=self._service[1] if self._service else None,
        )

    def inputs(self, obs: Observation, history: FleetHistory) -> Inputs:
        return replace(
            super().inputs(obs, history),
            held_requests=obs.router.held if obs.router else 0,
            demand=self.demand(obs),
        )

    def decide(self, obs: Observation, history: FleetHistory) -> int:
        if self.z == "default":
            return super().decide(obs, history)
        # decide() calls decision.demand_replicas with the product's default z: swap in the tuned
        # one around this call only (the simulation is single-threaded)
        orig = _decision.demand_replicas
        _decision.demand_replicas = functools.partial(_queueing.demand_replicas, z=self.z)  # type: ignore[assignment]
        try:
            return super().decide(obs, history)
        finally:
            _decision.demand_replicas = orig
