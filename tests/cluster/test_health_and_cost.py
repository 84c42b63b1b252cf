"""Issue 12 on the real local cluster: the health agent (real pynvml read path against the fake
libnvidia-ml.so.1) publishes GPUHealthy and its taint on a simulated GPU node and removes them on
recovery; the operator fills status.observedCost from Prometheus, and `toposerve cost` reports it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster.conftest import ROOT, Cluster, start_health_agent, wait_for
from tests.cluster.operator_harness import Operator, apply, get_llmd, install_crd, wait_condition
from toposerve.dev import fakenvml
from toposerve.health.node import CONDITION_TYPE, TAINT_KEY

pytestmark = pytest.mark.cluster

H100 = {"name": "NVIDIA H100 80GB HBM3", "temp": 45, "mem.total": 85520809984, "mem.used": 1 << 30}


def _gpu_node(cluster: Cluster) -> str:
    nodes = cluster.core.list_node(label_selector="nvidia.com/gpu.product").items
    if not nodes:
        pytest.skip("no simulated GPU node in this fleet profile")
    return str(nodes[0].metadata.name)


def _condition(cluster: Cluster, node: str) -> dict[str, Any] | None:
    n = cluster.api.sanitize_for_serialization(cluster.core.read_node(node))
    return next((c for c in n["status"].get("conditions") or [] if c["type"] == CONDITION_TYPE), None)


def _tainted(cluster: Cluster, node: str) -> bool:
    return any(t.key == TAINT_KEY for t in cluster.core.read_node(node).spec.taints or [])


@pytest.fixture
def agent(cluster: Cluster, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    node = _gpu_node(cluster)
    state = tmp_path / "gpu-state"
    fakenvml.write_state(state, [H100, H100])
    proc = start_health_agent(cluster, node, state, tmp_path / "agent.log")
    yield node, state
    proc.terminate()
    proc.wait(15)
    # Leave the shared node as found.
    n = cluster.core.read_node(node)
    taints = [t for t in n.spec.taints or [] if t.key != TAINT_KEY]
    cluster.core.patch_node(
        node, {"spec": {"taints": [cluster.api.sanitize_for_serialization(t) for t in taints]}}
    )


def test_an_ecc_burst_taints_the_node_and_recovery_removes_it(
    cluster: Cluster, agent: tuple[str, Path]
) -> None:
    node, state = agent
    ok = wait_for(lambda: (c := _condition(cluster, node)) and c["status"] == "True" and c, "GPUHealthy=True")
    assert ok["reason"] == "GPUsHealthy" and not _tainted(cluster, node)
    fakenvml.write_state(state, [H100, {**H100, "ecc.vol.uncorrected": 7}])
    bad = wait_for(
        lambda: (c := _condition(cluster, node)) and c["status"] == "False" and c, "GPUHealthy=False"
    )
    assert bad["reason"] == "GPUsUnhealthy" and "GPU 1: 7 uncorrected ECC errors" in bad["message"]
    wait_for(lambda: _tainted(cluster, node) or None, "the gpu-unhealthy taint")
    fakenvml.write_state(state, [H100, H100])  # counters reset (driver reload after a GPU reset)
    wait_for(
        lambda: (c := _condition(cluster, node)) and c["status"] == "True" and c, "GPUHealthy=True again"
    )
    wait_for(lambda: (not _tainted(cluster, node)) or None, "the taint removed")


@pytest.fixture
def cost_operator(cluster: Cluster, tmp_path: Path) -> Iterator[Operator]:
    install_crd(cluster)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"prometheusUrl": cluster.prometheus_url, "throughputWindow": "20s"}))
    op = Operator(cluster, tmp_path / "operator.log", "--resync", "3", "--config", str(config))
    op.start()
    yield op
    op.stop()


def test_observed_cost_reaches_status_and_the_cost_command(
    cluster: Cluster, namespace: str, cost_operator: Operator
) -> None:
    openai = pytest.importorskip("openai")
    manifest = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    manifest["spec"].update(engine="mock", replicas=1)
    assert apply(cluster, namespace, manifest).returncode == 0
    wait_condition(cluster, namespace, "quickstart", "Ready", "True", timeout=180)
    pod = cluster.core.list_namespaced_pod(
        namespace, label_selector="app.kubernetes.io/component=engine"
    ).items[0]
    client = openai.OpenAI(
        base_url=f"http://{pod.status.pod_ip}:8000/v1", api_key="x", max_retries=0, timeout=30
    )

    def observed() -> dict[str, Any] | None:
        client.completions.create(model=manifest["spec"]["model"]["name"], prompt="hi", max_tokens=16)
        cost = (get_llmd(cluster, namespace, "quickstart").get("status") or {}).get("observedCost") or {}
        return cost if (cost.get("outputTokensPerSecond") or 0) > 0 else None

    cost = wait_for(observed, "status.observedCost.outputTokensPerSecond > 0", timeout=180, every=1)
    # The mock engine runs on CPU: no GPU held, so no cost, and 0 $ per million tokens (not absent).
    assert (cost["gpus"], cost["costPerHour"], cost["costPerMillionOutputTokens"]) == (0, 0.0, 0.0)
    out = subprocess.run(
        [sys.executable, "-m", "toposerve.cli", "cost", "-n", namespace, "--prometheus-url", cluster.prometheus_url,
         "--window", "20s", "-o", "json"],
        env={**os.environ, "KUBECONFIG": str(cluster.kubeconfig)}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    (d,) = json.loads(out.stdout)["deployments"]
    assert d["name"] == "quickstart" and d["gpus"] == 0 and d["outputTokensPerSecond"] is not None
    assert [p["name"] for p in d["pools"]] == ["default"]
