"""poolOrder cost in the reconcile: per-pool figures from a (fake) Prometheus decide which pool
grows, status.pools[].costRank shows the figure, its source and the SLO verdict, and the Event
names the rule; Prometheus down means estimates, never an error."""

from __future__ import annotations

from typing import Any

import pytest

from toposerve.api.config import OperatorConfig
from toposerve.controller.pool_signals import PrometheusPoolSignals
from toposerve.controller.reconcile import Context, reconcile
from toposerve.planner.costorder import MIN_BUSY_MINUTES, POOL_LABEL, PoolSignals

from .test_pool_scaling import FakeKube, body, node

NODES = [node("h", "NVIDIA-H100-80GB-HBM3", 8), node("a", "NVIDIA-A100-SXM4-40GB", 8)]


def cost_body(replicas: int, slo_seconds: float | None = 1.0) -> dict[str, Any]:
    b = body(replicas, tier="throughput")
    b["spec"]["autoscaling"]["poolOrder"] = "cost"
    if slo_seconds is not None:
        b["spec"]["autoscaling"]["ttftSLO"] = {"seconds": slo_seconds, "quantile": 0.9}
    return b


class Signals:
    """Stands in for controller/pool_signals.PrometheusPoolSignals (same call signature)."""

    def __init__(self, answer: PoolSignals | None) -> None:
        self.answer = answer
        self.calls: list[tuple[str, str, float | None, int]] = []

    def __call__(
        self, namespace: str, name: str, quantile: float | None, window_s: int
    ) -> PoolSignals | None:
        self.calls.append((namespace, name, quantile, window_s))
        return self.answer


def busy(tps: dict[str, float], ttft: dict[str, float] | None = None) -> PoolSignals:
    n = float(MIN_BUSY_MINUTES)
    return PoolSignals(
        ttft_seconds=ttft or {},
        busy_tokens_per_second_sum={k: v * n for k, v in tps.items()},
        busy_minutes=dict.fromkeys(tps, n),
    )


def ranks(kube: FakeKube) -> dict[str, dict[str, Any]]:
    return {p["name"]: p.get("costRank") or {} for p in kube.body["status"]["pools"]}


def test_observed_figures_pick_the_cheapest_pool_meeting_the_slo_and_status_says_so() -> None:
    kube = FakeKube(cost_body(1), NODES)
    # H100 replicas (TP 4, ~$4.7/GPU-h list) observed at 400 tok/s busy; A100-40GB int4 (TP 2) at 2500
    sig = Signals(busy({"h100": 400.0, "a100": 2500.0}, ttft={"h100": 0.3, "a100": 0.6}))
    ctx = Context(kube=kube, config=OperatorConfig(), pool_signals=sig)  # type: ignore[arg-type]
    reconcile(ctx, "ns", "llm")
    assert sig.calls and sig.calls[0][2] == 0.9  # asked with the SLO's quantile
    assert kube.body["status"]["poolOrder"] == "cost"
    r = ranks(kube)
    assert r["a100"]["source"] == r["h100"]["source"] == "observed"
    assert r["a100"]["meetsSLO"] and r["h100"]["meetsSLO"]
    assert r["a100"]["costPerMillionTokens"] < r["h100"]["costPerMillionTokens"]
    assert r["a100"]["tokensPerSecondPerReplica"] == pytest.approx(2500.0)
    assert r["a100"]["costPerMillionTokens"] == pytest.approx(
        r["a100"]["marginalCostPerHour"] / (2500 * 3600) * 1e6, rel=1e-5
    )
    assert kube.workloads() == {"h100": 0, "a100": 1}

    kube.body["spec"]["replicas"] = 3
    reconcile(ctx, "ns", "llm")
    assert kube.workloads() == {"h100": 0, "a100": 3}
    (ev,) = [e for e in kube.events if e[0] == "PoolsScaled"]
    assert "cost: cheapest per token meeting the SLO first: a100 $" in ev[1] and "observed" in ev[1]

    # a100 now misses the SLO: it goes last, so growth goes to h100, shrink leaves a100 first.
    sig.answer = busy({"h100": 400.0, "a100": 2500.0}, ttft={"h100": 0.3, "a100": 1.8})
    kube.body["spec"]["replicas"] = 4
    reconcile(ctx, "ns", "llm")
    assert kube.workloads() == {"h100": 1, "a100": 3}
    assert ranks(kube)["a100"]["meetsSLO"] is False
    assert "a100 (over the TTFT SLO)" in kube.events[-1][1]
    kube.body["spec"]["replicas"] = 2
    reconcile(ctx, "ns", "llm")
    assert kube.workloads() == {"h100": 1, "a100": 1}


def test_prometheus_down_ranks_on_estimates_without_an_error() -> None:
    kube = FakeKube(cost_body(2), NODES)
    ctx = Context(kube=kube, config=OperatorConfig(), pool_signals=Signals(None))  # type: ignore[arg-type]
    reconcile(ctx, "ns", "llm")
    r = ranks(kube)
    assert {v["source"] for v in r.values()} == {"estimated"}
    assert all(v["meetsSLO"] for v in r.values())
    assert sum(kube.workloads().values()) == 2
    assert "ttftSeconds" not in r["h100"] or r["h100"]["ttftSeconds"] is None


