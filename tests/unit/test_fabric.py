"""Multi-node replicas ask for the fabric their nodes offer (render/fabric.py), and only that.

Every example (and the GB200 / H200 manifests below), planned and rendered against every simulated
fleet of hack/cluster/fleet.yaml with the fleet as the inventory: a multi-node vLLM pod requests
EFA on eks, InfiniBand RDMA (+ IPC_LOCK) on onprem, GPUDirect RDMA on GKE A3 Ultra, an IMEX channel
of a ComputeDomain on gb200 (valid for NVIDIA's CRD, vendored by hack/vendor_dra_schemas.py), and
nothing where the nodes offer nothing (then status says ``tcp``). Each pod must stay placeable on
the fleet (dev/placeable.py, the same oracle as test_placement_profiles.py), single-node replicas
and the mock engine get none of it, and vLLM's command lines do not change.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.unit.autoscale.test_render_autoscaler import errors, strict
from tests.unit.controller.test_pool_scaling import FakeKube
from tests.unit.test_placement_profiles import EXTRA, FLEET, ROOT
from toposerve.api.config import OperatorConfig
from toposerve.api.manifest import load_manifests
from toposerve.controller.kube import CHILD_KINDS
from toposerve.controller.reconcile import Context, reconcile
from toposerve.dev import fleet
from toposerve.dev.placeable import placeable_nodes, pod_templates
from toposerve.planner.inventory import inventory_from_nodes
from toposerve.planner.plan import plan_deployment
from toposerve.render import fabric as fab
from toposerve.render.objects import render_deployment

SCHEMAS = Path(__file__).resolve().parent / "schemas"
# The gke profile's H100s are A3 High (GPUDirect-TCPX, not rendered): this variant adds a pool of
# A3 Ultra (H200, GPUDirect RDMA), the machine fleet.yaml describes but no profile uses.
FLEET_X = copy.deepcopy(FLEET)
FLEET_X["profiles"]["gke-a3-ultra"] = [
    *FLEET["profiles"]["gke"],
    {
        "pool": "gke-a3u",
        "count": 2,
        "machine": "a3-ultragpu-8g",
        "labels": {
            "topology.kubernetes.io/region": "us-central1",
            "topology.kubernetes.io/zone": "us-central1-b",
            "cloud.google.com/gke-nodepool": "a3u",
            "cloud.google.com/gke-gpu-driver-version": "latest",
            "cloud.google.com/gke-os-distribution": "cos",
            "cloud.google.com/gke-provisioning": "standard",
            "cloud.google.com/gce-topology-block": "9b2c4d6e8f0a",
        },
        "taints": [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}],
    },
]
MANIFESTS = {p.name: p.read_text() for p in sorted((ROOT / "examples").glob("*.yaml"))} | EXTRA
MANIFESTS["h200-llama-405b"] = """
apiVersion: toposerve.io/v1alpha1
kind: LLMDeployment
metadata: {name: llama-405b-h200}
spec:
  model: {name: meta-llama/Llama-3.1-405B-Instruct, dtype: bf16, maxContextLength: 131072}
  serving: {minConcurrentSequences: 8}
  placement: {gpuTypes: [H200]}
"""
PROFILES = sorted(FLEET_X["profiles"])
# (profile, GPU type) of every multi-node vLLM pool the matrix renders -> the fabric its nodes
# offer (fleet.yaml). A new combination must be added here, on purpose.
EXPECTED = {
    ("eks", "H100"): fab.EFA,
    ("onprem", "H100"): fab.INFINIBAND,
    ("gb200", "GB200"): fab.IMEX,
    ("gke-a3-ultra", "H200"): fab.GKE_RDMA,
    ("gke", "H100"): fab.TCP,  # A3 High: GPUDirect-TCPX needs a sidecar toposerve does not render
    ("gke-a3-ultra", "H100"): fab.TCP,
    ("gpu", "H100"): fab.TCP,  # the project's own fleet: no fabric device plugin
}
BASE_RESOURCES = {"cpu", "memory", "ephemeral-storage", "nvidia.com/gpu"}


def crd_validator() -> jsonschema.Draft202012Validator:
    crd = yaml.safe_load((SCHEMAS / "nvidia-dra-driver-gpu-v25.12.0-computedomains.yaml").read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1beta1"]
    return jsonschema.Draft202012Validator(strict(version["schema"]["openAPIV3Schema"]))


def render(text: str, profile: str, engine: str = "vllm", with_inventory: bool = True) -> list[Any]:
    """(plan, objects, nodes) per deployment in ``text`` on ``profile``'s fleet."""
    config = OperatorConfig(auto_engine=engine)
    nodes = fleet.nodes(FLEET_X, profile)
    inv = inventory_from_nodes(nodes, config.catalog(), config.label_schemes)
    out = []
    for dep in load_manifests(text):
        plan = plan_deployment(dep.name, dep.spec, config, inv)
        objs = render_deployment(
            dep.name, "ns", dep.spec, plan, config, inventory=inv if with_inventory else None
        )
        out.append((plan, objs, nodes))
    return out


