"""The builtin mode's shells on fakes: parsing what sources answer (including garbage), the loop's
writes (scale subresource only, status.autoscaling only, an Event per change) and its refusals."""

from __future__ import annotations

import math
import threading
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kubernetes.client.exceptions import ApiException

from toposerve.api.config import OperatorConfig
from toposerve.autoscale import promql
from toposerve.autoscale.decision import History
from toposerve.autoscale.promql import per_pod
from toposerve.autoscale.report import (
    PodSample,
    Reading,
    history_from_status,
    parse_metrics_text,
    parse_vector,
    prometheus_samples,
)
from toposerve.controller.autoscale_sources import PrometheusSource, ScrapeSource, source_for
from toposerve.controller.autoscaler import Autoscaler

# ---- parsing -----------------------------------------------------------------------------------------


def vec(**pods: Any) -> list[dict[str, Any]]:
    return [{"metric": {"pod": p}, "value": [1700000000.0, v]} for p, v in pods.items()]


def test_parse_vector_keeps_finite_numbers_only() -> None:
    raw = vec(a="0.5", b="NaN", c="+Inf", d="garbage", e=0.25)
    raw += [
        {"metric": {}, "value": [0, "1"]},
        {"value": [0, "1"]},
        "junk",
        {"metric": {"pod": "f"}, "value": [1]},
    ]
    assert parse_vector(raw) == {"a": 0.5, "e": 0.25}
    assert parse_vector(None) == {} and parse_vector({"resultType": "vector"}) == {}


def test_prometheus_samples_drop_stale_pods() -> None:
    s = prometheus_samples({"a": 0.5, "b": 0.9}, {"a": 1.0}, {"b": 2.0}, {"a": 995.0, "b": 900.0}, 1000.0, 60)
    assert s == {"a": PodSample(0.5, 1.0, None)}  # b's newest sample is 100 s old
    assert prometheus_samples({"a": 0.5}, {}, {}, {}, 1000.0, 60) == {}  # never seen: missing


def test_parse_metrics_text_reads_vllm_gauges_and_survives_garbage() -> None:
    text = (
        "# TYPE vllm:kv_cache_usage_perc gauge\n"
        'vllm:kv_cache_usage_perc{model_name="m"} 0.42\n'
        "# TYPE vllm:num_requests_waiting gauge\n"
        'vllm:num_requests_waiting{model_name="m"} 3\n'
        "# TYPE vllm:num_requests_running gauge\n"
        'vllm:num_requests_running{model_name="m"} 7\n'
        'vllm:gpu_cache_usage_perc{model_name="m"} 0.99\n'
    )
    assert parse_metrics_text(text) == PodSample(0.42, 3.0, 7.0)
    assert parse_metrics_text("vllm:kv_cache_usage_perc NaN\n") == PodSample()
    assert parse_metrics_text("<html>502 Bad Gateway</html>") == PodSample()
    assert parse_metrics_text("") == PodSample()


def test_a_pods_engine_series_average_kv_usage_and_add_request_counts() -> None:
    """vLLM 0.33.0 exports one series per engine (labels model_name, engine): a data-parallel pod
    with two engines at 40 % KV usage is at 40 %, not 80 %; its waiting requests are both engines'."""
    text = (
        "# TYPE vllm:kv_cache_usage_perc gauge\n"
        'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.4\n'
        'vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.4\n'
        "# TYPE vllm:num_requests_waiting gauge\n"
        'vllm:num_requests_waiting{engine="0",model_name="m"} 2\n'
        'vllm:num_requests_waiting{engine="1",model_name="m"} 3\n'
        "# TYPE vllm:num_requests_running gauge\n"
        'vllm:num_requests_running{engine="0",model_name="m"} 5\n'
        'vllm:num_requests_running{engine="1",model_name="m"} 1\n'
    )
    assert parse_metrics_text(text) == PodSample(0.4, 5.0, 6.0)
    # Prometheus is asked the same way, per pod: avg for KV usage, sum for request counts.
    assert per_pod(promql.KV, "x", 30).startswith("avg by (pod)")
    assert per_pod(promql.WAITING, "x", 30).startswith("sum by (pod)")
    assert per_pod(promql.RUNNING, "x", 30).startswith("sum by (pod)")


def test_history_round_trips_through_status_and_ignores_junk() -> None:
    status = {"autoscaling": {"recommendations": [{"time": 1.5, "replicas": 3}, {"time": "x", "replicas": 2}, "junk"],
                              "scaleUps": [{"time": 2, "replicas": 1}], "scaleDowns": None}}  # fmt: skip
    assert history_from_status(status) == History(((1.5, 3),), ((2.0, 1),), ())
    assert history_from_status(None) == History()


# ---- sources ------------------------------------------------------------------------------------------


class FakeProm:
    def __init__(self, answers: dict[str, Any] | Exception) -> None:
        self.answers, self.queries = answers, []
        self.timeouts: list[float | None] = []

    def custom_query(self, query: str, timeout: float | None = None) -> Any:
        self.queries.append(query)
        self.timeouts.append(timeout)
        if isinstance(self.answers, Exception):
            raise self.answers
        for key, value in self.answers.items():
            if key in query:
                return value
        return []


SEL = 'namespace="{namespace}",toposerve_io_deployment="{name}"'


