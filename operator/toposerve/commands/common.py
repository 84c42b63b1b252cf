"""Input handling shared by the offline subcommands: files, config, inventory."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from toposerve.api.config import OperatorConfig
from toposerve.api.errors import SpecError, spec_error
from toposerve.api.manifest import LLMDeployment, load_manifests
from toposerve.planner.inventory import Inventory, inventory_from_nodes


def read_text(path: str) -> str:
    if path == "-":
        return sys.stdin.read()
    try:
        return Path(path).read_text()
    except OSError as e:
        raise SpecError(path, e.strerror or str(e)) from None


def load_deployments(path: str) -> list[LLMDeployment]:
    return load_manifests(read_text(path))


def load_config(path: str | None) -> OperatorConfig:
    if path is None:
        return OperatorConfig()
    try:
        return OperatorConfig.model_validate(yaml.safe_load(read_text(path)) or {})
    except ValidationError as e:
        raise spec_error(e, f"{path}: config") from None


def load_inventory(path: str | None, config: OperatorConfig) -> Inventory | None:
    """Nodes from `kubectl get nodes -o yaml` (a List) or a multi-document YAML of Node objects."""
    if path is None:
        return None
    nodes: list[dict[str, Any]] = []
    for doc in yaml.safe_load_all(read_text(path)):
        if isinstance(doc, dict) and doc.get("kind") in ("List", "NodeList"):
            nodes += doc.get("items") or []
        elif isinstance(doc, dict) and doc.get("kind") == "Node":
            nodes.append(doc)
    return inventory_from_nodes(nodes, config.catalog(), config.label_schemes)
