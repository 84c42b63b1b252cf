"""What the API server serves, on the real local cluster (kube-apiserver v1.35):

* the Prometheus Operator's CRDs (v0.89.0, the vendored copies in tests/unit/schemas): without them
  the operator attempts no PodMonitor and nothing fails; installed while it runs, its next
  reconciles add ``<name>-engine`` and ``<name>-router``, which the API server accepts unpruned and
  whose selectors, evaluated by the API server itself, pick exactly the running pods whose named
  port serves /metrics. The CRDs are removed again afterwards (when this test installed them).
* the version check: a 1.35 server accepts an ``image`` model cache (the refusal on older servers
  is tested at the client boundary, tests/unit/controller/test_server_capabilities.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.conftest import ROOT, Cluster, kubectl, wait_for
from tests.cluster.operator_harness import (
    Operator,
    apply,
    condition,
    running_operator,
    wait_condition,
)

pytestmark = pytest.mark.cluster

SCHEMAS = ROOT / "tests/unit/schemas"
CRDS = {
    plural: SCHEMAS / f"prometheus-operator-v0.89.0-{plural}.yaml"
    for plural in ("podmonitors", "servicemonitors")
}
QWEN = "Qwen/Qwen2.5-0.5B-Instruct"


def served(cluster: Cluster) -> bool:
    res = kubectl(cluster, "get", "--raw", "/apis/monitoring.coreos.com/v1", check=False)
    return res.returncode == 0 and any(
        r["name"] == "podmonitors" for r in json.loads(res.stdout)["resources"]
    )


def selector_string(sel: dict[str, Any]) -> str:
    """A metav1.LabelSelector as a label query, for the API server to evaluate."""
    parts = [f"{k}={v}" for k, v in (sel.get("matchLabels") or {}).items()]
    for e in sel.get("matchExpressions") or []:
        op = e["operator"]
        if op in ("In", "NotIn"):
            parts.append(f"{e['key']} {op.lower()} ({','.join(e['values'])})")
        else:
            parts.append(e["key"] if op == "Exists" else f"!{e['key']}")
    return ",".join(parts)


def pods(cluster: Cluster, namespace: str, selector: str) -> list[dict[str, Any]]:
    out = kubectl(cluster, "get", "pods", "-n", namespace, "-l", selector, "-o", "json")
    return [p for p in json.loads(out.stdout)["items"] if not p["metadata"].get("deletionTimestamp")]


def monitors(cluster: Cluster, namespace: str) -> dict[str, dict[str, Any]]:
    res = kubectl(
        cluster, "get", "podmonitors.monitoring.coreos.com", "-n", namespace, "-o", "json", check=False
    )
    if res.returncode != 0:
        return {}
    return {m["metadata"]["name"]: m for m in json.loads(res.stdout)["items"]}


@pytest.fixture
def scoped_operator(
    cluster: Cluster, namespace: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Operator]:
    """The operator watching only this test's namespace, resyncing every 5 s, logging unbuffered
    (the tests read its log while it runs)."""
    monkeypatch.setenv("PYTHONUNBUFFERED", "1")
    with running_operator(
        cluster,
        tmp_path,
        {"prometheusOperator": "auto", "gpuNodeProvisioning": "on-demand"},
        "-n",
        namespace,
        "--resync",
        "5",
    ) as op:
        yield op


def manifest(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "toposerve.io/v1alpha1",
        "kind": "LLMDeployment",
        "metadata": {"name": name},
        "spec": {"model": {"name": QWEN, "maxContextLength": 4096}, "engine": "mock", "replicas": 1,
                 "routing": {"enabled": True, "replicas": 1}, **spec},
    }  # fmt: skip


def test_pod_monitors_appear_with_the_crds_and_select_the_running_pods(
    cluster: Cluster, namespace: str, scoped_operator: Operator
) -> None:
    installed_here = False
    try:
        if served(cluster):
            print("the Prometheus Operator's CRDs were already installed: the without-CRDs half is skipped")
        name = "monitored"
        assert apply(cluster, namespace, manifest(name)).returncode == 0
        obj = wait_condition(cluster, namespace, name, "Ready", "True", timeout=180)
        if not served(cluster):
            # Without the CRDs: no monitor attempted, nothing failed.
            assert condition(obj, "Progressing")["reason"] != "ApplyFailed"  # type: ignore[index]
            log = Path(scoped_operator.log).read_text(errors="replace")
            assert "monitoring.coreos.com/v1 podmonitors served: False" in log  # Context.serves
            bad = [
                line
                for line in log.splitlines()
                if '"severity": "warning"' in line or '"severity": "error"' in line
            ]
            assert not bad, bad
            for plural, path in CRDS.items():
                kubectl(cluster, "apply", "--server-side", "-f", str(path))
                kubectl(cluster, "wait", "--for=condition=Established", f"crd/{plural}.monitoring.coreos.com",
                        "--timeout=60s")  # fmt: skip
            installed_here = True
        # The running operator finds the kind by API discovery (at most a minute old) and its resync
        # (5 s here) brings the monitors.
        got = wait_for(
            lambda: (
                m if set(m := monitors(cluster, namespace)) == {f"{name}-engine", f"{name}-router"} else None
            ),
            "the engine and router PodMonitors",
            timeout=180,
        )
        for component, port in (("engine", 8000), ("router", 8080)):
            m = got[f"{name}-{component}"]
            # Accepted as rendered: the schema pruned nothing we set.
            assert m["spec"]["podTargetLabels"][:2] == [
                "toposerve.io/deployment",
                "app.kubernetes.io/component",
            ]
            (ep,) = m["spec"]["podMetricsEndpoints"]
            assert (ep["port"], ep["path"], ep["interval"]) == ("http", "/metrics", "15s")
            assert m["metadata"]["ownerReferences"][0]["name"] == name

            # The API server evaluates the selector: it picks exactly this component's running pods.
            # (Asked until two queries agree: a rollout may replace a pod between them.)
            def agree(sel: dict[str, Any] = m["spec"]["selector"], c: str = component) -> list[Any] | None:
                picked = pods(cluster, namespace, selector_string(sel))
                expected = pods(
                    cluster, namespace, f"toposerve.io/deployment={name},app.kubernetes.io/component={c}"
                )
                names = {p["metadata"]["name"] for p in picked}
                return picked if picked and names == {p["metadata"]["name"] for p in expected} else None

            picked = wait_for(
                agree, f"the {component} PodMonitor's selector picks the {component} pods", timeout=120
            )
            for p in picked:
                assert p["status"]["phase"] == "Running"
                named = {
                    cp["name"]: cp["containerPort"]
                    for c in p["spec"]["containers"]
                    for cp in c.get("ports") or []
                }
                assert named[ep["port"]] == port, named
        # Routing off: the router's monitor goes with the router.
        m2 = manifest(name, routing={"enabled": False})
        assert apply(cluster, namespace, m2).returncode == 0
        wait_for(lambda: set(monitors(cluster, namespace)) == {f"{name}-engine"}, "the router's PodMonitor pruned",
                 timeout=120)  # fmt: skip
    finally:
        if installed_here:
            for plural in CRDS:
                kubectl(
                    cluster, "delete", "crd", f"{plural}.monitoring.coreos.com", "--wait=false", check=False
                )


def test_a_1_35_server_accepts_an_image_cache_spec(
    cluster: Cluster, namespace: str, scoped_operator: Operator
) -> None:
    version = json.loads(kubectl(cluster, "version", "-o", "json").stdout)["serverVersion"]
    if (int(version["major"]), int(version["minor"].rstrip("+"))) < (1, 35):
        pytest.skip(f"the local API server is {version['gitVersion']}, not >= 1.35")
    image = "registry.example/weights/qwen2.5-0.5b:v1"
    m = manifest("imagecache", engine="vllm", routing={"enabled": False},
                 model={"name": QWEN, "maxContextLength": 4096, "cache": {"type": "image", "image": image}},
                 placement={"gpuTypes": ["L4"]})  # fmt: skip
    assert apply(cluster, namespace, m).returncode == 0

    def engine_deployment() -> dict[str, Any] | None:
        out = kubectl(cluster, "get", "deployments", "-n", namespace, "-l",
                      "toposerve.io/deployment=imagecache,app.kubernetes.io/component!=router", "-o", "json")  # fmt: skip
        items = json.loads(out.stdout)["items"]
        return items[0] if items else None

    dep = wait_for(engine_deployment, "the engine Deployment of an image-cache spec", timeout=120)
    volumes = dep["spec"]["template"]["spec"]["volumes"]
    # kept by the API server (a server without ImageVolume drops the field from a new object)
    assert {"reference": image, "pullPolicy": "IfNotPresent"} in [v.get("image") for v in volumes]
    obj = json.loads(kubectl(cluster, "get", "llmd", "imagecache", "-n", namespace, "-o", "json").stdout)
    assert condition(obj, "Ready")["reason"] != "KubernetesVersionTooOld"  # type: ignore[index]
    assert f"API server version {version['gitVersion']}" in Path(scoped_operator.log).read_text(
        errors="replace"
    )
