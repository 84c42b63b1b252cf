"""The operator on fleets shaped like real providers (hack/cluster/fleet.yaml profiles gke, eks,
onprem, gb200), swapped into the running cluster: the nodes are replaced, the control plane stays.

The fleet profiles are written from the providers' documentation, not from the operator's code, so
these tests can disagree with it: every example must become Ready on the nodes of its planned GPU
type, or say precisely why not; a GPU pool scaled to zero nodes must not turn vLLM into the mock;
a two-node replica must schedule where nodes carry no NVLink clique label.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster.conftest import ROOT, Cluster, kubectl, wait_for
from tests.cluster.operator_harness import (
    Operator,
    apply,
    children,
    condition,
    get_llmd,
    operator,
    wait_condition,
    wait_observed,
)
from toposerve.api.config import OperatorConfig
from toposerve.api.manifest import parse_spec
from toposerve.planner.inventory import inventory_from_nodes, recognise
from toposerve.planner.plan import DeploymentPlan, plan_deployment

pytestmark = pytest.mark.cluster
__all__ = ["operator"]  # the fixture, imported for pytest

FLEET = ROOT / "hack" / "cluster" / "fleet.yaml"
PROFILES = ("gke", "eks", "onprem", "gb200")
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
CONFIG = OperatorConfig()


def _profile_nodes(profile: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "toposerve.dev.fleet", str(FLEET), "--profile", profile],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout


def _nodes(cluster: Cluster) -> list[dict[str, Any]]:
    return list(json.loads(kubectl(cluster, "get", "nodes", "-o", "json").stdout)["items"])


def use_profile(cluster: Cluster, profile: str) -> None:
    """Replace every node with the profile's (kwok nodes are plain API objects)."""
    nodes = _profile_nodes(profile)  # first: a profile that does not expand leaves the fleet alone
    kubectl(cluster, "delete", "nodes", "--all", "--wait=true")
    kubectl(cluster, "apply", "-f", "-", stdin=nodes)
    kubectl(cluster, "wait", "--for=condition=Ready", "node", "--all", "--timeout=180s")


@pytest.fixture(scope="module", params=PROFILES)
def fleet(request: pytest.FixtureRequest, cluster: Cluster) -> Iterator[str]:
    profile = str(request.param)
    use_profile(cluster, profile)
    yield profile
    use_profile(cluster, cluster.profile)


def plan_on_cluster(cluster: Cluster, manifest: dict[str, Any]) -> DeploymentPlan:
    inv = inventory_from_nodes(_nodes(cluster), CONFIG.catalog(), CONFIG.label_schemes)
    return plan_deployment(manifest["metadata"]["name"], parse_spec(manifest["spec"]), CONFIG, inv)


STRANDED = "didn't match pod affinity rules"


def ready_or_stranded(cluster: Cluster, namespace: str, name: str, plan: DeploymentPlan) -> bool:
    """Wait for Ready=True (True returned), or for the one honest failure a multi-node replica can
    meet (False returned): LeaderWorkerSet creates the leader first, the scheduler may put it in a
    domain that has no room for the rest of its group (the onprem profile's rack r02 has a cordoned
    node), and the workers then stay Pending on the group's pod affinity. Kubernetes' own scheduler
    cannot place a group as a unit (Kueue's topology-aware scheduling can); the operator must say so
    in Schedulable with the scheduler's words, and Ready must stay False."""

    def settled() -> dict[str, Any] | None:
        obj = get_llmd(cluster, namespace, name)
        if (obj.get("status") or {}).get("observedGeneration") != obj["metadata"]["generation"]:
            return None
        ready, sched = condition(obj, "Ready"), condition(obj, "Schedulable")
        if ready and ready["status"] == "True":
            return obj
        multi = any(p.nodes_per_replica > 1 for p in plan.pools)
        if multi and sched and sched["status"] == "False" and STRANDED in sched["message"]:
            return obj
        return None

    obj = wait_for(settled, f"Ready=True or a stranded-group condition on {namespace}/{name}", timeout=180)
    ready = condition(obj, "Ready")
    return bool(ready and ready["status"] == "True")


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_example_is_ready_on_its_gpu_or_says_why(
    cluster: Cluster, fleet: str, namespace: str, operator: Operator, example: Path
) -> None:
    manifest = yaml.safe_load(example.read_text())
    name = manifest["metadata"]["name"]
    plan = plan_on_cluster(cluster, manifest)
    assert apply(cluster, namespace, manifest).returncode == 0
    obj = wait_observed(cluster, namespace, name)
    assert obj["status"]["engine"] == "vllm", obj["status"].get("engineReason")
    if not any(p.fits for p in plan.pools):
        ready = condition(obj, "Ready")
        assert ready and ready["status"] == "False" and ready["reason"] == "DoesNotFit", ready
        assert "no acceptable GPU type fits" in ready["message"]
        return
    if not ready_or_stranded(cluster, namespace, name, plan):
        return
    nodes = {n["metadata"]["name"]: n for n in _nodes(cluster)}
    pods = [
        p
        for p in children(cluster, namespace, name)["pods"]
        if p["metadata"]["labels"].get("app.kubernetes.io/component") in ("engine", "worker")
    ]
    assert pods
    for pod in pods:
        labels = nodes[pod["spec"]["nodeName"]]["metadata"]["labels"]
        gpu, _, _ = recognise(labels, CONFIG.catalog(), CONFIG.label_schemes)
        assert gpu is not None and gpu.name == pod["metadata"]["labels"]["toposerve.io/gpu-type"], (
            pod["metadata"]["name"],
            labels,
        )
        if not any(p.spot for p in plan.pools):
            assert not any(labels.get(s.key) in s.values for s in CONFIG.label_schemes.spot), labels
    routers = [p for p in children(cluster, namespace, name)["pods"] if p["metadata"]["labels"].get(
        "app.kubernetes.io/component") == "router"]  # fmt: skip
    for r in routers:
        labels = nodes[r["spec"]["nodeName"]]["metadata"]["labels"]
        assert recognise(labels, CONFIG.catalog(), CONFIG.label_schemes)[0] is None, "router on a GPU node"


