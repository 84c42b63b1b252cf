"""Project-image pods really run: a pod IP from the node's CIDR that answers HTTP, and a real
EndpointSlice for the Service (what the router and autoscaler build on)."""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from tests.cluster.conftest import Cluster, wait_for
from tests.cluster.mock import PORT, deploy_mock_engine, http_get, http_send, in_node_cidr, ready_pods

pytestmark = pytest.mark.cluster
_NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


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
    # A long grace period, as the render gives engines: the process exits at once on SIGTERM
    # (no --shutdown-timeout: abort), so the runner removes the pod then, like the kubelet, and
    # not when the grace period is over (kwok's fallback stage).
    deploy_mock_engine(cluster, namespace, grace=600)
    (pod,) = ready_pods(cluster, namespace)
    old_ip = pod.status.pod_ip
    cluster.core.delete_namespaced_pod(pod.metadata.name, namespace)

    def pod_object_gone() -> bool:
        try:
            cluster.core.read_namespaced_pod(pod.metadata.name, namespace)
        except ApiException as e:
            return e.status == 404
        return False

    wait_for(pod_object_gone, "the deleted pod's object removed once its process stopped", timeout=60)

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


def endpoint_ready(cluster: Cluster, namespace: str, ip: str) -> bool | None:
    """The Service's EndpointSlice readiness of ``ip`` (None while it is not listed)."""
    for s in cluster.discovery.list_namespaced_endpoint_slice(
        namespace, label_selector="kubernetes.io/service-name=mock"
    ).items:
        for e in s.endpoints or []:
            if ip in e.addresses:
                return bool(e.conditions and e.conditions.ready)
    return None


def test_failing_readiness_probe_makes_the_pod_unready_and_back(cluster: Cluster, namespace: str) -> None:
    deploy_mock_engine(cluster, namespace, liveness=False)
    (pod,) = ready_pods(cluster, namespace)
    ip, name = pod.status.pod_ip, pod.metadata.name
    wait_for(lambda: endpoint_ready(cluster, namespace, ip), "the endpoint to be ready")

    assert http_send("POST", f"http://{ip}:{PORT}/admin/faults", {"unready": True}) == 200

    def pod_ready() -> bool:
        p = cluster.core.read_namespaced_pod(name, namespace)
        return any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])

    wait_for(lambda: not pod_ready(), "the pod to turn NotReady after its probe fails")
    wait_for(lambda: endpoint_ready(cluster, namespace, ip) is False, "the endpoint to turn not ready")

    assert http_send("DELETE", f"http://{ip}:{PORT}/admin/faults") in (200, 204)
    wait_for(pod_ready, "the pod to be Ready again")
    wait_for(lambda: endpoint_ready(cluster, namespace, ip), "the endpoint to be ready again")
    after = cluster.core.read_namespaced_pod(name, namespace)
    assert after.metadata.annotations["toposerve.dev/runner-restarts"] == "0"


def test_an_exited_process_is_restarted_on_the_same_pod_ip(cluster: Cluster, namespace: str) -> None:
    deploy_mock_engine(cluster, namespace)
    (pod,) = ready_pods(cluster, namespace)
    ip, name = pod.status.pod_ip, pod.metadata.name
    netns = "tsp-" + ip.replace(".", "-")  # the pod's own network namespace (the runner's ptp wiring)
    pids = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True, check=True).stdout
    mine = [
        int(p)
        for p in pids.split()
        if ip in Path(f"/proc/{p}/cmdline").read_text(errors="replace").split("\0")
    ]
    assert len(mine) == 1, mine
    os.kill(mine[0], signal.SIGKILL)

    def restarted() -> Any:
        p = cluster.core.read_namespaced_pod(name, namespace)
        notes = p.metadata.annotations or {}
        ok = (
            notes.get("toposerve.dev/runner-restarts") == "1"
            and notes.get("toposerve.dev/runner-ready") == "true"
        )
        return p if ok else None

    p = wait_for(restarted, "the runner to restart the killed process and report it ready")
    assert p.metadata.uid == pod.metadata.uid
    status, _ = http_get(f"http://{ip}:{PORT}/health")
    assert status == 200


