"""The reconcile shell and what the API server serves: its version (a spec needing a newer one is
refused with a condition and an Event, and nothing is applied or pruned) and the Prometheus
Operator's PodMonitor kind (found by API discovery: monitors rendered, or not, or pruned). The API
server is faked at the client boundary; tests/cluster/test_monitoring.py runs the real one."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from toposerve.api.config import OperatorConfig
from toposerve.controller.reconcile import Context, reconcile

L70 = "meta-llama/Llama-3.1-70B-Instruct"
IMAGE = "registry.example/weights/llama-70b:v1"


def node(name: str) -> dict[str, Any]:
    labels = {"kubernetes.io/hostname": name, "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",
              "nvidia.com/gpu.count": "8"}  # fmt: skip
    alloc = {
        "nvidia.com/gpu": "8",
        "cpu": "192",
        "memory": "2000Gi",
        "ephemeral-storage": "4000Gi",
        "pods": "110",
    }
    return {"metadata": {"name": name, "labels": labels}, "spec": {}, "status": {"allocatable": alloc}}


class FakeKube:
    """Just enough of controller/kube.Kube, with a server version and API discovery."""

    def __init__(self, body: dict[str, Any], version: str = "v1.35.4", monitors: bool = False) -> None:
        self.body = body
        self.version = version
        self.monitors = monitors
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.events: list[tuple[str, str, bool]] = []
        self.applied: list[tuple[str, str]] = []
        self.deleted: list[tuple[str, str]] = []

    def get(self, api_version: str, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        return copy.deepcopy(self.body)

    def list(self, api_version: str, kind: str, namespace: str | None, selector: str | None = None,
             fields: str | None = None) -> list[dict[str, Any]]:  # fmt: skip
        if kind == "Node":
            return [node("h1"), node("h2")]
        if kind == "PodMonitor" and not self.monitors:
            return []  # not served: Kube.list answers 404 with []
        return [copy.deepcopy(o) for (k, _), o in self.objects.items() if k == kind]

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        if obj["kind"] == "PodMonitor" and not self.monitors:
            raise ApiException(status=404, reason="Not Found")
        key = (obj["kind"], obj["metadata"]["name"])
        self.objects[key] = copy.deepcopy(obj)
        self.applied.append(key)
        return obj

    def delete(self, api_version: str, kind: str, namespace: str | None, name: str) -> None:
        self.objects.pop((kind, name), None)
        self.deleted.append((kind, name))

    def patch_status(
        self, api_version: str, kind: str, ns: str, name: str, status: dict[str, Any]
    ) -> dict[str, Any]:
        self.body["status"] = {**self.body.get("status", {}), **status}
        return copy.deepcopy(self.body)

    def has_crd(self, name: str) -> bool:
        return False

    def serves(self, api_version: str, plural: str) -> bool:
        return self.monitors and (api_version, plural) == ("monitoring.coreos.com/v1", "podmonitors")

    def server_version(self) -> dict[str, Any]:
        minor = self.version.split(".")[1]
        return {"major": "1", "minor": f"{minor}+", "gitVersion": self.version}

    def event(self, involved: Any, reason: str, message: str, warning: bool = False) -> None:
        self.events.append((reason, message, warning))


def body(cache: dict[str, Any] | None = None, routing: bool = True) -> dict[str, Any]:
    model: dict[str, Any] = {"name": L70, "maxContextLength": 8192}
    if cache:
        model["cache"] = cache
    return {
        "apiVersion": "toposerve.io/v1alpha1", "kind": "LLMDeployment",
        "metadata": {"name": "llm", "namespace": "ns", "uid": "u", "generation": 1},
        "spec": {"model": model, "engine": "vllm", "replicas": 1, "routing": {"enabled": routing},
                 "placement": {"gpuTypes": ["H100"]}},
    }  # fmt: skip


def conditions(kube: FakeKube) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in kube.body["status"]["conditions"]}


def test_an_image_cache_on_a_1_33_server_is_refused_and_nothing_is_touched() -> None:
    # Serving on a 1.35 cluster first: the spec without an image cache.
    kube = FakeKube(body(), version="v1.35.4")
    reconcile(Context(kube=kube, config=OperatorConfig()), "ns", "llm")  # type: ignore[arg-type]
    before = copy.deepcopy(kube.objects)
    assert ("Service", "llm-engine") in before
    # The control plane is v1.33 (say an EKS cluster); the user switches to an image cache.
    kube.version = "v1.33.2-eks-abc"
    kube.body["spec"]["model"]["cache"] = {"type": "image", "image": IMAGE}
    kube.body["metadata"]["generation"] = 2
    kube.applied.clear()
    ctx = Context(kube=kube, config=OperatorConfig())  # type: ignore[arg-type]  # a restarted operator
    reconcile(ctx, "ns", "llm")
    msg = (
        "spec.model.cache.type: image needs Kubernetes >= 1.35 (ImageVolume beta, on by default); "
        "the API server is v1.33.2-eks-abc"
    )
    c = conditions(kube)
    assert (c["Ready"]["status"], c["Ready"]["reason"], c["Ready"]["message"]) == (
        "False",
        "KubernetesVersionTooOld",
        msg,
    )
    assert c["Ready"]["observedGeneration"] == 2
    assert (
        c["Progressing"]["reason"] == "KubernetesVersionTooOld"
        and "nothing was applied" in c["Progressing"]["message"]
    )
    assert c["Degraded"]["status"] == "True"
    assert kube.events == [("KubernetesVersionTooOld", msg, True)]
    # nothing applied, nothing pruned: what served keeps serving
    assert kube.applied == [] and kube.deleted == [] and kube.objects == before
    # said once: the next reconcile writes no second Event
    reconcile(ctx, "ns", "llm")
    assert len(kube.events) == 1 and kube.applied == []


def test_the_same_spec_on_a_1_35_server_is_applied() -> None:
    kube = FakeKube(body({"type": "image", "image": IMAGE}), version="v1.35.0")
    reconcile(Context(kube=kube, config=OperatorConfig()), "ns", "llm")  # type: ignore[arg-type]
    assert conditions(kube)["Ready"]["reason"] != "KubernetesVersionTooOld"
    (dep,) = [
        o
        for (k, _), o in kube.objects.items()
        if k == "Deployment" and "engine" in str(o["metadata"]["labels"])
    ]
    volumes = dep["spec"]["template"]["spec"]["volumes"]
    assert {"reference": IMAGE, "pullPolicy": "IfNotPresent"} in [v.get("image") for v in volumes]


def test_a_cluster_that_enabled_the_gate_early_is_believed() -> None:
    kube = FakeKube(body({"type": "image", "image": IMAGE}), version="v1.33.2")
    config = OperatorConfig(enabled_feature_gates=["ImageVolume"])
    reconcile(Context(kube=kube, config=config), "ns", "llm")  # type: ignore[arg-type]
    assert conditions(kube)["Ready"]["reason"] != "KubernetesVersionTooOld"
    assert any(k == "Deployment" for k, _ in kube.applied)


def test_an_unreadable_version_refuses_nothing() -> None:
    kube = FakeKube(body({"type": "image", "image": IMAGE}), version="unknown")
    reconcile(Context(kube=kube, config=OperatorConfig()), "ns", "llm")  # type: ignore[arg-type]
    assert conditions(kube)["Ready"]["reason"] != "KubernetesVersionTooOld"
    assert kube.applied


def test_pod_monitors_follow_api_discovery() -> None:
    # no Prometheus Operator: no monitor attempted, nothing fails
    kube = FakeKube(body(), monitors=False)
    reconcile(Context(kube=kube, config=OperatorConfig()), "ns", "llm")  # type: ignore[arg-type]
    assert not [k for k in kube.applied if k[0] == "PodMonitor"]
    assert conditions(kube)["Progressing"]["reason"] != "ApplyFailed"
    # the CRDs arrive: the next reconcile (discovery is asked again) adds engine and router monitors
    kube.monitors = True
    reconcile(Context(kube=kube, config=OperatorConfig()), "ns", "llm")  # type: ignore[arg-type]
    assert {n for k, n in kube.applied if k == "PodMonitor"} == {"llm-engine", "llm-router"}
    # routing off: the router's monitor is pruned with the router
    kube.body["spec"]["routing"]["enabled"] = False
    reconcile(Context(kube=kube, config=OperatorConfig()), "ns", "llm")  # type: ignore[arg-type]
    assert ("PodMonitor", "llm-router") in kube.deleted and ("PodMonitor", "llm-engine") in kube.objects
    # prometheusOperator: off prunes ours
    reconcile(Context(kube=kube, config=OperatorConfig(prometheus_operator="off")), "ns", "llm")  # type: ignore[arg-type]
    assert not [k for k in kube.objects if k[0] == "PodMonitor"]


def test_prometheus_operator_on_without_the_crd_says_so() -> None:
    kube = FakeKube(body(), monitors=False)
    ctx = Context(kube=kube, config=OperatorConfig(prometheus_operator="on"))  # type: ignore[arg-type]
    with pytest.raises(ApiException):  # raised after the status is written: the worker retries
        reconcile(ctx, "ns", "llm")
    c = conditions(kube)["Progressing"]
    assert c["reason"] == "ApplyFailed" and "PodMonitor llm-engine" in c["message"]


def test_version_and_discovery_are_asked_once_per_interval() -> None:
    calls: list[str] = []

    class Counting(FakeKube):
        def serves(self, api_version: str, plural: str) -> bool:
            calls.append("discovery")
            return super().serves(api_version, plural)

        def server_version(self) -> dict[str, Any]:
            calls.append("version")
            return super().server_version()

    kube = Counting(body())
    ctx = Context(kube=kube, config=OperatorConfig())  # type: ignore[arg-type]
    for _ in range(3):
        reconcile(ctx, "ns", "llm")
    assert sorted(calls) == ["discovery", "version"]
    assert ctx.server_version() == ((1, 35), "v1.35.4")
