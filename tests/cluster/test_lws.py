"""LeaderWorkerSet works in the local cluster: the API, its webhooks (called by the real API
server) and its controller, creating a leader and workers that the scheduler places on GPUs."""

from __future__ import annotations

from typing import Any

import pytest

from tests.cluster.conftest import Cluster, wait_for

pytestmark = pytest.mark.cluster

GROUP, VERSION, PLURAL = "leaderworkerset.x-k8s.io", "v1", "leaderworkersets"
H100 = "NVIDIA-H100-80GB-HBM3"


def template(role: str) -> dict[str, Any]:
    return {
        "metadata": {"labels": {"role": role}},
        "spec": {
            "containers": [
                {
                    "name": "vllm",
                    "image": "vllm/vllm-openai:v0.11.0",  # simulated by kwok
                    "resources": {"limits": {"nvidia.com/gpu": "8"}},
                }
            ],
            "nodeSelector": {"nvidia.com/gpu.product": H100},
        },
    }


def test_leaderworkerset_creates_a_placed_group(gpu_cluster: Cluster, namespace: str) -> None:
    cluster = gpu_cluster
    if not cluster.extensions.list_custom_resource_definition(
        field_selector=f"metadata.name={PLURAL}.{GROUP}"
    ).items:
        pytest.fail("LeaderWorkerSet is not installed: the lws-controller build failed (docs/development.md)")
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "LeaderWorkerSet",
        "metadata": {"name": "llama"},
        "spec": {
            "replicas": 1,
            "leaderWorkerTemplate": {
                "size": 2,
                "leaderTemplate": template("leader"),
                "workerTemplate": template("worker"),
            },
        },
    }
    created = cluster.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
    # Defaulted by LWS's mutating webhook, which the API server called on the host process.
    assert created["spec"]["startupPolicy"] == "LeaderCreated"

    def running_group() -> list[Any] | None:
        pods = cluster.core.list_namespaced_pod(
            namespace, label_selector="leaderworkerset.sigs.k8s.io/name=llama"
        ).items
        running = [p for p in pods if p.status.phase == "Running" and p.spec.node_name]
        return running if len(running) == 2 else None

    pods = wait_for(running_group, "the leader and its worker to be Running", timeout=180)
    indices = sorted(p.metadata.labels["leaderworkerset.sigs.k8s.io/worker-index"] for p in pods)
    assert indices == ["0", "1"]
    for p in pods:
        node = cluster.core.read_node(p.spec.node_name)
        assert node.metadata.labels["nvidia.com/gpu.product"] == H100
