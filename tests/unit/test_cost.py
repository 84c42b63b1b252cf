"""Cost per hour and per million output tokens: the arithmetic, the pricing order, the pods that
count, the Prometheus answer, status, metrics and `toposerve cost`."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import REGISTRY

from tests.unit.conftest import make_spec
from tests.unit.fake_prometheus import FakePrometheus, serve
from toposerve.api.config import OperatorConfig
from toposerve.api.gpus import DEFAULT_CATALOG
from toposerve.commands import cost as cost_cmd
from toposerve.controller import metrics
from toposerve.controller.conditions import Observation, PlacementObs, PoolObs, compute_status
from toposerve.controller.throughput import PrometheusThroughput
from toposerve.planner.cost import (
    DeploymentCost,
    PoolCost,
    cost_per_million_tokens,
    gpu_hourly_price,
    observed_cost,
    pod_gpus,
    rates_by_pod,
    throughput_query,
)

H100 = DEFAULT_CATALOG.get("H100")


# ---- the arithmetic ---------------------------------------------------------------------------


def test_seed_worked_example_4x_h100_at_2_50_and_2000_tokens_per_second() -> None:
    # The source lesson: Llama 3.1 70B on 4x H100 at $2.50/GPU-hour, ~2K output tok/s with batching
    # -> ~$1.39 per million output tokens. 10 $/h / 7.2 M tokens/h = 1.3889.
    assert cost_per_million_tokens(4 * 2.50, 2000) == pytest.approx(1.3889, abs=1e-4)
    assert round(cost_per_million_tokens(4 * 2.50, 2000) or 0, 2) == 1.39


def test_no_throughput_is_unknown_not_zero_or_infinite() -> None:
    assert cost_per_million_tokens(10.0, 0) is None
    assert cost_per_million_tokens(10.0, None) is None
    assert cost_per_million_tokens(0.0, 100) == 0.0  # CPU-only mock engines cost no GPU


def test_price_order_spec_then_config_then_catalog_and_spot() -> None:
    cfg = OperatorConfig.model_validate({"hourlyPerGPU": {"H100": 3.0}, "spotHourlyPerGPU": {"H100": 1.1}})
    spec = make_spec("meta-llama/Llama-3.1-8B-Instruct", cost={"hourlyPerGPU": {"H100": 2.5}})
    assert gpu_hourly_price("H100", False, cfg, overrides=spec.cost) == 2.5
    assert gpu_hourly_price("H100", False, cfg) == 3.0
    assert gpu_hourly_price("H100", True, cfg, overrides=spec.cost) == 1.1  # spec has no spot price
    assert gpu_hourly_price("H100", False, OperatorConfig()) == H100.hourly_price
    assert gpu_hourly_price("H100", True, OperatorConfig()) == H100.spot_hourly_price
    assert gpu_hourly_price("no-such-gpu", False, OperatorConfig()) == 0.0


# ---- which pods cost --------------------------------------------------------------------------


def pod(
    name: str,
    node: str | None,
    gpus: int = 4,
    pool: str = "default",
    gpu: str = "H100",
    component: str = "engine",
    phase: str = "Running",
) -> dict[str, Any]:
    labels = {
        "toposerve.io/pool": pool,
        "toposerve.io/gpu-type": gpu,
        "app.kubernetes.io/component": component,
    }
    res = {"limits": {"nvidia.com/gpu": str(gpus)}} if gpus else {}
    return {
        "metadata": {"name": name, "labels": labels},
        "spec": {"nodeName": node, "containers": [{"name": "engine", "resources": res}]},
        "status": {"phase": phase},
    }


def price(gpu: str, spot: bool) -> float:
    return {("H100", False): 2.5, ("H100", True): 1.0, ("A100-80GB", False): 1.6}[(gpu, spot)]


def test_pods_on_nodes_cost_their_gpus_at_their_nodes_capacity_type() -> None:
    pods = [
        pod("e1", "od-1"),  # 4 on-demand H100
        pod("e2", "spot-1"),  # 4 spot H100
        pod("e3", None),  # pending: holds no GPU yet
        pod("e4", "od-1", phase="Succeeded"),  # finished: released its GPUs
        pod("w1", "od-2", component="worker"),  # a multi-node replica's worker holds GPUs too
        pod("r1", "cpu-1", gpus=0, component="router"),  # not a serving pod
        pod("a1", "od-3", gpus=2, pool="small", gpu="A100-80GB"),
    ]
    rates = {"e1": 1500.0, "e2": 500.0, "a1": 100.0, "r1": 9e9}
    cost = observed_cost("ns", "d", pods, {"spot-1": True}, price, rates, pools=["default", "small", "idle"])
    by = {p.name: p for p in cost.pools}
    assert (by["default"].gpus, by["default"].spot_gpus) == (12, 4)
    assert by["default"].cost_per_hour == pytest.approx(8 * 2.5 + 4 * 1.0)
    assert by["default"].output_tokens_per_second == 2000.0
    assert by["small"].cost_per_hour == pytest.approx(3.2)
    assert (by["idle"].gpus, by["idle"].cost_per_hour, by["idle"].output_tokens_per_second) == (0, 0.0, 0.0)
    total = cost.total
    assert (total.gpus, total.cost_per_hour, total.output_tokens_per_second) == (
        14,
        pytest.approx(27.2),
        2100.0,
    )
    assert total.cost_per_million_output_tokens == pytest.approx(27.2 / (2100 * 3600) * 1e6)


def test_without_a_throughput_source_throughput_stays_unknown() -> None:
    cost = observed_cost("ns", "d", [pod("e1", "n")], {}, price, None)
    assert cost.pools[0].output_tokens_per_second is None
    assert cost.pools[0].cost_per_million_output_tokens is None
    assert cost.total.output_tokens_per_second is None


def test_pod_gpus_reads_limits_then_requests_and_ignores_garbage() -> None:
    p = {"spec": {"containers": [
        {"resources": {"limits": {"nvidia.com/gpu": 2}}},
        {"resources": {"requests": {"nvidia.com/gpu": "1"}}},
        {"resources": {"limits": {"nvidia.com/gpu": "x"}}},
        {},
    ]}}  # fmt: skip
    assert pod_gpus(p) == 3


# ---- Prometheus -------------------------------------------------------------------------------


def test_query_and_parse_of_an_instant_vector() -> None:
    assert throughput_query("team-a", "5m") == (
        'sum by (pod) (rate(vllm:generation_tokens_total{namespace="team-a"}[5m]))'
    )
    result = [
        {"metric": {"pod": "a"}, "value": [1700000000.0, "12.5"]},
        {"metric": {"pod": "b"}, "value": [1700000000.0, "NaN"]},
        {"metric": {}, "value": [1700000000.0, "3"]},
        {"metric": {"pod": "c"}, "value": [1700000000.0, "+Inf"]},
        {"metric": {"pod": "d"}},
    ]
    assert rates_by_pod(result) == {"a": 12.5}


@pytest.fixture
def prometheus() -> Iterator[FakePrometheus]:
    with serve([
        {"metric": {"pod": "engine-0"}, "value": [1.7e9, "1999.5"]},
        {"metric": {"pod": "engine-1"}, "value": [1.7e9, "0.5"]},
    ]) as fake:  # fmt: skip
        yield fake


def test_prometheus_source_through_prometheus_api_client(prometheus: FakePrometheus) -> None:
    src = PrometheusThroughput(prometheus.url, window="2m", ttl_s=3600)
    assert src("ns") == {"engine-0": 1999.5, "engine-1": 0.5}
    assert src("ns") == {"engine-0": 1999.5, "engine-1": 0.5}  # cached: one query
    assert prometheus.queries == [throughput_query("ns", "2m")]


def test_prometheus_down_means_unknown_not_a_crash() -> None:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    assert PrometheusThroughput(f"http://127.0.0.1:{port}", timeout_s=2)("ns") is None


# ---- status and metrics -----------------------------------------------------------------------


def test_status_carries_observed_cost_per_pool_and_total() -> None:
    cost = DeploymentCost("ns", "d", (PoolCost("default", 4, 0, 10.0, 2000.123456),))
    placement = PlacementObs("H100", 1, 1, 4, 1, 1, 4, 1, 10.0)
    status = compute_status(
        Observation(
            3, 1, "s", None, "vllm", "r", pools=[PoolObs("default", True, placements=[placement])], cost=cost
        ),
        [],
        "2026-11-28T12:00:00Z",
    ).model_dump(by_alias=True, exclude_none=True)
    pool = status["pools"][0]["observedCost"]
    assert pool == {"gpus": 4, "spotGpus": 0, "costPerHour": 10.0, "outputTokensPerSecond": 2000.0,
                    "costPerMillionOutputTokens": 1.389}  # fmt: skip
    assert status["observedCost"] == pool
    assert status["costPerHour"] == 10.0  # the plan's figure stays beside it


def _sample(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def test_metrics_follow_pools_and_forget_deleted_deployments() -> None:
    two = DeploymentCost("m-ns", "d", (PoolCost("a", 4, 0, 10.0, 2000.0), PoolCost("b", 2, 2, 2.0, None)))
    metrics.record_cost(two)
    assert _sample("toposerve_cost_per_hour_dollars", namespace="m-ns", deployment="d", pool="") == 12.0
    assert _sample("toposerve_gpus", namespace="m-ns", deployment="d", pool="b") == 2
    assert _sample("toposerve_cost_per_million_output_tokens_dollars", namespace="m-ns", deployment="d",
                   pool="a") == pytest.approx(1.3889, abs=1e-4)  # fmt: skip
    assert _sample("toposerve_output_tokens_per_second", namespace="m-ns", deployment="d", pool="b") is None
    metrics.record_cost(DeploymentCost("m-ns", "d", (PoolCost("a", 4, 0, 10.0, 0.0),)))
    assert _sample("toposerve_gpus", namespace="m-ns", deployment="d", pool="b") is None
    assert _sample("toposerve_cost_per_million_output_tokens_dollars", namespace="m-ns", deployment="d",
                   pool="a") is None  # 0 tok/s: no figure rather than infinity  # fmt: skip
    metrics.forget_cost("m-ns", "d")
    assert _sample("toposerve_cost_per_hour_dollars", namespace="m-ns", deployment="d", pool="") is None


# ---- toposerve cost ---------------------------------------------------------------------------


def _node(name: str, spot: bool) -> dict[str, Any]:
    labels = {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3", "nvidia.com/gpu.count": "8"}
    if spot:
        labels["karpenter.sh/capacity-type"] = "spot"
    return {"metadata": {"name": name, "labels": labels},
            "status": {"allocatable": {"nvidia.com/gpu": "8"}, "capacity": {"nvidia.com/gpu": "8"}}}  # fmt: skip


def test_cost_command_reports_the_seed_example_from_cluster_objects(
    capsys: pytest.CaptureFixture[str],
) -> None:
    deployment = {
        "metadata": {"namespace": "ns", "name": "llama"},
        "spec": {"model": {"name": "meta-llama/Llama-3.1-70B-Instruct"}, "placement": {"gpuTypes": ["H100"]},
                 "cost": {"hourlyPerGPU": {"H100": 2.5}}},
        "status": {"costPerHour": 10.0, "pools": [{"name": "default", "costPerHour": 10.0}]},
    }  # fmt: skip
    objects = {
        ("Node", None): [_node("od-1", False), _node("spot-1", True)],
        ("LLMDeployment", "ns"): [deployment],
        ("Pod", "ns"): [pod("llama-0", "od-1")],
    }
    calls: list[tuple[str, str | None, str | None]] = []

    def lister(api_version: str, kind: str, ns: str | None, selector: str | None) -> list[dict[str, Any]]:
        calls.append((kind, ns, selector))
        return objects.get((kind, ns), [])

    rows = cost_cmd.collect(lister, OperatorConfig(), lambda ns: {"llama-0": 2000.0}, "ns")
    assert ("Pod", "ns", "toposerve.io/deployment=llama") in calls
    data = cost_cmd.as_json(rows)["deployments"][0]
    assert (data["gpus"], data["costPerHour"], data["plannedCostPerHour"]) == (4, 10.0, 10.0)
    assert data["costPerMillionOutputTokens"] == pytest.approx(1.3889, abs=1e-4)
    text = cost_cmd.table(rows)
    assert "(total)" in text and "1.389" in text and "2000.0" in text
