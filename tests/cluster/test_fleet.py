"""The simulated GPU fleet: GFD labels and GPU capacity, and real scheduler decisions on them."""

from __future__ import annotations

from typing import Any

import pytest

from tests.cluster.conftest import Cluster, wait_for

pytestmark = pytest.mark.cluster

H100 = "NVIDIA-H100-80GB-HBM3"
# Not the project's image, so kwok keeps it simulated: these pods never run anything.
VLLM_IMAGE = "vllm/vllm-openai:v0.11.0"


def gpu_pod(name: str, gpus: int, product: str | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "containers": [
            {
                "name": "vllm",
                "image": VLLM_IMAGE,
                "resources": {"limits": {"nvidia.com/gpu": str(gpus)}, "requests": {"cpu": "1"}},
            }
        ]
    }
    if product:
        spec["affinity"] = {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {
                            "matchExpressions": [
                                {"key": "nvidia.com/gpu.product", "operator": "In", "values": [product]}
                            ]
                        }
                    ]
                }
            }
        }
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}


def test_nodes_carry_gfd_labels_and_gpu_capacity(gpu_cluster: Cluster) -> None:
    cluster = gpu_cluster
    nodes = cluster.core.list_node().items
    by_product: dict[str, list[Any]] = {}
    for n in nodes:
        by_product.setdefault(n.metadata.labels.get("nvidia.com/gpu.product", "cpu"), []).append(n)
    assert {H100, "NVIDIA-A100-SXM4-80GB", "NVIDIA-A100-SXM4-40GB", "NVIDIA-B200", "NVIDIA-L4", "cpu"} <= set(
        by_product
    )
    h100 = by_product[H100]
    assert len({n.metadata.labels["nvidia.com/gpu.clique"] for n in h100}) >= 2
    for n in h100:
        labels = n.metadata.labels
        assert labels["nvidia.com/gpu.count"] == "8"
        assert labels["nvidia.com/gpu.memory"] == "81559"
        assert labels["nvidia.com/gpu.family"] == "hopper"
        assert labels["topology.kubernetes.io/zone"]
        assert n.status.capacity["nvidia.com/gpu"] == "8"
        assert n.status.allocatable["nvidia.com/gpu"] == "8"
        assert any(c.type == "Ready" and c.status == "True" for c in n.status.conditions)
    assert any(n.metadata.labels.get("toposerve.io/capacity-type") == "spot" for n in nodes)
    for n in by_product["cpu"]:
        assert not any(k.startswith("nvidia.com/") for k in n.metadata.labels)
        assert "nvidia.com/gpu" not in (n.status.capacity or {})


def test_scheduler_places_gpu_pods_by_product_and_count(gpu_cluster: Cluster, namespace: str) -> None:
    cluster = gpu_cluster
    cluster.core.create_namespaced_pod(namespace, gpu_pod("four-h100", 4, H100))
    cluster.core.create_namespaced_pod(namespace, gpu_pod("sixteen", 16))

    def bound() -> Any:
        p = cluster.core.read_namespaced_pod("four-h100", namespace)
        return p if p.spec.node_name and p.status.phase == "Running" else None

    pod = wait_for(bound, "four-h100 to be scheduled and (simulated) Running")
    node = cluster.core.read_node(pod.spec.node_name)
    assert node.metadata.labels["nvidia.com/gpu.product"] == H100
    assert pod.status.pod_ip  # simulated, but from the node's pod CIDR like every pod

    def unschedulable() -> Any:
        p = cluster.core.read_namespaced_pod("sixteen", namespace)
        conds = [c for c in p.status.conditions or [] if c.type == "PodScheduled" and c.status == "False"]
        return conds[0] if conds else None

    cond = wait_for(unschedulable, "the 16-GPU pod to be marked unschedulable")
    assert cond.reason == "Unschedulable"
    assert "Insufficient nvidia.com/gpu" in cond.message
    p16 = cluster.core.read_namespaced_pod("sixteen", namespace)
    assert p16.status.phase == "Pending"
    assert not p16.spec.node_name
