"""Node affinity, tolerations and pod co-location for serving pods, across providers' label schemes.

Pure. The scheduler ORs ``nodeSelectorTerms`` and ANDs the expressions inside one, so a GPU type is
required as one term per label scheme (GFD product, GKE accelerator, Karpenter GPU name with its
memory, instance type), each carrying the same on-demand constraints: the manifest schedules on
whatever scheme the cluster uses, and on none it does not. ``NotIn`` also matches nodes without
the label, which is what makes "not spot" safe on providers that never set a given spot label.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from toposerve.api.gpus import GPUType
from toposerve.api.nodelabels import HOSTNAME_LABEL, LabelSchemes

GROUP_KEY_LABEL = "leaderworkerset.sigs.k8s.io/group-key"


def _not_spot(schemes: LabelSchemes) -> list[dict[str, Any]]:
    return [{"key": s.key, "operator": "NotIn", "values": list(s.values)} for s in schemes.spot]


def gpu_terms(gpu: GPUType, gpus_per_pod: int, spot: bool, schemes: LabelSchemes) -> list[dict[str, Any]]:
    """One nodeSelectorTerm per label scheme that names this GPU type."""
    extra = [] if spot else _not_spot(schemes)
    terms: list[dict[str, Any]] = []
    for s in schemes.gpu_type:
        values = gpu.values_for(s.catalog_field)
        if not values:
            continue
        exprs: list[dict[str, Any]] = [{"key": s.type_label, "operator": "In", "values": values}]
        if s.memory_label and s.catalog_field == "karpenterNames":
            # Karpenter names A100 40 GB and 80 GB both "a100": tell them apart by memory (MiB per GPU).
            exprs.append(
                {"key": s.memory_label, "operator": "Gt", "values": [str(int(gpu.memory_mib * 0.9))]}
            )
            exprs.append(
                {"key": s.memory_label, "operator": "Lt", "values": [str(int(gpu.memory_mib * 1.1))]}
            )
        if s.count_label and gpus_per_pod > 1:
            exprs.append({"key": s.count_label, "operator": "Gt", "values": [str(gpus_per_pod - 1)]})
        terms.append({"matchExpressions": exprs + extra})
    return terms


def serving_affinity(
    gpu: GPUType,
    gpus_per_pod: int,
    spot: bool,
    schemes: LabelSchemes,
    requires_gpu: bool,
    group_topology_key: str | None = None,
    group_selector: dict[str, str] | None = None,
    group_preferred_keys: Sequence[str] = (),
) -> dict[str, Any]:
    """The affinity of a serving pod.

    ``requires_gpu`` False (the mock engine) only prefers nodes of the GPU type, keeping the
    on-demand rule required. ``group_topology_key`` co-locates the pods of one LeaderWorkerSet
    group in one domain of that label: pod affinity to the pool's pods (``group_selector``) narrowed
    to the pod's own group by ``matchLabelKeys`` (the API server adds the group-key value at pod
    creation; the key may not also appear in the selector), so several groups can share one big
    domain (a GB200 rack holds many 2-node replicas).

    ``group_preferred_keys`` (best first) only steer the group's pods into one domain of those
    labels, as preferred pod affinity with falling weights: for a GPU pool at zero nodes, whose new
    nodes may lack them (a required key a node lacks rejects even the group's first pod, so nothing
    schedules and no node is provisioned). Karpenter treats preferences as requirements first and
    relaxes them when they cannot be met (karpenter.sh/docs/concepts/scheduling, "Preferences").
    """
    node: dict[str, Any]
    terms = gpu_terms(gpu, gpus_per_pod, spot, schemes)
    if requires_gpu:
        node = {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": terms}}
    else:
        node = {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {"weight": 100, "preference": {"matchExpressions": t["matchExpressions"][:1]}} for t in terms
            ]
        }
        if not spot:
            node["requiredDuringSchedulingIgnoredDuringExecution"] = {
                "nodeSelectorTerms": [{"matchExpressions": _not_spot(schemes)}]
            }
    out: dict[str, Any] = {"nodeAffinity": node}

    def term(key: str) -> dict[str, Any]:
        return {
            "labelSelector": {"matchLabels": dict(group_selector or {})},
            "matchLabelKeys": [GROUP_KEY_LABEL],
            "topologyKey": key,
        }

    pod: dict[str, Any] = {}
    if group_topology_key:
        pod["requiredDuringSchedulingIgnoredDuringExecution"] = [term(group_topology_key)]
    preferred = [k for k in dict.fromkeys(group_preferred_keys) if k != group_topology_key]
    if preferred:
        # 100 for the best, halving after: one better domain outweighs all the worse ones together.
        pod["preferredDuringSchedulingIgnoredDuringExecution"] = [
            {"weight": max(1, 100 >> i), "podAffinityTerm": term(k)} for i, k in enumerate(preferred)
        ]
    if pod:
        out["podAffinity"] = pod
    return out


def serving_tolerations(
    spot: bool, schemes: LabelSchemes, user: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """GPU taints of every provider, spot taints when spot is allowed, then the user's."""
    tols = [dict(t) for t in schemes.gpu_tolerations]
    if spot:
        for s in schemes.spot:
            if s.taint:
                tols += [
                    {"key": s.key, "operator": "Equal", "value": v, "effect": "NoSchedule"} for v in s.values
                ]
    return tols + user


def router_affinity(schemes: LabelSchemes, mode: str, selector: dict[str, str]) -> dict[str, Any]:
    """Routers spread over nodes and stay off GPU nodes (preferred, or required with require-cpu):
    a GPU machine's CPUs belong to the engines, and an untainted GPU fleet would otherwise take them."""
    cpu_only = {
        # Instance types exist on every node, so only the GPU-specific labels tell a CPU node apart.
        "matchExpressions": [
            {"key": s.type_label, "operator": "DoesNotExist"}
            for s in schemes.gpu_type
            if s.catalog_field != "instanceTypes"
        ]
    }
    node: dict[str, Any] = {}
    if mode == "require-cpu":
        node["requiredDuringSchedulingIgnoredDuringExecution"] = {"nodeSelectorTerms": [cpu_only]}
    elif mode == "prefer-cpu":
        node["preferredDuringSchedulingIgnoredDuringExecution"] = [{"weight": 100, "preference": cpu_only}]
    out: dict[str, Any] = {
        "podAntiAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {
                    "weight": 100,
                    "podAffinityTerm": {
                        "labelSelector": {"matchLabels": selector},
                        "topologyKey": HOSTNAME_LABEL,
                    },
                }
            ]
        }
    }
    if node:
        out["nodeAffinity"] = node
    return out
