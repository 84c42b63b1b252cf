"""Minimum Kubernetes versions (api/kubeversion.py): server versions as providers report them, the
features a spec needs, the refusal's wording, and that the table misses nothing the renderer emits."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from toposerve.api import kubeversion as kv
from toposerve.api.config import OperatorConfig
from toposerve.dev import fleet
from toposerve.planner.inventory import inventory_from_nodes
from toposerve.planner.plan import plan_deployment
from toposerve.render.autoscaling import render_autoscaler
from toposerve.render.objects import render_deployment

from .conftest import make_spec

ROOT = Path(__file__).resolve().parents[2]
L70 = "meta-llama/Llama-3.1-70B-Instruct"
L405 = "meta-llama/Llama-3.1-405B-Instruct"
QWEN = "Qwen/Qwen2.5-0.5B-Instruct"
IMAGE = {"cache": {"type": "image", "image": "registry.example/weights/llama-70b:v1"}}


@pytest.mark.parametrize(
    ("text", "version"),
    [
        ("v1.35.4", (1, 35)),
        ("v1.33.2-eks-abc", (1, 33)),  # EKS
        ("v1.31.1-gke.100", (1, 31)),  # GKE
        ("v1.30.0+k3s1", (1, 30)),  # k3s
        ("v1.32.6-eks-931bdca", (1, 32)),
        ("1.34", (1, 34)),
        ("1.29.0", (1, 29)),
        (" v1.35.0-rc.1 ", (1, 35)),
        ("v2.0.0", (2, 0)),
    ],
)
def test_parse_version_accepts_what_providers_report(text: str, version: kv.Version) -> None:
    assert kv.parse_version(text) == version


@pytest.mark.parametrize("text", ["", "latest", "v1", "1.x", "v1.33extra", "version 1.33"])
def test_parse_version_refuses_anything_else(text: str) -> None:
    with pytest.raises(ValueError, match="not a Kubernetes version"):
        kv.parse_version(text)


def test_server_version_from_the_version_endpoint() -> None:
    eks = {"major": "1", "minor": "33+", "gitVersion": "v1.33.2-eks-abc", "platform": "linux/amd64"}
    assert kv.server_version(eks) == ((1, 33), "v1.33.2-eks-abc")
    # no usable gitVersion: major/minor, with the "+" managed clusters append
    assert kv.server_version({"major": "1", "minor": "31+", "gitVersion": "custom"}) == ((1, 31), "custom")
    assert kv.server_version({"major": "1", "minor": "30"}) == ((1, 30), "1.30")
    with pytest.raises(ValueError):
        kv.server_version({"gitVersion": "?"})


def test_the_table_is_kubernetes_own_feature_gate_history() -> None:
    """k8s.io/kubernetes v1.35.4 pkg/features/kube_features.go, as the module docstring says."""
    f = kv.FEATURES
    assert (f["MatchLabelKeysInPodAffinity"].available, f["MatchLabelKeysInPodAffinity"].default_on) == (
        (1, 29),
        (1, 31),
    )
    assert (f["ImageVolume"].available, f["ImageVolume"].default_on) == ((1, 31), (1, 35))
    assert (f["HPAConfigurableTolerance"].available, f["HPAConfigurableTolerance"].default_on) == (
        (1, 33),
        (1, 35),
    )
    # GA and on by default in 1.34 (resource.k8s.io/v1); an enabled gate counts from its 1.32 beta,
    # the first release NVIDIA's DRA driver supports (the 1.26-1.29 alpha was classic DRA)
    dra = f["DynamicResourceAllocation"]
    assert (dra.available, dra.default_on, dra.stage) == ((1, 32), (1, 34), "GA, on by default")
    for feature in f.values():
        assert feature.available <= feature.default_on and feature.kep.startswith("https://kep.k8s.io/")


def test_the_docs_table_matches() -> None:
    text = (ROOT / "docs/real-clusters.md").read_text()
    section = text.split("## Minimum Kubernetes versions", 1)[1].split("\n## ", 1)[0]
    for feature in kv.FEATURES.values():
        row = next(line for line in section.splitlines() if f"`{feature.gate}`" in line)
        assert f"**{feature.minimum}**" in row and feature.kep in row, row


def test_image_cache_needs_1_35_and_the_message_names_the_field() -> None:
    spec = make_spec(L70, 8192, ["H100"], model={"name": L70, **IMAGE})
    plan = plan_deployment("llm", spec)
    got = kv.missing((1, 33), spec, plan, server_text="v1.33.2")
    assert got == [
        "spec.model.cache.type: image needs Kubernetes >= 1.35 (ImageVolume beta, on by default); "
        "the API server is v1.33.2"
    ]
    assert kv.missing((1, 35), spec, plan) == []
    assert kv.missing((1, 36), spec, plan) == []
    # a cluster that turned the beta gate on early (1.33) is believed; before the gate existed, not
    assert kv.missing((1, 33), spec, plan, enabled_gates=["ImageVolume"]) == []
    assert kv.missing((1, 30), spec, plan, enabled_gates=["ImageVolume"])
    # the mock engine loads no weights: no image volume, nothing needed
    mock = make_spec(QWEN, engine="mock", model={"name": QWEN, **IMAGE})
    assert kv.missing((1, 30), mock, plan_deployment("llm", mock)) == []


def test_multi_node_groups_need_match_label_keys() -> None:
    spec = make_spec(L405, 131072, ["H100"], placement={"topologyKey": "nvidia.com/gpu.clique"})
    plan = plan_deployment("llm", spec)
    (msg,) = kv.missing((1, 30), spec, plan, server_text="v1.30.4-gke.100")
    assert msg.startswith("spec.placement.gpuTypes: H100 (pool default): a replica spans 2 nodes")
    assert "needs Kubernetes >= 1.31 (MatchLabelKeysInPodAffinity beta, on by default)" in msg
    assert msg.endswith("the API server is v1.30.4-gke.100")
    assert kv.missing((1, 31), spec, plan) == []
    single = make_spec(L70, 8192, ["H100"])
    assert kv.missing((1, 25), single, plan_deployment("llm", single)) == []


def test_hpa_tolerance_needs_1_35() -> None:
    auto = {"enabled": True, "mode": "hpa", "maxReplicas": 4}
    spec = make_spec(QWEN, engine="mock", autoscaling={**auto, "tolerance": 0.05})
    (msg,) = kv.missing((1, 34), spec, server_text="v1.34.1")
    assert msg.startswith(
        "spec.autoscaling.tolerance: 0.05 needs Kubernetes >= 1.35 (HPAConfigurableTolerance"
    )
    assert kv.missing((1, 34), make_spec(QWEN, engine="mock", autoscaling=auto)) == []


def _objects(spec: Any, config: OperatorConfig) -> list[dict[str, Any]]:
    plan = plan_deployment("llm", spec, config)
    objs = render_deployment("llm", "ns", spec, plan, config)
    return objs + render_autoscaler("llm", "ns", spec, config)[0]


CASES = {
    "single": make_spec(L70, 8192, ["H100"]),
    "image": make_spec(L70, 8192, ["H100"], model={"name": L70, **IMAGE}),
    "multi-node": make_spec(L405, 131072, ["H100"], placement={"topologyKey": "nvidia.com/gpu.clique"}),
    "multi-node-auto-topology": make_spec(L405, 131072, ["H100"]),
    "mock-image": make_spec(QWEN, engine="mock", model={"name": QWEN, **IMAGE}),
    "hpa-tolerance": make_spec(QWEN, engine="mock",
                               autoscaling={"enabled": True, "mode": "hpa", "maxReplicas": 4, "tolerance": 0.2}),
}  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_needs_names_every_gated_field_the_renderer_emits(case: str) -> None:
    """``needs`` (from spec and plan, to name the field) agrees with the rendered objects."""
    spec, config = CASES[case], OperatorConfig()
    plan = plan_deployment("llm", spec, config)
    used = kv.used_in(_objects(spec, config))
    assert {n.gate for n in kv.needs(spec, plan)} == used
    assert bool(used) == (case not in ("single", "mock-image"))


def test_features_only_in_the_objects_are_refused_too() -> None:
    """A gated field ``needs`` does not know of (e.g. on a fallback GPU type) still refuses."""
    spec = make_spec(L70, 8192, ["H100"])
    term = {"labelSelector": {"matchLabels": {"a": "b"}}, "matchLabelKeys": ["k"], "topologyKey": "t"}
    pod = {"affinity": {"podAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
        {"weight": 1, "podAffinityTerm": term}]}}}  # fmt: skip
    objs = [{"kind": "Deployment", "spec": {"template": {"spec": pod}}}]
    (msg,) = kv.missing((1, 30), spec, plan_deployment("llm", spec), objs)
    assert msg.startswith("spec.placement.gpuTypes: ") and "MatchLabelKeysInPodAffinity" in msg
    assert re.search(r"the API server is v1\.30$", msg)


IMAGE_SPEC = """apiVersion: toposerve.io/v1alpha1
kind: LLMDeployment
metadata: {name: llama}
spec:
  model:
    name: meta-llama/Llama-3.1-70B-Instruct
    maxContextLength: 8192
    cache: {type: image, image: registry.example/weights/llama-70b:v1}
  engine: vllm
  placement: {gpuTypes: [H100]}
