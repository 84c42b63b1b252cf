"""The health agent as users deploy it: examples/health-agent/health-agent.yaml's DaemonSet on the
local cluster, one agent pod per simulated GPU node, each reading its own node's GPUs.

The pod runner plays the NVIDIA container runtime for pods under RuntimeClass ``nvidia``: it gives
them the fake libnvidia-ml.so.1 and their node's state file (.cluster/nvml/<node>.state), so a test
breaks one GPU on one node and only that node's agent sees it. The agents run with their
ServiceAccount's token, so the example's RBAC is what they get.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster.conftest import ROOT, STATE, Cluster, kubectl, wait_for
from toposerve.dev import fakenvml
from toposerve.health.node import CONDITION_TYPE, TAINT_KEY

pytestmark = pytest.mark.cluster

EXAMPLE = ROOT / "examples" / "health-agent" / "health-agent.yaml"


def _conditions(cluster: Cluster) -> dict[str, dict[str, Any]]:
    out = {}
    for n in cluster.core.list_node().items:
        for c in n.status.conditions or []:
            if c.type == CONDITION_TYPE:
                out[n.metadata.name] = {"status": c.status, "reason": c.reason, "message": c.message}
    return out


def _tainted(cluster: Cluster) -> set[str]:
    return {
        n.metadata.name
        for n in cluster.core.list_node().items
        if any(t.key == TAINT_KEY for t in n.spec.taints or [])
    }


def _state(node: str) -> Path:
    return STATE / "nvml" / f"{node}.state"


def _gpus(node: str) -> list[dict[str, object]]:
    """The node's GPUs as the runner wrote them (parsed back from the state file)."""
    gpus: dict[int, dict[str, object]] = {}
    for line in _state(node).read_text().splitlines():
        key, _, value = line.partition("=")
        if key.startswith("gpu."):
            _, index, field = key.split(".", 2)
            gpus.setdefault(int(index), {})[field] = int(value) if value.isdigit() else value
    return [gpus[i] for i in sorted(gpus)]


@pytest.fixture
def daemonset(cluster: Cluster, namespace: str) -> Iterator[list[str]]:
    """The example, in the test's namespace (its cluster-scoped RBAC renamed after it), sampling
    every second instead of every 10 s; yields the GPU nodes."""
    docs = [d for d in yaml.safe_load_all(EXAMPLE.read_text()) if d and d["kind"] != "Namespace"]
    docs = list(yaml.safe_load_all(yaml.safe_dump_all(docs).replace("toposerve-system", namespace)))
    for d in docs:
        if d["kind"] in ("ClusterRole", "ClusterRoleBinding"):
            d["metadata"]["name"] = f"health-agent-{namespace}"
        if d["kind"] == "ClusterRoleBinding":
            d["roleRef"]["name"] = f"health-agent-{namespace}"
        if d["kind"] == "DaemonSet":
            c = d["spec"]["template"]["spec"]["containers"][0]
            c["args"] = [a if not a.startswith("--interval=") else "--interval=1" for a in c["args"]]
    manifest = yaml.safe_dump_all(docs)
    kubectl(cluster, "apply", "-f", "-", stdin=manifest)
    gpu_nodes = sorted(
        n.metadata.name
        for n in cluster.core.list_node().items
        if int((n.status.capacity or {}).get("nvidia.com/gpu", 0)) > 0
    )
    yield gpu_nodes
    kubectl(cluster, "delete", "-f", "-", "--wait=true", stdin=manifest, check=False)
    for node in gpu_nodes:  # leave the shared nodes as found
        n = cluster.core.read_node(node)
        taints = [
            cluster.api.sanitize_for_serialization(t) for t in n.spec.taints or [] if t.key != TAINT_KEY
        ]
        cluster.core.patch_node(node, {"spec": {"taints": taints}})
        if _state(node).exists():
            fakenvml.write_state(
                _state(node), [{**g, "ecc.vol.uncorrected": 0, "temp": 35} for g in _gpus(node)]
            )


def test_each_gpu_nodes_agent_reads_its_own_gpus_and_only_the_broken_node_is_tainted(
    cluster: Cluster, daemonset: list[str]
) -> None:
    nodes = daemonset
    if len(nodes) < 2:
        pytest.skip("needs two simulated GPU nodes")
    # One agent pod per GPU node, each publishing GPUHealthy=True for its node.
    healthy = wait_for(
        lambda: (
            (c := _conditions(cluster)) and all(c.get(n, {}).get("status") == "True" for n in nodes) and c
        ),
        "GPUHealthy=True on every GPU node",
        timeout=180,
    )
    assert all(healthy[n]["reason"] == "GPUsHealthy" for n in nodes) and not _tainted(cluster) & set(nodes)
    # The runtime gave each agent its node's GPUs: as many as the node has, named from its labels.
    for n in nodes:
        node = cluster.core.read_node(n)
        assert len(_gpus(n)) == int(node.status.capacity["nvidia.com/gpu"])

    ecc_node, hot_node = nodes[0], nodes[-1]
    fakenvml.write_state(
        _state(ecc_node),
        [{**g, "ecc.vol.uncorrected": 3} if i == 0 else g for i, g in enumerate(_gpus(ecc_node))],
    )
    fakenvml.write_state(
        _state(hot_node), [{**g, "temp": 92} if i == 1 else g for i, g in enumerate(_gpus(hot_node))]
    )
    bad = wait_for(
        lambda: (
            (c := _conditions(cluster)) and all(c[n]["status"] == "False" for n in (ecc_node, hot_node)) and c
        ),
        "GPUHealthy=False on the two broken nodes",
        timeout=120,
    )
    assert "GPU 0: 3 uncorrected ECC errors" in bad[ecc_node]["message"]
    assert "GPU 1" in bad[hot_node]["message"] and "92" in bad[hot_node]["message"]
    wait_for(
        lambda: _tainted(cluster) & set(nodes) == {ecc_node, hot_node} or None, "taints on exactly those two"
    )
    others = [n for n in nodes if n not in (ecc_node, hot_node)]
    assert all(_conditions(cluster)[n]["status"] == "True" for n in others)  # nobody else affected

    # Recovery (counters reset by a GPU reset, the GPU cooled): conditions back, taints lifted.
    for n in (ecc_node, hot_node):
        fakenvml.write_state(_state(n), [{**g, "ecc.vol.uncorrected": 0, "temp": 35} for g in _gpus(n)])
    wait_for(
        lambda: ((c := _conditions(cluster)) and all(c[n]["status"] == "True" for n in nodes)) or None,
        "GPUHealthy=True everywhere again",
        timeout=180,
    )
    wait_for(lambda: not (_tainted(cluster) & set(nodes)) or None, "taints lifted", timeout=60)
