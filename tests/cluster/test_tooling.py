"""The pure parts of the cluster tooling (fleet expansion, the runner's env and image rules).

They need no cluster, but live here because they test hack/cluster's contract.
"""

from __future__ import annotations

import ipaddress
import re

import pytest

from tests.cluster.conftest import ROOT
from toposerve.dev import fleet
from toposerve.dev.podrunner import container_env, expand, field_ref, is_runner_image, sd_targets

pytestmark = pytest.mark.cluster

GFD = {
    "NVIDIA-B200": ("183359", "blackwell"),
    "NVIDIA-H200": ("143771", "hopper"),
    "NVIDIA-H100-80GB-HBM3": ("81559", "hopper"),
    "NVIDIA-A100-SXM4-80GB": ("81920", "ampere"),
    "NVIDIA-A100-SXM4-40GB": ("40960", "ampere"),
    "NVIDIA-L4": ("23034", "ada-lovelace"),
}


def test_fleet_profiles_expand_to_gfd_labelled_nodes_with_distinct_cidrs() -> None:
    data = fleet.load(ROOT / "hack" / "cluster" / "fleet.yaml")
    nodes = fleet.nodes(data, "gpu")
    cidrs = [ipaddress.ip_network(n["spec"]["podCIDR"]) for n in nodes]
    assert len(set(cidrs)) == len(cidrs)
    assert all(c.subnet_of(ipaddress.ip_network("10.244.0.0/16")) for c in cidrs)
    seen = set()
    for n in nodes:
        labels = n["metadata"]["labels"]
        assert labels[fleet.CAPACITY_TYPE_LABEL] in ("spot", "on-demand")
        if product := labels.get("nvidia.com/gpu.product"):
            seen.add(product)
            assert (labels["nvidia.com/gpu.memory"], labels["nvidia.com/gpu.family"]) == GFD[product]
            assert n["status"]["capacity"]["nvidia.com/gpu"] == labels["nvidia.com/gpu.count"]
    assert set(GFD) <= seen
    assert all("nvidia.com/gpu.product" not in n["metadata"]["labels"] for n in fleet.nodes(data, "nogpu"))


@pytest.mark.parametrize(
    ("image", "runs"),
    [
        ("ghcr.io/toposerve/toposerve:dev", True),
        ("ghcr.io/toposerve/toposerve", True),
        ("ghcr.io/toposerve/toposerve@sha256:abc", True),
        ("ghcr.io/toposerve/toposerve-extra:1", False),
        ("vllm/vllm-openai:latest", False),
        ("localhost:5000/ghcr.io/toposerve/toposerve:1", False),
    ],
)
def test_runner_image_rule(image: str, runs: bool) -> None:
    assert is_runner_image(image) is runs


def test_env_and_argument_expansion_follow_kubernetes() -> None:
    pod = {
        "metadata": {"name": "p", "namespace": "ns", "labels": {"app": "x"}},
        "spec": {"nodeName": "h100-a-0"},
        "status": {"podIP": "10.244.1.7"},
    }
    container = {
        "env": [
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
            {"name": "URL", "value": "http://$(POD_IP):8000/$(MISSING)"},
        ]
    }
    env = container_env(pod, container)
    assert env == {
        "POD_IP": "10.244.1.7",
        "NAME": "p",
        "APP": "x",
        "URL": "http://10.244.1.7:8000/$(MISSING)",
    }
    assert expand("--host=$(POD_IP) $$(POD_IP) $$ $(", env) == "--host=10.244.1.7 $(POD_IP) $ $("
    assert field_ref(pod, "metadata.namespace") == "ns"
    with pytest.raises(ValueError):
        field_ref(pod, "spec.unknown")


def test_sd_targets_look_like_kubernetes_sd() -> None:
    running = {
        "metadata": {
            "name": "m",
            "namespace": "ns",
            "uid": "u",
            "labels": {"app.kubernetes.io/name": "x"},
            "annotations": {"prometheus.io/scrape": "true"},
        },
        "spec": {"nodeName": "cpu-0"},
        "status": {
            "phase": "Running",
            "podIP": "10.244.16.3",
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }
    pending = {"metadata": {"name": "p", "namespace": "ns"}, "status": {"phase": "Pending"}}
    (group,) = sd_targets([running, pending])
    assert group["targets"] == ["10.244.16.3"]
    labels = group["labels"]
    assert labels["__meta_kubernetes_pod_annotation_prometheus_io_scrape"] == "true"
    assert labels["__meta_kubernetes_pod_label_app_kubernetes_io_name"] == "x"
    assert labels["__meta_kubernetes_pod_ready"] == "true"
    assert labels["__meta_kubernetes_pod_node_name"] == "cpu-0"


def test_pinned_versions_agree_with_the_go_modules() -> None:
    """versions.sh (used to find caches and manifests) must name what gomod/*/go.mod builds."""
    here = ROOT / "hack" / "cluster"
    pins = dict(
        line.split("=", 1) for line in (here / "versions.sh").read_text().splitlines() if "_VERSION=" in line
    )
    mods = {
        "K8S_VERSION": ("k8s", "k8s.io/kubernetes"),
        "ETCD_VERSION": ("etcd", "go.etcd.io/etcd/server/v3"),
        "LWS_VERSION": ("lws", "sigs.k8s.io/lws"),
    }
    for var, (folder, module) in mods.items():
        gomod = (here / "gomod" / folder / "go.mod").read_text()
        pattern = rf"^\s*(require )?{re.escape(module)} {re.escape(pins[var])}( // indirect)?$"
        assert re.search(pattern, gomod, re.MULTILINE), f"{var}={pins[var]} is not what gomod/{folder} builds"