def workloads(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        o
        for o in objs
        if o["kind"] in ("Deployment", "LeaderWorkerSet")
        and o["metadata"]["labels"].get("app.kubernetes.io/component") != "router"
    ]


def engine(pod_spec: dict[str, Any]) -> dict[str, Any]:
    (c,) = [c for c in pod_spec["containers"] if c["name"] == "engine"]
    return c


def extended(pod_spec: dict[str, Any]) -> dict[str, str]:
    res = engine(pod_spec)["resources"]
    return {k: v for k, v in res["requests"].items() if k not in BASE_RESOURCES}


def env(pod_spec: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in engine(pod_spec)["env"]}


def fabric_of(pod_spec: dict[str, Any]) -> str:
    """What a rendered pod template asks for, read back from the pod (not from the module)."""
    ext = extended(pod_spec)
    if pod_spec.get("resourceClaims"):
        return fab.IMEX
    if fab.EFA_RESOURCE in ext:
        return fab.EFA
    if any(k.startswith(fab.GKE_NETWORK_PREFIX) for k in ext):
        return fab.GKE_RDMA
    if any(k.startswith(fab.RDMA_PREFIX) for k in ext):
        return fab.ROCE if "NCCL_IB_GID_INDEX" in env(pod_spec) else fab.INFINIBAND
    return fab.TCP


def node_type_nodes(nodes: list[dict[str, Any]], gpu_type: str) -> list[dict[str, Any]]:
    config = OperatorConfig()
    inv = inventory_from_nodes(nodes, config.catalog(), config.label_schemes)
    names = {n.name for n in inv.nodes_of(gpu_type)}
    return [n for n in nodes if n["metadata"]["name"] in names]


CASES = [
    pytest.param(ex, prof, id=f"{ex.removesuffix('.yaml')}-{prof}")
    for ex in sorted(MANIFESTS)
    for prof in PROFILES
]


@pytest.mark.parametrize(("example", "profile"), CASES)
def test_pods_request_the_fabric_the_nodes_offer_and_stay_placeable(example: str, profile: str) -> None:
    for _, objs, nodes in render(MANIFESTS[example], profile):
        for w in workloads(objs):
            gpu = w["metadata"]["labels"]["toposerve.io/gpu-type"]
            multi = w["kind"] == "LeaderWorkerSet"
            for role, pod_spec, pods in pod_templates(w):
                placeable = placeable_nodes(pod_spec, nodes)
                assert len(placeable) >= pods, f"{w['metadata']['name']} {role}: {len(placeable)} placeable"
                if not multi:
                    assert not extended(pod_spec), "single-node replicas need no fabric"
                    assert "resourceClaims" not in pod_spec
                    assert "add" not in engine(pod_spec)["securityContext"].get("capabilities", {})
                    continue
                want = EXPECTED.get((profile, gpu))
                assert want is not None, f"add ({profile!r}, {gpu!r}) to EXPECTED"
                assert fabric_of(pod_spec) == want, (profile, gpu, extended(pod_spec))
                # never a resource some node of the type lacks, in no more than the smallest has
                for res, qty in extended(pod_spec).items():
                    for n in node_type_nodes(nodes, gpu):
                        assert int(n["status"]["allocatable"].get(res, "0")) >= int(qty), (
                            res,
                            n["metadata"]["name"],
                        )
                caps = engine(pod_spec)["securityContext"].get("capabilities", {}).get("add", [])
                assert caps == (["IPC_LOCK"] if want in (fab.INFINIBAND, fab.ROCE) else [])
                check_fabric(want, pod_spec, objs, w, role)