def test_multi_node_replica_schedules_without_clique_labels(
    cluster: Cluster, fleet: str, namespace: str, operator: Operator
) -> None:
    if fleet != "onprem":
        pytest.skip("the HGX profile without clique labels is the one this is about")
    manifest = yaml.safe_load((ROOT / "examples" / "llama-405b-multinode.yaml").read_text())
    assert apply(cluster, namespace, manifest).returncode == 0
    plan = plan_on_cluster(cluster, manifest)
    if not ready_or_stranded(cluster, namespace, "llama-405b", plan):
        return  # the leader landed in the rack with a cordoned node: said in Schedulable, Ready False
    obj = get_llmd(cluster, namespace, "llama-405b")
    pool = obj["status"]["pools"][0]
    assert pool["nodesPerReplica"] == 2 and pool["topologyKey"] != "nvidia.com/gpu.clique"
    key = pool["topologyKey"]
    nodes = {n["metadata"]["name"]: n for n in _nodes(cluster)}
    placed = [p["spec"]["nodeName"] for p in children(cluster, namespace, "llama-405b")["pods"]
              if p["metadata"]["labels"].get("app.kubernetes.io/component") in ("engine", "worker")]  # fmt: skip
    assert len(placed) == 2 and len(set(placed)) == 2
    assert len({nodes[n]["metadata"]["labels"][key] for n in placed}) == 1  # one domain


def test_gpu_nodes_scaled_to_zero_never_turn_vllm_into_the_mock(
    cluster: Cluster, fleet: str, namespace: str, operator: Operator
) -> None:
    if fleet != "eks":
        pytest.skip("Karpenter scales GPU node pools to zero; one profile is enough")
    manifest = yaml.safe_load((ROOT / "examples" / "llama-70b-h100.yaml").read_text())
    assert apply(cluster, namespace, manifest).returncode == 0
    wait_condition(cluster, namespace, "llama-70b", "Ready", "True", timeout=180)
    gpu_nodes = [n["metadata"]["name"] for n in _nodes(cluster)
                 if recognise(n["metadata"].get("labels") or {}, CONFIG.catalog(), CONFIG.label_schemes)[0]]  # fmt: skip
    try:
        kubectl(cluster, "delete", "node", *gpu_nodes, "--wait=true")
        # A spec change forces a full reconcile against the GPU-less inventory.
        kubectl(cluster, "-n", namespace, "scale", "llmd/llama-70b", "--replicas=2")

        def replanned() -> dict[str, Any] | None:
            obj = get_llmd(cluster, namespace, "llama-70b")
            return obj if obj["status"].get("observedGeneration") == obj["metadata"]["generation"] else None

        obj = wait_for(replanned, "a reconcile with no GPU nodes")
        assert obj["status"]["engine"] == "vllm"
        for w in children(cluster, namespace, "llama-70b")["deployments"]:
            (c,) = w["spec"]["template"]["spec"]["containers"]
            assert c["image"].startswith("vllm/vllm-openai:"), c["image"]
    finally:
        use_profile(cluster, fleet)
