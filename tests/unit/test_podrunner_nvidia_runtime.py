"""The local cluster's stand-in for the NVIDIA container runtime: which containers get NVML, and
what a simulated node's GPUs look like to it (from the node's labels, as the fleet varies them)."""

from __future__ import annotations

from typing import Any

from toposerve.dev import fleet
from toposerve.dev.podrunner import node_gpu_state, wants_nvml

from .conftest import ROOT

FLEET = fleet.load(ROOT / "hack" / "cluster" / "fleet.yaml")


def pod(
    runtime: str | None = None, env: list[dict[str, str]] | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    c: dict[str, Any] = {"name": "c", "env": env or []}
    spec: dict[str, Any] = {"containers": [c]}
    if runtime:
        spec["runtimeClassName"] = runtime
    return {"spec": spec}, c


def test_the_runtime_class_or_the_toolkits_variable_asks_for_nvml() -> None:
    assert wants_nvml(*pod("nvidia"))
    assert wants_nvml(*pod(env=[{"name": "NVIDIA_VISIBLE_DEVICES", "value": "all"}]))
    assert not wants_nvml(*pod())
    assert not wants_nvml(*pod("gvisor"))
    # the toolkit's documented "no GPU" values
    assert not wants_nvml(*pod(env=[{"name": "NVIDIA_VISIBLE_DEVICES", "value": "void"}]))
    assert not wants_nvml(*pod(env=[{"name": "NVIDIA_VISIBLE_DEVICES", "value": "none"}]))


def test_every_gpu_node_of_every_profile_gets_its_gpus_and_cpu_nodes_none() -> None:
    seen_names = set()
    for profile in FLEET["profiles"]:
        for node in fleet.nodes(FLEET, profile):
            gpus = node_gpu_state(node)
            want = int(node["status"]["capacity"].get("nvidia.com/gpu", 0))
            assert len(gpus) == want, (profile, node["metadata"]["name"])
            assert len({g["uuid"] for g in gpus}) == want  # distinct devices
            for g in gpus:
                assert g["name"] != "NVIDIA GPU", (profile, node["metadata"]["labels"])  # named from a label
                assert 0 < int(str(g["mem.used"])) < int(str(g["mem.total"]))
                seen_names.add(g["name"])
    assert len(seen_names) > 3  # GFD products, GKE accelerators and Karpenter names all appear
