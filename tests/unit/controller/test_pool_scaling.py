"""The reconcile shell spreads spec.replicas over pools in tier order: room from the inventory,
status.pools shows the order, and an Event names the pools that changed."""

from __future__ import annotations

import copy
from typing import Any

from toposerve.api.config import OperatorConfig
from toposerve.controller.reconcile import Context, reconcile

L70 = "meta-llama/Llama-3.1-70B-Instruct"
AWQ = "hugging-quants/Meta-Llama-3.1-70B-Instruct-AWQ-INT4"


def node(name: str, product: str, count: int) -> dict[str, Any]:
    labels = {
        "kubernetes.io/hostname": name,
        "nvidia.com/gpu.product": product,
        "nvidia.com/gpu.count": str(count),
    }
    alloc = {
        "nvidia.com/gpu": str(count),
        "cpu": "192",
        "memory": "2000Gi",
        "ephemeral-storage": "4000Gi",
        "pods": "110",
    }
    return {"metadata": {"name": name, "labels": labels}, "spec": {}, "status": {"allocatable": alloc}}


class FakeKube:
    """Just enough of controller/kube.Kube: applied objects come back from list()."""

    def __init__(self, body: dict[str, Any], nodes: list[dict[str, Any]]) -> None:
        self.body, self.nodes = body, nodes
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.events: list[tuple[str, str, bool]] = []

    def get(self, api_version: str, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        return copy.deepcopy(self.body)

    def list(
        self,
        api_version: str,
        kind: str,
        namespace: str | None,
        selector: str | None = None,
        fields: str | None = None,
    ) -> list[dict[str, Any]]:
        if kind == "Node":
            return self.nodes
        return [copy.deepcopy(o) for (k, _), o in self.objects.items() if k == kind]

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        self.objects[(obj["kind"], obj["metadata"]["name"])] = copy.deepcopy(obj)
        return obj

    def delete(self, api_version: str, kind: str, namespace: str | None, name: str) -> None:
        self.objects.pop((kind, name), None)

    def patch_status(
        self, api_version: str, kind: str, ns: str, name: str, status: dict[str, Any]
    ) -> dict[str, Any]:
        self.body["status"] = {**self.body.get("status", {}), **status}
        return copy.deepcopy(self.body)

    def has_crd(self, name: str) -> bool:
        return False

    def event(self, involved: Any, reason: str, message: str, warning: bool = False) -> None:
        self.events.append((reason, message, warning))

    def workloads(self) -> dict[str, int]:
        return {
            o["metadata"]["labels"]["toposerve.io/pool"]: o["spec"]["replicas"]
            for (k, _), o in self.objects.items()
            if k == "Deployment" and "toposerve.io/pool" in o["metadata"].get("labels", {})
        }


def body(replicas: int, tier: str = "latency-critical") -> dict[str, Any]:
    return {
        "apiVersion": "toposerve.io/v1alpha1", "kind": "LLMDeployment",
        "metadata": {"name": "llm", "namespace": "ns", "uid": "u", "generation": 1},
        "spec": {
            "model": {"name": L70, "maxContextLength": 32768}, "engine": "vllm", "replicas": replicas,
            "routing": {"enabled": False}, "placement": {"tier": tier},
            "autoscaling": {"enabled": True, "maxReplicas": 8},
            "pools": [
                {"name": "h100", "gpuTypes": ["H100"]},
                {"name": "a100", "gpuTypes": ["A100-40GB"], "dtype": "int4", "checkpoint": AWQ},
            ],
        },
    }  # fmt: skip


def test_replicas_fill_the_fastest_pool_up_to_its_room_and_events_name_the_pools() -> None:
    # one 8-GPU H100 node: room for 2 replicas of TP 4; A100-40GB nodes hold the int4 pool (TP 2)
    nodes = [node("h", "NVIDIA-H100-80GB-HBM3", 8), node("a", "NVIDIA-A100-SXM4-40GB", 8)]
    kube = FakeKube(body(1), nodes)
    ctx = Context(kube=kube, config=OperatorConfig())  # type: ignore[arg-type]
    reconcile(ctx, "ns", "llm")
    assert kube.workloads() == {"h100": 1, "a100": 0}
    assert not [e for e in kube.events if e[0] == "PoolsScaled"]  # creation is no scale
    pools = {p["name"]: p for p in kube.body["status"]["pools"]}
    assert kube.body["status"]["poolOrder"] == "tier"
    assert (pools["h100"]["order"], pools["a100"]["order"]) == (1, 2)
    assert pools["h100"]["room"] == 2 and pools["a100"]["room"] == 4
    assert pools["h100"]["decodeStepMs"] < pools["a100"]["decodeStepMs"]

    kube.body["spec"]["replicas"] = 4  # the autoscaler's scale: room for one more on H100, then A100
    reconcile(ctx, "ns", "llm")
    assert kube.workloads() == {"h100": 2, "a100": 2}
    (ev,) = [e for e in kube.events if e[0] == "PoolsScaled"]
    assert "pool h100 1 -> 2, pool a100 0 -> 2" in ev[1] and "fastest first: h100, a100" in ev[1]

    kube.body["spec"]["replicas"] = 3  # shrink: from the end of the order
    reconcile(ctx, "ns", "llm")
    assert kube.workloads() == {"h100": 2, "a100": 1}
    assert kube.events[-1][0] == "PoolsScaled" and "pool a100 2 -> 1" in kube.events[-1][1]
    assert "h100" not in kube.events[-1][1].split(":")[-1]

    kube.body["spec"]["replicas"] = 3  # nothing changed: no Event
    n = len(kube.events)
    reconcile(ctx, "ns", "llm")
    assert len(kube.events) == n


def test_without_autoscaling_the_weight_split_stays() -> None:
    b = body(4)
    b["spec"]["autoscaling"] = {"enabled": False}
    nodes = [node("h", "NVIDIA-H100-80GB-HBM3", 8), node("a", "NVIDIA-A100-SXM4-40GB", 8)]
    kube = FakeKube(b, nodes)
    reconcile(Context(kube=kube, config=OperatorConfig()), "ns", "llm")  # type: ignore[arg-type]
    assert kube.workloads() == {"h100": 2, "a100": 2}
    assert kube.body["status"]["poolOrder"] == "weight"
    assert all("order" not in p for p in kube.body["status"]["pools"])


def test_the_event_counts_warm_standby_in_the_pools() -> None:
    b = body(1)
    b["spec"]["autoscaling"]["warmStandby"] = 1
    kube = FakeKube(b, [node("h", "NVIDIA-H100-80GB-HBM3", 8), node("a", "NVIDIA-A100-SXM4-40GB", 8)])
    ctx = Context(kube=kube, config=OperatorConfig())  # type: ignore[arg-type]
    reconcile(ctx, "ns", "llm")
    assert kube.workloads() == {"h100": 2, "a100": 0}
    kube.body["spec"]["replicas"] = 2
    reconcile(ctx, "ns", "llm")
    assert kube.workloads() == {"h100": 2, "a100": 1}  # the H100 node is full: the standby on A100
    assert kube.events[-1][0] == "PoolsScaled"
    assert kube.events[-1][1].startswith("spec.replicas 2 (+1 warm standby) over pools by tier order")


def engine_pod(
    name: str, pool: str, gpu: str, component: str = "engine", node: str | None = "h"
) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "ns", "uid": name,
                     "labels": {"toposerve.io/deployment": "llm", "toposerve.io/pool": pool,
                                "toposerve.io/gpu-type": gpu, "app.kubernetes.io/component": component}},
        "spec": {"nodeName": node, "containers": [{"name": "engine", "resources": {
            "requests": {"nvidia.com/gpu": "4"}, "limits": {"nvidia.com/gpu": "4"}}}]},
        "status": {"phase": "Running" if node else "Pending"},
    }  # fmt: skip


