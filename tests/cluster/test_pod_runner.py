"""Project-image pods really run: a pod IP from the node's CIDR that answers HTTP, and a real
EndpointSlice for the Service (what the router and autoscaler build on)."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from tests.cluster.conftest import Cluster, wait_for
from tests.cluster.mock import PORT, deploy_mock_engine, http_get, in_node_cidr, ready_pods

pytestmark = pytest.mark.cluster


def test_mock_engine_pod_serves_http_on_its_pod_ip(cluster: Cluster, namespace: str) -> None:
    deploy_mock_engine(cluster, namespace)
    (pod,) = ready_pods(cluster, namespace)
    ip = pod.status.pod_ip
    assert in_node_cidr(cluster, pod)
    assert not ipaddress.ip_address(ip).is_loopback
    assert pod.metadata.annotations["toposerve.dev/runner-ready"] == "true"

    status, _ = http_get(f"http://{ip}:{PORT}/health")
    assert status == 200
    status, body = http_get(f"http://{ip}:{PORT}/v1/models")
    assert status == 200
    assert "tiny-mock" in body

    def ready_endpoint() -> list[str] | None:
        slices = cluster.discovery.list_namespaced_endpoint_slice(
            namespace, label_selector="kubernetes.io/service-name=mock"
        ).items
        addrs = [
            a
            for s in slices
            for e in s.endpoints or []
            if e.conditions and e.conditions.ready
            for a in e.addresses
        ]
        return addrs or None

    assert wait_for(ready_endpoint, "a ready endpoint in the Service's EndpointSlice") == [ip]


def test_deleting_the_pod_stops_its_process(cluster: Cluster, namespace: str) -> None:
    deploy_mock_engine(cluster, namespace)
    (pod,) = ready_pods(cluster, namespace)
    old_ip = pod.status.pod_ip
    cluster.core.delete_namespaced_pod(pod.metadata.name, namespace)

    def replaced() -> list[Any] | None:
        pods = ready_pods(cluster, namespace)
        return pods if pods[0].metadata.uid != pod.metadata.uid else None

    (new,) = wait_for(replaced, "the ReplicaSet's replacement pod to be Ready")
    status, _ = http_get(f"http://{new.status.pod_ip}:{PORT}/health")
    assert status == 200

    def old_gone() -> bool:
        if old_ip == new.status.pod_ip:
            return True  # kwok reused the address for the replacement; it answers, as it should
        try:
            http_get(f"http://{old_ip}:{PORT}/health", timeout=1)
        except OSError:
            return True
        return False

    wait_for(old_gone, "the deleted pod's process to stop answering")


# Runs inside the pod network with the runner's KUBECONFIG; serves HTTP only if the API answered.
API_PROBE = """
import http.server, os, kubernetes
kubernetes.config.load_kube_config()
v1 = kubernetes.client.CoreV1Api()
me = v1.read_namespaced_pod(os.environ["POD_NAME"], os.environ["POD_NAMESPACE"])
assert me.status.pod_ip == os.environ["POD_IP"]
http.server.HTTPServer((os.environ["POD_IP"], 8000), http.server.SimpleHTTPRequestHandler).serve_forever()
"""


def test_pod_processes_reach_the_api_server(cluster: Cluster, namespace: str) -> None:
    field = {"status.podIP": "POD_IP", "metadata.name": "POD_NAME", "metadata.namespace": "POD_NAMESPACE"}
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "api-client"},
        "spec": {
            "containers": [
                {
                    "name": "main",
                    "image": "ghcr.io/toposerve/toposerve:dev",
                    "command": ["python", "-c", API_PROBE],
                    "env": [
                        {"name": v, "valueFrom": {"fieldRef": {"fieldPath": f}}} for f, v in field.items()
                    ],
                    "readinessProbe": {"tcpSocket": {"port": 8000}},
                }
            ]
        },
    }
    cluster.core.create_namespaced_pod(namespace, pod)

    def ready() -> Any:
        p = cluster.core.read_namespaced_pod("api-client", namespace)
        return p if any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or []) else None

    p = wait_for(ready, "the pod that lists itself through the API server to be Ready")
    status, _ = http_get(f"http://{p.status.pod_ip}:8000/")
    assert status == 200
