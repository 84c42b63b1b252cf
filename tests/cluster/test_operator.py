"""The operator on the real local cluster: examples converge, edits converge, GPU fallback and its
return, garbage collection, and a mock-engine deployment that answers the openai SDK."""

from __future__ import annotations

import copy
import json
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
    events,
    get_llmd,
    operator,
    wait_condition,
    wait_observed,
)
from toposerve.api.gpus import DEFAULT_CATALOG
from toposerve.api.manifest import parse_spec
from toposerve.planner.inventory import inventory_from_nodes
from toposerve.planner.plan import plan_deployment
from toposerve.render.objects import workload_name

pytestmark = pytest.mark.cluster
__all__ = ["operator"]  # the fixture, imported for pytest

EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def load(path: Path) -> dict[str, Any]:
    return dict(yaml.safe_load(path.read_text()))


def cluster_plan(cluster: Cluster, manifest: dict[str, Any]) -> Any:
    nodes = json.loads(kubectl(cluster, "get", "nodes", "-o", "json").stdout)["items"]
    from toposerve.api.config import OperatorConfig

    cfg = OperatorConfig()
    inv = inventory_from_nodes(nodes, cfg.catalog(), cfg.label_schemes)
    return plan_deployment(manifest["metadata"]["name"], parse_spec(manifest["spec"]), cfg, inv)


def node_labels(cluster: Cluster, node: str) -> dict[str, str]:
    return dict(cluster.core.read_node(node).metadata.labels or {})


def delete_and_wait_gone(cluster: Cluster, namespace: str, name: str) -> None:
    kubectl(cluster, "delete", "llmd", name, "-n", namespace, "--wait=true")

    def gone() -> bool:
        left = children(cluster, namespace, name)
        return not any(
            left[k] for k in ("deployments", "services", "poddisruptionbudgets", "leaderworkersets")
        )

    wait_for(gone, f"garbage collection of {name}'s children", timeout=120)