def test_too_few_busy_minutes_is_the_estimate() -> None:
    thin = PoolSignals(busy_tokens_per_second_sum={"a100": 2500.0}, busy_minutes={"a100": 1.0})
    assert thin.tokens_per_second("a100") is None
    kube = FakeKube(cost_body(1, slo_seconds=None), NODES)
    reconcile(Context(kube=kube, config=OperatorConfig(), pool_signals=Signals(thin)), "ns", "llm")  # type: ignore[arg-type]
    assert ranks(kube)["a100"]["source"] == "estimated"


def test_a_small_change_of_the_observed_figure_keeps_the_held_one() -> None:
    kube = FakeKube(cost_body(1), NODES)
    sig = Signals(busy({"h100": 400.0, "a100": 2500.0}))
    ctx = Context(kube=kube, config=OperatorConfig(), pool_signals=sig)  # type: ignore[arg-type]
    reconcile(ctx, "ns", "llm")
    held = ranks(kube)["a100"]["costPerMillionTokens"]
    sig.answer = busy({"h100": 400.0, "a100": 2350.0})  # 6 % less throughput: inside the band
    reconcile(ctx, "ns", "llm")
    assert ranks(kube)["a100"]["costPerMillionTokens"] == held
    sig.answer = busy({"h100": 400.0, "a100": 1500.0})  # 40 % less: a new figure
    reconcile(ctx, "ns", "llm")
    assert ranks(kube)["a100"]["costPerMillionTokens"] > held * 1.1


class FakeClient:
    """prometheus_api_client.PrometheusConnect.custom_query(query, timeout=...) -> the "result"
    list of the HTTP API's instant-vector answer."""

    def __init__(self, answers: dict[str, list[dict[str, Any]]] | Exception) -> None:
        self.answers = answers
        self.queries: list[str] = []

    def custom_query(self, query: str, timeout: float | None = None) -> list[dict[str, Any]]:
        self.queries.append(query)
        if isinstance(self.answers, Exception):
            raise self.answers
        for key, answer in self.answers.items():
            if query.startswith(key):
                return answer
        return []


def series(pool: str, value: str) -> dict[str, Any]:
    return {"metric": {POOL_LABEL: pool}, "value": [0, value]}


def test_the_prometheus_source_parses_per_pool_answers_and_fails_soft() -> None:
    client = FakeClient({
        "sum by (toposerve_io_pool) (sum_over_time": [series("a", "30000"), series("b", "NaN")],
        "sum by (toposerve_io_pool) (count_over_time": [series("a", "12"), {"metric": {}, "value": [0, "3"]}],
        "histogram_quantile(0.9": [series("a", "0.25"), series("b", "NaN")],
    })  # fmt: skip
    src = PrometheusPoolSignals(
        "http://p", 'namespace="{namespace}",toposerve_io_deployment="{name}"', client=client
    )
    got = src("ns", "llm", 0.9, 60)
    assert got is not None
    assert got.tokens_per_second("a") == 2500.0 and got.tokens_per_second("b") is None
    assert got.ttft_seconds == {"a": 0.25}
    assert all('toposerve_io_deployment="llm"' in q for q in client.queries)
    assert any(
        "vllm:num_requests_waiting" in q and "vllm:generation_tokens_total" in q for q in client.queries
    )
    n = len(client.queries)
    assert src("ns", "llm", 0.9, 60) is got and len(client.queries) == n  # kept for ttl_s
    down = PrometheusPoolSignals("http://p", "x", client=FakeClient(ConnectionError("refused")))
    assert down("ns", "llm", None, 60) is None


def test_the_slo_verdict_is_held_through_status() -> None:
    kube = FakeKube(cost_body(1), NODES)
    sig = Signals(busy({"h100": 400.0, "a100": 2500.0}, ttft={"a100": 1.2}))
    ctx = Context(kube=kube, config=OperatorConfig(), pool_signals=sig)  # type: ignore[arg-type]
    reconcile(ctx, "ns", "llm")
    assert ranks(kube)["a100"]["meetsSLO"] is False
    sig.answer = busy({"h100": 400.0, "a100": 2500.0}, ttft={"a100": 0.95})  # under, not by 10 %
    reconcile(ctx, "ns", "llm")
    assert ranks(kube)["a100"]["meetsSLO"] is False
    sig.answer = busy({"h100": 400.0, "a100": 2500.0}, ttft={"a100": 0.8})
    reconcile(ctx, "ns", "llm")
    assert ranks(kube)["a100"]["meetsSLO"] is True


def test_the_marginal_replica_is_priced_spot_only_above_the_baseline_with_spot_room() -> None:
    from toposerve.planner.costorder import marginal_price
    from toposerve.planner.plan import PoolPlan

    p = PoolPlan.model_validate(
        {"name": "l40s", "gpuType": "L40S", "fits": True, "spot": True, "onDemandBaseline": 1,
         "costPerHourPerReplica": 1.0, "onDemandCostPerHourPerReplica": 2.5}
    )  # fmt: skip
    assert marginal_price(p, current=0, spot_free=True) == 2.5  # the baseline comes first
    assert marginal_price(p, current=1, spot_free=True) == 1.0
    assert marginal_price(p, current=3, spot_free=False) == 2.5  # no spot room: on-demand
    on_demand = p.model_copy(update={"spot": False, "cost_per_hour_per_replica": 2.5})
    assert marginal_price(on_demand, current=5, spot_free=True) == 2.5
