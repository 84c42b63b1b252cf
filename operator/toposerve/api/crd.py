"""Generate the LLMDeployment CustomResourceDefinition from the pydantic models.

Pydantic emits JSON Schema (2020-12 flavoured, with $refs and nullable anyOfs); Kubernetes wants a
structural OpenAPI v3 schema. The conversion inlines references, turns ``Optional[X]`` into an
optional ``X``, maps numeric ``exclusiveMinimum`` to the boolean OpenAPI 3.0 form, drops titles and
``additionalProperties: false`` (the API server prunes or rejects unknown fields itself), and keeps
descriptions, defaults, enums, bounds and ``x-kubernetes-*`` extensions.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml

from toposerve import API_GROUP, API_VERSION
from toposerve.api.spec import LLMDeploymentSpec
from toposerve.api.status import LLMDeploymentStatus

PLURAL = "llmdeployments"
KIND = "LLMDeployment"
CRD_NAME = f"{PLURAL}.{API_GROUP}"

_DROP = {"title", "$defs"}


def _resolve(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Inline a $ref (keeping sibling keys such as description/default, which win)."""
    if "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[-1]
        merged = copy.deepcopy(defs[name])
        merged.update({k: v for k, v in node.items() if k != "$ref"})
        return _resolve(merged, defs)
    if "allOf" in node and len(node["allOf"]) == 1:
        inner = _resolve(node["allOf"][0], defs)
        inner.update({k: v for k, v in node.items() if k != "allOf"})
        return inner
    return node


def to_structural(node: Any, defs: dict[str, Any]) -> Any:
    """Convert one pydantic JSON-schema node to a structural Kubernetes schema node."""
    if isinstance(node, list):
        return [to_structural(n, defs) for n in node]
    if not isinstance(node, dict):
        return node
    node = _resolve(dict(node), defs)
    any_of = node.get("anyOf")
    if any_of and not node.get("x-kubernetes-int-or-string"):
        non_null = [b for b in any_of if b.get("type") != "null"]
        if len(non_null) == 1:
            branch = _resolve(dict(non_null[0]), defs)
            rest = {k: v for k, v in node.items() if k != "anyOf"}
            branch.update(rest)
            node = branch
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP:
            continue
        if key == "default" and value is None:
            continue
        if key == "additionalProperties" and isinstance(value, bool):
            continue  # false: the server prunes/rejects; true: x-kubernetes-preserve-unknown-fields says it
        if key == "const":
            out["enum"] = [value]
            continue
        if key == "exclusiveMinimum" and not isinstance(value, bool):
            out["minimum"] = value
            out["exclusiveMinimum"] = True
            continue
        if key == "exclusiveMaximum" and not isinstance(value, bool):
            out["maximum"] = value
            out["exclusiveMaximum"] = True
            continue
        if key == "properties":
            out["properties"] = {k: to_structural(v, defs) for k, v in value.items()}
            continue
        if key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = to_structural(value, defs)
            continue
        out[key] = value
    if "properties" in out:
        out.setdefault("type", "object")
    return out


def model_schema(model: type[LLMDeploymentSpec] | type[LLMDeploymentStatus]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.get("$defs", {})
    return dict(to_structural(raw, defs))


def openapi_schema() -> dict[str, Any]:
    spec = model_schema(LLMDeploymentSpec)
    status = model_schema(LLMDeploymentStatus)
    spec["description"] = (LLMDeploymentSpec.__doc__ or "").strip()
    status["description"] = (LLMDeploymentStatus.__doc__ or "").strip()
    return {
        "type": "object",
        "description": "LLMDeployment serves one model on a GPU cluster with planned parallelism, "
        "topology-aware placement, LLM-aware routing and KV-cache autoscaling.",
        "required": ["spec"],
        "x-kubernetes-validations": [
            {
                "rule": "size(self.metadata.name) <= 42",
                "message": "metadata.name must be at most 42 characters (children are named <name>-<pool>-<gpu>)",
            }
        ],
        "properties": {
            "apiVersion": {"type": "string", "description": "API version of this object."},
            "kind": {"type": "string", "description": "Kind of this object."},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
    }


PRINTER_COLUMNS: list[dict[str, Any]] = [
    {"name": "Model", "type": "string", "jsonPath": ".spec.model.name"},
    {"name": "GPU", "type": "string", "jsonPath": ".status.gpuTypes"},
    {"name": "TP/PP", "type": "string", "jsonPath": ".status.parallelism"},
    {"name": "Ready", "type": "integer", "jsonPath": ".status.readyReplicas"},
    {"name": "Desired", "type": "integer", "jsonPath": ".spec.replicas"},
    {"name": "Endpoint", "type": "string", "jsonPath": ".status.endpoint"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def crd() -> dict[str, Any]:
    """The CustomResourceDefinition as a dict."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": CRD_NAME,
            "labels": {"app.kubernetes.io/name": "toposerve", "app.kubernetes.io/part-of": "toposerve"},
        },
        "spec": {
            "group": API_GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": "llmdeployment",
                "shortNames": ["llmd"],
                "categories": ["toposerve"],
            },
            "versions": [
                {
                    "name": API_VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": openapi_schema()},
                    "subresources": {
                        "status": {},
                        "scale": {
                            "specReplicasPath": ".spec.replicas",
                            "statusReplicasPath": ".status.replicas",
                            "labelSelectorPath": ".status.selector",
                        },
                    },
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                }
            ],
        },
    }


HEADER = "# GENERATED by `toposerve crd` from operator/toposerve/api/{spec,status}.py. Do not edit.\n"


def crd_yaml() -> str:
    return HEADER + yaml.safe_dump(crd(), sort_keys=False, width=110)
