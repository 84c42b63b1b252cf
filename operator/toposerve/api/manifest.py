"""Read LLMDeployment manifests from YAML into validated objects, with errors that name the field."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import ValidationError

from toposerve import API_GROUP, API_VERSION
from toposerve.api.errors import SpecError, spec_error
from toposerve.api.spec import LLMDeploymentSpec

API = f"{API_GROUP}/{API_VERSION}"


@dataclass(frozen=True)
class LLMDeployment:
    """A parsed LLMDeployment: identity plus validated spec."""

    name: str
    namespace: str | None
    spec: LLMDeploymentSpec
    uid: str | None = None
    generation: int | None = None


def parse_spec(raw: Any, where: str = "spec") -> LLMDeploymentSpec:
    if not isinstance(raw, dict):
        raise SpecError(where, "must be a mapping")
    try:
        return LLMDeploymentSpec.model_validate(raw)
    except ValidationError as e:
        raise spec_error(e, where) from None


def parse_object(obj: Any, index: int = 0) -> LLMDeployment:
    doc = f"document {index + 1}"
    if not isinstance(obj, dict):
        raise SpecError(doc, "must be a mapping with apiVersion, kind, metadata and spec")
    if obj.get("kind") != "LLMDeployment":
        raise SpecError(f"{doc}: kind", f"expected LLMDeployment, got {obj.get('kind')!r}")
    if obj.get("apiVersion") != API:
        raise SpecError(f"{doc}: apiVersion", f"expected {API}, got {obj.get('apiVersion')!r}")
    meta = obj.get("metadata")
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str) or not meta["name"]:
        raise SpecError(f"{doc}: metadata.name", "is required")
    unknown = set(obj) - {"apiVersion", "kind", "metadata", "spec", "status"}
    if unknown:
        raise SpecError(f"{doc}: {sorted(unknown)[0]}", "unknown top-level field")
    if "spec" not in obj:
        raise SpecError(f"{meta['name']}: spec", "is required")
    try:
        spec = parse_spec(obj["spec"])
    except SpecError as e:
        raise SpecError(f"{meta['name']}: {e.field}", e.message) from None
    return LLMDeployment(
        name=meta["name"],
        namespace=meta.get("namespace"),
        spec=spec,
        uid=meta.get("uid"),
        generation=meta.get("generation"),
    )


def iter_documents(text: str) -> Iterator[Any]:
    try:
        for doc in yaml.safe_load_all(text):
            if doc is not None:
                yield doc
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "input"
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SpecError(where, f"malformed YAML: {problem}") from None


def load_manifests(text: str) -> list[LLMDeployment]:
    """Every LLMDeployment in a multi-document YAML text (other kinds are an error)."""
    items: list[Any] = []
    for doc in iter_documents(text):
        if isinstance(doc, dict) and doc.get("kind") == "List":
            items += doc.get("items") or []
        else:
            items.append(doc)
    if not items:
        raise SpecError("input", "no LLMDeployment found")
    return [parse_object(o, i) for i, o in enumerate(items)]
