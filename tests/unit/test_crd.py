"""The CRD is generated from the models, structural, documented and committed without drift."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml

from toposerve.api.crd import crd, crd_yaml

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = [
    ROOT / "crds" / "toposerve.io_llmdeployments.yaml",
    ROOT / "charts/toposerve/crds/toposerve.io_llmdeployments.yaml",
]


def test_committed_crds_match_the_generated_one() -> None:
    generated = crd_yaml()
    for path in COMMITTED:
        assert path.read_text() == generated, f"{path} drifted: run `make crds`"


def walk(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out: list[tuple[str, dict[str, Any]]] = []
    if isinstance(node, dict):
        out.append((path, node))
        for key, child in (node.get("properties") or {}).items():
            out += walk(child, f"{path}.{key}")
        if isinstance(node.get("items"), dict):
            out += walk(node["items"], f"{path}[]")
        if isinstance(node.get("additionalProperties"), dict):
            out += walk(node["additionalProperties"], f"{path}{{}}")
    return out


def schema() -> dict[str, Any]:
    return crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def test_schema_is_structural() -> None:
    for path, node in walk(schema()):
        assert "$ref" not in node and "title" not in node, path
        if "anyOf" in node:
            assert node.get("x-kubernetes-int-or-string") is True, f"{path}: anyOf only for int-or-string"
        else:
            assert "type" in node, f"{path} has no type"
        assert node.get("additionalProperties") not in (True, False), path


def test_every_spec_and_status_field_is_documented() -> None:
    for path, node in walk(schema()["properties"]["spec"], "spec") + walk(
        schema()["properties"]["status"], "status"
    ):
        if path.endswith("[]") or path.endswith("{}"):
            continue
        assert node.get("description"), f"{path} lacks a description (kubectl explain would be empty)"


def test_defaults_bounds_enums_and_cel_rules_are_present() -> None:
    spec = schema()["properties"]["spec"]["properties"]
    assert spec["model"]["properties"]["dtype"]["enum"] == ["bf16", "fp16", "fp8", "int8", "int4"]
    assert spec["model"]["properties"]["kvCacheDtype"]["default"] == "bf16"
    auto = spec["autoscaling"]["properties"]
    assert auto["targetKVCacheUtilization"]["default"] == 0.7
    assert auto["targetKVCacheUtilization"]["exclusiveMinimum"] is True
    rules = [r["rule"] for r in spec["autoscaling"]["x-kubernetes-validations"]]
    assert any("self.minReplicas <= self.maxReplicas" in r for r in rules)
    assert spec["replicas"]["minimum"] == 0
    tensor = spec["parallelism"]["properties"]["tensor"]
    assert tensor["x-kubernetes-int-or-string"] is True and tensor["default"] == "auto"
    assert spec["placement"]["properties"]["gpuTypes"]["x-kubernetes-list-type"] == "set"
    assert spec["parallelism"]["default"] == {}


def test_subresources_and_printer_columns() -> None:
    version = crd()["spec"]["versions"][0]
    assert version["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    names = [c["name"] for c in version["additionalPrinterColumns"]]
    assert names == ["Model", "GPU", "TP/PP", "Ready", "Desired", "Endpoint", "Age"]
    assert crd()["spec"]["names"]["shortNames"] == ["llmd"]


def test_crd_is_a_valid_kubernetes_object() -> None:
    kubernetes_validate.validate(yaml.safe_load(crd_yaml()), "1.32", strict=True)