def check_fabric(
    want: str, pod_spec: dict[str, Any], objs: list[dict[str, Any]], w: dict[str, Any], role: str
) -> None:
    ext, e = extended(pod_spec), env(pod_spec)
    annotations = w["spec"]["leaderWorkerTemplate"][f"{role}Template"]["metadata"].get("annotations", {})
    if want == fab.EFA:
        assert ext == {fab.EFA_RESOURCE: "32"}  # p5.48xlarge: 32 EFA interfaces, the pod holds the node
        assert engine(pod_spec)["resources"]["limits"][fab.EFA_RESOURCE] == "32"
        assert e["FI_PROVIDER"] == "efa" and e["FI_EFA_USE_DEVICE_RDMA"] == "1"
    elif want == fab.INFINIBAND:
        assert ext == {"rdma/rdma_shared_device_a": "1"}
        assert e["NCCL_IB_HCA"] == "mlx5" and "NCCL_IB_GID_INDEX" not in e
    elif want == fab.GKE_RDMA:
        nets = ["gvnic-1"] + [f"rdma-{i}" for i in range(8)]
        assert ext == {f"{fab.GKE_NETWORK_PREFIX}{n}": "1" for n in nets}
        assert e["NCCL_NET"] == "gIB"
        assert e["NCCL_TUNER_CONFIG_PATH"] == "/usr/local/gib/configs/tuner_config_a3u.txtpb"
        assert annotations["networking.gke.io/default-interface"] == "eth0"
        interfaces = json.loads(annotations["networking.gke.io/interfaces"])
        assert interfaces[0] == {"interfaceName": "eth0", "network": "default"}
        assert [i["network"] for i in interfaces[1:]] == nets
        mounts = {m["mountPath"] for m in engine(pod_spec)["volumeMounts"]}
        assert {"/usr/local/gib", "/usr/local/nvidia"} <= mounts
    elif want == fab.IMEX:
        assert not ext
        (claim,) = pod_spec["resourceClaims"]
        assert engine(pod_spec)["resources"]["claims"] == [{"name": claim["name"]}]
        domains = [o for o in objs if o["kind"] == "ComputeDomain"]
        (cd,) = [
            d
            for d in domains
            if d["spec"]["channel"]["resourceClaimTemplate"]["name"] == claim["resourceClaimTemplateName"]
        ]
        assert cd["apiVersion"] == fab.COMPUTE_DOMAIN_API and cd["metadata"]["namespace"] == "ns"
        assert not errors(crd_validator(), cd), errors(crd_validator(), cd)
    else:
        assert not ext and "resourceClaims" not in pod_spec
        assert "networking.gke.io/interfaces" not in annotations


def test_every_expected_case_occurs() -> None:
    """EXPECTED names no (profile, GPU type) the matrix never renders (it would test nothing)."""
    seen = set()
    for ex in MANIFESTS:
        for prof in PROFILES:
            for _, objs, _ in render(MANIFESTS[ex], prof):
                seen |= {
                    (prof, w["metadata"]["labels"]["toposerve.io/gpu-type"])
                    for w in workloads(objs)
                    if w["kind"] == "LeaderWorkerSet"
                }
    assert set(EXPECTED) <= seen, set(EXPECTED) - seen
    assert {fab.EFA, fab.INFINIBAND, fab.GKE_RDMA, fab.IMEX} <= {EXPECTED[k] for k in seen}