def test_room_counts_bound_serving_and_standby_pods_not_pending_ones() -> None:
    from toposerve.controller.observe import bound_replicas

    pods = [
        engine_pod("a", "h100", "H100"),
        engine_pod("b", "h100", "H100", component="standby"),
        engine_pod("c", "h100", "H100", node=None),
        engine_pod("d", "h100", "H100", component="router"),
    ]
    gone = engine_pod("e", "h100", "H100")
    gone["metadata"]["deletionTimestamp"] = "2026-12-01T00:00:00Z"
    assert bound_replicas([*pods, gone]) == {("h100", "H100"): 2}
    # In the reconcile: the H100 node's 8 GPUs are held by one serving and one standby pod, so the
    # pool's room is those 2 (no free GPU left); the A100-40GB node is free (4 replicas of TP 2).
    b = body(1)
    b["spec"]["autoscaling"]["warmStandby"] = 1
    kube = FakeKube(b, [node("h", "NVIDIA-H100-80GB-HBM3", 8), node("a", "NVIDIA-A100-SXM4-40GB", 8)])
    kube.objects[("Pod", "a")] = pods[0]
    kube.objects[("Pod", "b")] = pods[1]
    reconcile(Context(kube=kube, config=OperatorConfig()), "ns", "llm")  # type: ignore[arg-type]
    rooms = {p["name"]: p.get("room") for p in kube.body["status"]["pools"]}
    assert rooms == {"h100": 2, "a100": 4}
