"""Real fleets: every provider's GPU and spot labels, engine auto that never flips, on-demand node
pools, NVLink domains across nodes, quantization rules, machine-sized requests and topology keys.

Node fixtures use label values as each provider documents them (GFD README, GKE "About GPUs",
Karpenter well-known labels, AKS GPU docs), not values read back from the catalog.
"""

from __future__ import annotations

from typing import Any

import pytest

from toposerve.api.config import OperatorConfig
from toposerve.api.errors import SpecError
from toposerve.api.gpus import DEFAULT_CATALOG
from toposerve.planner.inventory import (
    PodShape,
    Usage,
    inventory_from_nodes,
    parse_quantity,
    pod_requests,
    recognise,
    usage_by_node,
)
from toposerve.planner.plan import plan_deployment
from toposerve.planner.resources import allocatable, serving_pod

from .conftest import make_spec

L8 = "meta-llama/Llama-3.1-8B-Instruct"
L70 = "meta-llama/Llama-3.1-70B-Instruct"
L405 = "meta-llama/Llama-3.1-405B-Instruct"
VLLM = OperatorConfig(auto_engine="detect")


def node(
    name: str,
    labels: dict[str, str],
    gpus: int = 0,
    cpu: str = "64",
    memory: str = "512Gi",
    taints: list[dict[str, str]] | None = None,
) -> dict[str, Any]:
    alloc = {"cpu": cpu, "memory": memory}
    if gpus:
        alloc["nvidia.com/gpu"] = str(gpus)
    return {
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, **labels}},
        "spec": {"taints": taints or []},
        "status": {"allocatable": alloc, "capacity": dict(alloc)},
    }


