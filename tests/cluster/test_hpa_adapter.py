"""hpa mode end to end: the real prometheus-adapter v0.12.0 (built from the Go module by
hack/prometheus-adapter/build.sh, started by hack/prometheus-adapter/up.sh with the rules in
hack/prometheus-adapter/config.yaml) serves the engines' vLLM series as the custom Pods metrics
the rendered HorizontalPodAutoscaler names, and kube-controller-manager's HPA controller scales an
LLMDeployment through its scale subresource. The chain is the production one: Prometheus scrapes
the mock engines, the adapter queries it when the API server's aggregator forwards the HPA
controller's reads of `custom.metrics.k8s.io`, and the HPA controller writes spec.replicas; the
operator's own builtin loop stays off. Windows are shortened through the spec; nothing is timed."""

from __future__ import annotations

import json
import subprocess
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.conftest import Cluster, kubectl, wait_for
from tests.cluster.operator_harness import Operator, apply, get_llmd, wait_condition
from tests.cluster.test_autoscale import Load, ips, manifest, scale_writers, scaling_operator, served
from tests.cluster.test_keda import workload_replicas

pytestmark = [pytest.mark.cluster, pytest.mark.hpa_adapter]
ROOT = Path(__file__).resolve().parents[2]
__all__ = ["scaling_operator"]  # the fixture, imported for its side effect on pytest's collection
# operatorConfig.hpaKVCacheMetric / hpaWaitingMetric defaults, the names the rules serve.
KV, WAITING = "vllm_kv_cache_usage_perc", "vllm_num_requests_waiting"


@pytest.fixture(scope="module")
def adapter(cluster: Cluster) -> Iterator[Cluster]:
    """prometheus-adapter running on the local cluster, stopped and unregistered afterwards (the
    cluster tests that run hpa mode without an adapter expect ScalingActive=False)."""
    subprocess.run(["bash", str(ROOT / "hack/prometheus-adapter/up.sh")], check=True)
    yield cluster
    subprocess.run(["bash", str(ROOT / "hack/prometheus-adapter/down.sh")], check=False)


def hpa(cluster: Cluster, namespace: str, name: str) -> dict[str, Any] | None:
    res = kubectl(cluster, "get", "hpa", name, "-n", namespace, "-o", "json", check=False)
    return json.loads(res.stdout) if res.returncode == 0 else None


def conditions(obj: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in ((obj or {}).get("status") or {}).get("conditions") or []}


def pods_metric(cluster: Cluster, namespace: str, metric: str, selector: str) -> dict[str, str]:
    """pod -> value (a quantity) of a Pods metric as the HPA controller reads it, through the
    API server's aggregator."""
    raw = kubectl(
        cluster, "get", "--raw",
        f"/apis/custom.metrics.k8s.io/v1beta1/namespaces/{namespace}/pods/*/{metric}"
        f"?labelSelector={urllib.parse.quote(selector)}", check=False,
    )  # fmt: skip
    if raw.returncode != 0:
        return {}
    out = json.loads(raw.stdout)
    assert out["kind"] == "MetricValueList", raw.stdout
    return {i["describedObject"]["name"]: i["value"] for i in out["items"]}


def hpa_events(cluster: Cluster, namespace: str, name: str) -> list[dict[str, Any]]:
    out = kubectl(cluster, "get", "events", "-n", namespace, "-o", "json", "--field-selector",
                  f"involvedObject.kind=HorizontalPodAutoscaler,involvedObject.name={name}")  # fmt: skip
    return list(json.loads(out.stdout)["items"])


