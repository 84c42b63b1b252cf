"""The cluster's GPU inventory, read from node labels whatever scheme the provider uses.

Pure: takes node objects as plain dicts (``kubectl get nodes -o json`` items) and, optionally, what
scheduled pods already request per node, so the same code serves the operator and ``toposerve plan
--inventory``. A node is a GPU node when any scheme in ``nodelabels`` recognises its GPU model
(GFD, GKE, Karpenter, instance type), even while its allocatable ``nvidia.com/gpu`` reads 0 (a
device plugin restarting): the label says what the machine is, allocatable says what is free now.
Capacity counts CPU and memory as well as GPUs, because a GPU pod whose CPU request does not fit
the machine is just as unschedulable.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from toposerve.api.gpus import GPUCatalog, GPUType
from toposerve.api.nodelabels import DEFAULT_SCHEMES, GFD_CLIQUE, ZONE_LABEL, LabelSchemes

GPU_RESOURCE = "nvidia.com/gpu"
# Set by the GPU health agent (health/node.py; the names are the agent's, repeated so the planner
# does not import the agent): either one takes the node's capacity away and moves its replicas.
GPU_HEALTH_CONDITION = "GPUHealthy"
GPU_UNHEALTHY_TAINT = "toposerve.io/gpu-unhealthy"

_MEM_SUFFIX = {
    "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "Ti": 1024**4, "Pi": 1024**5, "Ei": 1024**6,
    "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
}  # fmt: skip
_QTY = re.compile(r"^([0-9.]+(?:[eE][-+]?[0-9]+)?)([a-zA-Z]*)$")


def parse_quantity(value: Any) -> float:
    """A Kubernetes resource quantity as a number (``500m`` -> 0.5, ``16Gi`` -> 17179869184)."""
    text = str(value).strip()
    m = _QTY.match(text)
    if not m:
        raise ValueError(f"not a Kubernetes quantity: {value!r}")
    number, suffix = float(m.group(1)), m.group(2)
    if suffix == "m":
        return number / 1000
    if suffix == "":
        return number
    if suffix in _MEM_SUFFIX:
        return number * _MEM_SUFFIX[suffix]
    raise ValueError(f"not a Kubernetes quantity: {value!r}")


def _qty(value: Any, default: float = 0.0) -> float:
    try:
        return parse_quantity(value) if value is not None else default
    except ValueError:
        return default


@dataclass(frozen=True)
class Usage:
    """Resources requested on one node by the pods bound to it."""

    gpus: int = 0
    cpu: float = 0.0  # cores
    memory: float = 0.0  # bytes
    ephemeral: float = 0.0  # bytes of ephemeral-storage

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.gpus + other.gpus,
            self.cpu + other.cpu,
            self.memory + other.memory,
            self.ephemeral + other.ephemeral,
        )


def pod_requests(pod: Mapping[str, Any]) -> Usage:
    """What a pod takes from its node, as the scheduler counts it: the sum over containers, or the
    largest init container if that is more (per resource), plus pod overhead."""

    def of(c: Mapping[str, Any]) -> Usage:
        req = (c.get("resources") or {}).get("requests") or {}
        return Usage(
            int(_qty(req.get(GPU_RESOURCE))),
            _qty(req.get("cpu")),
            _qty(req.get("memory")),
            _qty(req.get("ephemeral-storage")),
        )

    spec = pod.get("spec") or {}
    total = Usage()
    for c in spec.get("containers") or []:
        total = total + of(c)
    for c in spec.get("initContainers") or []:
        u = of(c)
        total = Usage(
            max(total.gpus, u.gpus), max(total.cpu, u.cpu), max(total.memory, u.memory),
            max(total.ephemeral, u.ephemeral),
        )  # fmt: skip
    overhead = spec.get("overhead") or {}
    return total + Usage(0, _qty(overhead.get("cpu")), _qty(overhead.get("memory")))


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
class PodShape:
    """What one pod of a replica asks of a node."""

    gpus: int
    cpu: float = 0.0
    memory: float = 0.0
    ephemeral: float = 0.0


@dataclass(frozen=True)
class NodeInfo:
    name: str
    gpu_type: str | None
    gpu_count: int
    allocatable_gpus: int
    used_gpus: int = 0
    spot: bool = False
    interrupted: bool = False  # an interruption taint (labelSchemes.interruptionTaints) is on the node
    interruption: str | None = None  # that taint's key
    gpu_unhealthy: bool = False  # GPUHealthy=False or the gpu-unhealthy taint (the health agent's)
    health_message: str = ""  # the GPUHealthy condition's message
    cordoned: bool = False  # spec.unschedulable: `kubectl cordon` / the first step of `kubectl drain`
    schedulable: bool = True
    labels: Mapping[str, str] = field(default_factory=dict)
    taints: tuple[Taint, ...] = ()
    scheme: str | None = None  # which label scheme named the GPU (gfd, gke, karpenter, instance-type)
    allocatable_cpu: float = math.inf
    allocatable_memory: float = math.inf
    used_cpu: float = 0.0
    used_memory: float = 0.0
    allocatable_ephemeral: float = math.inf
    used_ephemeral: float = 0.0
    # Allocatable extended resources other than GPUs, as device plugins advertise them (EFA
    # ``vpc.amazonaws.com/efa``, ``rdma/*``, GKE ``networking.gke.io.networks/*``): render/fabric.py
    # requests a fabric only where every node of the GPU type offers it.
    extended: Mapping[str, int] = field(default_factory=dict)

    def admits(self, node_selector: Mapping[str, str], tolerations: Iterable[Mapping[str, Any]]) -> bool:
        """Whether a pod with this node selector and these tolerations may be scheduled here."""
        if any(self.labels.get(k) != v for k, v in node_selector.items()):
            return False
        tols = list(tolerations)
        return all(tolerates(tols, t) for t in self.taints if t.effect in ("NoSchedule", "NoExecute"))

    @property
    def free_gpus(self) -> int:
        return max(0, self.allocatable_gpus - self.used_gpus) if self.schedulable else 0

    def pods_fitting(self, shape: PodShape) -> int:
        """How many more pods of ``shape`` fit in what is free on this node (GPUs, CPU, memory)."""
        if not self.schedulable:
            return 0
        fits = [self.free_gpus // shape.gpus if shape.gpus else 10**6]
        if shape.cpu > 0:
            fits.append(int(max(0.0, self.allocatable_cpu - self.used_cpu) // shape.cpu))
        if shape.memory > 0:
            fits.append(int(max(0.0, self.allocatable_memory - self.used_memory) // shape.memory))
        if shape.ephemeral > 0:
            fits.append(int(max(0.0, self.allocatable_ephemeral - self.used_ephemeral) // shape.ephemeral))
        return max(0, min(fits))


@dataclass(frozen=True)
class Inventory:
    nodes: tuple[NodeInfo, ...] = ()

    @property
    def has_gpus(self) -> bool:
        """Whether any node is a GPU machine by its labels (allocatable may read 0 for a while)."""
        return any(n.gpu_type for n in self.nodes)

    def gpu_types(self) -> set[str]:
        return {n.gpu_type for n in self.nodes if n.gpu_type}

    def nodes_of(self, gpu_type: str, spot_allowed: bool = True) -> list[NodeInfo]:
        return [n for n in self.nodes if n.gpu_type == gpu_type and (spot_allowed or not n.spot)]

    def gpus_per_node(self, gpu_type: str) -> int | None:
        counts = [n.gpu_count for n in self.nodes if n.gpu_type == gpu_type and n.gpu_count > 0]
        return max(counts) if counts else None

    def free_gpus(self, gpu_type: str, spot_allowed: bool = True) -> int:
        return sum(n.free_gpus for n in self.nodes_of(gpu_type, spot_allowed))

    def host_share(self, gpu_type: str, gpus: int) -> tuple[float, float] | None:
        """(CPU cores, memory bytes) that ``gpus`` GPUs' share of the smallest machine of this type
        offers (allocatable x gpus / GPUs per node); None when the cluster has no such node."""
        shares = [
            (n.allocatable_cpu * gpus / n.gpu_count, n.allocatable_memory * gpus / n.gpu_count)
            for n in self.nodes_of(gpu_type)
            if n.gpu_count > 0 and math.isfinite(n.allocatable_cpu) and math.isfinite(n.allocatable_memory)
        ]
        if not shares:
            return None
        return min(s[0] for s in shares), min(s[1] for s in shares)

    def domains(self, gpu_type: str, key: str, spot_allowed: bool = True) -> dict[str, list[NodeInfo]]:
        """Nodes of ``gpu_type`` grouped by the value of the topology label ``key`` (nodes without it
        are left out)."""
        out: dict[str, list[NodeInfo]] = {}
        for n in self.nodes_of(gpu_type, spot_allowed):
            if key in n.labels:
                out.setdefault(n.labels[key], []).append(n)
        return out

    def placeable_replicas(
        self,
        gpu_type: str,
        gpus_per_pod: int,
        pods: int,
        spot_allowed: bool,
        node_selector: Mapping[str, str] | None = None,
        tolerations: Iterable[Mapping[str, Any]] = (),
        shape: PodShape | None = None,
        topology_key: str | None = None,
    ) -> int:
        """How many more replicas of ``pods`` pods fit in free capacity, on nodes the pods may use
        (node selector, taints, GPUs, CPU, memory). Multi-pod replicas with a ``topology_key`` count
        within each domain, since a replica cannot straddle two."""
        tols = list(tolerations)
        shape = shape or PodShape(gpus=gpus_per_pod)
        nodes = [n for n in self.nodes_of(gpu_type, spot_allowed) if n.admits(node_selector or {}, tols)]
        if pods > 1 and topology_key:
            groups: dict[str, list[NodeInfo]] = {}
            for n in nodes:
                if topology_key in n.labels:
                    groups.setdefault(n.labels[topology_key], []).append(n)
            return sum(sum(n.pods_fitting(shape) for n in g) // pods for g in groups.values())
        return sum(n.pods_fitting(shape) for n in nodes) // max(1, pods)


def _int(value: Any, default: int = 0) -> int:
    try:
        return int(str(value))
    except (TypeError, ValueError):
        return default


def recognise(
    labels: Mapping[str, str], catalog: GPUCatalog, schemes: LabelSchemes = DEFAULT_SCHEMES
) -> tuple[GPUType | None, str | None, int | None]:
    """(GPU type, scheme name, GPUs per node from labels) for a node's labels; Nones for a CPU node."""
    for s in schemes.gpu_type:
        value = labels.get(s.type_label)
        if not value:
            continue
        for suffix in s.strip_suffixes:
            value = value.removesuffix(suffix)
        memory = _int(labels.get(s.memory_label)) if s.memory_label else 0
        gpu = catalog.by_value(s.catalog_field, value, memory or None)
        if gpu is not None:
            count = _int(labels.get(s.count_label)) if s.count_label else 0
            return gpu, s.name, count or None
    return None, None, None