def test_prometheus_source_queries_per_pod_windowed_means_and_freshness() -> None:
    import time

    now = time.time()
    prom = FakeProm({"timestamp(": vec(p1=now - 2, p2=now - 500), "kv_cache": vec(p1="0.8", p2="0.9"),
                     "waiting": vec(p1="2"), "running": vec(p1="5")})  # fmt: skip
    r = PrometheusSource("http://prom:9090", SEL, client=prom).read("ns", "llm", [], 30, 60)
    assert r.ok and r.source == "prometheus http://prom:9090"
    assert r.pods == {"p1": PodSample(0.8, 2.0, 5.0)}
    assert (
        'avg by (pod) (avg_over_time(vllm:kv_cache_usage_perc{namespace="ns",toposerve_io_deployment="llm"}[30s]))'
        in prom.queries
    )


@pytest.mark.parametrize("error", [ConnectionError("refused"), TimeoutError("slow"), ValueError("not JSON")])
def test_prometheus_down_slow_or_garbage_is_unavailable_not_an_exception(error: Exception) -> None:
    r = PrometheusSource("http://prom:9090", SEL, client=FakeProm(error)).read("ns", "llm", [], 30, 60)
    assert not r.ok and r.pods == {} and type(error).__name__ in r.error


def test_one_deadline_covers_all_queries_of_a_read() -> None:
    """Each query gets what is left of the read's deadline; once it has passed, no more queries are
    sent and the read is unavailable (hold), naming the deadline."""
    t = [0.0]

    class SlowProm(FakeProm):
        def custom_query(self, query: str, timeout: float | None = None) -> Any:
            t[0] += 2.0  # every answer takes 2 s
            return super().custom_query(query, timeout)

    prom = SlowProm({"kv_cache": vec(p1="0.5")})
    r = PrometheusSource("http://p", SEL, timeout=5.0, client=prom, clock=lambda: t[0]).read(
        "ns", "llm", [], 30, 60
    )
    assert prom.timeouts == [5.0, 3.0, 1.0]  # the fourth query is never sent
    assert not r.ok and "TimeoutError" in r.error and "5 s deadline" in r.error
    fast = FakeProm({"kv_cache": vec(p1="0.5")})
    assert (
        PrometheusSource("http://p", SEL, timeout=5.0, client=fast, clock=lambda: 0.0)
        .read("ns", "llm", [], 30, 60)
        .ok
    )
    assert fast.timeouts == [5.0] * 4


def test_the_real_client_does_not_retry_a_failing_prometheus() -> None:
    """prometheus-api-client retries 503s 3 times with backoff by default; a read must cost one
    request, so that one slow or failing Prometheus cannot stretch the autoscaler's pass."""
    hits: list[str] = []

    class Unavailable(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append(self.path)
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Unavailable)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        r = PrometheusSource(url, SEL, timeout=10.0).read("ns", "llm", [], 30, 60)
    finally:
        server.shutdown()
        server.server_close()
    assert not r.ok
    assert len(hits) == 1 and hits[0].startswith("/api/v1/query"), hits


def test_the_pinned_client_has_the_timeout_the_source_passes() -> None:
    """prometheus-api-client added ``timeout=`` (PrometheusConnect and custom_query) in 0.5.7; on an
    older one every read raised TypeError, was caught, and the deployment sat in "metrics
    unavailable" forever. The lower bound in pyproject.toml must keep it."""
    import inspect
    import tomllib
    from pathlib import Path

    from packaging.requirements import Requirement
    from prometheus_api_client import PrometheusConnect

    deps = tomllib.loads((Path(__file__).parents[3] / "pyproject.toml").read_text())["project"][
        "dependencies"
    ]
    (req,) = [Requirement(d) for d in deps if d.startswith("prometheus-api-client")]
    assert not req.specifier.contains("0.5.6") and req.specifier.contains("0.5.7")
    assert "timeout" in inspect.signature(PrometheusConnect.custom_query).parameters


def test_scrape_source_marks_unreachable_pods_missing() -> None:
    pods = [
        {"metadata": {"name": "a"}, "status": {"podIP": "127.0.0.1"}},
        {"metadata": {"name": "b"}, "status": {}},
    ]
    r = ScrapeSource(timeout=0.5, port=1).read("ns", "llm", pods, 30, 60)  # port 1: refused
    assert r.ok and r.pods == {"a": PodSample()}
    assert source_for(None, SEL).name == "scrape" and source_for("http://p", SEL).name == "prometheus"


# ---- the loop -----------------------------------------------------------------------------------------


class FakeKube:
    def __init__(self, body: dict[str, Any], pods: list[dict[str, Any]], conflict: bool = False) -> None:
        self.body, self.pods, self.conflict = body, pods, conflict
        self.scales: list[tuple[str, Any]] = []
        self.statuses: list[dict[str, Any]] = []
        self.events: list[tuple[str, str, bool]] = []
        self.relabels: list[tuple[str, str]] = []

    def list(
        self, api_version: str, kind: str, ns: str | None, selector: str | None = None
    ) -> list[dict[str, Any]]:
        if kind == "LLMDeployment":
            return [self.body]
        if selector == OperatorConfig().gateway_selector:  # the chart's gateway pods (none here)
            assert ns is None
            return list(getattr(self, "gateways", []))
        # every pod of the deployment, as ctx.owned (the watch cache) or a label-selected list gives
        assert selector == "toposerve.io/deployment=llm"
        router = {"metadata": {"name": "router-0", "labels": {"app.kubernetes.io/component": "router"}},
                  "status": {"podIP": "10.244.0.3"}}  # fmt: skip
        return [*self.pods, router]

    def request(
        self, method: str, url: str, body: Any = None, content_type: str = "", query: Any = None
    ) -> Any:
        assert method == "PATCH" and content_type == "application/merge-patch+json"
        if "/pods/" in url:  # warm standby: a label, nothing else
            name = url.rsplit("/", 1)[1]
            assert set(body) == {"metadata"} and set(body["metadata"]) == {"labels"}
            self.relabels.append((name, body["metadata"]["labels"]["app.kubernetes.io/component"]))
            for p in self.pods:
                if p["metadata"]["name"] == name:
                    p["metadata"].setdefault("labels", {}).update(body["metadata"]["labels"])
            return {}
        assert url.endswith("/llmdeployments/llm/scale")
        if self.conflict:
            raise ApiException(status=409, reason="Conflict")
        self.scales.append((url, body))
        self.body["spec"]["replicas"] = body["spec"]["replicas"]
        return {}

    def patch_status(self, api_version: str, kind: str, ns: str, name: str, status: dict[str, Any]) -> None:
        assert set(status) == {"autoscaling"}  # nothing else of status, never spec
        self.statuses.append(status)
        self.body["status"] = {**self.body.get("status", {}), **status}

    def event(self, involved: Any, reason: str, message: str, warning: bool = False) -> None:
        self.events.append((reason, message, warning))


