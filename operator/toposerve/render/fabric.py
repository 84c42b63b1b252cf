"""The fast interconnect a multi-node replica's pods ask for, from what the nodes offer (pure).

A replica spread over several nodes (pipeline, tensor or context parallel across them) moves its
activations with NCCL. A pod that asks only for ``nvidia.com/gpu`` gets none of the node's fabric:
no EFA device, no RDMA NIC, no IMEX channel, so NCCL falls back to TCP over the pod's eth0 and
cross-node parallelism crawls. Each provider's fabric is reached differently, so this module
decides, per pool and GPU type, which one the nodes offer and what the pod must then carry:

* **EFA** (EKS p4d/p5/p6): the AWS EFA device plugin advertises ``vpc.amazonaws.com/efa``, one
  per EFA interface; the pod requests its GPUs' share of them and NCCL reaches them through
  libfabric (the aws-ofi-nccl plugin, which the engine image must carry).
  https://docs.aws.amazon.com/eks/latest/userguide/device-management-efa.html,
  https://docs.aws.amazon.com/eks/latest/userguide/node-efa.html,
  https://github.com/aws/eks-charts/tree/master/stable/aws-efa-k8s-device-plugin.
* **GKE GPUDirect RDMA** (A3 Ultra, A4): GKE multi-networking advertises
  ``networking.gke.io.networks/<Network>`` per additional Network; the pod names its interfaces in
  the ``networking.gke.io/interfaces`` annotation, asks for the RDMA Networks, mounts the gIB NCCL
  plugin the ``nccl-rdma-installer`` DaemonSet puts on the host and sets its NCCL environment
  (``/usr/local/gib/scripts/set_nccl_env.sh``, written out here since the engine runs no shell).
  https://cloud.google.com/ai-hypercomputer/docs/create/gke-ai-hypercompute-custom ("Configure
  your workload manifests" for GPUDirect RDMA),
  https://cloud.google.com/kubernetes-engine/docs/how-to/gpu-bandwidth-gpudirect-tcpx, and
  llm-d's GKE guide (llm-d/llm-d docs/infrastructure-providers/gke) for the same env on vLLM.
  A3 High / A3 Mega (GPUDirect-TCPX / -TCPXO) need a privileged ``tcpx(o)-daemon`` sidecar per
  pod, which toposerve does not render: they are recognised and reported as TCP.
* **InfiniBand / RoCE** (on-prem, NVIDIA Network Operator): the RDMA shared device plugin
  (resource prefix ``rdma/``) or an ``rdma/ib`` plugin; the pod asks for one unit (the shared
  plugin hands every HCA of its selector to each pod), adds ``IPC_LOCK`` to pin memory for RDMA,
  and NCCL uses its IB transport. https://docs.nvidia.com/networking/display/kubernetes2410/
  ("RDMA shared device plugin", the example pods with ``IPC_LOCK``),
  https://github.com/Mellanox/k8s-rdma-shared-dev-plugin, NCCL environment variables
  https://docs.nvidia.com/deeplearning/nccl/user-guide/docs/env.html.
* **IMEX** (GB200 NVL72 and other multi-node NVLink systems): NVLink between trays works only
  through an IMEX channel, which NVIDIA's DRA driver for GPUs hands out through a
  ``ComputeDomain`` (``resource.nvidia.com/v1beta1``): the driver creates the ResourceClaimTemplate
  named in ``spec.channel.resourceClaimTemplate.name`` and every pod that claims it joins the
  domain. https://docs.nvidia.com/datacenter/cloud-native/gpu-operator/latest/dra-cds.html,
  https://github.com/NVIDIA/k8s-dra-driver-gpu (CRD vendored in tests/unit/schemas/).

A fabric is requested only when *every* node of the GPU type the pool may use offers it (an
extended resource a node lacks would keep the pod off that node, and the planner's capacity view
counts those nodes), in the smallest amount any of them has. Nodes offering none: ``tcp``, which
status and an Event report. Single-node replicas need none of this (NVLink inside the node), and
the mock engine simulates a replica in one process: both get no fabric at all.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from toposerve.api.gpus import GPUCatalog
from toposerve.api.nodelabels import GFD_CLIQUE, INSTANCE_TYPE_LABEL
from toposerve.planner.inventory import Inventory, NodeInfo
from toposerve.planner.plan import PoolPlan

EFA_RESOURCE = "vpc.amazonaws.com/efa"
GKE_NETWORK_PREFIX = "networking.gke.io.networks/"
RDMA_PREFIX = "rdma/"  # k8s-rdma-shared-dev-plugin's default resourcePrefix; also rdma/ib plugins
COMPUTE_DOMAIN_API = "resource.nvidia.com/v1beta1"
IMEX_CLAIM = "imex-channel"
# The gIB tuner profile per machine (the files nccl-rdma-installer puts under /usr/local/gib/configs).
GIB_TUNER = {"a3-ultragpu-8g": "a3u", "a4-highgpu-8g": "a4"}
GKE_TCPX_MACHINES = ("a3-highgpu-", "a3-megagpu-", "a3-edgegpu-")

EFA, GKE_RDMA, INFINIBAND, ROCE, IMEX, TCP = "efa", "gke-gpudirect-rdma", "infiniband", "roce", "imex", "tcp"


@dataclass(frozen=True)
class Fabric:
    """What a multi-node replica's engine pods carry to use the fabric, and its name for status.

    ``name`` is empty where no fabric is needed (single-node replicas, the mock engine); ``tcp``
    where one is needed and the nodes offer none (the reason says what was looked for)."""

    name: str = ""
    reason: str = ""
    resources: dict[str, str] = field(default_factory=dict)  # requests and limits alike
    env: list[dict[str, Any]] = field(default_factory=list)
    pod_annotations: dict[str, str] = field(default_factory=dict)
    capabilities: tuple[str, ...] = ()  # added to the engine container's securityContext
    volumes: list[dict[str, Any]] = field(default_factory=list)
    volume_mounts: list[dict[str, Any]] = field(default_factory=list)
    resource_claims: list[dict[str, Any]] = field(default_factory=list)  # pod spec.resourceClaims
    claims: list[dict[str, str]] = field(default_factory=list)  # the container's resources.claims
    objects: list[dict[str, Any]] = field(default_factory=list)  # e.g. the ComputeDomain

    @property
    def over_tcp(self) -> bool:
        return self.name == TCP


NO_FABRIC = Fabric()


def _env(pairs: dict[str, str]) -> list[dict[str, Any]]:
    return [{"name": k, "value": v} for k, v in pairs.items()]


def _common(nodes: Sequence[NodeInfo], pred: Any) -> dict[str, int]:
    """Extended resources matching ``pred`` that every node offers, with the smallest amount."""
    names = set.intersection(*({k for k, v in n.extended.items() if v > 0 and pred(k)} for n in nodes))
    return {k: min(n.extended[k] for n in nodes) for k in sorted(names)}


def _share(nodes: Sequence[NodeInfo], resource: str, gpus_per_pod: int) -> int:
    """The pod's share of a per-node device count: its GPUs' fraction of the smallest node's
    devices (all of them for a whole-node pod), at least one."""
    shares = [
        n.extended[resource] * gpus_per_pod // n.gpu_count if n.gpu_count else n.extended[resource]
        for n in nodes
    ]
    return max(1, min(shares))


def _efa(nodes: Sequence[NodeInfo], plan: PoolPlan) -> Fabric:
    count = _share(nodes, EFA_RESOURCE, plan.gpus_per_pod)
    # libfabric's EFA provider (man fi_efa): use the EFA device and its RDMA read (p4d and newer),
    # be fork-safe (vLLM starts worker processes) and keep huge pages off, which fork-safety needs.
    env = {
        "FI_PROVIDER": "efa",
        "FI_EFA_USE_DEVICE_RDMA": "1",
        "FI_EFA_FORK_SAFE": "1",
        "FI_EFA_USE_HUGE_PAGE": "0",
    }
    return Fabric(
        name=EFA,
        reason=f"every {plan.gpu_type} node offers {EFA_RESOURCE}; each pod requests {count}",
        resources={EFA_RESOURCE: str(count)},
        env=_env(env),
    )


def _gke_rdma(nodes: Sequence[NodeInfo], networks: Sequence[str], plan: PoolPlan) -> Fabric:
    rdma = [n for n in networks if "rdma" in n]
    other = [n for n in networks if "rdma" not in n]
    # eth0 stays the pod network (default); extra gVNICs next, then one interface per RDMA NIC.
    interfaces = [{"interfaceName": "eth0", "network": "default"}] + [
        {"interfaceName": f"eth{i}", "network": net} for i, net in enumerate([*other, *rdma], start=1)
    ]
    env = {
        # What gIB's set_nccl_env.sh exports (the GKE guide has the pod source it; vLLM runs no shell).
        "LD_LIBRARY_PATH": "/usr/local/gib/lib64:/usr/local/nvidia/lib64",
        "NCCL_NET": "gIB",
        "NCCL_CROSS_NIC": "0",
        "NCCL_NET_GDR_LEVEL": "PIX",
        "NCCL_P2P_NET_CHUNKSIZE": "131072",
        "NCCL_NVLS_CHUNKSIZE": "524288",
        "NCCL_IB_ADAPTIVE_ROUTING": "1",
        "NCCL_IB_QPS_PER_CONNECTION": "4",
        "NCCL_IB_TC": "52",
        "NCCL_IB_FIFO_TC": "84",
        # The pod network and the extra gVNIC carry NCCL's bootstrap, never the RDMA NICs.
        "NCCL_SOCKET_IFNAME": ",".join(i["interfaceName"] for i in interfaces[: 1 + len(other)]),
    }
    machines = {n.labels.get(INSTANCE_TYPE_LABEL, "") for n in nodes}
    tuners = {GIB_TUNER[m] for m in machines if m in GIB_TUNER}
    if len(tuners) == 1:
        env["NCCL_TUNER_CONFIG_PATH"] = f"/usr/local/gib/configs/tuner_config_{tuners.pop()}.txtpb"
    return Fabric(
        name=GKE_RDMA,
        reason=(
            f"every {plan.gpu_type} node is on the GKE Networks {', '.join(networks)} "
            f"(GPUDirect RDMA over {', '.join(rdma)}, gIB NCCL plugin from the host)"
        ),
        resources={f"{GKE_NETWORK_PREFIX}{net}": "1" for net in networks},
        env=_env(env),
        pod_annotations={
            "networking.gke.io/default-interface": "eth0",
            "networking.gke.io/interfaces": json.dumps(interfaces, separators=(",", ":")),
        },
        # Installed on the host by GKE's nccl-rdma-installer DaemonSet; the guide mounts both.
        volumes=[
            {"name": "gib", "hostPath": {"path": "/home/kubernetes/bin/gib"}},
            {"name": "nvidia-install-dir-host", "hostPath": {"path": "/home/kubernetes/bin/nvidia"}},
        ],
        volume_mounts=[
            {"name": "gib", "mountPath": "/usr/local/gib"},
            {"name": "nvidia-install-dir-host", "mountPath": "/usr/local/nvidia"},
        ],
    )


def _rdma(resource: str, plan: PoolPlan) -> Fabric:
    # The shared device plugin names resources after its config (rdma_shared_device_a for IB in the
    # Network Operator's examples); a name that says RoCE / Ethernet is taken for RoCE.
    roce = any(w in resource.removeprefix(RDMA_PREFIX).lower() for w in ("roce", "eth"))
    env = {
        "NCCL_IB_DISABLE": "0",
        # ConnectX HCAs (mlx5_*, NCCL prefix match): the Network Operator's plugin selects vendor
        # 15b3, and NCCL should not try an HCA the device plugin did not hand to the pod.
        "NCCL_IB_HCA": "mlx5",
        "NCCL_SOCKET_IFNAME": "eth0",  # bootstrap over the pod network
    }
    if roce:
        env["NCCL_IB_GID_INDEX"] = "3"  # RoCE v2 over IPv4 (NCCL env docs)
    kind = ROCE if roce else INFINIBAND
    return Fabric(
        name=kind,
        reason=f"every {plan.gpu_type} node offers {resource} ({'RoCE' if roce else 'InfiniBand'} RDMA)",
        resources={resource: "1"},
        env=_env(env),
        capabilities=("IPC_LOCK",),
    )


def compute_domain_name(workload: str) -> str:
    return f"{workload}-imex"


def _imex(workload: str, plan: PoolPlan) -> Fabric:
    name = compute_domain_name(workload)
    template = f"{name}-channel"
    domain = {
        "apiVersion": COMPUTE_DOMAIN_API,
        "kind": "ComputeDomain",
        "metadata": {"name": name},
        "spec": {
            # One domain for the workload's pods (every replica shares the pod template). The spec
            # is immutable (CEL self == oldSelf), so it must not follow the replica count:
            # numNodes 0 is what the driver recommends with IMEXDaemonsWithDNSNames (on by default
            # since v25.8.0): pods start as soon as their node's IMEX daemon runs, and NCCL waits
            # for its peers anyway.
            "numNodes": 0,
            "channel": {"resourceClaimTemplate": {"name": template}},
        },
    }
    return Fabric(
        name=IMEX,
        reason=(
            f"{plan.gpu_type} replicas stay inside one NVLink domain ({GFD_CLIQUE}): multi-node NVLink "
            f"through an IMEX channel of ComputeDomain {name} (NVIDIA DRA driver for GPUs)"
        ),
        resource_claims=[{"name": IMEX_CLAIM, "resourceClaimTemplateName": template}],
        claims=[{"name": IMEX_CLAIM}],
        objects=[domain],
    )


def fabric_for(
    plan: PoolPlan,
    engine: str,
    inventory: Inventory | None,
    catalog: GPUCatalog,
    workload: str,
) -> Fabric:
    """The fabric the engine pods of ``plan`` (one pool on one GPU type) use, and why.

    ``workload`` names the pool's workload (the ComputeDomain is named after it)."""
    if engine != "vllm" or plan.nodes_per_replica <= 1 or not plan.fits or plan.gpu_type is None:
        return NO_FABRIC
    gpu = catalog.get(plan.gpu_type)
    over = "multi-node traffic goes over TCP on the pod network"
    if inventory is None:
        return Fabric(TCP, f"no node inventory: no fabric requested, {over}")
    nodes = inventory.nodes_of(plan.gpu_type, plan.spot)
    if plan.topology_key:  # a replica's pods are required into one domain: never on nodes without the key
        nodes = [n for n in nodes if plan.topology_key in n.labels]
    if not nodes:
        return Fabric(
            TCP,
            f"no {plan.gpu_type} nodes now, so no fabric they offer is known: none requested, {over} "
            "(the pods' template changes once nodes exist)",
        )
    # Multi-node NVLink: only for GPU types whose NVLink domain spans nodes, with the replica required
    # into one clique (GFD sets the label once the tray's NVLink fabric is up).
    if gpu.nvlink_domain_gpus > plan.gpus_per_pod and plan.topology_key == GFD_CLIQUE:
        return _imex(workload, plan)
    if EFA_RESOURCE in _common(nodes, lambda k: k == EFA_RESOURCE):
        return _efa(nodes, plan)
    networks = [
        k.removeprefix(GKE_NETWORK_PREFIX) for k in _common(nodes, lambda k: k.startswith(GKE_NETWORK_PREFIX))
    ]
    networks = [n for n in networks if not n.endswith(".IP")]
    if any("rdma" in n for n in networks):
        return _gke_rdma(nodes, networks, plan)
    rdma = list(_common(nodes, lambda k: k.startswith(RDMA_PREFIX)))
    if rdma:
        return _rdma(rdma[0], plan)
    machines = sorted({n.labels.get(INSTANCE_TYPE_LABEL, "") for n in nodes} - {""})
    if networks and any(m.startswith(GKE_TCPX_MACHINES) for m in machines):
        return Fabric(
            TCP,
            f"{plan.gpu_type} nodes ({', '.join(machines)}) offer GPUDirect-TCPX/TCPXO on the GKE Networks "
            f"{', '.join(networks)}, which needs a tcpx(o)-daemon sidecar toposerve does not render: {over}",
        )
    partial = sorted({k for n in nodes for k in n.extended if _fabric_resource(k)})
    if partial:
        return Fabric(
            TCP,
            f"only some {plan.gpu_type} nodes offer {', '.join(partial)}; requesting it would keep the "
            f"pods off the others: {over}",
        )
    return Fabric(
        TCP,
        f"{plan.gpu_type} nodes offer no fabric toposerve knows ({EFA_RESOURCE}, {GKE_NETWORK_PREFIX}rdma-*, "
        f"{RDMA_PREFIX}*, {GFD_CLIQUE} for multi-node NVLink): {over}",
    )


def _fabric_resource(name: str) -> bool:
    return name == EFA_RESOURCE or name.startswith((RDMA_PREFIX, GKE_NETWORK_PREFIX))
