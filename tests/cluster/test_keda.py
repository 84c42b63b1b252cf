"""keda mode end to end: the real KEDA v2.21.0 (operator + metrics adapter, built from the Go module
by hack/keda/build.sh and started by hack/keda/up.sh) scales an LLMDeployment through its rendered
ScaledObject. The chain is the production one: Prometheus scrapes the mock engines, KEDA's operator
queries it for the ScaledObject's triggers, KEDA's adapter serves them as external metrics through
the API server's aggregator, and kube-controller-manager's HPA controller (`keda-hpa-<name>`, made
by KEDA) writes spec.replicas through the LLMDeployment's scale subresource; the operator's own
builtin loop stays off. Scale from zero is KEDA's activation (0 <-> 1 is KEDA's, not the HPA's), woken
by the requests the router holds. Windows are shortened through the spec; nothing is timed."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.conftest import Cluster, kubectl, wait_for
from tests.cluster.operator_harness import Operator, apply, get_llmd, wait_condition
from tests.cluster.test_autoscale import (
    Load,
    held_chat,
    ips,
    manifest,
    scale_writers,
    scaling_operator,
    served,
)

pytestmark = [pytest.mark.cluster, pytest.mark.keda]
ROOT = Path(__file__).resolve().parents[2]
__all__ = ["scaling_operator"]  # the fixture, imported for its side effect on pytest's collection


@pytest.fixture(scope="module")
def keda(cluster: Cluster) -> Cluster:
    """KEDA running on the local cluster (a no-op when it already runs)."""
    subprocess.run(["bash", str(ROOT / "hack/keda/up.sh")], check=True)
    return cluster


def keda_manifest(name: str, ttft_slo: bool = False) -> dict[str, Any]:
    m = manifest(name)
    a = m["spec"]["autoscaling"]
    a["mode"] = "keda"
    if ttft_slo:  # a loose SLO: its trigger must be served, the KV cache is what scales here
        a["ttftSLO"] = {"seconds": 30}
    # KEDA polls Prometheus every pollingInterval (= syncPeriodSeconds); the HPA controller syncs
    # every 15 s (kube-controller-manager's default), so the windows stay short but not below that.
    a["syncPeriodSeconds"] = 5
    a["scaleDown"]["stabilizationWindowSeconds"] = 30
    return m


def scaled_object(cluster: Cluster, namespace: str, name: str) -> dict[str, Any] | None:
    res = kubectl(cluster, "get", "scaledobjects.keda.sh", name, "-n", namespace, "-o", "json", check=False)
    return json.loads(res.stdout) if res.returncode == 0 else None


def conditions(obj: dict[str, Any] | None) -> dict[str, str]:
    return {c["type"]: c["status"] for c in ((obj or {}).get("status") or {}).get("conditions") or []}


def keda_hpa(cluster: Cluster, namespace: str, name: str) -> dict[str, Any] | None:
    res = kubectl(cluster, "get", "hpa", f"keda-hpa-{name}", "-n", namespace, "-o", "json", check=False)
    return json.loads(res.stdout) if res.returncode == 0 else None


def workload_replicas(cluster: Cluster, namespace: str, name: str) -> int:
    out = kubectl(cluster, "get", "deployments", "-n", namespace, "-l",
                  f"toposerve.io/deployment={name},app.kubernetes.io/component!=router", "-o", "json")  # fmt: skip
    return sum(d["spec"]["replicas"] for d in json.loads(out.stdout)["items"])


def test_keda_scales_on_kv_cache_through_the_external_metrics_api(
    keda: Cluster, namespace: str, scaling_operator: Operator
) -> None:
    cluster, name = keda, "kedascale"
    assert apply(cluster, namespace, keda_manifest(name, ttft_slo=True)).returncode == 0
    wait_condition(cluster, namespace, name, "Ready", "True", timeout=180)
    # KEDA took the ScaledObject: Ready, and its HPA reads the external metrics the adapter serves.
    so = wait_for(
        lambda: (o := scaled_object(cluster, namespace, name)) and conditions(o).get("Ready") == "True" and o,
        "KEDA marking the ScaledObject Ready",
        timeout=120,
    )
    assert so["status"]["scaleTargetKind"] == "toposerve.io/v1alpha1.LLMDeployment", so["status"]
    hpa = wait_for(
        lambda: (
            (h := keda_hpa(cluster, namespace, name)) and conditions(h).get("ScalingActive") == "True" and h
        ),
        "KEDA's HPA with ScalingActive=True (external metrics served through the aggregator)",
        timeout=180,
        every=2,
    )
    assert hpa["spec"]["scaleTargetRef"]["kind"] == "LLMDeployment"
    metrics = {m["external"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "External"}
    # s0-kv-cache, s1-waiting-requests, s2-ttft (the TTFT SLO's trigger)
    assert len(metrics) == 3 and all(m.startswith("s") for m in metrics), metrics
    # The external metrics API answers for every trigger through the aggregator, as the HPA
    # controller asks it (a PromQL KEDA's Prometheus scaler rejects would fail here).
    for metric in sorted(metrics):
        raw = kubectl(
            cluster, "get", "--raw",
            f"/apis/external.metrics.k8s.io/v1beta1/namespaces/{namespace}/{metric}"
            f"?labelSelector=scaledobject.keda.sh%2Fname%3D{name}",
        )  # fmt: skip
        items = json.loads(raw.stdout)
        assert items["kind"] == "ExternalMetricValueList" and items["items"], (metric, raw.stdout)
    # The builtin loop is off for this deployment: it never writes status.autoscaling decisions.
    assert (
        not (get_llmd(cluster, namespace, name).get("status") or {})
        .get("autoscaling", {})
        .get("desiredReplicas")
    )

    router = wait_for(lambda: (r := ips(cluster, namespace, name)) and r[0], "a ready router")
    with Load(f"http://{router}:8080") as load:

        def scaled_up() -> dict[str, Any] | None:
            obj = get_llmd(cluster, namespace, name)
            return obj if obj["spec"]["replicas"] >= 2 else None

        obj = wait_for(scaled_up, "spec.replicas raised by KEDA's HPA", timeout=300, every=1)
        writers = scale_writers(obj)
        # Written through the scale subresource by the HPA controller, not by the operator.
        assert any(sub == "scale" and mgr != "toposerve-autoscaler" for mgr, sub in writers), writers
        assert ("toposerve-autoscaler", "scale") not in writers, writers
        engines = wait_for(
            lambda: (e := ips(cluster, namespace, f"{name}-engine")) and len(e) >= 2 and e,
            "two ready engines",
            timeout=180,
        )
        wait_for(
            lambda: all(served(ip) > 0 for ip in engines), "traffic on every engine", timeout=120, every=1
        )
    assert load.ok > 0, (load.ok, load.failed)
    wait_for(
        lambda: get_llmd(cluster, namespace, name)["spec"]["replicas"] == 1 or None,
        "spec.replicas back to minReplicas after the load (KEDA's HPA, scale-down window)",
        timeout=300,
        every=2,
    )
    wait_for(
        lambda: workload_replicas(cluster, namespace, name) == 1 or None,
        "the workloads following",
        timeout=60,
    )


def test_keda_scales_from_zero_on_a_held_request_and_back_to_zero(
    keda: Cluster, namespace: str, scaling_operator: Operator
) -> None:
    """minReplicas 0: KEDA deactivates the deployment to zero when no trigger is active, the router
    holds the first request, the held-requests gauge (in the waiting-requests trigger) activates it,
    KEDA scales 0 -> 1, and the held request is answered by the new replica."""
    cluster, name = keda, "kedazero"
    m = keda_manifest(name)
    a = m["spec"]["autoscaling"]
    a.update({"minReplicas": 0, "maxReplicas": 1, "startupGraceSeconds": 120})
    a["scaleDown"]["stabilizationWindowSeconds"] = 15  # KEDA's cooldownPeriod
    assert apply(cluster, namespace, m).returncode == 0
    wait_condition(cluster, namespace, name, "Ready", "True", timeout=180)
    # No load: KEDA deactivates (1 -> 0) after its cooldown; the writer is KEDA itself.
    obj = wait_for(
        lambda: (o := get_llmd(cluster, namespace, name))["spec"]["replicas"] == 0 and o,
        "KEDA scaling the idle deployment to zero",
        timeout=240,
        every=2,
    )
    # KEDA wrote the 0 through the scale subresource (autoscaling/v1 Scale's spec.replicas is
    # omitempty, so that write leaves no managedFields owner): the proof that it was KEDA is its
    # ScaledObject reporting every trigger inactive, and that the builtin loop did not write.
    assert ("toposerve-autoscaler", "scale") not in scale_writers(obj), scale_writers(obj)
    wait_for(
        lambda: conditions(scaled_object(cluster, namespace, name)).get("Active") == "False" or None,
        "KEDA's ScaledObject Active=False at zero",
        timeout=60,
    )
    wait_for(
        lambda: not ips(cluster, namespace, f"{name}-engine") or None,
        "no engine endpoints at zero",
        timeout=120,
    )
    router = wait_for(lambda: (r := ips(cluster, namespace, name)) and r[0], "a ready router", timeout=120)
    held_chat(router, timeout=200)  # held by the router until KEDA activates a replica
    obj = get_llmd(cluster, namespace, name)
    assert obj["spec"]["replicas"] == 1
    # KEDA's writes of 0 and 1 through a custom resource's scale subresource leave no managedFields
    # owner of their own (seen with v2.21.0 on Kubernetes 1.35: the 0 is omitted from the Scale,
    # the 1 stays with the manifest's applier), so KEDA's part is read from the ScaledObject it
    # marks Active, and the builtin loop's absence from its write and its status record.
    assert ("toposerve-autoscaler", "scale") not in scale_writers(obj), scale_writers(obj)
    assert not ((obj.get("status") or {}).get("autoscaling") or {}).get("desiredReplicas"), obj.get("status")
    so = wait_for(
        lambda: (
            (o := scaled_object(cluster, namespace, name)) and conditions(o).get("Active") == "True" and o
        ),
        "KEDA's ScaledObject Active=True after the held request",
        timeout=60,
    )
    assert so["status"].get("lastActiveTime"), so["status"]