GKE_H100 = {
    "cloud.google.com/gke-accelerator": "nvidia-h100-80gb",
    "node.kubernetes.io/instance-type": "a3-highgpu-8g",
}
GKE_L4 = {
    "cloud.google.com/gke-accelerator": "nvidia-l4",
    "node.kubernetes.io/instance-type": "g2-standard-4",
}
KARPENTER_A100_40 = {
    "karpenter.k8s.aws/instance-gpu-name": "a100",
    "karpenter.k8s.aws/instance-gpu-count": "8",
    "karpenter.k8s.aws/instance-gpu-memory": "40960",
    "karpenter.sh/capacity-type": "on-demand",
}
KARPENTER_A100_80 = {**KARPENTER_A100_40, "karpenter.k8s.aws/instance-gpu-memory": "81920"}
AKS_H100 = {
    "node.kubernetes.io/instance-type": "Standard_ND96isr_H100_v5",
    "kubernetes.azure.com/accelerator": "nvidia",
}
EKS_MNG_L4 = {"node.kubernetes.io/instance-type": "g6.xlarge", "eks.amazonaws.com/capacityType": "SPOT"}
GFD_SHARED = {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB-SHARED", "nvidia.com/gpu.count": "8"}


@pytest.mark.parametrize(
    ("labels", "gpu", "scheme"),
    [
        (GKE_H100, "H100", "gke"),
        (GKE_L4, "L4", "gke"),
        (KARPENTER_A100_40, "A100-40GB", "karpenter"),
        (KARPENTER_A100_80, "A100-80GB", "karpenter"),
        (AKS_H100, "H100", "instance-type"),
        (EKS_MNG_L4, "L4", "instance-type"),
        (GFD_SHARED, "A100-80GB", "gfd"),
        ({"nvidia.com/gpu.product": "NVIDIA-GB200", "nvidia.com/gpu.clique": "c1.0"}, "GB200", "gfd"),
        ({"node.kubernetes.io/instance-type": "n2-standard-8"}, None, None),
        ({}, None, None),
    ],
)
def test_every_label_scheme_names_the_gpu(
    labels: dict[str, str], gpu: str | None, scheme: str | None
) -> None:
    found, which, _ = recognise(labels, DEFAULT_CATALOG)
    assert (found.name if found else None, which) == (gpu, scheme)


def test_spot_is_recognised_from_every_providers_label() -> None:
    spot_labels = [
        {"karpenter.sh/capacity-type": "spot"},
        {"cloud.google.com/gke-spot": "true"},
        {"cloud.google.com/gke-preemptible": "true"},
        {"eks.amazonaws.com/capacityType": "SPOT"},
        {"kubernetes.azure.com/scalesetpriority": "spot"},
    ]
    inv = inventory_from_nodes(
        [node(f"n{i}", {**GKE_L4, **sl}, 1) for i, sl in enumerate(spot_labels)], DEFAULT_CATALOG
    )
    assert all(n.spot for n in inv.nodes)
    on_demand = inventory_from_nodes(
        [node("o", {**GKE_L4, "karpenter.sh/capacity-type": "on-demand"}, 1)], DEFAULT_CATALOG
    )
    assert not on_demand.nodes[0].spot


def test_a_gpu_node_whose_device_plugin_restarts_is_still_a_gpu_node() -> None:
    n = node("h", GKE_H100, 0)  # allocatable nvidia.com/gpu missing for a while
    inv = inventory_from_nodes([n], DEFAULT_CATALOG)
    assert inv.has_gpus and inv.nodes[0].gpu_type == "H100" and inv.free_gpus("H100") == 0


def test_engine_auto_on_gke_and_karpenter_inventories_is_vllm() -> None:
    for labels in (GKE_H100, KARPENTER_A100_80, AKS_H100):
        inv = inventory_from_nodes([node("g", labels, 8)], DEFAULT_CATALOG)
        assert plan_deployment("x", make_spec(L70, 8192), VLLM, inv).engine == "vllm"


def test_engine_auto_is_resolved_once_and_never_flips_to_mock() -> None:
    cpu_only = inventory_from_nodes([node("c", {})], DEFAULT_CATALOG)
    spec = make_spec(L70, 8192, ["H100"])
    assert plan_deployment("x", spec, VLLM, cpu_only).engine == "mock"
    # GPU pools scaled to zero: the recorded vLLM decision stands.
    d = plan_deployment("x", spec, VLLM, cpu_only, recorded_engine="vllm")
    assert d.engine == "vllm" and "earlier" in d.engine_reason
    # Only an explicit spec.engine switches.
    assert (
        plan_deployment(
            "x", make_spec(L70, 8192, ["H100"], engine="mock"), VLLM, cpu_only, recorded_engine="vllm"
        ).engine
        == "mock"
    )


def test_on_demand_provisioning_keeps_types_without_nodes_in_the_plan() -> None:
    cpu_only = inventory_from_nodes([node("c", {})], DEFAULT_CATALOG)
    spec = make_spec(L70, 8192, ["H100", "A100-80GB"])
    on_demand = OperatorConfig(gpu_node_provisioning="on-demand")
    d = plan_deployment("x", spec, on_demand, cpu_only)
    assert d.engine == "vllm" and d.pools[0].gpu_type == "H100"  # a Pending pod asks the autoscaler
    static = plan_deployment("x", spec, VLLM, cpu_only, recorded_engine="vllm")
    assert not static.pools[0].fits and "no H100 nodes" in (static.pools[0].reason or "")


def test_tensor_parallel_spans_nodes_inside_a_gb200_nvlink_domain() -> None:
    rack = [
        node(f"gb{i}", {"nvidia.com/gpu.product": "NVIDIA-GB200", "nvidia.com/gpu.count": "4",
                        "nvidia.com/gpu.clique": "cluster-a.7"}, 4, cpu="140", memory="800Gi")
        for i in range(4)
    ]  # fmt: skip
    inv = inventory_from_nodes(rack, DEFAULT_CATALOG)
    p = plan_deployment("x", make_spec(L405, 131072, ["GB200"]), VLLM, inv).pools[0]
    assert p.fits, p.reason
    assert (p.tensor_parallel, p.pipeline_parallel, p.gpus_per_pod, p.nodes_per_replica) == (8, 1, 4, 2)
    assert p.nvlink_across_nodes and p.topology_key == "nvidia.com/gpu.clique"

    # The same nodes without a clique label: TP stays in the node, pipeline stages cross nodes.
    def without_clique(zone: dict[str, str]) -> list[dict[str, Any]]:
        out = []
        for n in rack:
            labels = {k: v for k, v in n["metadata"]["labels"].items() if k != "nvidia.com/gpu.clique"}
            out.append({**n, "metadata": {**n["metadata"], "labels": {**labels, **zone}}})
        return out

    inv = inventory_from_nodes(without_clique({"topology.kubernetes.io/zone": "z"}), DEFAULT_CATALOG)
    r = plan_deployment("x", make_spec(L405, 131072, ["GB200"]), VLLM, inv).pools[0]
    assert (r.tensor_parallel, r.pipeline_parallel, r.nvlink_across_nodes) == (4, 2, False)
    assert r.topology_key == "topology.kubernetes.io/zone"
    # No label groups the nodes at all: said plainly, not rendered to land anywhere.
    none = inventory_from_nodes(without_clique({}), DEFAULT_CATALOG)
    bare = plan_deployment("x", make_spec(L405, 131072, ["GB200"]), VLLM, none).pools[0]
    assert not bare.fits and "no topology label groups 2 GB200 nodes" in (bare.reason or "")


def test_topology_key_prefers_clique_then_rack_labels_then_zone() -> None:
    def hgx(name: str, extra: dict[str, str]) -> dict[str, Any]:
        base = {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3", "nvidia.com/gpu.count": "8"}
        return node(name, {**base, **extra}, 8)

    zone = {"topology.kubernetes.io/zone": "z1"}
    only_zone = inventory_from_nodes([hgx("a", zone), hgx("b", zone)], DEFAULT_CATALOG)
    p = plan_deployment("x", make_spec(L405, 131072, ["H100"]), VLLM, only_zone).pools[0]
    assert p.topology_key == "topology.kubernetes.io/zone" and p.fits
    block = {**zone, "cloud.google.com/gce-topology-block": "b7"}
    blocks = inventory_from_nodes([hgx("a", block), hgx("b", block)], DEFAULT_CATALOG)
    assert plan_deployment("x", make_spec(L405, 131072, ["H100"]), VLLM, blocks).pools[0].topology_key == (
        "cloud.google.com/gce-topology-block"
    )
    # Two blocks of one node each: a 2-node replica fits no block, so the zone is used.
    split = inventory_from_nodes(
        [hgx("a", {**zone, "cloud.google.com/gce-topology-block": "b1"}),
         hgx("b", {**zone, "cloud.google.com/gce-topology-block": "b2"})], DEFAULT_CATALOG,
    )  # fmt: skip
    assert plan_deployment("x", make_spec(L405, 131072, ["H100"]), VLLM, split).pools[0].topology_key == (
        "topology.kubernetes.io/zone"
    )
    # placement.fallbackTopologyKey is honoured.
    racks = {"example.com/rack": "r1"}
    inv = inventory_from_nodes([hgx("a", racks), hgx("b", racks)], DEFAULT_CATALOG)
    spec = make_spec(L405, 131072, ["H100"], placement={"fallbackTopologyKey": "example.com/rack"})
    assert plan_deployment("x", spec, VLLM, inv).pools[0].topology_key == "example.com/rack"


def test_int4_needs_a_checkpoint_awq_needs_a_quantized_build_and_methods_are_vllms() -> None:
    with pytest.raises(SpecError, match=r"spec.model.dtype: int4 needs a pre-quantized checkpoint"):
        plan_deployment("x", make_spec(L70, 8192, ["H100"], model={"dtype": "int4"}))
    with pytest.raises(SpecError, match=r"spec.model.quantization: awq loads pre-quantized weights"):
        plan_deployment("x", make_spec(L70, 8192, ["H100"], model={"dtype": "int4", "quantization": "awq"}))
    with pytest.raises(
        SpecError, match=r"spec.model.quantization: 'bitsandbytes' is not a quantization method"
    ):
        plan_deployment("x", make_spec(L70, 8192, ["H100"], model={"quantization": "bitsandbytes"}))
    ok = make_spec(L70, 8192, ["H100"], model={"dtype": "int4", "checkpoint": "org/Llama-3.1-70B-AWQ"})
    p = plan_deployment("x", ok).pools[0]
    assert p.vllm_args[0] == "org/Llama-3.1-70B-AWQ" and "--quantization" not in p.vllm_args
    int8 = plan_deployment("x", make_spec(L70, 8192, ["H100"], model={"dtype": "int8"})).pools[0]
    assert int8.vllm_args[int8.vllm_args.index("--quantization") + 1] == "int8_per_channel_weight_only"


def test_a_gpu_generation_without_the_kernels_is_passed_over() -> None:
    spec = make_spec(L8, 8192, ["A100-80GB", "H100"], model={"dtype": "fp8", "quantization": "modelopt",
                                                               "checkpoint": "nvidia/Llama-3.1-8B-FP8"})  # fmt: skip
    p = plan_deployment("x", spec).pools[0]
    assert p.gpu_type == "H100"
    assert "compute capability 8.9+" in p.alternatives[0].reason


def test_pods_fit_the_small_machines_of_their_gpu() -> None:
    # GKE g2-standard-4 (4 vCPU, 16 GB) and EKS g6.xlarge (4 vCPU, 16 GiB): ~3.92 CPU, ~13 GiB allocatable.
    res = serving_pod(DEFAULT_CATALOG.get("L4"), 1, 0.8, 8.0, 64.0)
    assert res.cpu <= 3.92 and res.memory_gib <= 13
    cpu, mem = allocatable(4, 16)
    assert 3.9 < cpu < 3.95 and 13 < mem < 13.5
    # Big machines are capped per GPU by the operator config.
    assert serving_pod(DEFAULT_CATALOG.get("H100"), 4, 0.8, 8.0, 64.0).cpu == 32


def test_plan_on_real_l4_machines_fits_and_too_small_machines_say_why() -> None:
    l4 = [node(f"l{i}", GKE_L4, 1, cpu="3920m", memory="13Gi", taints=[
        {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]) for i in range(2)]  # fmt: skip
    inv = inventory_from_nodes(l4, DEFAULT_CATALOG)
    p = plan_deployment("x", make_spec("Qwen/Qwen2.5-7B-Instruct", 8192, ["L4"]), VLLM, inv).pools[0]
    assert p.fits and p.cpu_per_pod <= 3.92 and p.memory_gib_per_pod <= 13
    assert inv.placeable_replicas("L4", 1, 1, False, {}, [{"key": "nvidia.com/gpu", "operator": "Exists"}],
                                  shape=PodShape(1, p.cpu_per_pod, p.memory_gib_per_pod * 1024**3)) == 2  # fmt: skip
    tiny = inventory_from_nodes([node("t", GKE_L4, 1, cpu="2", memory="6Gi")], DEFAULT_CATALOG)
    q = plan_deployment("x", make_spec("Qwen/Qwen2.5-7B-Instruct", 8192, ["L4"]), VLLM, tiny).pools[0]
    assert not q.fits and "allocates 2 CPU" in (q.reason or "") and "hostCPUPerGPU" in (q.reason or "")


def test_capacity_counts_cpu_and_memory_not_only_gpus() -> None:
    n = node(
        "h",
        {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3", "nvidia.com/gpu.count": "8"},
        8,
        cpu="40",
        memory="400Gi",
    )
    inv = inventory_from_nodes([n], DEFAULT_CATALOG, used={"h": Usage(gpus=0, cpu=30.0, memory=0)})
    # 8 free GPUs hold 4 two-GPU pods, but 10 free cores hold only one 8-core pod.
    assert inv.placeable_replicas("H100", 2, 1, False, shape=PodShape(2, 8.0, 0)) == 1
    assert inv.placeable_replicas("H100", 2, 1, False, shape=PodShape(2, 0.5, 0)) == 4


def test_quantities_and_pod_requests_follow_the_scheduler() -> None:
    assert (
        parse_quantity("500m") == 0.5
        and parse_quantity("16Gi") == 16 * 1024**3
        and parse_quantity("1G") == 1e9
    )
    with pytest.raises(ValueError):
        parse_quantity("lots")
    pod = {
        "spec": {
            "nodeName": "n",
            "containers": [{"resources": {"requests": {"cpu": "1", "memory": "1Gi", "nvidia.com/gpu": "2"}}},
                           {"resources": {"requests": {"cpu": "500m"}}}],
            "initContainers": [{"resources": {"requests": {"cpu": "4"}}}],
        },
        "status": {"phase": "Running"},
    }  # fmt: skip
    assert pod_requests(pod) == Usage(gpus=2, cpu=4.0, memory=1024**3)
    done = {**pod, "status": {"phase": "Succeeded"}}
    assert usage_by_node([pod, done]) == {"n": Usage(gpus=2, cpu=4.0, memory=1024**3)}
