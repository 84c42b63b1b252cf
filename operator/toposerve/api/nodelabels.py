"""How real clusters label GPU nodes, spot capacity and network topology: one table, many providers.

No single label scheme exists. NVIDIA GPU Feature Discovery (GFD) writes
``nvidia.com/gpu.product`` (``NVIDIA-H100-80GB-HBM3``), GKE without the GPU operator writes
``cloud.google.com/gke-accelerator`` (``nvidia-h100-80gb``), Karpenter on EKS writes
``karpenter.k8s.aws/instance-gpu-name`` (``h100``; the A100 40/80 GB builds differ only by
``instance-gpu-memory``), EKS managed node groups and AKS carry only the instance type
(``p5.48xlarge``, ``Standard_ND96isr_H100_v5``). Recognising a GPU node therefore tries every
scheme, and node affinity is rendered as one ``nodeSelectorTerm`` per scheme (terms are ORed by the
scheduler), so the same manifest schedules on whichever scheme the cluster uses.

Sources (read 2026-11): GFD README (NVIDIA/k8s-device-plugin, ``gpu-feature-discovery``), GKE
"About GPUs" / "Spot VMs" / "compact placement" docs, Karpenter "Well-known labels" (AWS
provider), EKS managed node group labels, AKS "Use GPUs" and "spot node pools" docs. Everything
here is overridable through the operator config (``labelSchemes``), and new GPU types carry their
own values in ``extraGpuTypes``.
"""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

INSTANCE_TYPE_LABEL = "node.kubernetes.io/instance-type"
ZONE_LABEL = "topology.kubernetes.io/zone"
HOSTNAME_LABEL = "kubernetes.io/hostname"
GFD_PRODUCT = "nvidia.com/gpu.product"
GFD_COUNT = "nvidia.com/gpu.count"
GFD_MEMORY = "nvidia.com/gpu.memory"
GFD_CLIQUE = "nvidia.com/gpu.clique"


