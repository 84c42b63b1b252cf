"""A mock-engine Deployment and Service as the renderer makes them, for the cluster tests."""

from __future__ import annotations

import ipaddress
import urllib.request
from typing import Any

from tests.cluster.conftest import Cluster, wait_for

IMAGE = "ghcr.io/toposerve/toposerve:dev"
PORT = 8000
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    with _NO_PROXY.open(url, timeout=timeout) as r:
        return int(r.status), r.read().decode()


def deploy_mock_engine(
    cluster: Cluster,
    namespace: str,
    name: str = "mock",
    replicas: int = 1,
    liveness: bool = True,
    grace: int = 2,
) -> None:
    labels = {"app": name}
    container = {
        "name": "engine",
        "image": IMAGE,
        "command": ["toposerve", "mock-engine"],
        "args": [
            "--host",
            "$(POD_IP)",
            "--port",
            str(PORT),
            "--model",
            "tiny-mock",
            "--gpu-type",
            "L4",
            "--enable-admin",
        ],  # the fault-injection endpoints the pod-runner tests use
        "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
        "ports": [{"name": "http", "containerPort": PORT}],
        "readinessProbe": {"httpGet": {"path": "/health", "port": PORT}, "periodSeconds": 2},
        "livenessProbe": {
            "httpGet": {"path": "/health", "port": PORT},
            "periodSeconds": 5,
            "failureThreshold": 6,
        },
    }
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {
                    "labels": labels,
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(PORT),
                        "prometheus.io/path": "/metrics",
                    },
                },
                "spec": {
                    "containers": [container],
                    # CPU-only nodes: the mock engine is what runs on clusters without GPUs.
                    "affinity": {
                        "nodeAffinity": {
                            "requiredDuringSchedulingIgnoredDuringExecution": {
                                "nodeSelectorTerms": [
                                    {
                                        "matchExpressions": [
                                            {"key": "nvidia.com/gpu.present", "operator": "DoesNotExist"}
                                        ]
                                    }
                                ]
                            }
                        }
                    },
                    "terminationGracePeriodSeconds": grace,
                },
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name},
        "spec": {"selector": labels, "ports": [{"name": "http", "port": PORT, "targetPort": "http"}]},
    }
    if not liveness:
        del container["livenessProbe"]
    cluster.apps.create_namespaced_deployment(namespace, deployment)
    cluster.core.create_namespaced_service(namespace, service)


def ready_pods(cluster: Cluster, namespace: str, name: str = "mock", count: int = 1) -> list[Any]:
    """Wait until ``count`` pods of the Deployment are Ready; return them."""

    def ready() -> list[Any] | None:
        pods = cluster.core.list_namespaced_pod(namespace, label_selector=f"app={name}").items
        ok = [
            p
            for p in pods
            if not p.metadata.deletion_timestamp
            and any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])
        ]
        return ok if len(ok) >= count else None

    return wait_for(ready, f"{count} Ready pod(s) of {namespace}/{name}", timeout=180)


def in_node_cidr(cluster: Cluster, pod: Any) -> bool:
    node = cluster.core.read_node(pod.spec.node_name)
    return ipaddress.ip_address(pod.status.pod_ip) in ipaddress.ip_network(node.spec.pod_cidr)


def http_send(method: str, url: str, body: dict[str, Any] | None = None, timeout: float = 5.0) -> int:
    """Send a JSON request; return the status."""
    import json

    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with _NO_PROXY.open(req, timeout=timeout) as r:
        return int(r.status)