@pytest.mark.parametrize("profile", ["eks", "onprem", "gb200", "gke-a3-ultra"])
def test_the_fabric_leaves_vllm_command_lines_alone(profile: str) -> None:
    text = "\n---\n".join(
        MANIFESTS[k] for k in ("llama-405b-multinode.yaml", "gb200-llama-405b", "h200-llama-405b")
    )
    with_fabric = render(text, profile)
    without = render(text, profile, with_inventory=False)
    for (_, a, _), (_, b, _) in zip(with_fabric, without, strict=True):
        args = [
            [pod_spec["containers"][0]["args"] for _, pod_spec, _ in pod_templates(w)] for w in workloads(a)
        ]
        assert args == [[p["containers"][0]["args"] for _, p, _ in pod_templates(w)] for w in workloads(b)]


def test_no_inventory_no_fabric() -> None:
    for _, objs, _ in render(MANIFESTS["llama-405b-multinode.yaml"], "eks", with_inventory=False):
        for w in workloads(objs):
            for _, pod_spec, _ in pod_templates(w):
                assert not extended(pod_spec)


def test_the_mock_engine_gets_no_fabric() -> None:
    for profile in ("eks", "onprem", "gb200"):
        text = MANIFESTS["llama-405b-multinode.yaml"] + "\n---\n" + MANIFESTS["gb200-llama-405b"]
        for _, objs, _ in render(text, profile, engine="mock"):
            assert not [o for o in objs if o["kind"] == "ComputeDomain"]
            for w in workloads(objs):
                for _, pod_spec, _ in pod_templates(w):
                    assert not extended(pod_spec) and "resourceClaims" not in pod_spec


def _nodes(extra: dict[str, str], n: int = 2, labels: dict[str, str] | None = None) -> list[dict[str, Any]]:
    return [
        {
            "metadata": {
                "name": f"n{i}",
                "labels": {
                    "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",
                    "nvidia.com/gpu.count": "8",
                    "topology.kubernetes.io/zone": "z",
                    **(labels or {}),
                },
            },
            "spec": {},
            "status": {
                "allocatable": {
                    "nvidia.com/gpu": "8",
                    "cpu": "190",
                    "memory": "2000Gi",
                    "ephemeral-storage": "3000Gi",
                    **extra,
                },
            },
        }
        for i in range(n)
    ]


def _fabric(nodes: list[dict[str, Any]]) -> fab.Fabric:
    config = OperatorConfig()
    inv = inventory_from_nodes(nodes, config.catalog(), config.label_schemes)
    (dep,) = load_manifests(MANIFESTS["llama-405b-multinode.yaml"])
    (pool,) = plan_deployment(dep.name, dep.spec, config, inv).pools
    return fab.fabric_for(pool, "vllm", inv, config.catalog(), "w")


def test_roce_gets_the_gid_index_and_ipc_lock() -> None:
    f = _fabric(_nodes({"rdma/roce_shared": "63"}))
    assert f.name == fab.ROCE and f.capabilities == ("IPC_LOCK",)
    assert {"name": "NCCL_IB_GID_INDEX", "value": "3"} in f.env


def test_a_fabric_only_some_nodes_offer_is_not_requested() -> None:
    nodes = _nodes({fab.EFA_RESOURCE: "32"}) + [
        {**n, "metadata": {**n["metadata"], "name": "plain"}} for n in _nodes({}, 1)
    ]
    f = _fabric(nodes)
    assert f.name == fab.TCP and not f.resources and fab.EFA_RESOURCE in f.reason


def test_a_partial_node_pod_takes_its_share_of_efa() -> None:
    config = OperatorConfig()
    inv = inventory_from_nodes(_nodes({fab.EFA_RESOURCE: "32"}), config.catalog(), config.label_schemes)
    (dep,) = load_manifests(MANIFESTS["llama-405b-multinode.yaml"])
    (pool,) = plan_deployment(dep.name, dep.spec, config, inv).pools
    half = pool.model_copy(update={"gpus_per_pod": 4})
    assert fab.fabric_for(half, "vllm", inv, config.catalog(), "w").resources == {fab.EFA_RESOURCE: "16"}


def test_single_node_replicas_get_nothing() -> None:
    config = OperatorConfig()
    inv = inventory_from_nodes(_nodes({fab.EFA_RESOURCE: "32"}), config.catalog(), config.label_schemes)
    (dep,) = load_manifests((ROOT / "examples" / "llama-70b-h100.yaml").read_text())
    (pool,) = plan_deployment(dep.name, dep.spec, config, inv).pools
    assert pool.nodes_per_replica == 1
    assert fab.fabric_for(pool, "vllm", inv, config.catalog(), "w") == fab.NO_FABRIC