class FakeSource:
    name = "fake"

    def __init__(self, kv: float | None, ok: bool = True, held: int = 0) -> None:
        self.kv, self.ok, self.held_n = kv, ok, held
        self.held_asked: list[Any] = []

    def held(self, namespace: str, name: str, routers: Any) -> int:
        self.held_asked.append(routers)
        return self.held_n

    def read(self, namespace: str, name: str, pods: Any, window_s: int, stale_after_s: int) -> Reading:
        samples = {p["metadata"]["name"]: PodSample(self.kv, 0.0, 1.0) for p in pods}
        return Reading("fake", self.ok, samples if self.ok else {}, "" if self.ok else "down")


T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC).timestamp()


def pod(name: str, ready: bool = True, component: str = "engine") -> dict[str, Any]:
    return {"metadata": {"name": name, "creationTimestamp": "2026-12-01T10:00:00Z",
                         "labels": {"app.kubernetes.io/component": component}},
            "status": {"podIP": "10.244.0.9", "conditions": [{"type": "Ready", "status": str(ready)}]}}  # fmt: skip


def llmd(replicas: int, **auto: Any) -> dict[str, Any]:
    a = {"enabled": True, "minReplicas": 1, "maxReplicas": 6, "syncPeriodSeconds": 10,
         "scaleUp": {"stabilizationWindowSeconds": 0}, "scaleDown": {"stabilizationWindowSeconds": 30}, **auto}  # fmt: skip
    return {"apiVersion": "toposerve.io/v1alpha1", "kind": "LLMDeployment",
            "metadata": {"name": "llm", "namespace": "ns", "uid": "u", "resourceVersion": "42"},
            "spec": {"model": {"name": "Qwen/Qwen2.5-0.5B-Instruct"}, "replicas": replicas, "autoscaling": a}}  # fmt: skip


class Clock:
    def __init__(self) -> None:
        self.t = T0

    def __call__(self) -> float:
        return self.t


def scaler(kube: FakeKube, source: FakeSource, clock: Clock) -> Autoscaler:
    return Autoscaler(kube, OperatorConfig(), source=source, clock=clock)  # type: ignore[arg-type]


def test_a_slow_read_holds_only_its_own_deployment() -> None:
    """Deployments are decided concurrently and each at most once at a time: while one waits on a
    slow source, another is decided, and later passes do not queue the slow one again."""
    bodies = {n: llmd(2) for n in ("slow", "fast")}
    for n, b in bodies.items():
        b["metadata"]["name"] = n
    release, scaled = threading.Event(), threading.Event()
    reads: list[str] = []

    class Source(FakeSource):
        def read(self, namespace: str, name: str, pods: Any, window_s: int, stale_after_s: int) -> Reading:
            reads.append(name)
            if name == "slow":
                assert release.wait(60)
            return super().read(namespace, name, pods, window_s, stale_after_s)

    class Kube(FakeKube):
        def request(
            self, method: str, url: str, body: Any = None, content_type: str = "", query: Any = None
        ) -> Any:
            name = url.split("/llmdeployments/")[1].split("/")[0]
            self.scales.append((name, body))
            if name == "fast":
                scaled.set()
            return {}

    kube = Kube(llmd(2), [])
    a = Autoscaler(kube, OperatorConfig(), source=Source(0.95), clock=Clock(),  # type: ignore[arg-type]
                   bodies=lambda: list(bodies.values()), pods_of=lambda ns, n: [pod(f"{n}-a"), pod(f"{n}-b")])  # fmt: skip
    try:
        a.run_once([], wait=0.0)  # handed to the workers; returns what is done by then
        assert scaled.wait(60), "the fast deployment waited for the slow one"
        a.run_once([], wait=0.0)  # the slow one is still being decided: not queued again
        assert reads.count("slow") == 1
    finally:
        release.set()
    a._workers.shutdown(wait=True)
    assert sorted(name for name, _ in kube.scales) == ["fast", "slow"]


