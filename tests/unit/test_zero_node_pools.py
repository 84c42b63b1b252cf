"""GPU pools at zero nodes (Karpenter, GKE node auto-provisioning, the Cluster Autoscaler): what the
operator renders must be satisfiable by a node the provisioner could create.

kube-scheduler rejects a node that lacks a required pod-affinity topology key even for the first pod
of a group (InterPodAffinity, "all topology labels must exist on the node"), and a provisioner only
creates a node that some Pending pod could then be bound to. So for every example, on every fleet
profile of hack/cluster/fleet.yaml with each GPU type's nodes removed in turn (the pool scaled to
zero, ``gpuNodeProvisioning: on-demand``), the pods planned on that type must be placeable on the
profile's own nodes of that type (the node template the provisioner would launch: same labels, same
taints), and every required group topology key must be one each of those nodes carries. The
profiles are written from the providers' documentation, not from the operator's code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.unit.test_placement_profiles import EXAMPLES, EXTRA, FLEET, PROFILES
from toposerve.api.config import OperatorConfig
from toposerve.api.manifest import load_manifests
from toposerve.api.nodelabels import GFD_CLIQUE, ZONE_LABEL
from toposerve.dev import fleet
from toposerve.dev.placeable import group_topology_keys, placeable_nodes, pod_templates
from toposerve.planner.inventory import TopologyChoice, inventory_from_nodes, recognise, topology_key_for
from toposerve.planner.plan import plan_deployment
from toposerve.render.objects import render_deployment
from toposerve.render.placement import serving_affinity

ROOT = Path(__file__).resolve().parents[2]
ON_DEMAND = OperatorConfig(auto_engine="vllm", gpu_node_provisioning="on-demand")
CATALOG = ON_DEMAND.catalog()


def gpu_type(node: dict[str, Any]) -> str | None:
    gpu, _, _ = recognise(node["metadata"]["labels"], CATALOG, ON_DEMAND.label_schemes)
    return gpu.name if gpu else None


# (example, profile, GPU type at zero) -> what blocks it. Not topology: with no node of the type the
# planner cannot see the machine's size and assumes config.defaultGpusPerNode (8) unless the spec sets
# placement.gpusPerNode, so a pod may ask for more GPUs than the pool's machines have.
KNOWN_FAILURES: dict[tuple[str, str, str], str] = {
    ("gb200-llama-405b", "gb200", "GB200"): "8 GPUs per pod assumed at zero nodes; a GB200 tray has 4 "
    "(the example sets no placement.gpusPerNode)",
    ("gb200-llama-405b", "eks-zero", "GB200"): "8 GPUs per pod assumed at zero nodes; a GB200 tray has 4",
    ("heterogeneous.yaml", "gke", "A100-40GB"): "8 GPUs per pod assumed at zero nodes; the gke profile's "
    "A100 40GB pool is a2-highgpu-1g (1 GPU)",
}


def templates(profile: str) -> list[dict[str, Any]]:
    """One node of each pool of the profile, scaled to zero or not: what its provisioner launches."""
    return [fleet.pool_template(FLEET, profile, p["pool"], "10.0.0.0/24") for p in FLEET["profiles"][profile]]


def _zero_cases() -> list[Any]:
    out = []
    for prof in PROFILES:
        types = sorted({t for n in templates(prof) if (t := gpu_type(n))})
        for t in types:
            for ex in EXAMPLES:
                why = KNOWN_FAILURES.get((ex, prof, t))
                marks = [pytest.mark.xfail(strict=False, reason=why)] if why else []
                out.append(
                    pytest.param(ex, prof, t, id=f"{ex.removesuffix('.yaml')}-{prof}-no-{t}", marks=marks)
                )
    return out


def _manifest(example: str) -> str:
    return EXTRA[example] if example in EXTRA else (ROOT / "examples" / example).read_text()


def _engine_workloads(objs: list[dict[str, Any]], pool: str) -> list[dict[str, Any]]:
    def pool_of(o: dict[str, Any]) -> str | None:
        spec = o["spec"]
        tpl = spec.get("template") or spec.get("leaderWorkerTemplate", {}).get("workerTemplate", {})
        labels: dict[str, str] = tpl.get("metadata", {}).get("labels", {})
        return labels.get("toposerve.io/pool")

    return [
        o
        for o in objs
        if o["kind"] in ("Deployment", "LeaderWorkerSet")
        and o["metadata"]["labels"].get("app.kubernetes.io/component", "engine") == "engine"
        and pool_of(o) == pool
    ]


def problems_at_zero(example: str, profile: str, gpu: str) -> list[str]:
    """What keeps the pods planned on ``gpu`` from a node the provisioner could create, once the
    profile's ``gpu`` nodes are gone."""
    future = [n for n in templates(profile) if gpu_type(n) == gpu]  # the node template(s) the pool launches
    now = [n for n in fleet.nodes(FLEET, profile) if gpu_type(n) != gpu]
    inventory = inventory_from_nodes(now, CATALOG, ON_DEMAND.label_schemes)
    out: list[str] = []
    for dep in load_manifests(_manifest(example)):
        plan = plan_deployment(dep.name, dep.spec, ON_DEMAND, inventory)
        objs = render_deployment(dep.name, "ns", dep.spec, plan, ON_DEMAND)
        for pool in plan.pools:
            if not pool.fits or pool.gpu_type != gpu:
                continue
            where = f"{dep.name}/{pool.name} on {gpu} at zero nodes"
            if pool.nodes_per_replica > 1:
                reason = pool.topology_reason or ""
                if pool.topology_key and f"required {pool.topology_key}" not in reason:
                    out.append(f"{where}: the reason does not say which key is required: {reason!r}")
            for w in _engine_workloads(objs, pool.name):
                for key in sorted(group_topology_keys(w)):
                    lacking = [n["metadata"]["name"] for n in future if key not in n["metadata"]["labels"]]
                    if lacking:
                        out.append(
                            f"{where}: requires pod affinity on {key}, which new nodes lack: {lacking}"
                        )
                for role, pod_spec, _ in pod_templates(w):
                    if not placeable_nodes(pod_spec, future):
                        out.append(f"{where}: the {role} fits no node the provisioner could create")
    return out