class _Cfg(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


class GPUTypeScheme(_Cfg):
    """One way a provider names the GPU model of a node."""

    name: str = Field(description="Scheme name (gfd, gke, karpenter, instance-type, ...).")
    type_label: str = Field(description="Node label whose value names the GPU model.")
    count_label: str | None = Field(default=None, description="Node label with the GPUs per node, if any.")
    memory_label: str | None = Field(
        default=None,
        description="Node label with the memory of one GPU in MiB; tells apart same-name builds.",
    )
    catalog_field: str = Field(
        description="GPU catalog field listing this scheme's values: products, gkeAccelerators, "
        "karpenterNames or instanceTypes."
    )
    strip_suffixes: list[str] = Field(
        default_factory=list,
        description="Value suffixes ignored when matching (GFD's -SHARED for time-slicing).",
    )


class SpotLabel(_Cfg):
    """A label (and the values) that marks a node as spot / preemptible capacity."""

    key: str
    values: list[str]
    taint: bool = Field(
        default=False, description="Providers that also taint spot nodes with key=value:NoSchedule."
    )


class TaintMatch(_Cfg):
    """A taint that announces a node's interruption; empty value or effect match any."""

    key: str
    value: str | None = None
    effect: str | None = None

    def matches(self, taint: Mapping[str, object]) -> bool:
        return (
            taint.get("key") == self.key
            and (self.value is None or taint.get("value") == self.value)
            and (self.effect is None or taint.get("effect") == self.effect)
        )


class ProvisionedNodes(_Cfg):
    """What a node a provisioner creates from zero is sure to carry, so that a GPU pool at zero nodes
    is never given a required pod affinity on a label its first node will lack (kube-scheduler then
    rejects every node for the group's first pod, and the provisioner, asked for a node no launch can
    satisfy, creates none)."""

    name: str = Field(description="Provider or provisioner (karpenter, gke, eks, aks).")
    detect: list[str] = Field(
        description="Node labels that only nodes of this provider carry: any node in the cluster with one "
        "of them says new GPU nodes come from it."
    )
    topology: list[str] = Field(
        description="Topology labels every node it creates carries, whatever the machine or pool: a "
        "multi-node replica may require one of them. Others (blocks, racks, NVLink cliques) are only "
        "preferred."
    )


class LabelSchemes(_Cfg):
    """Every label scheme toposerve reads; defaults cover GFD, GKE, EKS (Karpenter, managed) and AKS."""

    gpu_type: list[GPUTypeScheme] = Field(
        default_factory=lambda: [
            GPUTypeScheme(
                name="gfd",
                type_label=GFD_PRODUCT,
                count_label=GFD_COUNT,
                memory_label=GFD_MEMORY,
                catalog_field="products",
                strip_suffixes=["-SHARED"],
            ),
            GPUTypeScheme(
                name="gke", type_label="cloud.google.com/gke-accelerator", catalog_field="gkeAccelerators"
            ),
            GPUTypeScheme(
                name="karpenter",
                type_label="karpenter.k8s.aws/instance-gpu-name",
                count_label="karpenter.k8s.aws/instance-gpu-count",
                memory_label="karpenter.k8s.aws/instance-gpu-memory",
                catalog_field="karpenterNames",
            ),
            GPUTypeScheme(
                name="instance-type", type_label=INSTANCE_TYPE_LABEL, catalog_field="instanceTypes"
            ),
        ],
        description="GPU model schemes, tried in order.",
    )
    spot: list[SpotLabel] = Field(
        default_factory=lambda: [
            SpotLabel(key="karpenter.sh/capacity-type", values=["spot"]),
            SpotLabel(key="cloud.google.com/gke-spot", values=["true"], taint=True),
            SpotLabel(key="cloud.google.com/gke-preemptible", values=["true"], taint=True),
            # GKE also labels every node with how it was provisioned (standard, spot, preemptible).
            SpotLabel(key="cloud.google.com/gke-provisioning", values=["spot", "preemptible"]),
            SpotLabel(key="eks.amazonaws.com/capacityType", values=["SPOT"]),
            SpotLabel(key="kubernetes.azure.com/scalesetpriority", values=["spot"], taint=True),
            SpotLabel(key="toposerve.io/capacity-type", values=["spot"], taint=True),
        ],
        description="Labels that mark spot nodes (any one matching makes a node spot).",
    )
    interruption_taints: list[TaintMatch] = Field(
        default_factory=lambda: [
            # AWS Node Termination Handler (taintNode: true): spot interruption notice, rebalance
            # recommendation, ASG lifecycle termination, scheduled maintenance
            # (github.com/aws/aws-node-termination-handler README, "taintNode").
            TaintMatch(key="aws-node-termination-handler/spot-itn"),
            TaintMatch(key="aws-node-termination-handler/rebalance-recommendation"),
            TaintMatch(key="aws-node-termination-handler/asg-lifecycle-termination"),
            TaintMatch(key="aws-node-termination-handler/scheduled-maintenance"),
            # GKE graceful node shutdown of Spot and preemptible VMs ("Spot VMs" docs).
            TaintMatch(key="cloud.google.com/impending-node-termination"),
            # Karpenter disrupting a node (consolidation, expiry, spot interruption via SQS).
            TaintMatch(key="karpenter.sh/disrupted"),
            TaintMatch(key="karpenter.sh/disruption", value="disrupting"),
        ],
        description="Taints that announce a node's imminent termination (spot interruption, maintenance): "
        "its capacity no longer counts and its replicas are replaced elsewhere.",
    )
    gpu_tolerations: list[dict[str, str]] = Field(
        default_factory=lambda: [
            # GKE: nvidia.com/gpu=present:NoSchedule; EKS/GPU operator setups: nvidia.com/gpu:NoSchedule.
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
            # AKS GPU pools are commonly created with --node-taints sku=gpu:NoSchedule.
            {"key": "sku", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"},
        ],
        description="Tolerations every GPU serving pod carries.",
    )
    topology: list[str] = Field(
        default_factory=lambda: [
            GFD_CLIQUE,  # multi-node NVLink domain (GB200 NVL72 class); absent on HGX H100 fleets
            "cloud.google.com/gce-topology-block",  # GKE compact placement / A3 Mega blocks
            "topology.k8s.aws/network-node-layer-3",  # EKS instance topology (p4d/p5 and newer)
            "toposerve.io/rack",
        ],
        description="Node labels naming a tightly connected domain, best first; the zone is the last resort.",
    )
    provisioned: list[ProvisionedNodes] = Field(
        default_factory=lambda: [
            # Karpenter sets the zone it launched in, karpenter.sh/nodepool, karpenter.sh/capacity-type
            # and node.kubernetes.io/instance-type on every node (karpenter.sh/docs/concepts/scheduling
            # "Well-Known Labels"). It provisions for pod affinity only on labels it knows (zone,
            # hostname, capacity type, NodePool requirement labels): with another topologyKey it
            # launches nothing (aws/karpenter-provider-aws#1863). topology.k8s.aws/network-node-layer-*
            # come with the instance type (p4d/p5 and newer), so they are only preferred.
            ProvisionedNodes(name="karpenter", detect=["karpenter.sh/nodepool"], topology=[ZONE_LABEL]),
            # GKE (Standard pools scaled from zero, node auto-provisioning): the zone and the node pool
            # on every node; cloud.google.com/gce-topology-block only on A3/A4 pools created with a
            # compact placement policy (cloud.google.com/kubernetes-engine/docs/how-to/compact-placement:
            # "GKE provisions workloads within a compact placement in the same zone").
            ProvisionedNodes(name="gke", detect=["cloud.google.com/gke-nodepool"], topology=[ZONE_LABEL]),
            # EKS managed node groups and the Cluster Autoscaler: the zone (set by the cloud provider).
            ProvisionedNodes(name="eks", detect=["eks.amazonaws.com/nodegroup"], topology=[ZONE_LABEL]),
            # AKS: the zone ("<region>-<n>", or "0" in a pool without availability zones).
            ProvisionedNodes(name="aks", detect=["kubernetes.azure.com/agentpool"], topology=[ZONE_LABEL]),
        ],
        description="Providers whose GPU node pools scale from zero, and the topology labels every node "
        "they create carries (gpuNodeProvisioning on-demand, GPU type with no node now). A cluster "
        "matching none: the labels every current node carries.",
    )


DEFAULT_SCHEMES = LabelSchemes()