def test_hpa_scales_on_kv_cache_through_prometheus_adapter(
    adapter: Cluster, namespace: str, scaling_operator: Operator
) -> None:
    cluster, name = adapter, "hpascale"
    m = manifest(name)
    a = m["spec"]["autoscaling"]
    a["mode"] = "hpa"
    # kube-controller-manager's HPA controller syncs every 15 s (its default): a scale-down window
    # of a couple of syncs keeps the way back short.
    a["scaleDown"]["stabilizationWindowSeconds"] = 30
    assert apply(cluster, namespace, m).returncode == 0
    wait_condition(cluster, namespace, name, "Ready", "True", timeout=180)

    # The HPA controller reads both Pods metrics through the adapter: ScalingActive=True.
    h = wait_for(
        lambda: (h := hpa(cluster, namespace, name)) and conditions(h).get("ScalingActive", {}).get("status") == "True" and h,
        "the HPA's ScalingActive=True (custom metrics served by prometheus-adapter)",
        timeout=180,
        every=2,
    )  # fmt: skip
    assert conditions(h)["ScalingActive"]["reason"] == "ValidMetricFound", conditions(h)
    assert h["spec"]["scaleTargetRef"]["kind"] == "LLMDeployment"
    assert {x["pods"]["metric"]["name"] for x in h["spec"]["metrics"]} == {KV, WAITING}
    # Both metrics answer through the API server's aggregator for exactly the engine pods of the
    # scale subresource's selector, one value each.
    selector = get_llmd(cluster, namespace, name)["status"]["selector"]
    engines = set(kubectl(cluster, "get", "pods", "-n", namespace, "-l", selector,
                          "-o", "jsonpath={.items[*].metadata.name}").stdout.split())  # fmt: skip
    assert len(engines) == 1, engines
    for metric in (KV, WAITING):
        values = wait_for(lambda m=metric: pods_metric(cluster, namespace, m, selector), f"{metric} values")
        assert set(values) == engines, (metric, values, engines)
    # The builtin loop is off for this deployment: it never writes status.autoscaling decisions.
    assert not ((get_llmd(cluster, namespace, name).get("status") or {}).get("autoscaling") or {}).get(
        "desiredReplicas"
    )

    router = wait_for(lambda: (r := ips(cluster, namespace, name)) and r[0], "a ready router")
    with Load(f"http://{router}:8080") as load:
        obj = wait_for(
            lambda: (o := get_llmd(cluster, namespace, name))["spec"]["replicas"] >= 2 and o,
            "spec.replicas raised by the HPA controller",
            timeout=300,
            every=1,
        )
        writers = scale_writers(obj)
        # Written through the scale subresource by kube-controller-manager (the HPA controller's
        # field manager), not by the operator.
        assert ("kube-controller-manager", "scale") in writers, writers
        assert ("toposerve-autoscaler", "scale") not in writers, writers
        h = hpa(cluster, namespace, name)
        assert h and h["status"]["desiredReplicas"] >= 2 and h["status"].get("lastScaleTime"), h
        assert conditions(h)["AbleToScale"]["status"] == "True", conditions(h)
        # The controller says why it rescaled: a Pods metric it read through the adapter, above
        # its target (kube-controller-manager's SuccessfulRescale Event).
        rescale = wait_for(
            lambda: [e["message"] for e in hpa_events(cluster, namespace, name) if e["reason"] == "SuccessfulRescale"],
            "the HPA controller's SuccessfulRescale Event",
            timeout=60,
        )  # fmt: skip
        assert any(f"pods metric {KV} above target" in msg or f"pods metric {WAITING} above target" in msg
                   for msg in rescale), rescale  # fmt: skip
        new = wait_for(
            lambda: (e := ips(cluster, namespace, f"{name}-engine")) and len(e) >= 2 and e,
            "two ready engines",
            timeout=180,
        )
        wait_for(lambda: all(served(ip) > 0 for ip in new), "traffic on every engine", timeout=120, every=1)
    assert load.ok > 0, (load.ok, load.failed)
    print(f"HPA rescale Events: {rescale}; spec.replicas writers: {writers}")
    wait_for(
        lambda: get_llmd(cluster, namespace, name)["spec"]["replicas"] == 1 or None,
        "spec.replicas back to minReplicas after the load (the HPA's scale-down window)",
        timeout=300,
        every=2,
    )
    wait_for(
        lambda: workload_replicas(cluster, namespace, name) == 1 or None,
        "the workloads following",
        timeout=60,
    )
