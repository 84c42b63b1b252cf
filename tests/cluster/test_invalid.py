"""A corpus of invalid LLMDeployments: the API server rejects each with a message naming the field,
or, for what only the planner can know, the operator reports it in status (Ready=False)."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from tests.cluster.conftest import Cluster, kubectl
from tests.cluster.operator_harness import (
    Operator,
    apply,
    condition,
    get_llmd,
    install_crd,
    operator,
    wait_for,
)

pytestmark = pytest.mark.cluster
__all__ = ["operator"]

M = {"name": "meta-llama/Llama-3.1-8B-Instruct", "maxContextLength": 8192}


def doc(spec: dict[str, Any], name: str = "bad") -> dict[str, Any]:
    return {
        "apiVersion": "toposerve.io/v1alpha1",
        "kind": "LLMDeployment",
        "metadata": {"name": name},
        "spec": spec,
    }


SERVER_REJECTS: list[tuple[str, dict[str, Any], str]] = [
    ("dtype-enum", {"model": {**M, "dtype": "bf17"}}, "spec.model.dtype"),
    ("negative-replicas", {"model": M, "replicas": -1}, "spec.replicas"),
    ("replicas-string", {"model": M, "replicas": "three"}, "spec.replicas"),
    ("model-missing", {"placement": {"gpuTypes": ["H100"]}}, "spec.model"),
    ("model-name-empty", {"model": {**M, "name": ""}}, "spec.model.name"),
    (
        "min-gt-max",
        {"model": M, "autoscaling": {"minReplicas": 5, "maxReplicas": 2}},
        "spec.autoscaling.minReplicas",
    ),
    (
        "kv-target-zero",
        {"model": M, "autoscaling": {"targetKVCacheUtilization": 0}},
        "spec.autoscaling.targetKVCacheUtilization",
    ),
    (
        "kv-target-above-one",
        {"model": M, "autoscaling": {"targetKVCacheUtilization": 1.5}},
        "spec.autoscaling.targetKVCacheUtilization",
    ),
    ("tp-zero", {"model": M, "parallelism": {"tensor": 0}}, "spec.parallelism.tensor"),
    ("tp-word", {"model": M, "parallelism": {"tensor": "four"}}, "spec.parallelism.tensor"),
    ("pp-negative", {"model": M, "parallelism": {"pipeline": -2}}, "spec.parallelism.pipeline"),
    ("tier-enum", {"model": M, "placement": {"tier": "fast"}}, "spec.placement.tier"),
    ("gpu-duplicates", {"model": M, "placement": {"gpuTypes": ["H100", "H100"]}}, "spec.placement.gpuTypes"),
    ("gpu-pattern", {"model": M, "placement": {"gpuTypes": ["bad type!"]}}, "spec.placement.gpuTypes[0]"),
    ("engine-enum", {"model": M, "engine": "tgi"}, "spec.engine"),
    ("kv-dtype-enum", {"model": {**M, "kvCacheDtype": "int4"}}, "spec.model.kvCacheDtype"),
    ("context-zero", {"model": {**M, "maxContextLength": 0}}, "spec.model.maxContextLength"),
    ("unknown-field", {"model": M, "colour": "blue"}, "colour"),
    (
        "pool-duplicate",
        {"model": M, "pools": [{"name": "a", "gpuTypes": ["H100"]}, {"name": "a", "gpuTypes": ["L4"]}]},
        "spec.pools[1]",
    ),
    (
        "pools-and-gpu-types",
        {"model": M, "pools": [{"name": "a", "gpuTypes": ["H100"]}], "placement": {"gpuTypes": ["L4"]}},
        "spec.pools",
    ),
    ("pool-no-gpus", {"model": M, "pools": [{"name": "a", "gpuTypes": []}]}, "spec.pools[0].gpuTypes"),
    (
        "pool-name-pattern",
        {"model": M, "pools": [{"name": "Bad_Name", "gpuTypes": ["H100"]}]},
        "spec.pools[0].name",
    ),
    ("strategy-enum", {"model": M, "routing": {"strategy": "random"}}, "spec.routing.strategy"),
    (
        "bounded-load-low",
        {"model": M, "routing": {"boundedLoadFactor": 0.5}},
        "spec.routing.boundedLoadFactor",
    ),
    ("negative-price", {"model": M, "cost": {"hourlyPerGPU": {"H100": -1}}}, "spec.cost.hourlyPerGPU"),
    (
        "mem-util-high",
        {"model": M, "serving": {"gpuMemoryUtilization": 1.5}},
        "spec.serving.gpuMemoryUtilization",
    ),
    (
        "kv-heads-gt-heads",
        {
            "model": {
                **M,
                "name": "acme/x",
                "architecture": {
                    "parameters": 1,
                    "layers": 2,
                    "attentionHeads": 4,
                    "kvHeads": 8,
                    "headDim": 64,
                },
            }
        },
        "spec.model.architecture.kvHeads",
    ),
    (
        "policy-type-enum",
        {
            "model": M,
            "autoscaling": {"scaleUp": {"policies": [{"type": "Nodes", "value": 1, "periodSeconds": 60}]}},
        },
        "spec.autoscaling.scaleUp.policies[0].type",
    ),
    (
        "toleration-operator",
        {"model": M, "placement": {"tolerations": [{"key": "a", "operator": "Maybe"}]}},
        "spec.placement.tolerations[0].operator",
    ),
    ("gpus-per-node-zero", {"model": M, "placement": {"gpusPerNode": 0}}, "spec.placement.gpusPerNode"),
    ("cache-pvc-without-claim", {"model": {**M, "cache": {"type": "pvc"}}}, "spec.model.cache.claimName"),
    ("cache-type-enum", {"model": {**M, "cache": {"type": "nfs"}}}, "spec.model.cache.type"),
]


@pytest.fixture
def crd(cluster: Cluster) -> None:
    install_crd(cluster)


@pytest.mark.parametrize(("case", "spec", "field"), SERVER_REJECTS, ids=[c[0] for c in SERVER_REJECTS])
def test_api_server_rejects_naming_the_field(
    cluster: Cluster, namespace: str, crd: None, case: str, spec: dict[str, Any], field: str
) -> None:
    res = apply(cluster, namespace, doc(spec))
    assert res.returncode != 0, f"{case} was accepted"
    assert field in res.stderr, res.stderr


def test_long_names_are_rejected(cluster: Cluster, namespace: str, crd: None) -> None:
    res = apply(cluster, namespace, doc({"model": M}, name="x" * 50))
    assert res.returncode != 0 and "metadata.name must be at most 42" in res.stderr, res.stderr


SEMANTIC: list[tuple[str, dict[str, Any], str, str]] = [
    ("unknown-model", {"model": {**M, "name": "acme/unknown"}}, "InvalidSpec", "spec.model.architecture"),
    (
        "tp-not-dividing-heads",
        {"model": M, "parallelism": {"tensor": 3}},
        "InvalidSpec",
        "spec.parallelism.tensor",
    ),
    ("ep-on-dense", {"model": M, "parallelism": {"expert": 2}}, "InvalidSpec", "spec.parallelism.expert"),
    (
        "unknown-gpu-type",
        {"model": M, "placement": {"gpuTypes": ["TPU-v5"]}},
        "InvalidSpec",
        "spec.placement.gpuTypes[0]",
    ),
    (
        "context-beyond-native",
        {"model": {**M, "name": "Qwen/Qwen2.5-7B-Instruct", "maxContextLength": 65536}},
        "InvalidSpec",
        "spec.model.maxContextLength",
    ),
    (
        "too-big-for-every-gpu",
        {
            "model": {**M, "name": "meta-llama/Llama-3.1-405B-Instruct"},
            "parallelism": {"tensor": 1, "pipeline": 1},
            "placement": {"gpuTypes": ["L4"]},
        },
        "DoesNotFit",
        "weights need",
    ),
    (
        "awq-on-the-bf16-original",
        {"model": {**M, "dtype": "int4", "quantization": "awq"}},
        "InvalidSpec",
        "spec.model.checkpoint",
    ),
    (
        "gpu-absent-from-cluster",
        {"model": M, "engine": "vllm", "placement": {"gpuTypes": ["L40S"]}},
        "DoesNotFit",
        "no L40S nodes",
    ),
]


def test_semantic_errors_are_reported_in_status(cluster: Cluster, namespace: str, operator: Operator) -> None:
    for i, (case, spec, _, _) in enumerate(SEMANTIC):
        assert apply(cluster, namespace, doc(spec, name=f"s{i}")).returncode == 0, case
    for i, (case, _, reason, words) in enumerate(SEMANTIC):

        def reported(i: int = i, reason: str = reason) -> dict[str, Any] | None:
            c = condition(get_llmd(cluster, namespace, f"s{i}"), "Ready")
            return c if c and c["status"] == "False" and c["reason"] == reason else None

        c = wait_for(reported, f"{case}: Ready=False/{reason}")
        assert words in c["message"], (case, c)
    # One Warning Event per problem, not a retry storm.
    evs = yaml.safe_load(kubectl(cluster, "get", "events", "-n", namespace, "-o", "yaml").stdout)["items"]
    for i, (case, _, reason, _) in enumerate(SEMANTIC):
        mine = [e for e in evs if e["involvedObject"]["name"] == f"s{i}" and e["reason"] == reason]
        assert 1 <= len(mine) <= 2, (case, len(mine))