@pytest.mark.parametrize(("example", "profile", "gpu"), _zero_cases())
def test_a_pool_at_zero_nodes_asks_for_a_node_the_provisioner_can_create(
    example: str, profile: str, gpu: str
) -> None:
    found = problems_at_zero(example, profile, gpu)
    assert not found, "\n".join(found)


def test_the_multi_node_example_on_an_h100_pool_at_zero_requires_the_zone_and_prefers_the_rest() -> None:
    for profile, provider in (("eks", "karpenter"), ("gke", "gke"), ("gpu", "this cluster")):
        now = [n for n in fleet.nodes(FLEET, profile) if gpu_type(n) != "H100"]
        inventory = inventory_from_nodes(now, CATALOG, ON_DEMAND.label_schemes)
        (dep,) = load_manifests((ROOT / "examples" / "llama-405b-multinode.yaml").read_text())
        (pool,) = plan_deployment(dep.name, dep.spec, ON_DEMAND, inventory).pools
        assert (pool.gpu_type, pool.nodes_per_replica) == ("H100", 2), pool
        assert pool.topology_key == ZONE_LABEL, (profile, pool.topology_reason)
        # HGX H100 NVLink stays inside the node: no clique to prefer; racks and blocks are.
        assert GFD_CLIQUE not in pool.preferred_topology_keys
        assert "cloud.google.com/gce-topology-block" in pool.preferred_topology_keys
        reason = pool.topology_reason or ""
        assert (
            f"required {ZONE_LABEL}" in reason and "preferred cloud.google.com/gce-topology-block" in reason
        )
        assert provider in reason, reason


def test_nodes_that_exist_and_carry_the_key_keep_it_required() -> None:
    """Unchanged where the pool has nodes: the onprem racks (zone) and the gpu profile's cliques
    stay required; on demand, the better keys stay preferred, as they were at zero nodes, so the
    first nodes do not change the pod template (a rolling restart)."""
    better = [
        "cloud.google.com/gce-topology-block",
        "topology.k8s.aws/network-node-layer-3",
        "toposerve.io/rack",
    ]
    for profile, key, preferred in (("gpu", GFD_CLIQUE, []), ("onprem", ZONE_LABEL, better)):
        inventory = inventory_from_nodes(fleet.nodes(FLEET, profile), CATALOG, ON_DEMAND.label_schemes)
        (dep,) = load_manifests((ROOT / "examples" / "llama-405b-multinode.yaml").read_text())
        (pool,) = plan_deployment(dep.name, dep.spec, ON_DEMAND, inventory).pools
        assert (pool.topology_key, pool.preferred_topology_keys) == (key, preferred), pool.topology_reason
        static = plan_deployment(dep.name, dep.spec, OperatorConfig(auto_engine="vllm"), inventory).pools[0]
        assert (static.topology_key, static.preferred_topology_keys) == (key, []), static.topology_reason