def has_lws(cluster: Cluster) -> bool:
    return (
        kubectl(cluster, "get", "crd", "leaderworkersets.leaderworkerset.x-k8s.io", check=False).returncode
        == 0
    )


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_example_converges_to_its_plan(
    cluster: Cluster, namespace: str, operator: Operator, example: Path
) -> None:
    manifest = load(example)
    name = manifest["metadata"]["name"]
    res = apply(cluster, namespace, manifest)
    assert res.returncode == 0, res.stderr
    plan = cluster_plan(cluster, manifest)
    obj = wait_observed(cluster, namespace, name)
    st = obj["status"]
    assert st["engine"] == plan.engine and st["selector"]
    multi = any(p.nodes_per_replica > 1 for p in plan.pools)
    if multi and not has_lws(cluster):
        c = condition(obj, "Ready")
        assert c and c["reason"] == "LeaderWorkerSetRequired", c
        delete_and_wait_gone(cluster, namespace, name)
        return
    kids = wait_for(
        lambda: (
            (k := children(cluster, namespace, name))
            and len(k["deployments"]) + len(k["leaderworkersets"]) >= len(plan.pools)
            and k
        ),
        "workloads for every pool",
    )
    workloads = {w["metadata"]["name"]: w for w in kids["deployments"] + kids["leaderworkersets"]}
    for pool in plan.pools:
        assert pool.fits, pool.reason
        assert pool.gpu_type is not None
        w = workloads[workload_name(name, pool.name, pool.gpu_type)]
        if w["kind"] == "Deployment":
            pod = w["spec"]["template"]["spec"]
        else:
            pod = w["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["spec"]
        c = pod["containers"][0]
        if plan.engine == "vllm":
            assert c["resources"]["limits"]["nvidia.com/gpu"] == str(pool.gpus_per_pod)
            args = " ".join(c["args"])
            assert f"--tensor-parallel-size {pool.tensor_parallel}" in args
            assert f"--pipeline-parallel-size {pool.pipeline_parallel}" in args
    svc_names = {s["metadata"]["name"] for s in kids["services"]}
    assert f"{name}-engine" in svc_names and (name in svc_names) == manifest["spec"].get("routing", {}).get(
        "enabled", True
    )
    # The real scheduler put every scheduled serving pod on a node of the planned GPU type.
    if plan.engine == "vllm":
        expected = {p.name: p for p in plan.pools}

        def scheduled() -> list[dict[str, Any]] | None:
            pods = children(cluster, namespace, name)["pods"]
            engine = [
                p for p in pods if p["metadata"]["labels"].get("app.kubernetes.io/component") == "engine"
            ]
            placed = [p for p in engine if p["spec"].get("nodeName")]
            want = sum(p.replicas for p in plan.pools)
            return placed if len(placed) >= want else None

        for pod in wait_for(scheduled, "serving pods scheduled"):
            labels = pod["metadata"]["labels"]
            pool = expected[labels["toposerve.io/pool"]]
            nl = node_labels(cluster, pod["spec"]["nodeName"])
            assert labels["toposerve.io/gpu-type"] == pool.gpu_type
            assert nl["nvidia.com/gpu.product"] == DEFAULT_CATALOG.get(pool.gpu_type or "").product
            assert int(nl["nvidia.com/gpu.count"]) >= pool.gpus_per_pod
            if not pool.spot:
                assert nl.get("toposerve.io/capacity-type") != "spot"
        wait_condition(cluster, namespace, name, "Ready", "True")
    delete_and_wait_gone(cluster, namespace, name)


def test_mock_quickstart_answers_the_openai_sdk(cluster: Cluster, namespace: str, operator: Operator) -> None:
    openai = pytest.importorskip("openai")
    manifest = load(ROOT / "examples" / "quickstart.yaml")
    manifest["spec"]["engine"] = (
        "mock"  # the local fleet's GPUs are simulated: serve with the CPU mock engine
    )
    manifest["spec"]["replicas"] = 1
    assert apply(cluster, namespace, manifest).returncode == 0
    obj = wait_condition(cluster, namespace, "quickstart", "Ready", "True", timeout=180)
    assert obj["status"]["engine"] == "mock" and obj["status"]["readyReplicas"] == 1

    def endpoint() -> str | None:
        slices = cluster.discovery.list_namespaced_endpoint_slice(
            namespace, label_selector="kubernetes.io/service-name=quickstart-engine"
        ).items
        addrs = [
            a
            for s in slices
            for e in s.endpoints or []
            if e.conditions and e.conditions.ready
            for a in e.addresses
        ]
        return addrs[0] if addrs else None

    ip = wait_for(endpoint, "a ready endpoint behind quickstart-engine")
    client = openai.OpenAI(base_url=f"http://{ip}:8000/v1", api_key="unused", max_retries=0, timeout=30)
    served = obj["spec"]["model"]["name"]
    chat = client.chat.completions.create(
        model=served, messages=[{"role": "user", "content": "Hello!"}], max_tokens=8
    )
    assert chat.choices[0].message.content and chat.usage and chat.usage.completion_tokens > 0
    delete_and_wait_gone(cluster, namespace, "quickstart")


def test_edits_converge_and_scale_subresource_works(
    cluster: Cluster, namespace: str, operator: Operator
) -> None:
    manifest = load(ROOT / "examples" / "llama-70b-h100.yaml")
    manifest["spec"]["model"]["maxContextLength"] = 8192
    assert apply(cluster, namespace, manifest).returncode == 0
    obj = wait_observed(cluster, namespace, "llama-70b")
    assert obj["status"]["pools"][0]["gpuType"] == "H100"
    kubectl(cluster, "scale", "llmd/llama-70b", "-n", namespace, "--replicas=3")

    def scaled() -> bool:
        kids = children(cluster, namespace, "llama-70b")
        reps = {d["metadata"]["name"]: d["spec"]["replicas"] for d in kids["deployments"]}
        return (
            reps.get("llama-70b-default-h100") == 3
            and get_llmd(cluster, namespace, "llama-70b")["status"]["replicas"] == 3
        )

    wait_for(scaled, "3 replicas after kubectl scale")
    edited = copy.deepcopy(manifest)
    edited["spec"]["replicas"] = 3
    edited["spec"]["placement"]["gpuTypes"] = ["A100-80GB", "H100"]
    edited["spec"]["model"]["name"] = "meta-llama/Llama-3.1-8B-Instruct"
    assert apply(cluster, namespace, edited).returncode == 0
    obj = wait_observed(cluster, namespace, "llama-70b")
    assert obj["status"]["observedGeneration"] == obj["metadata"]["generation"] >= 3

    def moved() -> dict[str, Any] | None:
        kids = children(cluster, namespace, "llama-70b")
        names = {d["metadata"]["name"]: d for d in kids["deployments"]}
        return names if set(names) == {"llama-70b-default-a100-80gb"} else None

    dep = wait_for(moved, "the workload to move to A100-80GB and the H100 one to go")[
        "llama-70b-default-a100-80gb"
    ]
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[0] == "meta-llama/Llama-3.1-8B-Instruct" and dep["spec"]["replicas"] == 3
    delete_and_wait_gone(cluster, namespace, "llama-70b")


def filler(namespace: str, replicas: int) -> dict[str, Any]:
    """Pods that take every on-demand H100 GPU, so the scheduler has no H100 capacity left."""
    pod = {
        "containers": [{"name": "hog", "image": "registry.k8s.io/pause:3.10",
                        "resources": {"limits": {"nvidia.com/gpu": "8"}, "requests": {"nvidia.com/gpu": "8"}}}],
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "nvidia.com/gpu.product", "operator": "In", "values": ["NVIDIA-H100-80GB-HBM3"]},
                                  {"key": "toposerve.io/capacity-type", "operator": "NotIn", "values": ["spot"]}]}]}}},
    }  # fmt: skip
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "h100-filler", "namespace": namespace},
        "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": "filler"}},
                 "template": {"metadata": {"labels": {"app": "filler"}}, "spec": pod}},
    }  # fmt: skip


