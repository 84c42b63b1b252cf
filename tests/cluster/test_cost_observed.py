"""Issue 12's cost proof on the local cluster: engines that hold (simulated) GPUs serve a steady
load, and status.observedCost's cost per million output tokens matches GPUs x price divided by the
throughput the *client* measured, within 5%.

The operator runs with ``mockHoldsGPUs`` (mock engines request the plan's GPUs on the plan's GPU
type, as vLLM would) and reads throughput from the cluster's real Prometheus; nothing but the
operator touches status, and the expected figure is computed here from what the client received
and the price set in the manifest, not from anything the operator reports.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster.conftest import Cluster, wait_for
from tests.cluster.operator_harness import Operator, apply, get_llmd, install_crd, wait_condition

pytestmark = pytest.mark.cluster

PRICE = 3.0  # USD per H100-hour, set in the manifest (not a catalog default)
WINDOW = 30  # seconds of rate() in the operator's throughput query


@pytest.fixture
def gpu_operator(cluster: Cluster, tmp_path: Path) -> Iterator[Operator]:
    install_crd(cluster)
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {"prometheusUrl": cluster.prometheus_url, "throughputWindow": f"{WINDOW}s", "mockHoldsGPUs": True}
        )
    )
    op = Operator(cluster, tmp_path / "operator.log", "--config", str(config))
    op.start()
    yield op
    op.stop()


def test_cost_per_million_tokens_is_gpus_times_price_over_observed_throughput(
    cluster: Cluster, namespace: str, gpu_operator: Operator
) -> None:
    openai = pytest.importorskip("openai")
    model = "Qwen/Qwen2.5-7B-Instruct"
    manifest: dict[str, Any] = {
        "apiVersion": "toposerve.io/v1alpha1",
        "kind": "LLMDeployment",
        "metadata": {"name": "priced"},
        "spec": {
            "model": {"name": model, "maxContextLength": 8192},
            "engine": "mock",
            "replicas": 1,
            "placement": {"gpuTypes": ["H100"]},
            "routing": {"enabled": False},
            "cost": {"hourlyPerGPU": {"H100": PRICE}},
        },
    }
    assert apply(cluster, namespace, manifest).returncode == 0
    wait_condition(cluster, namespace, "priced", "Ready", "True", timeout=180)
    (pod,) = cluster.core.list_namespaced_pod(
        namespace, label_selector="app.kubernetes.io/component=engine"
    ).items
    gpus = int(pod.spec.containers[0].resources.limits["nvidia.com/gpu"])
    node = cluster.core.read_node(pod.spec.node_name)
    assert gpus >= 1 and int(node.status.allocatable["nvidia.com/gpu"]) >= gpus  # really on a GPU node

    # Steady closed-loop load; the client records (time, completion tokens) of every answer.
    received: list[tuple[float, int]] = []
    stop = threading.Event()
    errors: list[str] = []

    def load() -> None:
        client = openai.OpenAI(
            base_url=f"http://{pod.status.pod_ip}:8000/v1", api_key="x", max_retries=0, timeout=60
        )
        while not stop.is_set():
            try:
                r = client.completions.create(model=model, prompt="count to ten", max_tokens=32)
                received.append((time.monotonic(), r.usage.completion_tokens))
            except Exception as e:  # recorded, asserted below
                errors.append(repr(e))

    threads = [threading.Thread(target=load, daemon=True) for _ in range(4)]
    start = time.monotonic()
    for t in threads:
        t.start()
    try:
        # Wait for a status written after a whole window of load (the operator refreshes observed
        # cost every 30 s while a deployment serves); remember when each new value appeared.
        seen: list[tuple[float, dict[str, Any]]] = []

        def settled() -> dict[str, Any] | None:
            cost = (get_llmd(cluster, namespace, "priced").get("status") or {}).get("observedCost") or {}
            if not seen or seen[-1][1] != cost:
                seen.append((time.monotonic(), cost))
            fresh = [c for t, c in seen if t - start > WINDOW + 10 and c.get("outputTokensPerSecond")]
            return fresh[0] if fresh else None

        cost = wait_for(settled, "a status computed after a full window of load", timeout=240, every=1)
        at = next(t for t, c in seen if c == cost)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=70)
    assert not errors, errors[:3]
    # The client's throughput over the window before the status appeared (plus the operator's
    # 5 s query cache and Prometheus's 2 s scrapes of slack: the load is steady, so this is the rate).
    tokens = sum(n for t, n in received if at - WINDOW - 5 <= t <= at - 5)
    client_tps = tokens / WINDOW
    assert client_tps > 0
    expected_per_million = gpus * PRICE / (client_tps * 3600) * 1e6
    assert cost["gpus"] == gpus and cost["costPerHour"] == pytest.approx(gpus * PRICE)
    assert cost["outputTokensPerSecond"] == pytest.approx(client_tps, rel=0.05)
    assert cost["costPerMillionOutputTokens"] == pytest.approx(expected_per_million, rel=0.05)