class _LWSKube(FakeKube):
    def has_crd(self, name: str) -> bool:
        return True


def _body(key: str = "llama-405b-multinode.yaml", **spec: Any) -> dict[str, Any]:
    """The LLMDeployment object of one of MANIFESTS, as the API server hands it over."""
    doc = yaml.safe_load(MANIFESTS[key])
    return {
        "apiVersion": "toposerve.io/v1alpha1",
        "kind": "LLMDeployment",
        "metadata": {"name": doc["metadata"]["name"], "namespace": "ns", "uid": "u1", "generation": 1},
        "spec": {**doc["spec"], **spec},
    }


@pytest.mark.parametrize(
    ("profile", "want"), [("eks", fab.EFA), ("onprem", fab.INFINIBAND), ("gke", fab.TCP)]
)
def test_status_says_the_fabric_and_an_event_says_tcp_once(profile: str, want: str) -> None:
    kube = _LWSKube(_body(), fleet.nodes(FLEET_X, profile))
    ctx = Context(kube=kube, config=OperatorConfig(auto_engine="vllm"))  # type: ignore[arg-type]
    reconcile(ctx, "ns", "llama-405b")
    (pool,) = kube.body["status"]["pools"]
    assert pool["fabric"] == want and pool["fabricReason"]
    over_tcp = [m for r, m, warn in kube.events if r == "MultiNodeOverTCP" and warn]
    assert len(over_tcp) == (1 if want == fab.TCP else 0)
    reconcile(ctx, "ns", "llama-405b")  # status already says tcp: no second Event
    assert len([r for r, _, _ in kube.events if r == "MultiNodeOverTCP"]) == len(over_tcp)
    lws = [o for (k, _), o in kube.objects.items() if k == "LeaderWorkerSet"]
    assert lws and all(fabric_of(p) == want for w in lws for _, p, _ in pod_templates(w))


class _Pruning(_LWSKube):
    def __init__(self, body: dict[str, Any], nodes: list[dict[str, Any]]) -> None:
        super().__init__(body, nodes)
        self.deleted: list[tuple[str, str, str]] = []

    def delete(self, api_version: str, kind: str, namespace: str | None, name: str) -> None:
        self.deleted.append((api_version, kind, name))
        super().delete(api_version, kind, namespace, name)


def test_a_compute_domain_is_a_child_kept_while_wanted_and_pruned_after() -> None:
    assert (fab.COMPUTE_DOMAIN_API, "ComputeDomain") in CHILD_KINDS  # the rendered apiVersion
    kube = _Pruning(_body("gb200-llama-405b", engine="vllm"), fleet.nodes(FLEET_X, "gb200"))
    ctx = Context(kube=kube, config=OperatorConfig())  # type: ignore[arg-type]
    reconcile(ctx, "ns", "llama-405b-gb200")
    (domain,) = [o for (k, _), o in kube.objects.items() if k == "ComputeDomain"]
    assert domain["apiVersion"] == fab.COMPUTE_DOMAIN_API
    assert [r["uid"] for r in domain["metadata"]["ownerReferences"]] == ["u1"]
    assert domain["metadata"]["labels"]["toposerve.io/deployment"] == "llama-405b-gb200"
    # wanted: a second reconcile keeps it (listed under the same apiVersion it is rendered with)
    reconcile(ctx, "ns", "llama-405b-gb200")
    assert not [d for d in kube.deleted if d[1] == "ComputeDomain"]
    # no longer wanted (the mock engine simulates a replica in one pod): pruned, not left to the
    # LLMDeployment's deletion
    kube.body["spec"]["engine"] = "mock"
    kube.body["metadata"]["generation"] = 2
    reconcile(ctx, "ns", "llama-405b-gb200")
    assert (fab.COMPUTE_DOMAIN_API, "ComputeDomain", domain["metadata"]["name"]) in kube.deleted
    assert not [k for k in kube.objects if k[0] == "ComputeDomain"]
