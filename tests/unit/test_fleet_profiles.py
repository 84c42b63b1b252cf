"""The shapes of the simulated fleets: each profile must look like the provider it imitates.

These tests read only the generated Node objects, never the operator's label recognition, so a
profile that drifts towards the operator's assumptions (GFD labels everywhere, cliques on every
node, room for any request) fails here.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pytest
import yaml

from toposerve.dev import fleet
from toposerve.dev.placeable import parse_quantity

ROOT = Path(__file__).resolve().parents[2]
FLEET = fleet.load(ROOT / "hack" / "cluster" / "fleet.yaml")
PROFILES = sorted(FLEET["profiles"])
# eks-zero: a GPU pool at zero nodes (CPU nodes only until a provisioner acts; dev/provisioner.py)
GPU_PROFILES = [p for p in PROFILES if p not in ("nogpu", "eks-zero")]
GFD_PREFIX = "nvidia.com/gpu."
# The label each provider puts on spot nodes (DESIGN.md "Real fleets label GPUs differently").
SPOT_LABELS = {
    "gke": ("cloud.google.com/gke-spot", "true"),
    "eks": None,  # karpenter.sh/capacity-type=spot or eks.amazonaws.com/capacityType=SPOT, below
    "gpu": (fleet.CAPACITY_TYPE_LABEL, "spot"),
}


def nodes(profile: str) -> list[dict[str, Any]]:
    return fleet.nodes(FLEET, profile)


def labels(n: dict[str, Any]) -> dict[str, str]:
    out: dict[str, str] = n["metadata"]["labels"]
    return out


def gpus(n: dict[str, Any]) -> int:
    return int(n["status"]["capacity"].get("nvidia.com/gpu", "0"))


def test_every_profile_is_named() -> None:
    assert set(PROFILES) == {"gpu", "nogpu", "gke", "eks", "onprem", "gb200", "eks-zero"}


@pytest.mark.parametrize("profile", PROFILES)
def test_nodes_are_well_formed(profile: str) -> None:
    ns = nodes(profile)
    names = [n["metadata"]["name"] for n in ns]
    assert len(set(names)) == len(names)
    cidrs = [ipaddress.ip_network(n["spec"]["podCIDR"]) for n in ns]
    assert len(set(cidrs)) == len(cidrs) and all(c.prefixlen == 24 for c in cidrs)
    for n in ns:
        assert n["metadata"]["annotations"]["kwok.x-k8s.io/node"] == "fake"
        assert labels(n)["kubernetes.io/hostname"] == n["metadata"]["name"]
        assert all(isinstance(v, str) for v in labels(n).values())


@pytest.mark.parametrize("profile", PROFILES)
def test_allocatable_is_below_capacity(profile: str) -> None:
    for n in nodes(profile):
        cap, alloc = n["status"]["capacity"], n["status"]["allocatable"]
        for res in ("cpu", "memory"):
            assert parse_quantity(alloc[res]) < parse_quantity(cap[res]), (n["metadata"]["name"], res)
        for res, q in alloc.items():
            assert parse_quantity(q) <= parse_quantity(cap[res])
        assert alloc.get("nvidia.com/gpu") == cap.get("nvidia.com/gpu")


@pytest.mark.parametrize("profile", PROFILES)
def test_every_profile_keeps_cpu_only_nodes(profile: str) -> None:
    cpu_only = [n for n in nodes(profile) if gpus(n) == 0]
    assert len(cpu_only) >= 2
    for n in cpu_only:
        assert not any(k.startswith("nvidia.com/") for k in labels(n))
        assert not n["spec"].get("taints")


@pytest.mark.parametrize("profile", GPU_PROFILES)
def test_gpu_profiles_have_gpu_nodes(profile: str) -> None:
    assert any(gpus(n) for n in nodes(profile))


def test_small_machines_are_small() -> None:
    """A 1-GPU L4 machine has 4 vCPU and ~13-14 GiB allocatable (DESIGN.md), on GKE and EKS alike."""
    for profile, itype in (("gke", "g2-standard-4"), ("eks", "g6.xlarge")):
        (n, *_) = [n for n in nodes(profile) if labels(n).get("node.kubernetes.io/instance-type") == itype]
        alloc = n["status"]["allocatable"]
        assert parse_quantity(alloc["cpu"]) < 4
        assert 13 * 2**30 < parse_quantity(alloc["memory"]) < 14 * 2**30
        assert gpus(n) == 1


def test_gke_has_no_gfd_labels_but_gke_ones_and_the_gpu_taint() -> None:
    gpu_nodes = [n for n in nodes("gke") if gpus(n)]
    assert {labels(n)["cloud.google.com/gke-accelerator"] for n in gpu_nodes} >= {
        "nvidia-l4", "nvidia-h100-80gb", "nvidia-a100-80gb", "nvidia-tesla-a100"}  # fmt: skip
    for n in nodes("gke"):
        assert not any(k.startswith(GFD_PREFIX) for k in labels(n))
        assert labels(n)["cloud.google.com/gke-nodepool"]
        assert labels(n)["node.kubernetes.io/instance-type"]
        assert labels(n)["topology.kubernetes.io/region"] == "us-central1"
    for n in gpu_nodes:
        assert {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"} in n["spec"]["taints"]
    a3 = [n for n in gpu_nodes if labels(n)["node.kubernetes.io/instance-type"] == "a3-highgpu-8g"]
    assert a3 and all(gpus(n) == 8 and labels(n)["cloud.google.com/gce-topology-block"] for n in a3)


def test_eks_speaks_karpenter_and_managed_node_groups() -> None:
    gpu_nodes = [n for n in nodes("eks") if gpus(n)]
    karpenter = [n for n in gpu_nodes if "karpenter.sh/nodepool" in labels(n)]
    assert {labels(n)["karpenter.k8s.aws/instance-gpu-name"] for n in karpenter} == {"h100", "a100", "l4"}
    for n in karpenter:
        lab = labels(n)
        assert int(lab["karpenter.k8s.aws/instance-gpu-count"]) == gpus(n)
        assert lab["karpenter.k8s.aws/instance-gpu-manufacturer"] == "nvidia"
        assert lab["karpenter.sh/capacity-type"] in ("spot", "on-demand")
        assert {"key": "nvidia.com/gpu", "effect": "NoSchedule"} in n["spec"]["taints"]
    # A100 40 and 80 GB share the name; the per-GPU memory (MiB) tells them apart.
    a100 = {labels(n)["karpenter.k8s.aws/instance-gpu-memory"] for n in karpenter
            if labels(n)["karpenter.k8s.aws/instance-gpu-name"] == "a100"}  # fmt: skip
    assert a100 == {"40960", "81920"}
    for n in gpu_nodes:
        if labels(n)["node.kubernetes.io/instance-type"].startswith(("p5.", "p4d.", "p4de.")):
            assert all(f"topology.k8s.aws/network-node-layer-{i}" in labels(n) for i in (1, 2, 3))
    assert any(labels(n).get("eks.amazonaws.com/capacityType") == "SPOT" for n in gpu_nodes)
    assert not any(k.startswith(GFD_PREFIX) for n in nodes("eks") for k in labels(n))


def test_onprem_has_gfd_but_no_cliques_no_spot() -> None:
    gpu_nodes = [n for n in nodes("onprem") if gpus(n)]
    assert gpu_nodes
    for n in gpu_nodes:
        lab = labels(n)
        assert lab["nvidia.com/gpu.product"] and lab["nvidia.com/gpu.count"] == str(gpus(n))
        assert "nvidia.com/gpu.clique" not in lab
        assert not n["spec"].get("taints")
    for n in nodes("onprem"):
        assert not any("spot" in v.lower() or "spot" in k for k, v in labels(n).items())
    assert any(n["spec"].get("unschedulable") for n in gpu_nodes)
    assert len({labels(n)["topology.kubernetes.io/zone"] for n in gpu_nodes}) >= 3  # racks


def test_gb200_trays_share_cliques_in_gfd_format() -> None:
    gpu_nodes = [n for n in nodes("gb200") if gpus(n)]
    assert all(gpus(n) == 4 and labels(n)["nvidia.com/gpu.product"] == "NVIDIA-GB200" for n in gpu_nodes)
    assert all(labels(n)["kubernetes.io/arch"] == "arm64" for n in gpu_nodes)
    cliques: dict[str, int] = {}
    for n in gpu_nodes:
        if c := labels(n).get("nvidia.com/gpu.clique"):
            cluster_uuid, clique_id = c.rsplit(".", 1)
            assert len(cluster_uuid) == 36 and clique_id.isdigit()
            cliques[c] = cliques.get(c, 0) + 1
    assert len(cliques) >= 2 and all(size >= 2 for size in cliques.values())
    assert any("nvidia.com/gpu.clique" not in labels(n) for n in gpu_nodes)  # fabric not up


@pytest.mark.parametrize("profile", ["gpu", "gke", "eks"])
def test_spot_nodes_carry_their_providers_label(profile: str) -> None:
    spot = []
    for n in nodes(profile):
        lab = labels(n)
        if profile == "eks":
            if (
                lab.get("karpenter.sh/capacity-type") == "spot"
                or lab.get("eks.amazonaws.com/capacityType") == "SPOT"
            ):
                spot.append(n)
        elif lab.get(SPOT_LABELS[profile][0]) == SPOT_LABELS[profile][1]:  # type: ignore[index]
            spot.append(n)
    assert spot
    if profile == "gpu":
        assert all(fleet.CAPACITY_TYPE_LABEL in labels(n) for n in nodes(profile))
    if profile == "gke":
        assert all(lab == "spot" for lab in (labels(n)["cloud.google.com/gke-provisioning"] for n in spot))


def test_gpu_profile_keeps_what_the_cluster_tests_use() -> None:
    ns = {n["metadata"]["name"]: n for n in nodes("gpu")}
    assert {labels(ns[f"h100-{p}-0"])["nvidia.com/gpu.clique"] for p in "ab"} == {"h100-nvl-a", "h100-nvl-b"}
    assert labels(ns["h100-spot-0"])[fleet.CAPACITY_TYPE_LABEL] == "spot"


def write(tmp_path: Path, doc: dict[str, Any]) -> Path:
    p = tmp_path / "fleet.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p


MACHINE = {"capacity": {"cpu": "4", "memory": "16Gi"}, "allocatable": {"cpu": "3", "memory": "15Gi"}}


@pytest.mark.parametrize(
    ("machines", "pool", "message"),
    [
        ({"m": MACHINE}, {"pool": "p", "machine": "x"}, "pool p: machine 'x' is not in machines"),
        ({"m": MACHINE}, {"pool": "p", "machine": "m", "labels": {"a": True}}, "pool p: labels: 'a': True"),
        ({"m": MACHINE}, {"pool": "p", "machine": "m", "count": -1}, "pool p: count"),
        ({"m": MACHINE}, {"pool": "p", "machine": "m", "colour": "red"}, "pool p: unknown fields ['colour']"),
        ({"m": MACHINE}, {"pool": "p", "machine": "m", "taints": [{"key": "k", "effect": "Never"}]},
         "pool p: taints[0]: needs a key and an effect"),
        ({"m": MACHINE}, {"pool": "p", "machine": "m", "gpu": "NVIDIA-X", "gpus": 1}, "gpu 'NVIDIA-X'"),
        ({"m": {"capacity": {"cpu": "4", "memory": "16Gi"}, "allocatable": {"cpu": "5", "memory": "1Gi"}}},
         {"pool": "p", "machine": "m"}, "machines.m.allocatable.cpu: 5 is more than capacity 4"),
        ({"m": {"capacity": {"cpu": "4", "memory": "16GB"}, "allocatable": {"cpu": "3", "memory": "1Gi"}}},
         {"pool": "p", "machine": "m"}, "machines.m.capacity.memory: '16GB' is not a Kubernetes quantity"),
        ({"m": {"capacity": {"cpu": "4"}, "allocatable": {"cpu": "3"}}},
         {"pool": "p", "machine": "m"}, "machines.m: capacity and allocatable both need memory"),
    ],
)  # fmt: skip
def test_bad_fleets_name_the_pool_and_field(
    tmp_path: Path, machines: dict[str, Any], pool: dict[str, Any], message: str
) -> None:
    data = fleet.load(write(tmp_path, {"machines": machines, "profiles": {"x": [pool]}}))
    with pytest.raises(fleet.FleetError) as e:
        fleet.nodes(data, "x")
    assert message in str(e.value)


def test_taints_unschedulable_and_explicit_labels_expand(tmp_path: Path) -> None:
    pool = {"pool": "p", "machine": "m", "count": 2, "unschedulable": True, "labels": {"a": "b"},
            "taints": [{"key": "k", "value": "v", "effect": "NoExecute"}]}  # fmt: skip
    (a, b) = fleet.nodes({"machines": {"m": MACHINE}, "profiles": {"x": [pool]}}, "x")
    assert a["spec"]["taints"] == [{"key": "k", "value": "v", "effect": "NoExecute"}]
    assert a["spec"]["unschedulable"] is True and labels(a)["a"] == "b"
    assert a["status"]["capacity"]["cpu"] == "4" and a["status"]["allocatable"]["cpu"] == "3"
    assert a["spec"]["podCIDR"] != b["spec"]["podCIDR"]
    assert "nvidia.com/gpu" not in a["status"]["capacity"]


def test_a_pool_scaled_to_zero_makes_no_nodes() -> None:
    pools = [{"pool": "gone", "machine": "m", "count": 0}, {"pool": "here", "machine": "m"}]
    (only,) = fleet.nodes({"machines": {"m": MACHINE}, "profiles": {"x": pools}}, "x")
    assert only["metadata"]["name"] == "here-0"
