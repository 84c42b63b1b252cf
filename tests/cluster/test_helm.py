"""The chart on the local cluster: `helm install` runs the operator as a pod under its own
ServiceAccount (the pod runner gives it in-cluster config and a TokenRequest token, so the chart's
RBAC is what it has: a permission taken away is a 403); the quickstart becomes Ready and answers a
chat completion through its router; `helm upgrade` with changed values keeps it serving;
`helm uninstall` leaves no operator object behind, and the CRD and the LLMDeployment stay."""

from __future__ import annotations

import json
import subprocess
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster.conftest import ROOT, STATE, Cluster, kubectl, wait_for
from tests.cluster.operator_harness import get_llmd, wait_condition
from tests.unit.chart_helpers import CHART, helm_binary

pytestmark = pytest.mark.cluster
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))
QUICKSTART = "quickstart"


def helm(cluster: Cluster, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {"KUBECONFIG": str(cluster.kubeconfig), "HELM_CACHE_HOME": "/tmp/toposerve-helm/cache",
           "HELM_CONFIG_HOME": "/tmp/toposerve-helm/config", "HELM_DATA_HOME": "/tmp/toposerve-helm/data",
           "PATH": "/usr/bin:/bin", "HOME": "/tmp/toposerve-helm"}  # fmt: skip
    out = subprocess.run([helm_binary(), *args], capture_output=True, text=True, env=env, timeout=400)
    assert out.returncode == 0 or not check, f"helm {' '.join(args)}:\n{out.stdout}\n{out.stderr}"
    return out


def values_file(tmp_path: Path, values: dict[str, Any]) -> str:
    path = tmp_path / f"values-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def operator_pods(cluster: Cluster, namespace: str, release: str) -> list[Any]:
    sel = f"app.kubernetes.io/instance={release},app.kubernetes.io/component=operator"
    return [p for p in cluster.core.list_namespaced_pod(namespace, label_selector=sel).items
            if not p.metadata.deletion_timestamp]  # fmt: skip


def ready(pod: Any) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])


def pod_log(pod: Any) -> str:
    path = STATE / "pods" / f"{pod.metadata.namespace}_{pod.metadata.name}_operator.log"
    return path.read_text(errors="replace") if path.exists() else ""