def test_gpu_fallback_and_return(cluster: Cluster, namespace: str, operator: Operator) -> None:
    nodes = json.loads(kubectl(cluster, "get", "nodes", "-l",
                                "nvidia.com/gpu.product=NVIDIA-H100-80GB-HBM3,toposerve.io/capacity-type!=spot",
                                "-o", "json").stdout)["items"]  # fmt: skip
    kubectl(cluster, "apply", "-f", "-", stdin=yaml.safe_dump(filler(namespace, len(nodes))))

    def filled() -> bool:
        pods = cluster.core.list_namespaced_pod(namespace, label_selector="app=filler").items
        return len([p for p in pods if p.spec.node_name]) == len(nodes)

    wait_for(filled, "filler pods on every on-demand H100 node", timeout=120)
    manifest = load(ROOT / "examples" / "llama-70b-h100.yaml")
    manifest["spec"]["model"]["maxContextLength"] = 8192
    manifest["spec"]["replicas"] = 2
    assert apply(cluster, namespace, manifest).returncode == 0

    def fell_back() -> dict[str, Any] | None:
        obj = get_llmd(cluster, namespace, "llama-70b")
        pl = {
            p["gpuType"]: p["replicas"]
            for p in ((obj.get("status") or {}).get("pools") or [{}])[0].get("placements", [])
        }
        return obj if pl.get("A100-80GB") == 2 and not pl.get("H100") else None

    obj = wait_for(fell_back, "both replicas to fall back to A100-80GB", timeout=180)
    assert condition(obj, "Degraded")["reason"] == "FallbackActive"  # type: ignore[index]
    evs = events(cluster, namespace, "llama-70b")
    fb = [e for e in evs if e["reason"] == "GPUFallback"]
    assert (
        fb and "H100" in fb[0]["message"] and "A100-80GB" in fb[0]["message"] and fb[0]["type"] == "Warning"
    )
    wait_condition(cluster, namespace, "llama-70b", "Ready", "True", timeout=120)
    # Capacity returns on the preferred type: replicas move back, one at a time.
    kubectl(cluster, "delete", "deployment", "h100-filler", "-n", namespace, "--wait=true")

    def returned() -> bool:
        kids = children(cluster, namespace, "llama-70b")
        reps = {d["metadata"]["name"]: d["spec"]["replicas"] for d in kids["deployments"]}
        return reps.get("llama-70b-default-h100") == 2 and "llama-70b-default-a100-80gb" not in reps

    wait_for(returned, "both replicas back on H100 and the A100 workload gone", timeout=240)
    back = [e for e in events(cluster, namespace, "llama-70b") if e["reason"] == "GPUFallbackReturn"]
    assert len(back) >= 2 and all("1 replica" in e["message"] for e in back)  # gradual: one per move
    obj = wait_condition(cluster, namespace, "llama-70b", "Degraded", "False", timeout=120)
    delete_and_wait_gone(cluster, namespace, "llama-70b")


