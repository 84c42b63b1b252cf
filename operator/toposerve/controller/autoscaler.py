"""The builtin autoscaler: a leader-only loop in the operator process (I/O shell).

Every ``syncPeriodSeconds`` per LLMDeployment in mode builtin: list its engine pods, read the
metrics source, ``decide`` (pure), write spec.replicas only through the scale subresource (with
the resourceVersion it decided on, so a concurrent ``kubectl scale`` wins the race and is
re-decided next time instead of being overwritten blind), record ``status.autoscaling`` (one merge
patch of that key only) and emit an Event on every change. The reconcile then resizes the
workloads from spec.replicas like for any other writer.

It runs beside the reconcile workers, not through kopf handlers: a decision is periodic, not an
answer to an event, and kopf timers would add finalizers to users' objects.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from kubernetes.client.exceptions import ApiException

from toposerve import API_GROUP, API_VERSION
from toposerve.api.config import OperatorConfig
from toposerve.api.errors import SpecError
from toposerve.api.manifest import parse_spec
from toposerve.api.spec import AutoscalingSpec, LLMDeploymentSpec
from toposerve.autoscale.decision import Config, Decision, Inputs, decide
from toposerve.autoscale.forecast import spec_demand_floor, spec_slice_offset
from toposerve.autoscale.queueing import Demand
from toposerve.autoscale.report import TTFT, event_of, history_from_status, replicas, status_of
from toposerve.autoscale.router_figures import RouterFigures
from toposerve.autoscale.schedule import schedule_floor
from toposerve.autoscale.standby import Pod as StandbyPod
from toposerve.autoscale.standby import relabel
from toposerve.autoscale.startup import planning_startup
from toposerve.controller.autoscale_sources import PrometheusSource, Source, read_routers, source_for
from toposerve.controller.kube import Kube, path
from toposerve.controller.observe import ANNOTATION_EVACUATION, parse_time
from toposerve.render.objects import LABEL_COMPONENT, LABEL_DEPLOYMENT

log = logging.getLogger("toposerve.autoscaler")
API = f"{API_GROUP}/{API_VERSION}"
TICK_SECONDS = 1.0
GATEWAY_LIST_SECONDS = 5.0  # how stale the list of gateway pods may be
LEADING_PERIOD_SECONDS = 5  # with leadingSignal: the routers' 5 s window, decided on as often
WORKERS = 8  # deployments decided at once; each decision's reads are bounded by prometheusTimeoutSeconds
FORECAST_REFRESH_SECONDS = 300.0  # history changes slowly: one pair of range queries per 5 minutes
PERIOD_SECONDS = {"daily": 86400.0, "weekly": 7 * 86400.0}


ENGINE, STANDBY = "engine", "standby"  # values of app.kubernetes.io/component on serving pods


def _component(pod: Mapping[str, Any]) -> str:
    return str(((pod.get("metadata") or {}).get("labels") or {}).get(LABEL_COMPONENT, ""))


def _leaving(pod: Mapping[str, Any]) -> bool:
    meta = pod.get("metadata") or {}
    return bool(meta.get("deletionTimestamp") or ANNOTATION_EVACUATION in (meta.get("annotations") or {}))


def _ready(pod: Mapping[str, Any]) -> bool:
    return any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in (pod.get("status") or {}).get("conditions") or []
    )


def _rfc3339(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Autoscaler:
    def __init__(
        self,
        kube: Kube,
        config: OperatorConfig,
        source: Source | None = None,
        clock: Callable[[], float] = time.time,
        bodies: Callable[[], Iterable[Mapping[str, Any]]] | None = None,
        pods_of: Callable[[str, str], list[dict[str, Any]]] | None = None,
    ) -> None:
        """``bodies`` and ``pods_of`` read the operator's watch caches (the LLMDeployments as kopf
        last delivered them, a deployment's pods from controller/children.py); without them the
        loop lists through the API, which every second would load the API server for nothing."""
        self.kube, self.config, self.clock = kube, config, clock
        self.read_routers: Callable[[Sequence[Mapping[str, Any]], tuple[str, str]], RouterFigures] = (
            read_routers
        )
        self._gateways: tuple[float, list[dict[str, Any]]] | None = None  # (when listed, pods)
        self.bodies, self.pods_of = bodies, pods_of
        self.source = source or source_for(
            config.prometheus_url,
            config.prometheus_selector,
            config.prometheus_router_selector,
            config.prometheus_timeout_seconds,
        )
        self._last: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()
        self._running: set[tuple[str, str]] = set()  # deployments whose decision is under way
        self._workers = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="autoscaler")
        self._forecast: dict[tuple[str, str], tuple[float, int | None]] = {}  # key -> (when, floor)

    def run_once(self, namespaces: Sequence[str], wait: float | None = None) -> list[Decision]:
        """Decide for every builtin-mode LLMDeployment whose sync period has passed.

        Deployments are decided concurrently (WORKERS at a time), each at most once at a time: a
        slow Prometheus answer holds that deployment's decision, never the others' (read one after
        another, a dozen deployments at 26 s each outlasted the router's hold at zero). ``wait``:
        how long to wait for the decisions (None: all of them); those still running finish in the
        background and the next pass skips their deployments until they do."""
        targets: list[str | None] = list(namespaces) if namespaces else [None]
        if self.bodies is not None:
            listed: list[Mapping[str, Any]] = list(self.bodies())
        else:
            listed = [b for ns in targets for b in self.kube.list(API, "LLMDeployment", ns)]
        futures: list[Future[Decision | None]] = []
        for body in listed:
            meta = body.get("metadata") or {}
            key = (str(meta.get("namespace")), str(meta.get("name")))
            with self._lock:
                if key in self._running:
                    continue
                self._running.add(key)
            futures.append(self._workers.submit(self._tick_one, key, body))
        done, _ = futures_wait(futures, timeout=wait)
        return [d for f in futures if f in done and (d := f.result()) is not None]

    def _tick_one(self, key: tuple[str, str], body: Mapping[str, Any]) -> Decision | None:
        try:
            return self.tick(body)
        except Exception as e:  # one deployment's trouble must not stop the others
            log.warning("autoscaling %s/%s failed: %s", *key, e)
            return None
        finally:
            with self._lock:
                self._running.discard(key)

    def _pods(self, ns: str, name: str) -> list[dict[str, Any]]:
        if self.pods_of is not None:
            return self.pods_of(ns, name)
        return self.kube.list("v1", "Pod", ns, selector=f"{LABEL_DEPLOYMENT}={name}")

    def _gateway_pods(self) -> list[dict[str, Any]]:
        """The gateway's running pods (docs/gateway.md), listed at most every GATEWAY_LIST_SECONDS
        for all deployments: they route every deployment in their scope."""
        now = self.clock()
        with self._lock:
            if self._gateways is not None and now - self._gateways[0] < GATEWAY_LIST_SECONDS:
                return self._gateways[1]
        try:
            pods = self.kube.list(
                "v1", "Pod", self.config.gateway_namespace, selector=self.config.gateway_selector
            )
        except Exception as e:  # no gateway is not an error; an API hiccup: none this time
            log.debug("listing gateway pods failed: %s", e)
            pods = []
        running = [p for p in pods if (p.get("status") or {}).get("podIP") and _ready(p)]
        with self._lock:
            self._gateways = (now, running)
        return running

    def _routers(self, ns: str, name: str, spec: LLMDeploymentSpec) -> list[dict[str, Any]]:
        """Every router that routes this deployment: its own (dedicated mode) and the gateway's
        replicas (dedicated and gateway modes; mode none: no router at all)."""
        mode = spec.routing.effective_mode
        if mode == "none":
            return []
        own = (
            [p for p in self._pods(ns, name) if _component(p) == "router"]
            if spec.routing.dedicated_router
            else []
        )
        return own + self._gateway_pods()

    def _due(self, key: tuple[str, str], period: float, now: float) -> bool:
        last = self._last.get(key)
        if last is not None and now - last < period:
            return False
        self._last[key] = now
        return True

    def tick(self, body: Mapping[str, Any], force: bool = False) -> Decision | None:
        """One decision for one LLMDeployment (None: not builtin, invalid, deleted or not due)."""
        meta = body.get("metadata") or {}
        ns, name = str(meta.get("namespace")), str(meta.get("name"))
        if meta.get("deletionTimestamp"):
            return None
        try:
            spec = parse_spec(body.get("spec") or {})
        except SpecError:
            return None  # the reconcile reports it (InvalidSpec)
        a = spec.autoscaling
        if a.effective_mode != "builtin":
            self._last.pop((ns, name), None)
            return None
        now = self.clock()
        period = (
            min(a.sync_period_seconds, LEADING_PERIOD_SECONDS) if a.leading_signal else a.sync_period_seconds
        )
        if not force and not self._due((ns, name), period, now):
            return None
        every = [p for p in self._pods(ns, name) if _component(p) in (ENGINE, STANDBY)]
        # Terminating pods are gone already; pods being evacuated (controller/evacuation.py) are on
        # their way out, their replacements count instead, and their labels are evacuation's.
        every = [p for p in every if not _leaving(p)]
        pods = [p for p in every if _component(p) == ENGINE]
        spares = [p for p in every if _component(p) == STANDBY]
        created = {}
        for p in every:
            t = parse_time((p.get("metadata") or {}).get("creationTimestamp"))
            if t is not None:
                created[str(p["metadata"]["name"])] = t.timestamp()
        reading = self.source.read(ns, name, pods, a.metrics_window_seconds, a.stale_after_seconds)
        floor, window = schedule_floor(a.schedules, datetime.fromtimestamp(now, UTC))
        status = body.get("status") or {}
        current = spec.replicas
        # Start-up as measured on this deployment's pods (status.pools[].startup), unless the spec
        # says startupGraceSeconds: how long a starting replica counts as capacity on the way, and
        # how far ahead the forecast looks.
        startup_s, startup_from = planning_startup(
            status.get("pools") or [],
            float(a.startup_grace_seconds),
            "startup_grace_seconds" in a.model_fields_set,
        )
        forecast = self._forecast_floor(ns, name, a, now, startup_s)
        held = 0
        if current == 0:  # scale from zero: what the routers hold is the only demand there is
            # its own routers through the source (Prometheus or their pages); the gateway's
            # share from the gateway pods' pages, this deployment's series only
            own = [p for p in self._pods(ns, name) if _component(p) == "router"]
            held = self.source.held(ns, name, own) if spec.routing.dedicated_router else 0
            if spec.routing.effective_mode != "none" and (gateways := self._gateway_pods()):
                held += round(self.read_routers(gateways, (ns, name)).held)
        ttft = TTFT()
        if a.ttft_slo is not None and reading.ok:
            try:
                ttft = self.source.ttft(ns, name, a.ttft_slo.quantile, a.metrics_window_seconds)
            except Exception as e:  # a source that raises anyway: unknown, so no scale-down
                log.warning("TTFT for %s/%s unavailable: %s", ns, name, e)
        inputs = Inputs(
            now=now,
            current=current,
            replicas=replicas(pods, reading.pods, now, created),
            source_ok=reading.ok,
            schedule_floor=floor,
            schedule_name=window,
            forecast_floor=forecast or 0,
            held_requests=held,
            standby_ready=sum(1 for p in spares if _ready(p)),
            ttft=ttft.seconds,
            ttft_idle=ttft.idle,
            demand=self._demand(ns, name, spec, status) if a.leading_signal else None,
        )
        d = decide(replace(Config.from_spec(a), startup_grace=startup_s), inputs, history_from_status(status))
        self._note_override(body, status, current)
        if d.desired != current:
            if not self._scale(body, ns, name, d.desired):
                return d  # somebody changed it meanwhile: decide again next time, record nothing
            slo = a.ttft_slo.seconds if a.ttft_slo else None
            reason, msg = event_of(d, a.target_kv_cache_utilization, slo)
            log.info("%s/%s: %s", ns, name, msg)
            self.kube.event(body, reason, msg)
        standby = a.standby_for(d.desired)
        if standby or spares:
            self._standby(body, every, created, now, d.desired, standby)
        self.kube.patch_status(
            API,
            "LLMDeployment",
            ns,
            name,
            {
                "autoscaling": status_of(
                    d,
                    reading,
                    "builtin",
                    _rfc3339(now),
                    status,
                    held_requests=held,
                    forecast=forecast,
                    ttft_slo=a.ttft_slo.seconds if a.ttft_slo else None,
                    burst_headroom=a.burst_headroom,
                    startup=(startup_s, startup_from),
                )
            },
        )
        return d

    def _demand(
        self, ns: str, name: str, spec: LLMDeploymentSpec, status: Mapping[str, Any]
    ) -> Demand | None:
        """What the deployment's routers see, read from each router pod (router_figures.py), with
        the KV capacity of one replica from status (the plan's); None when no router answered,
        routing is off or the capacity is unknown: the decision then uses the engines' metrics."""
        capacities = [
            int(c)
            for p in status.get("pools") or []
            if isinstance(c := p.get("kvCacheTokensPerReplica"), int) and c > 0
        ]
        if not capacities:
            return None
        routers = self._routers(ns, name, spec)
        if not routers:
            return None
        f = self.read_routers(routers, (ns, name))
        if not f.routers:
            return None
        return Demand(
            kv_tokens_per_replica=float(min(capacities)),  # the smallest pool's: the conservative one
            arrivals_short=f.arrivals_short,
            arrivals_long=f.arrivals_long,
            prompt_tokens_short=f.prompt_tokens_short,
            prompt_tokens_long=f.prompt_tokens_long,
            decode_tokens_short=f.decode_tokens_short,
            decode_tokens_long=f.decode_tokens_long,
            in_flight=f.in_flight_requests,
            in_flight_tokens=f.in_flight_tokens,
            held=f.held + f.queued,  # queued: every backend saturated, waiting like held requests
            decode_tokens_per_replica=f.decode_tokens_per_replica,
            batch=f.running_per_replica,
        )

    def _forecast_floor(
        self, ns: str, name: str, a: AutoscalingSpec, now: float, startup_s: float | None = None
    ) -> int | None:
        """The forecast floor, refreshed every few minutes; None when off or without history
        (the pods' /metrics have none; a failed query keeps the last known value a while)."""
        if not a.forecast.enabled or not isinstance(self.source, PrometheusSource):
            return None
        key = (ns, name)
        cached = self._forecast.get(key)
        if cached and now - cached[0] < FORECAST_REFRESH_SECONDS:
            return cached[1]
        f = a.forecast
        try:
            kv, waiting = self.source.history(
                ns,
                name,
                now,
                spec_slice_offset(a, startup_s),
                PERIOD_SECONDS[f.period],
                f.lookback,
                f.window_seconds,
            )
        except Exception as e:
            log.warning("forecast for %s/%s failed: %s", ns, name, e)
            return cached[1] if cached else None
        value = spec_demand_floor(a, kv, waiting)
        self._forecast[key] = (now, value)
        return value

    def _standby(
        self,
        body: Mapping[str, Any],
        pods: Sequence[Mapping[str, Any]],
        created: Mapping[str, float],
        now: float,
        serving: int,
        standby: int,
    ) -> None:
        """Relabel pods so that ``serving`` of them are engines and up to ``standby`` are spares."""
        view = [
            StandbyPod(str(p["metadata"]["name"]), _component(p) == STANDBY, _ready(p),
                       now - created.get(str(p["metadata"]["name"]), now))
            for p in pods
        ]  # fmt: skip
        change = relabel(view, serving, standby)
        ns = str(body["metadata"]["namespace"])
        for names, to in ((change.promote, ENGINE), (change.demote, STANDBY)):
            for pod in names:
                try:
                    self.kube.request(
                        "PATCH",
                        path("v1", "Pod", ns, pod),
                        body={"metadata": {"labels": {LABEL_COMPONENT: to}}},
                        content_type="application/merge-patch+json",
                        query=[("fieldManager", "toposerve-autoscaler")],
                    )
                except ApiException as e:  # the pod went away meanwhile: the next pass sees it gone
                    if e.status != 404:
                        raise
        if change.promote:
            msg = f"warm standby promoted into rotation: {', '.join(change.promote)}"
            self.kube.event(body, "StandbyPromoted", msg)

    def _note_override(self, body: Mapping[str, Any], status: Mapping[str, Any], current: int) -> None:
        """Say so when spec.replicas moved outside the autoscaler (kubectl scale, a GitOps sync)."""
        prev = status.get("autoscaling") or {}
        mine = prev.get("desiredReplicas")
        if prev.get("mode") == "builtin" and isinstance(mine, int) and mine != current:
            msg = (
                f"spec.replicas was set to {current} outside the autoscaler (it had set {mine}); with "
                "autoscaling.mode builtin the autoscaler decides the count: set enabled: false or mode: off "
                "to scale by hand"
            )
            self.kube.event(body, "ReplicasOverridden", msg, warning=True)

    def _scale(self, body: Mapping[str, Any], ns: str, name: str, replicas: int) -> bool:
        """PATCH the scale subresource, conditional on the resourceVersion decided on."""
        patch = {"metadata": {"resourceVersion": (body.get("metadata") or {}).get("resourceVersion")},
                 "spec": {"replicas": replicas}}  # fmt: skip
        try:
            self.kube.request(
                "PATCH",
                path(API, "LLMDeployment", ns, name, "scale"),
                body=patch,
                content_type="application/merge-patch+json",
                query=[("fieldManager", "toposerve-autoscaler")],
            )
        except ApiException as e:
            if e.status == 409:
                log.info("%s/%s changed while deciding; deciding again next time", ns, name)
                return False
            raise
        return True


async def run(autoscaler: Autoscaler, leading: asyncio.Event, namespaces: Sequence[str]) -> None:
    """Leader only: decide while this process leads, idle otherwise."""
    while True:
        await leading.wait()
        try:
            # wait=0: hand the due decisions to the workers and come back next tick; a slow one
            # keeps only its own deployment waiting.
            await asyncio.to_thread(autoscaler.run_once, namespaces, 0.0)
        except Exception as e:  # listing failed: the API server is away; try again
            log.warning("autoscaler pass failed: %s", e)
        await asyncio.sleep(TICK_SECONDS)