def is_spot(labels: Mapping[str, str], schemes: LabelSchemes = DEFAULT_SCHEMES) -> bool:
    return any(labels.get(s.key) in s.values for s in schemes.spot)


def interruption(taints: Iterable[Mapping[str, Any]], schemes: LabelSchemes = DEFAULT_SCHEMES) -> str | None:
    """The key of the first taint announcing the node's termination (spot interruption notice,
    maintenance), or None."""
    for t in taints:
        if any(m.matches(t) for m in schemes.interruption_taints):
            return str(t.get("key"))
    return None


def node_info(
    node: Mapping[str, Any],
    catalog: GPUCatalog,
    schemes: LabelSchemes = DEFAULT_SCHEMES,
    used: Usage | None = None,
) -> NodeInfo:
    meta = node.get("metadata") or {}
    labels: dict[str, str] = dict(meta.get("labels") or {})
    status = node.get("status") or {}
    spec = node.get("spec") or {}
    gpu, scheme, label_count = recognise(labels, catalog, schemes)
    alloc = status.get("allocatable") or {}
    capacity = status.get("capacity") or {}
    allocatable = _int(alloc.get(GPU_RESOURCE))
    count = label_count or _int(capacity.get(GPU_RESOURCE)) or allocatable
    conditions = {c.get("type"): c for c in status.get("conditions") or []}
    ready = "Ready" not in conditions or conditions["Ready"].get("status") == "True"
    health = conditions.get(GPU_HEALTH_CONDITION) or {}
    unhealthy = health.get("status") == "False" or any(
        t.get("key") == GPU_UNHEALTHY_TAINT for t in spec.get("taints") or []
    )
    taints = tuple(
        Taint(str(t.get("key", "")), str(t.get("value") or ""), str(t.get("effect", "")))
        for t in spec.get("taints") or []
    )
    used = used or Usage()
    notice = interruption(spec.get("taints") or [], schemes)
    stopping = notice is not None
    return NodeInfo(
        taints=taints,
        name=str(meta.get("name", "")),
        gpu_type=gpu.name if gpu else None,
        gpu_count=count,
        allocatable_gpus=allocatable,
        used_gpus=used.gpus,
        spot=is_spot(labels, schemes),
        interrupted=stopping,
        interruption=notice,
        gpu_unhealthy=unhealthy,
        cordoned=bool(spec.get("unschedulable", False)),
        health_message=str(health.get("message") or ""),
        # A node about to go, or whose GPUs are unhealthy, offers no capacity, whatever the taint's effect.
        schedulable=ready and not spec.get("unschedulable", False) and not stopping and not unhealthy,
        labels=labels,
        scheme=scheme,
        allocatable_cpu=_qty(alloc.get("cpu"), math.inf),
        allocatable_memory=_qty(alloc.get("memory"), math.inf),
        used_cpu=used.cpu,
        used_memory=used.memory,
        allocatable_ephemeral=_qty(alloc.get("ephemeral-storage"), math.inf),
        used_ephemeral=used.ephemeral,
        extended={k: int(_qty(v)) for k, v in alloc.items() if "/" in k and k != GPU_RESOURCE},
    )


