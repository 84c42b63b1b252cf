"""What the chart's operator pod relies on from the local cluster: in-cluster config and a real
ServiceAccount token in each project-image pod (its identity is the ServiceAccount's, not the
admin's), volumes where the pod spec mounts them, and a control plane that answers on loopback
and the pod network's bridge only, never on the machine's other addresses."""

from __future__ import annotations

import os
import re
import socket
import subprocess
from typing import Any

import pytest

from tests.cluster.conftest import STATE, Cluster, wait_for
from tests.cluster.mock import http_get

pytestmark = pytest.mark.cluster
BRIDGE = "10.243.0.1"  # hack/cluster/common.sh HOST_ADDR

# Serves HTTP on the pod IP only if in-cluster config works and says who the pod is.
WHOAMI = """
import http.server, os, kubernetes
assert open("/var/run/secrets/kubernetes.io/serviceaccount/namespace").read() == os.environ["NS"]
assert open("/etc/probe/greeting").read() == "hello"
kubernetes.config.load_incluster_config()
review = kubernetes.client.AuthenticationV1Api().create_self_subject_review({"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"})
user = review.status.user_info.username
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(user.encode())
http.server.HTTPServer((os.environ["POD_IP"], 8000), H).serve_forever()
"""


def test_project_pods_get_in_cluster_config_and_their_own_token(cluster: Cluster, namespace: str) -> None:
    cluster.core.create_namespaced_service_account(namespace, {"metadata": {"name": "prober"}})
    cluster.core.create_namespaced_config_map(
        namespace, {"metadata": {"name": "probe"}, "data": {"greeting": "hello"}}
    )
    fields = {"status.podIP": "POD_IP", "metadata.namespace": "NS"}
    pod: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "whoami"},
        "spec": {
            "serviceAccountName": "prober",
            "containers": [{
                "name": "main",
                "image": "ghcr.io/toposerve/toposerve:dev",
                "command": ["python", "-c", WHOAMI],
                "env": [{"name": v, "valueFrom": {"fieldRef": {"fieldPath": f}}} for f, v in fields.items()],
                "readinessProbe": {"tcpSocket": {"port": 8000}},
                "volumeMounts": [{"name": "probe", "mountPath": "/etc/probe", "readOnly": True}],
            }],
            "volumes": [{"name": "probe", "configMap": {"name": "probe"}}],
        },
    }  # fmt: skip
    cluster.core.create_namespaced_pod(namespace, pod)

    def ready() -> Any:
        p = cluster.core.read_namespaced_pod("whoami", namespace)
        return p if any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or []) else None

    p = wait_for(ready, "the pod that asks the API server who it is to be Ready")
    status, body = http_get(f"http://{p.status.pod_ip}:8000/")
    assert status == 200
    assert body == f"system:serviceaccount:{namespace}:prober"
    # The mount point exists only in the pod's mount namespace (an overlay), not on the host.
    assert not os.path.exists("/etc/probe")


def _machine_addresses() -> list[str]:
    out = subprocess.run(
        ["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True, check=True
    ).stdout
    addrs = [line.split()[3].split("/")[0] for line in out.splitlines()]
    return [a for a in addrs if not a.startswith("127.") and a != BRIDGE]


def _cluster_pids() -> set[int]:
    files = list((STATE / "kwok/clusters/toposerve/pids").glob("*.pid"))
    files += [STATE / f for f in ("podrunner.pid", "prometheus.pid", "lws.pid")]
    return {int(f.read_text().split()[0]) for f in files if f.exists() and f.read_text().strip()}


def _listening() -> list[tuple[str, int, int]]:
    """(address, port, pid) of every TCP listener of the cluster's processes (`ss`)."""
    pids = _cluster_pids()
    out = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=True).stdout
    found = []
    for line in out.splitlines():
        cols = line.split()
        addr, _, port = cols[3].rpartition(":")
        for pid in map(int, re.findall(r"pid=(\d+)", line)):
            if pid in pids:
                found.append((addr.strip("[]"), int(port), pid))
    return found


def test_the_control_plane_listens_on_loopback_and_the_bridge_only(cluster: Cluster) -> None:
    listeners = _listening()
    names = {pid for _, _, pid in listeners}
    assert len(names) >= 5, f"expected etcd, apiserver, controllers, kwok, runner: {listeners}"
    wrong = [(a, p) for a, p, _ in listeners if a not in ("127.0.0.1", "::1", BRIDGE)]
    assert wrong == [], f"listening beyond loopback and the bridge: {wrong}"
    others = _machine_addresses()
    if not others:
        pytest.skip("this machine has no address besides loopback and the pod bridge to test from")
    for addr in others:
        for _, port, _ in listeners:
            with socket.socket() as s:
                s.settimeout(2)
                assert s.connect_ex((addr, port)) != 0, f"{addr}:{port} answers"