def test_gb200_at_zero_keeps_tensor_parallelism_inside_a_tray() -> None:
    """New GB200 trays need not carry GFD's clique yet (fabric not up, GPU operator not installed on
    them yet), so TP across trays is not planned at zero nodes: pipeline stages cross them."""
    now = [n for n in fleet.nodes(FLEET, "gb200") if gpu_type(n) != "GB200"]
    inventory = inventory_from_nodes(now, CATALOG, ON_DEMAND.label_schemes)
    # Trays have 4 GPUs; at zero nodes only the spec can say so.
    (dep,) = load_manifests(EXTRA["gb200-llama-405b"].replace("placement: {", "placement: {gpusPerNode: 4, "))
    (pool,) = plan_deployment(dep.name, dep.spec, ON_DEMAND, inventory).pools
    assert pool.fits and pool.nodes_per_replica > 1 and not pool.nvlink_across_nodes, pool
    assert pool.topology_key == ZONE_LABEL
    assert pool.preferred_topology_keys[0] == GFD_CLIQUE  # GB200 trays of one rack share it when up
    assert "tensor parallelism stays inside a node" in (pool.topology_reason or "")


def test_provisioner_labels_decide_the_required_key() -> None:
    def n(name: str, labels: dict[str, str]) -> dict[str, Any]:
        return {"metadata": {"name": name, "labels": labels}, "status": {"allocatable": {"cpu": "4"}}}

    cands = [GFD_CLIQUE, "cloud.google.com/gce-topology-block", "toposerve.io/rack"]
    # A Karpenter CPU node says where new nodes come from, whatever labels it has itself.
    karp = inventory_from_nodes([n("c", {"karpenter.sh/nodepool": "general"})], CATALOG)
    choice = topology_key_for(karp, "H100", 2, cands, ZONE_LABEL)
    assert choice == TopologyChoice(
        ZONE_LABEL, choice.reason, ("cloud.google.com/gce-topology-block", "toposerve.io/rack")
    )
    # No provisioner recognised: what every node carries (here a rack label beats the zone).
    racks = inventory_from_nodes(
        [
            n("a", {"toposerve.io/rack": "r1", ZONE_LABEL: "z"}),
            n("b", {"toposerve.io/rack": "r2", ZONE_LABEL: "z"}),
        ],
        CATALOG,
    )
    assert topology_key_for(racks, "H100", 2, cands, ZONE_LABEL).key == "toposerve.io/rack"
    # Nothing any new node is sure to carry: nothing required, said in the reason.
    bare = inventory_from_nodes([n("a", {}), n("b", {ZONE_LABEL: "z"})], CATALOG)
    none = topology_key_for(bare, "H100", 2, cands, ZONE_LABEL)
    assert none.key is None and "none is required" in none.reason
    assert none.preferred == ("cloud.google.com/gce-topology-block", "toposerve.io/rack", ZONE_LABEL)
    # Without an inventory (toposerve plan offline) the first candidate is still assumed.
    assert topology_key_for(None, "H100", 2, cands, ZONE_LABEL).key == GFD_CLIQUE


def test_preferred_group_affinity_is_rendered_with_falling_weights() -> None:
    gpu = CATALOG.get("H100")
    aff = serving_affinity(
        gpu, 8, False, ON_DEMAND.label_schemes, True, ZONE_LABEL, {"toposerve.io/pool": "p"},
        group_preferred_keys=["cloud.google.com/gce-topology-block", ZONE_LABEL, "toposerve.io/rack"],
    )  # fmt: skip
    pod = aff["podAffinity"]
    assert [t["topologyKey"] for t in pod["requiredDuringSchedulingIgnoredDuringExecution"]] == [ZONE_LABEL]
    pref = pod["preferredDuringSchedulingIgnoredDuringExecution"]
    assert [(p["weight"], p["podAffinityTerm"]["topologyKey"]) for p in pref] == [
        (100, "cloud.google.com/gce-topology-block"),
        (50, "toposerve.io/rack"),
    ]
    assert all(
        p["podAffinityTerm"]["matchLabelKeys"] == ["leaderworkerset.sigs.k8s.io/group-key"] for p in pref
    )
    # Only preferences: no required term at all.
    only = serving_affinity(
        gpu, 8, False, ON_DEMAND.label_schemes, True, None, {}, group_preferred_keys=["k"]
    )
    assert "requiredDuringSchedulingIgnoredDuringExecution" not in only["podAffinity"]
    assert "podAffinity" not in serving_affinity(gpu, 8, False, ON_DEMAND.label_schemes, True)