def inventory_from_nodes(
    nodes: Iterable[Mapping[str, Any]],
    catalog: GPUCatalog,
    schemes: LabelSchemes = DEFAULT_SCHEMES,
    used: Mapping[str, Usage] | None = None,
) -> Inventory:
    used = used or {}
    infos = []
    for n in nodes:
        name = str((n.get("metadata") or {}).get("name", ""))
        infos.append(node_info(n, catalog, schemes, used.get(name)))
    return Inventory(tuple(infos))


def usage_by_node(pods: Iterable[Mapping[str, Any]]) -> dict[str, Usage]:
    """Requests of bound, unfinished pods summed per node (what the scheduler has handed out)."""
    out: dict[str, Usage] = {}
    for pod in pods:
        node = (pod.get("spec") or {}).get("nodeName")
        phase = (pod.get("status") or {}).get("phase")
        if not node or phase in ("Succeeded", "Failed"):
            continue
        out[node] = out.get(node, Usage()) + pod_requests(pod)
    return out


class TopologyChoice(NamedTuple):
    """Where the pods of one multi-node replica must be, and where they had better be.

    ``key``: the label every pod of a replica shares, required (None: no label can be required, the
    pods land wherever the scheduler puts them). ``preferred``: better labels, best first, that the
    nodes may or may not carry, rendered as preferred pod affinity. ``reason``: what status says.
    """

    key: str | None
    reason: str
    preferred: tuple[str, ...] = ()


