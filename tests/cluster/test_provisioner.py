"""A GPU pool at zero nodes, ``gpuNodeProvisioning: on-demand``, and a provisioner that launches
nodes for unschedulable GPU pods (``toposerve.dev.provisioner``, Karpenter's part): the operator's
two-node LeaderWorkerSet group must make it launch nodes, and its pods must be bound to them, in one
zone.

GB200 is the type at zero: no other cluster test's fleet has it, and the provisioner reacts only to
this test's namespace, so the nodes it launches (eks-zero profile, pool eks-gb200 of
hack/cluster/fleet.yaml, tainted nvidia.com/gpu:NoSchedule) take no one else's pods; they are
deleted at the end. On the local cluster vLLM pods are simulated by kwok (only the project's image is
run), so being bound is what is checked.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster.conftest import ROOT, Cluster, wait_for
from tests.cluster.operator_harness import Operator, apply, get_llmd, install_crd
from toposerve.dev import fleet
from toposerve.dev.provisioner import OWNER_LABEL, Provisioner, Template

pytestmark = pytest.mark.cluster

FLEET = fleet.load(ROOT / "hack" / "cluster" / "fleet.yaml")
ZONE = "topology.kubernetes.io/zone"
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


def _gb200_nodes(cluster: Cluster) -> list[Any]:
    return list(cluster.core.list_node(label_selector="nvidia.com/gpu.product=NVIDIA-GB200").items)


PREFIX = "gb200-prov-"
STALE_AFTER = timedelta(minutes=10)  # no run of this module lasts that long


def _delete_stale_nodes(cluster: Cluster) -> None:
    """Nodes an earlier run of this module left behind (killed before its clean-up ran); a run in
    progress elsewhere keeps its own nodes (younger than STALE_AFTER)."""
    now = datetime.now(UTC)
    for n in cluster.core.list_node(label_selector=OWNER_LABEL).items:
        owner = n.metadata.labels.get(OWNER_LABEL, "")
        if owner.startswith(PREFIX) and now - n.metadata.creation_timestamp > STALE_AFTER:
            cluster.core.delete_node(n.metadata.name)


@pytest.fixture
def provisioner(cluster: Cluster, namespace: str) -> Iterator[Provisioner]:
    _delete_stale_nodes(cluster)
    if _gb200_nodes(cluster):
        pytest.skip("the running fleet has GB200 nodes: this test needs the GB200 pool at zero")
    name = f"{PREFIX}{uuid.uuid4().hex[:5]}"
    tpl = Template.from_fleet(FLEET, "eks-zero", "eks-gb200", zone="us-east-1b", name=name)
    prov = Provisioner(
        cluster.core, tpl, FLEET.get("podNetwork", "10.244.0.0/16"), max_nodes=4, namespace=namespace
    )
    prov.start()
    try:
        yield prov
    finally:
        prov.stop()
        cluster.core.delete_collection_node(label_selector=f"{OWNER_LABEL}={name}")


@pytest.fixture
def on_demand_operator(cluster: Cluster, namespace: str, tmp_path: Path) -> Iterator[Operator]:
    """An operator with ``gpuNodeProvisioning: on-demand`` for this test's namespace only: the
    cluster is shared, and other namespaces' LLMDeployments belong to their own tests' operators
    (with their own configs)."""
    install_crd(cluster)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"gpuNodeProvisioning": "on-demand"}))
    op = Operator(
        cluster, tmp_path / "operator.log", "--config", str(config), "--resync", "5", "--namespace", namespace
    )
    op.start()
    try:
        yield op
    finally:
        op.stop()
        print(f"--- operator log (last lines)\n{op.tail()}")


# The group's leader (component engine) and worker (component worker); not the router's pods, which
# carry the deployment label too and are placed on CPU nodes.
GROUP_PODS = "toposerve.io/deployment=gb200-pp2,app.kubernetes.io/component in (engine,worker)"


def _group_pods(cluster: Cluster, namespace: str) -> list[Any]:
    return list(cluster.core.list_namespaced_pod(namespace, label_selector=GROUP_PODS).items)


def test_a_two_node_group_on_a_pool_at_zero_gets_nodes_and_is_bound_in_one_zone(
    cluster: Cluster, namespace: str, on_demand_operator: Operator, provisioner: Provisioner
) -> None:
    assert apply(cluster, namespace, GB200_TWO_TRAYS).returncode == 0

    def bound() -> list[Any] | None:
        pods = [p for p in _group_pods(cluster, namespace) if p.spec.node_name]
        return pods if len(pods) == 2 else None

    pods = wait_for(bound, "the leader and worker bound to provisioned GB200 nodes", timeout=180)
    assert sorted(provisioner.created) == sorted({p.spec.node_name for p in pods}), provisioner.created
    assert len(provisioner.created) == 2, (provisioner.created, provisioner.skipped)
    zones = {cluster.core.read_node(p.spec.node_name).metadata.labels[ZONE] for p in pods}
    assert zones == {"us-east-1b"}
    pool = get_llmd(cluster, namespace, "gb200-pp2")["status"]["pools"][0]
    assert pool["topologyKey"] == ZONE, pool
    assert (
        f"required {ZONE}" in pool["topologyReason"] and "nvidia.com/gpu.clique" in pool["topologyReason"]
    ), pool


def test_a_group_requiring_the_clique_at_zero_gets_no_node(
    cluster: Cluster, namespace: str, provisioner: Provisioner
) -> None:
    """What the operator rendered before: required pod affinity on nvidia.com/gpu.clique. The
    scheduler rejects every node for the first pod, and no node is launched for it."""
    spec: dict[str, Any] = {
        "containers": [
            {
                "name": "vllm",
                "image": "vllm/vllm-openai:v0.11.0",
                "resources": {"limits": {"nvidia.com/gpu": "4"}},
            }
        ],
        "nodeSelector": {"node.kubernetes.io/instance-type": "p6e-gb200.36xlarge"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": {
            "podAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": [
                    {
                        "labelSelector": {"matchLabels": {"app": "clique"}},
                        "topologyKey": "nvidia.com/gpu.clique",
                    }
                ]
            }
        },
    }
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "leader", "labels": {"app": "clique"}},
        "spec": spec,
    }
    cluster.core.create_namespaced_pod(namespace, pod)

    def unschedulable() -> bool:
        p = cluster.core.read_namespaced_pod("leader", namespace)
        return any(
            c.type == "PodScheduled" and c.status == "False" and c.reason == "Unschedulable"
            for c in p.status.conditions or []
        )

    wait_for(unschedulable, "the scheduler to give up on the clique-bound pod", timeout=60)
    wait_for(lambda: provisioner.skipped, "the provisioner to look at the pod and refuse it", timeout=30)
    assert provisioner.created == [] and "nvidia.com/gpu.clique" in provisioner.skipped[0], (
        provisioner.skipped
    )
    assert not cluster.core.read_namespaced_pod("leader", namespace).spec.node_name