def chat(cluster: Cluster, namespace: str) -> str:
    """One chat completion through the quickstart's router (its Service's ready endpoint)."""

    def router_ip() -> str | None:
        slices = cluster.discovery.list_namespaced_endpoint_slice(
            namespace, label_selector=f"kubernetes.io/service-name={QUICKSTART}"
        ).items
        ips = [a for s in slices for e in s.endpoints or [] if e.conditions and e.conditions.ready
               for a in e.addresses]  # fmt: skip
        return ips[0] if ips else None

    ip = wait_for(router_ip, "a ready router endpoint")
    body = json.dumps({"model": "Qwen/Qwen2.5-0.5B-Instruct", "max_tokens": 4,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()  # fmt: skip
    req = urllib.request.Request(
        f"http://{ip}:8080/v1/chat/completions", data=body, headers={"content-type": "application/json"}
    )
    with _NO_PROXY.open(req, timeout=60) as r:
        assert r.status == 200
        text: str = json.loads(r.read())["choices"][0]["message"]["content"]
    assert text
    return text


def engine_pod_uids(cluster: Cluster, namespace: str) -> set[str]:
    pods = cluster.core.list_namespaced_pod(namespace, label_selector=f"toposerve.io/deployment={QUICKSTART}")
    return {p.metadata.uid for p in pods.items if ready(p)}


def set_rules(cluster: Cluster, kind: str, namespace: str | None, name: str, drop: str) -> None:
    """Take the rule for resource ``drop`` out of a Role/ClusterRole (helm upgrade puts it back)."""
    args = ["get", kind.lower(), name, "-o", "json"] + (["-n", namespace] if namespace else [])
    role = json.loads(kubectl(cluster, *args).stdout)
    role["rules"] = [r for r in role["rules"] if drop not in r["resources"]]
    kubectl(cluster, "replace", "-f", "-", stdin=json.dumps(role))


@pytest.fixture
def release(cluster: Cluster, namespace: str) -> Iterator[str]:
    """A release name; whatever the test leaves installed (say, after a failure) is uninstalled."""
    name = f"ts-{uuid.uuid4().hex[:5]}"
    yield name
    helm(cluster, "uninstall", name, "-n", namespace, "--ignore-not-found", "--wait", check=False)


def test_helm_install_upgrade_uninstall(
    cluster: Cluster, namespace: str, release: str, tmp_path: Path
) -> None:
    full = f"{release}-toposerve"
    base = {"replicaCount": 1, "watchNamespaces": [namespace], "operatorConfig": {"autoEngine": "mock"}}

    # -- install: the operator runs as a pod under its ServiceAccount, Ready, holding the Lease.
    helm(cluster, "install", release, str(CHART), "-n", namespace, "-f", values_file(tmp_path, base),
         "--wait", "--timeout", "3m")  # fmt: skip
    assert cluster.extensions.read_custom_resource_definition("llmdeployments.toposerve.io")
    (pod,) = wait_for(lambda: [p for p in operator_pods(cluster, namespace, release) if ready(p)] or None,
                      "the operator pod to be Ready")  # fmt: skip
    assert pod.spec.service_account_name == full
    assert (pod.metadata.annotations or {}).get("toposerve.dev/runner-ready") == "true", "run by the runner"
    wait_for(lambda: "became leader" in pod_log(pod), "the operator pod to take the Lease")
    lease = json.loads(
        kubectl(cluster, "get", "lease", "toposerve-operator", "-n", namespace, "-o", "json").stdout
    )
    assert lease["spec"]["holderIdentity"]

    # -- the quickstart: Ready, status written by the in-cluster operator, answering via its router.
    manifest = yaml.safe_load((ROOT / "examples/quickstart.yaml").read_text())
    kubectl(cluster, "apply", "-n", namespace, "-f", "-", stdin=yaml.safe_dump(manifest))
    wait_condition(cluster, namespace, QUICKSTART, "Ready", "True", timeout=180)
    chat(cluster, namespace)
    serving = engine_pod_uids(cluster, namespace)

    # -- RBAC is real: without `patch llmdeployments/status` the operator's status write is a 403.
    set_rules(cluster, "Role", namespace, full, "llmdeployments/status")
    kubectl(cluster, "scale", "llmdeployment", QUICKSTART, "-n", namespace, "--replicas=3")
    wait_for(lambda: "403" in pod_log(pod) and "Forbidden" in pod_log(pod), "a 403 in the operator's log",
             timeout=60)  # fmt: skip
    assert get_llmd(cluster, namespace, QUICKSTART)["status"]["replicas"] == 2  # not written

    # -- upgrade with changed values: config, replicas, all namespaces (ClusterRole); the Role's
    #    rule comes back, the status catches up, the serving pods are untouched and answer.
    changed = {**base, "replicaCount": 2, "watchNamespaces": [],
               "operatorConfig": {"autoEngine": "mock", "hourlyPerGPU": {"L4": 0.5}}}  # fmt: skip
    helm(cluster, "upgrade", release, str(CHART), "-n", namespace, "-f", values_file(tmp_path, changed),
         "--wait", "--timeout", "4m")  # fmt: skip
    obj = wait_condition(cluster, namespace, QUICKSTART, "Ready", "True", timeout=180)
    assert obj["status"]["replicas"] == 3
    assert serving <= engine_pod_uids(cluster, namespace), "the upgrade restarted serving pods"
    chat(cluster, namespace)
    pods = wait_for(lambda: (ps := [p for p in operator_pods(cluster, namespace, release) if ready(p)])
                    and len(ps) == 2 and ps, "two Ready operator pods")  # fmt: skip
    assert pod.metadata.uid not in {p.metadata.uid for p in pods}, "a config change rolls the operator"
    # An upgraded pod takes the Lease (once the old holder's expires) and reconciles under the
    # ClusterRole of an all-namespaces install.
    wait_for(lambda: any("became leader" in pod_log(p) for p in pods), "an upgraded operator pod to lead",
             timeout=120)  # fmt: skip
    kubectl(cluster, "scale", "llmdeployment", QUICKSTART, "-n", namespace, "--replicas=2")
    obj = wait_condition(cluster, namespace, QUICKSTART, "Ready", "True", timeout=180)
    assert obj["status"]["replicas"] == 2
    roles = kubectl(cluster, "get", "role", "-n", namespace, "-l", f"app.kubernetes.io/instance={release}",
                    "-o", "name").stdout.split()  # fmt: skip
    assert roles == [f"role.rbac.authorization.k8s.io/{full}-leader-election"], "all namespaces: no Role"

    # -- uninstall: no operator object remains; the CRD and the LLMDeployment stay (and serve).
    helm(cluster, "uninstall", release, "-n", namespace, "--wait", "--timeout", "2m")
    sel = f"app.kubernetes.io/instance={release}"
    for kind in ("deployment", "serviceaccount", "configmap", "service", "poddisruptionbudget", "role",
                 "rolebinding"):  # fmt: skip
        left = kubectl(cluster, "get", kind, "-n", namespace, "-l", sel, "-o", "name").stdout.split()
        assert left == [], f"{kind} left behind: {left}"
    for kind in ("clusterrole", "clusterrolebinding"):
        assert kubectl(cluster, "get", kind, "-l", sel, "-o", "name").stdout.split() == []
    wait_for(lambda: not operator_pods(cluster, namespace, release), "the operator pods to go")
    assert cluster.extensions.read_custom_resource_definition("llmdeployments.toposerve.io")
    assert get_llmd(cluster, namespace, QUICKSTART)["spec"]["replicas"] == 2
    chat(cluster, namespace)