def test_scale_up_goes_through_the_scale_subresource_with_an_event_and_status() -> None:
    kube, clock = FakeKube(llmd(2), [pod("a"), pod("b")]), Clock()
    a = scaler(kube, FakeSource(0.95), clock)
    # a fresh loop waits its (zero-length) up window; the first pass scales at once
    (d,) = a.run_once([])
    assert (d.current, d.desired) == (2, 3)
    assert kube.scales == [
        (kube.scales[0][0], {"metadata": {"resourceVersion": "42"}, "spec": {"replicas": 3}})
    ]
    ((reason, msg, warning),) = kube.events
    assert reason == "ScaledUp" and "spec.replicas 2 -> 3" in msg and "kv-cache 0.95" in msg and not warning
    st = kube.statuses[-1]["autoscaling"]
    assert (st["mode"], st["source"], st["desiredReplicas"], st["reason"]) == (
        "builtin",
        "fake",
        3,
        "ScaleUp",
    )
    assert st["inputs"]["kvCacheUtilization"] == 0.95 and st["inputs"]["readyReplicas"] == 2
    assert st["lastScaleTime"] == "2026-12-01T12:00:00Z" and st["floorSource"] == "minReplicas"


def test_sync_period_is_respected() -> None:
    kube, clock = FakeKube(llmd(2), [pod("a"), pod("b")]), Clock()
    a = scaler(kube, FakeSource(0.7), clock)
    assert len(a.run_once([])) == 1
    clock.t += 5
    assert a.run_once([]) == []
    clock.t += 5
    assert len(a.run_once([])) == 1


def test_scale_down_waits_for_the_window_then_steps() -> None:
    kube, clock = FakeKube(llmd(3), [pod("a"), pod("b"), pod("c")]), Clock()
    a = scaler(kube, FakeSource(0.05), clock)
    seen = []
    for _ in range(8):
        (d,) = a.run_once([])
        seen.append(d.desired)
        clock.t += 10
    assert seen[:3] == [3, 3, 3]  # the 30 s down window (a fresh loop seeds it with the current count)
    assert seen[3] == 1  # then straight to min (Kubernetes' default down policy: 100% per 15 s)
    assert [e[0] for e in kube.events] == ["ScaledDown"]


def test_missing_metrics_hold_and_say_so() -> None:
    kube, clock = FakeKube(llmd(3), [pod("a"), pod("b"), pod("c")]), Clock()
    a = scaler(kube, FakeSource(None, ok=False), clock)
    for _ in range(6):
        (d,) = a.run_once([])
        clock.t += 10
    assert d.desired == 3 and kube.scales == [] and kube.events == []
    st = kube.statuses[-1]["autoscaling"]
    assert st["reason"] == "MetricsUnavailable" and st["metricsAvailable"] is False
    assert st["source"] == "fake (unavailable: down)"


def test_a_conflict_is_not_overwritten_blind() -> None:
    kube, clock = FakeKube(llmd(2), [pod("a"), pod("b")], conflict=True), Clock()
    (d,) = scaler(kube, FakeSource(0.95), clock).run_once([])
    assert d.desired == 3 and kube.scales == [] and kube.events == [] and kube.statuses == []


def test_kubectl_scale_is_overridden_and_an_event_says_why() -> None:
    kube, clock = FakeKube(llmd(2), [pod("a"), pod("b")]), Clock()
    a = scaler(kube, FakeSource(0.7), clock)
    a.run_once([])
    kube.body["spec"]["replicas"] = 6  # kubectl scale --replicas=6
    kube.body["metadata"]["resourceVersion"] = "43"
    clock.t += 10
    a.run_once([])
    reasons = [e[0] for e in kube.events]
    assert reasons[0] == "ReplicasOverridden" and kube.events[0][2] is True
    assert "set to 6 outside the autoscaler (it had set 2)" in kube.events[0][1]


@pytest.mark.parametrize("auto", [{"enabled": False}, {"mode": "hpa"}, {"mode": "keda"}, {"mode": "off"}])
def test_only_builtin_mode_is_acted_on(auto: dict[str, Any]) -> None:
    kube = FakeKube(llmd(2, **auto), [pod("a")])
    assert scaler(kube, FakeSource(1.0), Clock()).run_once([]) == []
    assert kube.scales == kube.statuses == kube.events == []  # type: ignore[comparison-overlap]


def test_invalid_spec_is_left_to_the_reconcile() -> None:
    body = llmd(2)
    body["spec"]["autoscaling"]["minReplicas"] = 9
    kube = FakeKube(body, [pod("a")])
    assert scaler(kube, FakeSource(1.0), Clock()).run_once([]) == []


def test_starting_pods_count_as_capacity_on_the_way() -> None:
    kube, clock = (
        FakeKube(llmd(4), [pod("a"), pod("b"), pod("c", ready=False), pod("d", ready=False)]),
        Clock(),
    )
    clock.t = datetime(2026, 12, 1, 10, 1, tzinfo=UTC).timestamp()  # the pods are 60 s old
    (d,) = scaler(kube, FakeSource(0.9), clock).run_once([])
    assert (d.desired, d.starting) == (4, 2)
    assert not math.isnan(kube.statuses[-1]["autoscaling"]["inputs"]["kvCacheUtilization"])


def test_schedule_floor_raises_and_is_named() -> None:
    win = {"name": "noon", "start": "11:00", "end": "13:00", "minReplicas": 4}
    kube, clock = FakeKube(llmd(2, schedules=[win]), [pod("a"), pod("b")]), Clock()
    (d,) = scaler(kube, FakeSource(0.7), clock).run_once([])
    assert (d.desired, d.reason, d.floor_source) == (4, "BelowFloor", "schedule/noon")


# ---- forecast ------------------------------------------------------------------------------------------