def test_the_rendered_group_carries_the_preferred_affinity() -> None:
    now = [n for n in fleet.nodes(FLEET, "eks") if gpu_type(n) != "H100"]
    inventory = inventory_from_nodes(now, CATALOG, ON_DEMAND.label_schemes)
    (dep,) = load_manifests((ROOT / "examples" / "llama-405b-multinode.yaml").read_text())
    plan = plan_deployment(dep.name, dep.spec, ON_DEMAND, inventory)
    (lws,) = [
        o
        for o in render_deployment(dep.name, "ns", dep.spec, plan, ON_DEMAND)
        if o["kind"] == "LeaderWorkerSet"
    ]
    for _, spec, _ in pod_templates(lws):
        pod = spec["affinity"]["podAffinity"]
        assert [t["topologyKey"] for t in pod["requiredDuringSchedulingIgnoredDuringExecution"]] == [
            ZONE_LABEL
        ]
        preferred = [
            t["podAffinityTerm"]["topologyKey"]
            for t in pod["preferredDuringSchedulingIgnoredDuringExecution"]
        ]
        assert preferred == plan.pools[0].preferred_topology_keys


# --- the simulated provisioner (toposerve.dev.provisioner), pure part ------------------------------

GB200_TWO_TRAYS = """
apiVersion: toposerve.io/v1alpha1
kind: LLMDeployment
metadata: {name: gb200-pp2}
spec:
  model: {name: meta-llama/Llama-3.1-70B-Instruct, maxContextLength: 8192}
  engine: vllm
  placement: {gpuTypes: [GB200], gpusPerNode: 4}
  parallelism: {tensor: 4, pipeline: 2}
"""


def _gb200_group() -> tuple[list[dict[str, Any]], Any]:
    """Pods of one group (leader, worker) of a two-tray GB200 replica planned with no GB200 node."""
    inventory = inventory_from_nodes(fleet.nodes(FLEET, "eks-zero"), CATALOG, ON_DEMAND.label_schemes)
    (dep,) = load_manifests(GB200_TWO_TRAYS)
    plan = plan_deployment(dep.name, dep.spec, ON_DEMAND, inventory)
    (lws,) = [
        o
        for o in render_deployment(dep.name, "ns", dep.spec, plan, ON_DEMAND)
        if o["kind"] == "LeaderWorkerSet"
    ]
    pods = [
        {"metadata": {"name": f"{role}-{i}", "namespace": "ns"}, "spec": spec}
        for role, spec, n in pod_templates(lws)
        for i in range(n)
    ]
    return pods, plan.pools[0]


def test_the_provisioner_launches_one_zone_of_nodes_for_a_pending_group() -> None:
    from toposerve.dev.provisioner import Template, plan_nodes

    pods, pool = _gb200_group()
    assert (pool.gpu_type, pool.nodes_per_replica, pool.topology_key) == ("GB200", 2, ZONE_LABEL), pool
    assert "karpenter" in (pool.topology_reason or "")  # the eks-zero CPU nodes say who provisions
    tpl = Template.from_fleet(FLEET, "eks-zero", "eks-gb200", zone="us-east-1b", name="gb200-prov")
    nodes, skipped = plan_nodes(tpl, pods, [], 0, ["10.244.200.0/24", "10.244.201.0/24"], max_new=8)
    assert not skipped, skipped
    assert [n["metadata"]["name"] for n in nodes] == ["gb200-prov-0", "gb200-prov-1"]  # 4 GPUs a tray
    for n in nodes:
        labels = n["metadata"]["labels"]
        assert labels[ZONE_LABEL] == "us-east-1b"
        assert (
            labels["karpenter.sh/nodepool"] == "gpu-gb200"
            and labels["karpenter.sh/capacity-type"] == "on-demand"
        )
        assert labels["node.kubernetes.io/instance-type"] == "p6e-gb200.36xlarge"
        assert labels["nvidia.com/gpu.product"] == "NVIDIA-GB200"  # GFD's, once the node runs
    assert {n["spec"]["podCIDR"] for n in nodes} == {"10.244.200.0/24", "10.244.201.0/24"}
    # Nodes launched before, still empty, take the same pods: nothing more is created.
    again, _ = plan_nodes(tpl, pods, [(n, []) for n in nodes], 2, ["10.244.202.0/24"], max_new=8)
    assert again == []


def test_the_provisioner_launches_nothing_for_a_clique_it_cannot_promise() -> None:
    """The old rendering (required pod affinity on nvidia.com/gpu.clique): Karpenter launches no node
    for a topology key only GFD sets after boot, so the group stays Pending for good."""
    from toposerve.dev.provisioner import Template, plan_nodes

    pods, _ = _gb200_group()
    for p in pods:
        for term in p["spec"]["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]:
            term["topologyKey"] = GFD_CLIQUE
    tpl = Template.from_fleet(FLEET, "eks-zero", "eks-gb200")
    nodes, skipped = plan_nodes(tpl, pods, [], 0, ["10.244.200.0/24"], max_new=8)
    assert nodes == [] and len(skipped) == 2 and all(GFD_CLIQUE in s for s in skipped), skipped