def cpu_filler(namespace: str, replicas: int, resources: dict[str, str] | None = None) -> dict[str, Any]:
    """Pods that take nearly all of one resource of the on-demand H100 nodes but no GPU (CPU by
    default: the capacity view counts it; ephemeral storage: only the scheduler can tell)."""
    d = filler(namespace, replicas)
    d["metadata"]["name"] = "cpu-filler"
    pod = d["spec"]["template"]["spec"]
    pod["containers"][0]["resources"] = {"requests": resources or {"cpu": "190"}}
    pod["topologySpreadConstraints"] = [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
                                         "whenUnsatisfiable": "DoNotSchedule",
                                         "labelSelector": {"matchLabels": {"app": "filler"}}}]  # fmt: skip
    return d


@pytest.mark.parametrize("shortage", ["cpu", "anti-affinity"])
def test_replicas_stuck_unschedulable_fall_back_after_patience(
    cluster: Cluster, namespace: str, tmp_path: Path, shortage: str
) -> None:
    """CPU is short on every H100 node: the capacity view counts CPU, so new replicas go straight to
    the next GPU type ("no free H100 capacity"). Another pod on every H100 node repels serving pods
    (required pod anti-affinity): the view does not model that, the scheduler refuses, the pod stays
    Pending, and after the patience window (--fallback-after 5 here) the stuck replica moves to the
    next GPU type."""
    from tests.cluster.operator_harness import install_crd

    install_crd(cluster)
    op = Operator(cluster, tmp_path / "operator.log", "--fallback-after", "5", "--resync", "5",
                  "--return-cooldown", "600")  # fmt: skip
    op.start()
    try:
        sel = "nvidia.com/gpu.product=NVIDIA-H100-80GB-HBM3,toposerve.io/capacity-type!=spot"
        nodes = json.loads(kubectl(cluster, "get", "nodes", "-l", sel, "-o", "json").stdout)["items"]
        blocker = cpu_filler(namespace, len(nodes), {"cpu": "190"} if shortage == "cpu" else {"cpu": "10m"})
        if shortage == "anti-affinity":
            blocker["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"] = {
                "requiredDuringSchedulingIgnoredDuringExecution": [{
                    "labelSelector": {"matchExpressions": [{"key": "toposerve.io/deployment", "operator": "Exists"}]},
                    "topologyKey": "kubernetes.io/hostname"}]}  # fmt: skip
        kubectl(cluster, "apply", "-f", "-", stdin=yaml.safe_dump(blocker))

        def filled() -> bool:
            pods = cluster.core.list_namespaced_pod(namespace, label_selector="app=filler").items
            return len([p for p in pods if p.spec.node_name]) == len(nodes)

        wait_for(filled, "cpu filler pods on every on-demand H100 node")
        manifest = load(ROOT / "examples" / "llama-70b-h100.yaml")
        manifest["spec"]["model"]["maxContextLength"] = 8192
        assert apply(cluster, namespace, manifest).returncode == 0

        def moved() -> list[dict[str, Any]] | None:
            evs = [e for e in events(cluster, namespace, "llama-70b") if e["reason"] == "GPUFallback"]
            return evs or None

        (ev,) = wait_for(moved, "a GPUFallback event", timeout=120)
        expected = "no free H100 capacity" if shortage == "cpu" else "unschedulable on H100"
        assert expected in ev["message"] and "A100-80GB" in ev["message"]
        obj = wait_condition(cluster, namespace, "llama-70b", "Ready", "True", timeout=120)
        assert obj["status"]["gpuTypes"] == "A100-80GB"
        sched = condition(obj, "Schedulable")
        assert sched and sched["status"] == "True"
        degraded = condition(obj, "Degraded")
        assert degraded and degraded["reason"] == "FallbackActive"
        delete_and_wait_gone(cluster, namespace, "llama-70b")
    finally:
        op.stop()
        # Free the nodes before the next test: a terminating namespace's pods still hold resources.
        kubectl(cluster, "delete", "deployment", "cpu-filler", "-n", namespace, "--wait=true", check=False)

        def freed() -> bool:
            return not cluster.core.list_namespaced_pod(namespace, label_selector="app=filler").items

        wait_for(freed, "filler pods gone")