def test_demand_floor_takes_the_median_comparable_slice() -> None:
    from toposerve.autoscale.forecast import demand_floor, slice_offset, slice_times

    assert demand_floor([0.6, 2.1, 1.4], [0.0, 3.0, 0.0], 0.7, 4.0, 10) == 2  # ceil(1.4 / 0.7) = 2
    assert demand_floor([0.6, 1.4], [], 0.7, 4.0, 10) == 2  # even count: mean of the middle two, 1.0
    assert demand_floor([0.5], [20.0], 0.7, 4.0, 10) == 5  # the queue says more
    assert demand_floor([9.0], [], 0.5, 4.0, 6) == 6  # never above max
    assert demand_floor([], [], 0.7, 4.0, 10) == 0
    assert demand_floor([math.nan, -1.0, math.inf], [], 0.7, 4.0, 10) == 0
    assert demand_floor([math.nan, 1.4, -1.0], [], 0.7, 4.0, 10) == 2  # bad samples are left out
    assert slice_times(1000.0, 60.0, 100.0, 3) == (760.0, 960.0)
    assert slice_offset(300.0, 900.0) == 750.0  # the window [300 - 450, 300 + 450] is centred at the lead


def test_the_forecast_lead_is_one_start_up_unless_set() -> None:
    from toposerve.api.spec import AutoscalingSpec
    from toposerve.autoscale.forecast import spec_slice_offset

    a = AutoscalingSpec.model_validate({"startupGraceSeconds": 420, "forecast": {"windowSeconds": 600}})
    assert spec_slice_offset(a) == 420 + 300
    assert spec_slice_offset(a, 90.0) == 90 + 300  # the measured start-up the loop plans with
    a = AutoscalingSpec.model_validate(
        {"startupGraceSeconds": 420, "forecast": {"windowSeconds": 600, "leadSeconds": 60}}
    )
    assert spec_slice_offset(a) == 60 + 300 == spec_slice_offset(a, 90.0)  # leadSeconds wins


def test_a_one_day_spike_does_not_become_tomorrows_floor() -> None:
    """Yesterday's spike, backlog and all, at the same minute: the median day is a normal one."""
    from toposerve.autoscale.forecast import demand_floor

    normal_kv, normal_wait = 2.0, 0.5
    kv = [normal_kv, normal_kv, normal_kv, normal_kv, normal_kv, normal_kv, 8.0]  # spike on the last day
    waiting = [normal_wait] * 6 + [300.0]
    assert demand_floor(kv, waiting, 0.7, 4.0, 12) == math.ceil(normal_kv / 0.7)
    # a rise that recurs on most days does raise the floor
    assert demand_floor([2.0, 5.6, 5.6, 5.6], [], 0.7, 4.0, 12) == 8


def test_the_forecast_quantile_chooses_between_median_and_busiest() -> None:
    from toposerve.autoscale.forecast import demand_floor, quantile

    assert quantile([3.0, 1.0, 2.0], 0.0) == 1.0 and quantile([3.0, 1.0, 2.0], 1.0) == 3.0
    assert quantile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5  # the mean of the middle two
    assert quantile([0.0, 10.0], 0.25) == 2.5  # linear between order statistics
    assert quantile([7.0], 0.9) == 7.0
    for bad in (-0.1, 1.1):
        with pytest.raises(ValueError, match="quantile must be in"):
            quantile([1.0], bad)
    with pytest.raises(ValueError, match="no samples"):
        quantile([], 0.5)
    days = [0.6, 2.1, 1.4]
    assert demand_floor(days, [], 0.7, 4.0, 10, q=1.0) == 3  # the busiest: ceil(2.1 / 0.7)
    assert demand_floor(days, [], 0.7, 4.0, 10, q=0.5) == 2
    assert demand_floor(days, [], 0.7, 4.0, 10, q=0.0) == 1