# The main container of the sidecar test: fails (and would be restarted) unless the sidecar is
# already serving when it starts; then serves the shared /models volume over HTTP.
SIDECAR_MAIN = """
import functools, http.server, urllib.request
urllib.request.urlopen("http://127.0.0.1:8011/health", timeout=2)
handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory="/models")
http.server.ThreadingHTTPServer(("0.0.0.0", 8000), handler).serve_forever()
"""


def test_a_native_sidecar_starts_first_shares_volumes_and_gates_readiness(
    cluster: Cluster, namespace: str, tmp_path: Path
) -> None:
    """kubernetes.io/docs "Sidecar Containers": an init container with restartPolicy Always starts
    before the main containers (once its startupProbe passes) and runs beside them; here the
    adapter stager, which stages an archive into the emptyDir the main container serves."""
    import json

    from tests.unit.adapterstage.loopback import adapter_files, file_server, tar_bytes
    from toposerve.adapterstage.sources import STAGE_ROOT, stage_name

    probe = {"httpGet": {"path": "/health", "port": "adapter-stage"}, "periodSeconds": 1}
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "with-sidecar"},
        "spec": {
            "terminationGracePeriodSeconds": 5,
            "initContainers": [
                {
                    "name": "adapter-stage",
                    "image": "ghcr.io/toposerve/toposerve:dev",
                    "restartPolicy": "Always",
                    "command": ["toposerve", "adapter-stage"],
                    "ports": [{"name": "adapter-stage", "containerPort": 8011}],
                    "startupProbe": probe,
                    "readinessProbe": probe,
                    "volumeMounts": [{"name": "models", "mountPath": "/models"}],
                }
            ],
            "containers": [
                {
                    "name": "main",
                    "image": "ghcr.io/toposerve/toposerve:dev",
                    "command": ["python", "-c", SIDECAR_MAIN],
                    "readinessProbe": {"tcpSocket": {"port": 8000}, "periodSeconds": 1},
                    "volumeMounts": [{"name": "models", "mountPath": "/models"}],
                }
            ],
            "volumes": [{"name": "models", "emptyDir": {}}],
        },
    }
    cluster.core.create_namespaced_pod(namespace, pod)

    def ready() -> Any:
        p = cluster.core.read_namespaced_pod("with-sidecar", namespace)
        return p if any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or []) else None

    p = wait_for(ready, "the pod with a sidecar to be Ready")
    assert p.metadata.annotations["toposerve.dev/runner-restarts"] == "0"  # main never ran before it
    ip = p.status.pod_ip
    assert http_get(f"http://{ip}:8011/health")[0] == 200
    with file_server({"a.tgz": tar_bytes(adapter_files())}, host="10.243.0.1") as (url, _):
        source = f"{url}/a.tgz"
        req = urllib.request.Request(
            f"http://{ip}:8011/stage", data=json.dumps({"source": source}).encode(), method="POST"
        )
        with _NO_PROXY_OPENER.open(req, timeout=30) as r:
            assert json.loads(r.read())["path"] == f"{STAGE_ROOT}/{stage_name(source)}"
    # what the sidecar wrote is on the volume the main container serves
    status, body = http_get(f"http://{ip}:8000/.toposerve-adapters/{stage_name(source)}/adapter_config.json")
    assert status == 200 and json.loads(body)["r"] == 8
    cluster.core.delete_namespaced_pod("with-sidecar", namespace)

    def gone() -> bool:
        try:
            cluster.core.read_namespaced_pod("with-sidecar", namespace)
        except ApiException as e:
            return e.status == 404
        return False

    wait_for(gone, "the pod removed once both processes stopped", timeout=60)
