"""The cluster's GPU inventory, read from node labels the way NVIDIA GPU Feature Discovery writes them.

Pure: takes node objects as plain dicts (``kubectl get nodes -o json`` items) and, optionally, the
GPUs already requested per node, so the same code serves the operator and ``toposerve plan
--inventory``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from toposerve.api.gpus import GPUCatalog

PRODUCT_LABEL = "nvidia.com/gpu.product"
COUNT_LABEL = "nvidia.com/gpu.count"
CLIQUE_LABEL = "nvidia.com/gpu.clique"
ZONE_LABEL = "topology.kubernetes.io/zone"
GPU_RESOURCE = "nvidia.com/gpu"


@dataclass(frozen=True)
class Taint:
    key: str
    value: str
    effect: str


def tolerates(tolerations: Iterable[Mapping[str, Any]], taint: Taint) -> bool:
    """Whether any toleration matches the taint (the scheduler's rule, for NoSchedule/NoExecute)."""
    for t in tolerations:
        if t.get("effect") and t["effect"] != taint.effect:
            continue
        key = t.get("key")
        if t.get("operator", "Equal") == "Exists":
            if not key or key == taint.key:
                return True
        elif key == taint.key and (t.get("value") or "") == taint.value:
            return True
    return False


@dataclass(frozen=True)
class NodeInfo:
    name: str
    gpu_type: str | None
    gpu_count: int
    allocatable_gpus: int
    used_gpus: int = 0
    spot: bool = False
    schedulable: bool = True
    labels: Mapping[str, str] = field(default_factory=dict)
    taints: tuple[Taint, ...] = ()

    def admits(self, node_selector: Mapping[str, str], tolerations: Iterable[Mapping[str, Any]]) -> bool:
        """Whether a pod with this node selector and these tolerations may be scheduled here."""
        if any(self.labels.get(k) != v for k, v in node_selector.items()):
            return False
        tols = list(tolerations)
        return all(tolerates(tols, t) for t in self.taints if t.effect in ("NoSchedule", "NoExecute"))

    @property
    def free_gpus(self) -> int:
        return max(0, self.allocatable_gpus - self.used_gpus) if self.schedulable else 0


@dataclass(frozen=True)
class Inventory:
    nodes: tuple[NodeInfo, ...] = ()

    @property
    def has_gpus(self) -> bool:
        return any(n.gpu_type and n.allocatable_gpus > 0 for n in self.nodes)

    def gpu_types(self) -> set[str]:
        return {n.gpu_type for n in self.nodes if n.gpu_type}

    def nodes_of(self, gpu_type: str, spot_allowed: bool = True) -> list[NodeInfo]:
        return [n for n in self.nodes if n.gpu_type == gpu_type and (spot_allowed or not n.spot)]

    def gpus_per_node(self, gpu_type: str) -> int | None:
        counts = [n.gpu_count for n in self.nodes if n.gpu_type == gpu_type]
        return max(counts) if counts else None

    def free_gpus(self, gpu_type: str, spot_allowed: bool = True) -> int:
        return sum(n.free_gpus for n in self.nodes_of(gpu_type, spot_allowed))

    def placeable_replicas(
        self,
        gpu_type: str,
        gpus_per_pod: int,
        pods: int,
        spot_allowed: bool,
        node_selector: Mapping[str, str] | None = None,
        tolerations: Iterable[Mapping[str, Any]] = (),
    ) -> int:
        """How many more replicas of ``pods`` pods x ``gpus_per_pod`` GPUs fit in free capacity, on
        nodes the pods may use (node selector, taints)."""
        tols = list(tolerations)
        nodes = [n for n in self.nodes_of(gpu_type, spot_allowed) if n.admits(node_selector or {}, tols)]
        slots = sum(n.free_gpus // max(1, gpus_per_pod) for n in nodes)
        return slots // max(1, pods)


def _int(value: Any, default: int = 0) -> int:
    try:
        return int(str(value))
    except (TypeError, ValueError):
        return default


def node_info(node: Mapping[str, Any], catalog: GPUCatalog, capacity_label: str, used: int = 0) -> NodeInfo:
    meta = node.get("metadata") or {}
    labels: dict[str, str] = dict(meta.get("labels") or {})
    status = node.get("status") or {}
    spec = node.get("spec") or {}
    product = labels.get(PRODUCT_LABEL)
    gpu = catalog.by_product(product) if product else None
    allocatable = _int((status.get("allocatable") or {}).get(GPU_RESOURCE))
    count = _int(labels.get(COUNT_LABEL), allocatable)
    ready = any(
        c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or []
    ) or not status.get("conditions")
    taints = tuple(
        Taint(str(t.get("key", "")), str(t.get("value") or ""), str(t.get("effect", "")))
        for t in spec.get("taints") or []
    )
    return NodeInfo(
        taints=taints,
        name=str(meta.get("name", "")),
        gpu_type=gpu.name if gpu else None,
        gpu_count=count,
        allocatable_gpus=allocatable,
        used_gpus=used,
        spot=labels.get(capacity_label) == "spot",
        schedulable=ready and not spec.get("unschedulable", False),
        labels=labels,
    )


def inventory_from_nodes(
    nodes: Iterable[Mapping[str, Any]],
    catalog: GPUCatalog,
    capacity_label: str = "toposerve.io/capacity-type",
    used_gpus: Mapping[str, int] | None = None,
) -> Inventory:
    used_gpus = used_gpus or {}
    infos = []
    for n in nodes:
        name = str((n.get("metadata") or {}).get("name", ""))
        infos.append(node_info(n, catalog, capacity_label, used_gpus.get(name, 0)))
    return Inventory(tuple(infos))