def test_the_forecast_quantile_is_validated_by_the_api() -> None:
    from pydantic import ValidationError

    from toposerve.api.spec import AutoscalingSpec

    assert AutoscalingSpec.model_validate({"forecast": {}}).forecast.quantile == 0.5
    with pytest.raises(ValidationError, match="less than or equal to 1"):
        AutoscalingSpec.model_validate({"forecast": {"quantile": 1.5}})


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(min_value=0, max_value=50), min_size=1, max_size=14),
    st.floats(min_value=0, max_value=1),
    st.floats(min_value=0, max_value=1),
)
def test_a_higher_forecast_quantile_never_lowers_the_floor(days: list[float], q1: float, q2: float) -> None:
    from toposerve.autoscale.forecast import demand_floor

    lo, hi = sorted((q1, q2))
    assert demand_floor(days, [], 0.7, 4.0, 1000, q=lo) <= demand_floor(days, [], 0.7, 4.0, 1000, q=hi)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.floats(min_value=0, max_value=50), min_size=2, max_size=14),
    st.floats(min_value=0, max_value=1e6),
    st.integers(min_value=0, max_value=13),
)
def test_one_outlier_day_moves_the_floor_no_further_than_its_neighbours(
    days: list[float], outlier: float, where: int
) -> None:
    """However large (or small) one slice is, the floor stays within what the two order statistics
    of the other slices around the median need: one day cannot drag it to maxReplicas."""
    from toposerve.autoscale.forecast import demand_floor

    n, at = len(days), where % len(days)
    b = sorted(days)
    f = demand_floor([*days[:at], outlier, *days[at:]], [], 0.7, 4.0, 10_000)
    need = lambda x: math.ceil(round(x / 0.7, 9))  # noqa: E731
    assert need(b[n // 2 - 1]) <= f <= need(b[n // 2 + n % 2])


def test_prometheus_history_is_one_range_query_per_metric_stepping_a_period() -> None:
    class RangeProm(FakeProm):
        def custom_query_range(self, query: str, start_time: Any, end_time: Any, step: str) -> Any:
            self.queries.append((query, start_time.timestamp(), end_time.timestamp(), step))
            v = "1.4" if "kv_cache" in query else "NaN"
            return [{"metric": {}, "values": [[start_time.timestamp(), v], [end_time.timestamp(), "0.7"]]}]

    prom = RangeProm({})
    kv, waiting = PrometheusSource("http://p", SEL, client=prom).history(
        "ns", "llm", 1e6, 600, 86400, 7, 900
    )  # offset 600
    assert kv == [1.4, 0.7] and waiting == [0.7]
    (q, start, end, step), _ = prom.queries
    assert step == "86400s" and start == 1e6 + 600 - 7 * 86400 and end == 1e6 + 600 - 86400
    assert "[900s]" in q and q.startswith("sum(avg by (pod) (avg_over_time(vllm:kv_cache_usage_perc")


def test_the_loop_raises_the_floor_to_the_forecast_and_reports_it() -> None:
    class HistorySource(PrometheusSource):
        def __init__(self) -> None:
            super().__init__("http://p", SEL, client=object())
            self.calls = 0

        def read(self, namespace: str, name: str, pods: Any, window_s: int, stale_after_s: int) -> Reading:
            return Reading(
                "prometheus http://p", True, {p["metadata"]["name"]: PodSample(0.7, 0, 1) for p in pods}
            )

        def history(self, *a: Any) -> tuple[list[float], list[float]]:
            self.calls += 1
            self.args = a
            return [2.0, 2.7], []

    body = llmd(2, forecast={"enabled": True, "lookback": 3})
    kube, clock, src = FakeKube(body, [pod("a"), pod("b")]), Clock(), HistorySource()
    a = Autoscaler(kube, OperatorConfig(), source=src, clock=clock)  # type: ignore[arg-type]
    (d,) = a.run_once([])
    assert (d.desired, d.reason, d.floor_source) == (4, "BelowFloor", "forecast")  # ceil(2.35 / 0.7)
    # each slice centred one start-up time (startupGraceSeconds 600) ahead: evaluated at +600 + 900/2
    assert src.args[3:] == (1050.0, 86400.0, 3, 900)
    assert kube.statuses[-1]["autoscaling"]["forecast"] == 4
    clock.t += 10
    a.run_once([])
    assert src.calls == 1  # cached between refreshes
    # forecast.quantile reaches the floor: the least of the days, ceil(2.0 / 0.7) = 3
    low = llmd(2, forecast={"enabled": True, "lookback": 3, "quantile": 0})
    kube = FakeKube(low, [pod("a"), pod("b")])
    a = Autoscaler(kube, OperatorConfig(), source=HistorySource(), clock=Clock())  # type: ignore[arg-type]
    (d,) = a.run_once([])
    assert (d.desired, d.floor_source) == (3, "forecast")


# ---- scale from zero ------------------------------------------------------------------------------------


def test_vector_sum_and_gauge_parsing() -> None:
    from toposerve.autoscale.report import parse_metrics_gauge, vector_sum

    assert vector_sum([{"metric": {}, "value": [0, "2"]}, {"metric": {"pod": "r"}, "value": [0, "1"]}]) == 3.0
    assert vector_sum([{"metric": {}, "value": [0, "NaN"]}]) is None and vector_sum("junk") is None
    text = "# TYPE toposerve_router_held_requests gauge\ntoposerve_router_held_requests 4.0\n"
    assert parse_metrics_gauge(text, "toposerve_router_held_requests") == 4.0
    assert parse_metrics_gauge("garbage{", "toposerve_router_held_requests") is None
    assert parse_metrics_gauge("", "toposerve_router_held_requests") is None


def test_prometheus_held_sums_the_routers_and_a_broken_answer_is_zero() -> None:
    prom = FakeProm({"held": [{"metric": {}, "value": [0, "3"]}]})
    src = PrometheusSource("http://p", SEL, client=prom, router_selector='namespace="{namespace}",x="{name}"')
    assert src.held("ns", "llm", []) == 3
    assert prom.queries == ['sum(toposerve_router_held_requests{namespace="ns",x="llm"}) or vector(0)']
    assert PrometheusSource("http://p", SEL, client=FakeProm(ConnectionError("x"))).held("ns", "llm", []) == 0


def test_held_requests_wake_a_deployment_at_zero() -> None:
    kube, clock, src = FakeKube(llmd(0, minReplicas=0), []), Clock(), FakeSource(None, held=2)
    (d,) = scaler(kube, src, clock).run_once([])
    assert (d.current, d.desired, d.reason) == (0, 1, "ScaleFromZero")
    assert src.held_asked and src.held_asked[0][0]["metadata"]["name"] == "router-0"
    assert kube.scales[0][1]["spec"]["replicas"] == 1
    assert kube.statuses[-1]["autoscaling"]["inputs"]["heldRequests"] == 2
    # at one replica and more the routers are not asked (held requests only matter at zero)
    kube2, src2 = FakeKube(llmd(1), [pod("a")]), FakeSource(0.7, held=5)
    scaler(kube2, src2, Clock()).run_once([])
    assert src2.held_asked == []


def _gateway_pod(name: str, ready: bool = True) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": {"app.kubernetes.io/component": "gateway"}},
            "status": {"podIP": "10.244.9.9", "conditions": [{"type": "Ready", "status": str(ready)}]}}  # fmt: skip


def test_the_gateway_wakes_a_deployment_it_routes_at_zero_and_mode_none_is_not_woken() -> None:
    """Gateway mode has no router of its own: what the gateway replicas hold for this deployment
    (their pages' series of this deployment, router_figures.parse_router_page) scales it from zero."""
    from toposerve.autoscale.router_figures import RouterFigures

    for mode, own_held, want in (("gateway", 0, (1, 5)), ("dedicated", 2, (1, 7)), ("none", 0, (0, 0))):
        body = llmd(0, minReplicas=0)
        body["spec"]["routing"] = {"mode": mode}
        kube = FakeKube(body, [])
        kube.gateways = [_gateway_pod("gw-0"), _gateway_pod("gw-1"), _gateway_pod("gw-2", ready=False)]  # type: ignore[attr-defined]
        src = FakeSource(None, held=own_held)
        a = scaler(kube, src, Clock())
        asked: list[tuple[list[str], tuple[str, str]]] = []
        a.read_routers = lambda routers, only, asked=asked: (
            asked.append(([r["metadata"]["name"] for r in routers], only)) or RouterFigures(routers=2, held=5)
        )  # type: ignore[func-returns-value, misc]
        (d,) = a.run_once([])
        assert (d.desired, kube.statuses[-1]["autoscaling"]["inputs"]["heldRequests"]) == want, mode
        if mode == "none":
            assert asked == [] and src.held_asked == []
        else:
            assert asked == [(["gw-0", "gw-1"], ("ns", "llm"))]  # ready gateway pods, this deployment
            assert bool(src.held_asked) == (mode == "dedicated")  # its own routers only in dedicated mode


def test_the_leading_signal_reads_the_gateway_and_own_routers() -> None:
    from toposerve.autoscale.router_figures import RouterFigures

    for mode, want in (("gateway", ["gw-0"]), ("dedicated", ["router-0", "gw-0"]), ("none", None)):
        body = llmd(2, leadingSignal=True)
        body["spec"]["routing"] = {"mode": mode}
        body["status"] = {"pools": [{"name": "default", "kvCacheTokensPerReplica": 20000}]}
        kube = FakeKube(body, [pod("a"), pod("b")])
        kube.gateways = [_gateway_pod("gw-0")]  # type: ignore[attr-defined]
        a = scaler(kube, FakeSource(0.5), Clock())
        asked: list[list[str]] = []
        a.read_routers = lambda routers, only, asked=asked: (
            asked.append([r["metadata"]["name"] for r in routers]) or RouterFigures()
        )  # type: ignore[func-returns-value, misc]
        a.run_once([])
        assert asked == ([] if want is None else [want]), mode


# ---- warm standby ---------------------------------------------------------------------------------------


class StandbySource(FakeSource):
    def read(self, namespace: str, name: str, pods: Any, window_s: int, stale_after_s: int) -> Reading:
        assert all(p["metadata"]["labels"]["app.kubernetes.io/component"] == "engine" for p in pods)
        return super().read(namespace, name, pods, window_s, stale_after_s)


def test_standby_is_kept_out_of_rotation_and_promoted_first_on_a_scale_up() -> None:
    pods = [pod("a"), pod("b"), pod("c")]  # the workload runs replicas 2 + warmStandby 1
    kube, clock = FakeKube(llmd(2, warmStandby=1), pods), Clock()
    a = scaler(kube, StandbySource(0.7), clock)
    a.run_once([])
    assert len(kube.relabels) == 1 and kube.relabels[0][1] == "standby"  # one surplus engine demoted
    spare = kube.relabels[0][0]
    assert kube.scales == []
    # load arrives: the standby (ready, loaded) goes back into rotation with the scale-up
    kube.relabels.clear()
    a.source = StandbySource(1.0)
    clock.t += 10
    (d,) = a.run_once([])
    assert (d.current, d.desired, d.promote) == (2, 3, 1)
    assert kube.relabels == [(spare, "engine")]
    assert [e[0] for e in kube.events] == ["ScaledUp", "StandbyPromoted"]
    assert "1 warm standby promoted" in kube.events[0][1]
    # the workload's new pod becomes the next standby
    kube.pods.append(pod("d", ready=False))
    kube.relabels.clear()
    a.source = StandbySource(0.7)
    clock.t += 10
    a.run_once([])
    assert kube.relabels == [("d", "standby")]


def test_no_standby_means_no_relabelling() -> None:
    kube = FakeKube(llmd(2), [pod("a"), pod("b"), pod("c")])
    scaler(kube, FakeSource(0.7), Clock()).run_once([])
    assert kube.relabels == []


def test_the_planner_runs_standby_pods_only_in_builtin_mode() -> None:
    from toposerve.api.manifest import parse_spec
    from toposerve.planner.plan import plan_deployment

    def pods_for(**auto: Any) -> int:
        raw = llmd(2, **auto)["spec"]
        raw["engine"] = "mock"
        raw["placement"] = {"gpuTypes": ["L4"]}
        return sum(p.replicas for p in plan_deployment("llm", parse_spec(raw), OperatorConfig()).pools)

    assert pods_for(warmStandby=2) == 4
    assert pods_for() == 2
    assert pods_for(warmStandby=2, mode="off") == 2
    assert pods_for(warmStandbyPercent=50) == 3  # 2 serving: floor(50 % x 2) = 1 standby
    assert pods_for(warmStandbyPercent=50, mode="off") == 2


def test_a_load_sized_standby_follows_the_decision() -> None:
    """The loop keeps standby_for(desired) pods out of rotation: 50 % of 2 replicas is one (the third
    pod is demoted), 49 % of 2 is none (the third pod stays an engine until the workload drops it)."""
    kube, clock = FakeKube(llmd(2, warmStandbyPercent=50), [pod("a"), pod("b"), pod("c")]), Clock()
    (d,) = scaler(kube, StandbySource(0.7), clock).run_once([])
    assert d.desired == 2 and [r[1] for r in kube.relabels] == ["standby"]
    kube = FakeKube(llmd(2, warmStandbyPercent=49), [pod("a"), pod("b"), pod("c")])
    (d,) = scaler(kube, FakeSource(0.7), Clock()).run_once([])
    assert d.desired == 2 and kube.relabels == []


def test_a_pod_gone_before_its_relabel_does_not_stop_the_pass() -> None:
    class GoneKube(FakeKube):
        def request(
            self, method: str, url: str, body: Any = None, content_type: str = "", query: Any = None
        ) -> Any:
            if "/pods/" in url:
                raise ApiException(status=404, reason="Not Found")
            return super().request(method, url, body, content_type, query)

    kube = GoneKube(llmd(2, warmStandby=1), [pod("a"), pod("b"), pod("c")])
    (d,) = scaler(kube, StandbySource(0.7), Clock()).run_once([])
    assert d.desired == 2 and kube.statuses  # decided and recorded all the same


def test_pods_being_evacuated_are_neither_counted_nor_relabelled() -> None:
    from toposerve.controller.observe import ANNOTATION_EVACUATION

    leaving = pod("old")
    leaving["metadata"]["annotations"] = {ANNOTATION_EVACUATION: "GPUUnhealthy"}
    kube = FakeKube(llmd(2, warmStandby=1), [pod("a"), pod("b"), leaving, pod("new", ready=False)])
    (d,) = scaler(kube, StandbySource(0.7), Clock()).run_once([])
    assert d.ready == 2 and d.starting == 0  # "old" is out of the count; "new" became the standby
    assert kube.relabels == [("new", "standby")]


def test_the_loop_plans_with_the_measured_start_up_unless_the_spec_sets_one() -> None:
    """A replica not Ready after 2 minutes is capacity on the way under the default 600 s grace,
    and stuck where this deployment's replicas measured a 40 s p90 start-up (x1.5 = 60 s)."""
    young = pod("c", ready=False)
    young["metadata"]["creationTimestamp"] = "2026-12-01T11:58:00Z"  # 120 s before T0
    measured = {
        "pools": [{"name": "default", "startup": {"samples": 4, "p50Seconds": 30.0, "p90Seconds": 40.0}}]
    }

    def decide_once(**auto: Any) -> tuple[Any, dict[str, Any]]:
        body = llmd(3, **auto)
        body["status"] = measured
        kube = FakeKube(body, [pod("a"), pod("b"), young])
        (d,) = scaler(kube, FakeSource(0.5), Clock()).run_once([])
        return d, kube.statuses[-1]["autoscaling"]

    d, st = decide_once()
    assert (d.starting, d.stuck) == (0, 1)
    assert st["startupSeconds"] == 60.0 and "measured: pool default p90 40 s over 4" in st["startupSource"]
    d, st = decide_once(startupGraceSeconds=600)
    assert (d.starting, d.stuck) == (1, 0)
    assert (st["startupSeconds"], st["startupSource"]) == (600.0, "startupGraceSeconds")


def test_the_loop_reads_its_routers_only_with_leading_signal_and_says_which_signal_decided() -> None:
    """A burst the routers see and the engines do not yet (KV 0.5, below target): the routers'
    demand scales up, status says so; without leadingSignal the routers are not read at all."""
    from toposerve.autoscale.router_figures import RouterFigures

    burst = RouterFigures(
        routers=2, arrivals_short=8.0, arrivals_long=2.0, prompt_tokens_short=8000.0, prompt_tokens_long=2000.0,
        decode_tokens_short=4000.0, decode_tokens_long=1000.0, in_flight_requests=20.0, in_flight_tokens=30000.0,
        decode_tokens_per_replica=400.0, running_per_replica=10.0, ready_replicas=2.0,
    )  # fmt: skip
    asked: list[list[str]] = []

    def run(**auto: Any) -> tuple[Any, dict[str, Any], Autoscaler]:
        body = llmd(2, **auto)
        body["status"] = {"pools": [{"name": "default", "kvCacheTokensPerReplica": 20000}]}
        kube = FakeKube(body, [pod("a"), pod("b")])
        a = scaler(kube, FakeSource(0.5), Clock())
        a.read_routers = lambda routers, only: asked.append([r["metadata"]["name"] for r in routers]) or burst  # type: ignore[func-returns-value]
        (d,) = a.run_once([])
        return d, kube.statuses[-1]["autoscaling"], a

    d, st, _ = run()
    assert (
        asked == []
        and d.signal != "router arrivals"
        and d.desired == 2
        and "demandReplicas" not in st["inputs"]
    )
    d, st, a = run(leadingSignal=True)
    assert asked == [["router-0"]]  # the deployment's router pods, read directly
    assert d.signal == "router arrivals" and d.desired > 2, d
    assert st["signal"] == "router arrivals" and st["inputs"]["demandReplicas"] == d.demand.replicas
    assert (
        st["inputs"]["demandWindow"] in ("short", "long", "in-flight")
        and "router arrivals" in st["inputs"]["demandExplanation"]
    )
    # decided every 5 s with the leading signal, not every syncPeriodSeconds (10 here)
    a.clock.t += 5  # type: ignore[attr-defined]
    assert len(a.run_once([])) == 1
