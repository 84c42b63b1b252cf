"""Which Kubernetes version each feature a spec uses needs, and what a given API server lacks (pure).

Some fields the renderer emits only work from a Kubernetes version on, and an older API server
does not say so clearly: ``matchLabelKeys`` in pod affinity (group co-location of multi-node
replicas) is dropped without a word where the feature gate is off, so a replica's pods scatter
over racks; an ``image`` volume (``model.cache.type: image``) is rejected at pod creation, long
after the LLMDeployment was accepted; ``behavior.*.tolerance`` of an HPA is dropped; a pod's
``resourceClaims`` (the IMEX channel of a GB200 ComputeDomain, DRA) are dropped where DRA is off,
and the engines start without multi-node NVLink. So the operator reads the server's version at
start and refuses such a spec up front (a condition and an Event naming the field, nothing
applied), and ``toposerve render --kubernetes-version`` does the same offline.

The table gives the version from which each feature is *on by default* (what a managed cluster
has: EKS, GKE and AKS do not let users turn feature gates on), and the version where the gate
first exists, for clusters that enable it early (operator config ``enabledFeatureGates``).
Source of every row: ``pkg/features/kube_features.go`` of ``k8s.io/kubernetes@v1.35.4`` (the
versioned feature specs), checked against the KEPs named.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from toposerve.api.spec import LLMDeploymentSpec

if TYPE_CHECKING:  # the planner imports api/, not the other way round
    from toposerve.planner.plan import DeploymentPlan

Version = tuple[int, int]  # (major, minor)

_VERSION = re.compile(r"^\s*v?(\d+)\.(\d+)(?:[.+\-].*)?\s*$")
_MINOR = re.compile(r"^(\d+)")

SOURCE = "k8s.io/kubernetes@v1.35.4 pkg/features/kube_features.go"


@dataclass(frozen=True)
class Feature:
    gate: str
    available: Version  # the gate exists (alpha, or beta off by default): usable when enabled
    default_on: Version  # beta or GA and on by default: every cluster of this version has it
    stage: str  # what it is at ``default_on``, for messages
    what: str  # what toposerve uses it for
    kep: str  # the enhancement's URL

    @property
    def minimum(self) -> str:
        return show(self.default_on)


FEATURES: dict[str, Feature] = {
    f.gate: f
    for f in (
        Feature(
            "MatchLabelKeysInPodAffinity", (1, 29), (1, 31), "beta, on by default",
            "matchLabelKeys in pod affinity: the pods of one multi-node replica share a topology domain",
            "https://kep.k8s.io/3633",
        ),
        Feature(
            "ImageVolume", (1, 31), (1, 35), "beta, on by default",
            "image volumes: model weights mounted from an OCI image (model.cache.type: image)",
            "https://kep.k8s.io/4639",
        ),
        Feature(
            "HPAConfigurableTolerance", (1, 33), (1, 35), "beta, on by default",
            "HorizontalPodAutoscaler behavior.scaleUp/scaleDown.tolerance (autoscaling.mode: hpa)",
            "https://kep.k8s.io/4951",
        ),
        # Versioned spec: alpha 1.26, beta (off by default) 1.32, GA and on by default 1.34
        # (resource.k8s.io/v1), locked on from 1.35. Where the gate is off the API server drops a
        # pod's resourceClaims without a word, and the engine runs without its IMEX channel. The
        # gate's 1.26-1.29 alpha was "classic" DRA, a different API; NVIDIA's DRA driver (the
        # ComputeDomain's) needs structured parameters and names 1.32 as its minimum, with DRA
        # enabled: that is where an enabled gate counts from.
        Feature(
            "DynamicResourceAllocation", (1, 32), (1, 34), "GA, on by default",
            "pod resourceClaims (DRA): the IMEX channel of a GB200 ComputeDomain (NVIDIA's DRA driver)",
            "https://kep.k8s.io/4381",
        ),
    )
}  # fmt: skip


@dataclass(frozen=True)
class Need:
    """One feature a spec needs, and the field that asks for it (for the message)."""

    gate: str
    field: str  # e.g. "spec.model.cache.type"
    detail: str  # what in the field, e.g. "image"


def parse_version(text: str) -> Version:
    """``(major, minor)`` of a server's gitVersion: ``v1.35.4``, ``v1.33.2-eks-abc``,
    ``v1.31.1-gke.100``, ``v1.30.0+k3s1``, ``1.34``. ValueError for anything else."""
    m = _VERSION.match(text or "")
    if not m:
        raise ValueError(f"not a Kubernetes version: {text!r} (expected e.g. 1.33 or v1.33.2)")
    return int(m.group(1)), int(m.group(2))


def server_version(info: Mapping[str, Any]) -> tuple[Version, str]:
    """``(major, minor)`` and the text to show, from the API server's ``/version`` answer.

    gitVersion first; ``major``/``minor`` otherwise (managed clusters report minor as ``"33+"``).
    """
    git = str(info.get("gitVersion") or "")
    try:
        return parse_version(git), git
    except ValueError:
        pass
    major, minor = _MINOR.match(str(info.get("major") or "")), _MINOR.match(str(info.get("minor") or ""))
    if major and minor:
        v = (int(major.group(1)), int(minor.group(1)))
        return v, git or show(v)
    raise ValueError(f"the API server reported no usable version: {dict(info)!r}")


def show(v: Version) -> str:
    return f"{v[0]}.{v[1]}"


def needs(
    spec: LLMDeploymentSpec,
    plan: DeploymentPlan | None = None,
    objects: Iterable[Mapping[str, Any]] = (),
) -> list[Need]:
    """The features ``spec`` (and its ``plan``, a DeploymentPlan, for what the planner decided)
    makes the rendered objects use. Some depend on the nodes as well (a fabric is chosen from what
    they offer, render/fabric.py): those are read from the ``objects`` rendered, and named by the
    pool and GPU type their workload carries in its labels."""
    out: list[Need] = []
    if plan is not None:
        for pool in plan.pools:
            if plan.engine == "vllm" and pool.fits and pool.nodes_per_replica > 1 and pool.topology_key:
                # The GPU type chosen makes a replica span nodes: a larger one would not.
                field = f"spec.pools[{pool.name}].gpuTypes" if spec.pools else "spec.placement.gpuTypes"
                detail = (
                    f"{pool.gpu_type} (pool {pool.name}): a replica spans {pool.nodes_per_replica} nodes, "
                    f"kept in one {pool.topology_key} domain by matchLabelKeys in pod affinity,"
                )
                out.append(Need("MatchLabelKeysInPodAffinity", field, detail))
    # The weights cache is the vLLM engine's (the mock engine loads no weights).
    if spec.model.cache.type == "image" and (plan is None or plan.engine == "vllm"):
        out.append(Need("ImageVolume", "spec.model.cache.type", "image"))
    a = spec.autoscaling
    if a.effective_mode == "hpa" and abs(a.tolerance - 0.1) > 1e-9:
        out.append(Need("HPAConfigurableTolerance", "spec.autoscaling.tolerance", f"{a.tolerance:g}"))
    # DRA: the pods of a workload claim an IMEX channel (GB200 multi-node NVLink).
    claimed: list[tuple[str, str]] = []
    for obj in objects:
        if "DynamicResourceAllocation" not in used_in([obj]):
            continue
        labels = (obj.get("metadata") or {}).get("labels") or {}
        key = (str(labels.get(_LABEL_POOL, "default")), str(labels.get(_LABEL_GPU_TYPE, "?")))
        if key not in claimed:
            claimed.append(key)
    for pool_name, gpu in claimed:
        field = f"spec.pools[{pool_name}].gpuTypes" if spec.pools else "spec.placement.gpuTypes"
        detail = (
            f"{gpu} (pool {pool_name}): its replicas span the nodes of one NVLink domain through an "
            "IMEX channel the pods claim (pod resourceClaims),"
        )
        out.append(Need("DynamicResourceAllocation", field, detail))
    return out


_LABEL_POOL = "toposerve.io/pool"  # render/objects.py: LABEL_POOL, LABEL_GPU_TYPE
_LABEL_GPU_TYPE = "toposerve.io/gpu-type"


def lacks(server: Version, need: Need, enabled_gates: Iterable[str] = ()) -> bool:
    """Whether a server of this version does not give ``need`` (gates in ``enabled_gates`` count
    from the version where they exist, the others from where they are on by default)."""
    f = FEATURES[need.gate]
    since = f.available if need.gate in set(enabled_gates) else f.default_on
    return server < since


def message(need: Need, server_text: str) -> str:
    """e.g. ``spec.model.cache.type: image needs Kubernetes >= 1.35 (ImageVolume beta, on by
    default); the API server is v1.33.2``."""
    f = FEATURES[need.gate]
    return (
        f"{need.field}: {need.detail} needs Kubernetes >= {f.minimum} ({f.gate} {f.stage}); "
        f"the API server is {server_text}"
    )


# Where a feature found only in the rendered objects comes from (``needs`` names the field better
# when it can: this is the fallback, e.g. a fallback GPU type whose replicas span nodes).
_FIELD_OF = {
    "MatchLabelKeysInPodAffinity": ("spec.placement.gpuTypes", "a GPU type whose replicas span several "
                                    "nodes (group co-location by matchLabelKeys in pod affinity)"),
    "ImageVolume": ("spec.model.cache.type", "image"),
    "HPAConfigurableTolerance": ("spec.autoscaling.tolerance", "a tolerance other than 0.1"),
    "DynamicResourceAllocation": ("spec.placement.gpuTypes", "a GPU type whose replicas claim an IMEX "
                                  "channel (pod resourceClaims)"),
}  # fmt: skip


def missing(
    server: Version,
    spec: LLMDeploymentSpec,
    plan: DeploymentPlan | None = None,
    objects: Iterable[Mapping[str, Any]] = (),
    enabled_gates: Iterable[str] = (),
    server_text: str | None = None,
) -> list[str]:
    """One message per feature that ``spec`` (its ``plan``, the ``objects`` rendered from them)
    needs and a server of version ``server`` lacks; empty: the server serves all of it."""
    gates = list(enabled_gates)
    objects = list(objects)
    found = needs(spec, plan, objects)
    named = {n.gate for n in found}
    found += [Need(g, *_FIELD_OF[g]) for g in sorted(used_in(objects) - named)]
    text = server_text or f"v{show(server)}"
    return [message(n, text) for n in found if lacks(server, n, gates)]


def used_in(objects: Iterable[Mapping[str, Any]]) -> set[str]:
    """The gates rendered objects actually use (a check that ``needs`` misses nothing)."""
    found: set[str] = set()

    def walk(node: Any, parent: str) -> None:
        if isinstance(node, dict):
            if parent in ("requiredDuringSchedulingIgnoredDuringExecution", "podAffinityTerm") and (
                node.get("matchLabelKeys") or node.get("mismatchLabelKeys")
            ):
                found.add("MatchLabelKeysInPodAffinity")
            if parent == "volumes" and "image" in node:
                found.add("ImageVolume")
            if parent in ("scaleUp", "scaleDown") and "tolerance" in node:
                found.add("HPAConfigurableTolerance")
            if node.get("resourceClaims") and "containers" in node:
                found.add("DynamicResourceAllocation")
            for k, v in node.items():
                walk(v, k)
        elif isinstance(node, list):
            for v in node:
                walk(v, parent)

    for obj in objects:
        walk(obj, "")
    return found