"""


def _render(tmp_path: Path, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    from toposerve.cli import main

    f = tmp_path / "in.yaml"
    f.write_text(IMAGE_SPEC)
    code = main(["render", "-f", str(f), *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_render_with_an_old_kubernetes_version_refuses_naming_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _render(tmp_path, capsys, "--kubernetes-version", "1.33")
    assert code == 2 and out == ""
    assert err.strip() == (
        "toposerve render: error: llama: spec.model.cache.type: image needs Kubernetes >= 1.35 "
        "(ImageVolume beta, on by default); the API server is 1.33 (--kubernetes-version)"
    )
    for ok in ("1.35", "v1.35.4", "1.36"):
        code, out, _ = _render(tmp_path, capsys, "--kubernetes-version", ok)
        assert code == 0 and "reference: registry.example/weights/llama-70b:v1" in out
    code, out, _ = _render(tmp_path, capsys)  # no version: no check, as before
    assert code == 0 and out
    code, _, err = _render(tmp_path, capsys, "--kubernetes-version", "latest")
    assert code == 2 and "--kubernetes-version: not a Kubernetes version: 'latest'" in err
    config = tmp_path / "config.yaml"
    config.write_text("enabledFeatureGates: [ImageVolume]\n")
    code, _, _ = _render(tmp_path, capsys, "--kubernetes-version", "1.33", "--config", str(config))
    assert code == 0


def test_render_includes_pod_monitors_only_when_told_the_prometheus_operator_is_there(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = _render(tmp_path, capsys)
    assert code == 0 and "kind: PodMonitor" not in out  # auto: offline, nothing to discover
    config = tmp_path / "config.yaml"
    config.write_text("prometheusOperator: 'on'\n")
    code, out, _ = _render(tmp_path, capsys, "--config", str(config))
    kinds = [d["kind"] for d in yaml.safe_load_all(out) if d]
    assert code == 0 and kinds.count("PodMonitor") == 2


GB200_405B = make_spec(
    L405, 131072, ["GB200"], engine="vllm", placement={"topologyKey": "nvidia.com/gpu.clique"}
)


def _gb200(spec: Any) -> tuple[Any, list[dict[str, Any]]]:
    """The plan and objects on the gb200 fleet, the nodes as the inventory (the IMEX fabric)."""
    config = OperatorConfig()
    nodes = fleet.nodes(fleet.load(ROOT / "hack" / "cluster" / "fleet.yaml"), "gb200")
    inv = inventory_from_nodes(nodes, config.catalog(), config.label_schemes)
    plan = plan_deployment("llm", spec, config, inv)
    return plan, render_deployment("llm", "ns", spec, plan, config, inventory=inv)


def test_pod_resource_claims_need_dynamic_resource_allocation() -> None:
    plan, objs = _gb200(GB200_405B)
    assert any(o["kind"] == "ComputeDomain" for o in objs)
    assert (
        {n.gate for n in kv.needs(GB200_405B, plan, objs)}
        == kv.used_in(objs)
        == {
            "MatchLabelKeysInPodAffinity",
            "DynamicResourceAllocation",
        }
    )
    got = kv.missing((1, 33), GB200_405B, plan, objs, server_text="v1.33.5-eks-1a2b")
    (msg,) = [m for m in got if "DynamicResourceAllocation" in m]
    assert msg == (
        "spec.placement.gpuTypes: GB200 (pool default): its replicas span the nodes of one NVLink "
        "domain through an IMEX channel the pods claim (pod resourceClaims), needs Kubernetes >= 1.34 "
        "(DynamicResourceAllocation GA, on by default); the API server is v1.33.5-eks-1a2b"
    )
    assert kv.missing((1, 34), GB200_405B, plan, objs) == []
    # a 1.32/1.33 cluster that turned DRA on (NVIDIA's driver supports 1.32+) is believed; 1.31 not
    assert kv.missing((1, 32), GB200_405B, plan, objs, enabled_gates=["DynamicResourceAllocation"]) == []
    assert kv.missing((1, 31), GB200_405B, plan, objs, enabled_gates=["DynamicResourceAllocation"])


def test_no_claims_no_dra_need() -> None:
    # without nodes (or without the inventory) no fabric is chosen, nothing claims a device
    plan = plan_deployment("llm", GB200_405B)
    objs = render_deployment("llm", "ns", GB200_405B, plan)
    assert "DynamicResourceAllocation" not in kv.used_in(objs)
    assert not [m for m in kv.missing((1, 30), GB200_405B, plan, objs) if "DynamicResourceAllocation" in m]
    # the mock engine simulates a replica in one pod: no fabric, no claims
    mock = make_spec(
        L405, 131072, ["GB200"], engine="mock", placement={"topologyKey": "nvidia.com/gpu.clique"}
    )
    plan, objs = _gb200(mock)
    assert "DynamicResourceAllocation" not in kv.used_in(objs)


def test_claims_only_in_the_objects_name_a_field_too() -> None:
    spec = make_spec(L70, 8192, ["H100"])
    pod = {
        "containers": [{"name": "engine"}],
        "resourceClaims": [{"name": "c", "resourceClaimTemplateName": "t"}],
    }
    objs = [{"kind": "Deployment", "metadata": {"labels": {}}, "spec": {"template": {"spec": pod}}}]
    (msg,) = kv.missing((1, 33), spec, plan_deployment("llm", spec), objs)
    assert msg.startswith("spec.placement.gpuTypes: ") and "(DynamicResourceAllocation GA" in msg