def provisioned_topology(
    inventory: Inventory, schemes: LabelSchemes = DEFAULT_SCHEMES
) -> tuple[str, tuple[str, ...]]:
    """(where new nodes come from, the topology labels each of them will carry) in a cluster whose
    GPU pools scale from zero.

    Recognised by the provider's own node labels on any node (CPU nodes included: a pool at zero has
    none of its own): Karpenter, GKE, EKS, AKS (``labelSchemes.provisioned``). A cluster matching no
    provider: the topology labels every node now carries (its own convention, e.g. an on-prem zone
    per rack); no nodes at all: none.
    """
    for p in schemes.provisioned:
        if any(key in n.labels for n in inventory.nodes for key in p.detect):
            return p.name, tuple(p.topology)
    if not inventory.nodes:
        return "an empty cluster", ()
    looked = [*schemes.topology, ZONE_LABEL]
    every = tuple(k for k in looked if all(k in n.labels for n in inventory.nodes))
    return "this cluster (no provisioner recognised; labels every node carries)", every


def topology_key_for(
    inventory: Inventory | None,
    gpu_type: str,
    nodes_per_replica: int,
    candidates: Sequence[str],
    fallback: str = ZONE_LABEL,
    schemes: LabelSchemes = DEFAULT_SCHEMES,
    multi_node_nvlink: bool = False,
    on_demand: bool = False,
) -> TopologyChoice:
    """The label that keeps a multi-node replica inside one tightly connected domain, and why.

    With nodes of this type: the first of ``candidates`` (best first) whose domain holds
    ``nodes_per_replica`` of them wins; then ``fallback`` (the zone); None when no label the nodes
    carry groups enough of them (status says so). Without an inventory the first candidate is
    assumed.

    With no node of this type now (a pool scaled to zero, gpuNodeProvisioning on-demand), the key is
    chosen from the labels a node the provisioner creates will carry (``provisioned_topology``), never
    from what existing nodes of other types carry: kube-scheduler rejects a node lacking a required
    pod-affinity topology key even for a group's first pod (InterPodAffinity: "all topology labels
    must exist on the node"), so requiring ``nvidia.com/gpu.clique`` of an H100 pool at zero keeps
    the leader Pending and the provisioner never creates the node. The first candidate (or the
    fallback) every new node carries is required; the better candidates are preferred, with the
    NVLink clique left out unless the GPU type's NVLink domain spans nodes (``multi_node_nvlink``).
    With ``on_demand`` the better candidates stay preferred once nodes exist, so that a pool going
    from zero to some nodes does not change the pods' template (a rolling restart of every group)
    while the required key stays the same.
    """
    if inventory is None:
        return TopologyChoice((candidates[0] if candidates else fallback), "no node inventory: assumed")
    if not inventory.nodes_of(gpu_type):
        source, carried = provisioned_topology(inventory, schemes)
        order = list(dict.fromkeys([*candidates, fallback]))
        key = next((k for k in order if k in carried), None)
        better = order[: order.index(key)] if key else order
        preferred = tuple(k for k in better if k != GFD_CLIQUE or multi_node_nvlink)
        pref = f"; preferred {', '.join(preferred)} (only some new nodes carry them)" if preferred else ""
        if key is None:
            reason = (
                f"no {gpu_type} nodes now: none of {', '.join(order)} is on every node {source} creates, so "
                f"none is required (a group's pods may land in different domains){pref}"
            )
        else:
            reason = (
                f"no {gpu_type} nodes now: required {key}, which every node {source} creates carries{pref}; "
                "a required key the new node lacked would keep the group's first pod Pending and no node "
                "would be created"
            )
        return TopologyChoice(key, reason, preferred)
    order = [*candidates, fallback]
    for i, key in enumerate(order):
        groups = inventory.domains(gpu_type, key)
        if groups and max(len(g) for g in groups.values()) >= nodes_per_replica:
            biggest = max(len(g) for g in groups.values())
            reason = f"{gpu_type} nodes carry {key} ({len(groups)} domain(s), up to {biggest} nodes)"
            if not on_demand:
                return TopologyChoice(key, reason)
            kept = tuple(
                k for k in dict.fromkeys(order[:i]) if k != key and (k != GFD_CLIQUE or multi_node_nvlink)
            )
            pref = f"; preferred {', '.join(kept)} (nodes created on demand may carry them)" if kept else ""
            return TopologyChoice(key, f"required {key}: {reason}{pref}", kept)
    looked = ", ".join([*candidates, fallback])
    return TopologyChoice(
        None, f"no topology label groups {nodes_per_replica} {gpu_type} nodes (looked for {looked})"
    )
