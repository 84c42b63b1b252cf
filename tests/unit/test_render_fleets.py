"""Rendering for real fleets: affinity per label scheme, taints, machine-sized requests, model
weights storage, start-up sized from the weights, and a router that survives a drain."""

from __future__ import annotations

from typing import Any

from toposerve.api.config import OperatorConfig
from toposerve.planner.plan import plan_deployment
from toposerve.render.objects import render_deployment

from .conftest import make_spec

L8 = "meta-llama/Llama-3.1-8B-Instruct"
L70 = "meta-llama/Llama-3.1-70B-Instruct"
L405 = "meta-llama/Llama-3.1-405B-Instruct"


def render(spec: Any, config: OperatorConfig | None = None) -> list[dict[str, Any]]:
    config = config or OperatorConfig()
    return render_deployment("llm", "ns", spec, plan_deployment("llm", spec, config), config)


def engine_pod(objs: list[dict[str, Any]]) -> dict[str, Any]:
    dep = next(o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"] != "llm-router")
    return dict(dep["spec"]["template"]["spec"])


def terms(pod: dict[str, Any]) -> list[dict[str, dict[str, Any]]]:
    sel = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]
    return [{e["key"]: e for e in t["matchExpressions"]} for t in sel]


def test_gpu_affinity_has_one_term_per_label_scheme() -> None:
    pod = engine_pod(render(make_spec(L70, 8192, ["A100-40GB"])))
    by_label = {next(iter(t)): t for t in terms(pod)}
    assert by_label["nvidia.com/gpu.product"]["nvidia.com/gpu.product"]["values"] == [
        "NVIDIA-A100-SXM4-40GB",
        "NVIDIA-A100-PCIE-40GB",
    ]
    assert by_label["cloud.google.com/gke-accelerator"]["cloud.google.com/gke-accelerator"]["values"] == [
        "nvidia-tesla-a100"
    ]
    karpenter = by_label["karpenter.k8s.aws/instance-gpu-name"]
    assert karpenter["karpenter.k8s.aws/instance-gpu-name"]["values"] == ["a100"]
    # 40 GB and 80 GB builds share the name: memory per GPU (MiB) tells them apart.
    assert karpenter["karpenter.k8s.aws/instance-gpu-memory"]["operator"] in ("Gt", "Lt")
    assert (
        "p4d.24xlarge"
        in by_label["node.kubernetes.io/instance-type"]["node.kubernetes.io/instance-type"]["values"]
    )
    # Every term forbids every provider's spot label (NotIn also matches nodes without it).
    for t in terms(pod):
        assert t["karpenter.sh/capacity-type"]["operator"] == "NotIn"
        assert t["kubernetes.azure.com/scalesetpriority"]["values"] == ["spot"]


def test_gpu_taints_of_every_provider_are_tolerated_and_spot_ones_only_when_allowed() -> None:
    pod = engine_pod(render(make_spec(L8, 8192, ["L4"])))
    keys = {(t["key"], t.get("value")) for t in pod["tolerations"]}
    assert ("nvidia.com/gpu", None) in keys and ("sku", "gpu") in keys
    assert ("cloud.google.com/gke-spot", "true") not in keys
    spot = engine_pod(render(make_spec(L8, 8192, ["L4"], placement={"spot": {"enabled": True}})))
    spot_keys = {(t["key"], t.get("value")) for t in spot["tolerations"]}
    assert {
        ("cloud.google.com/gke-spot", "true"),
        ("kubernetes.azure.com/scalesetpriority", "spot"),
    } <= spot_keys
    assert all("karpenter.sh/capacity-type" not in t for t in terms(spot))


def test_requests_fit_a_one_gpu_l4_machine() -> None:
    (c,) = engine_pod(render(make_spec(L8, 8192, ["L4"], parallelism={"tensor": 1})))["containers"]
    req = c["resources"]["requests"]
    assert req["nvidia.com/gpu"] == "1"
    cores = float(req["cpu"][:-1]) / 1000 if req["cpu"].endswith("m") else float(req["cpu"])
    assert cores <= 3.92 and int(req["memory"].removesuffix("Gi")) <= 13


def test_weights_get_a_cache_volume_and_start_up_is_sized_from_them() -> None:
    small = engine_pod(render(make_spec(L8, 8192, ["H100"])))
    big = engine_pod(render(make_spec(L70, 8192, ["H100"])))
    (cs,), (cb,) = small["containers"], big["containers"]
    models = next(v for v in big["volumes"] if v["name"] == "models")
    assert int(models["emptyDir"]["sizeLimit"].removesuffix("Gi")) > 131  # 70B bf16 is ~131 GiB
    assert int(cb["resources"]["requests"]["ephemeral-storage"].removesuffix("Gi")) > 131
    env = {e["name"]: e for e in cb["env"]}
    assert env["HF_HOME"]["value"].startswith("/models")
    assert {"name": "models", "mountPath": "/models"} in cb["volumeMounts"]
    budget_small = cs["startupProbe"]["failureThreshold"] * cs["startupProbe"]["periodSeconds"]
    budget_big = cb["startupProbe"]["failureThreshold"] * cb["startupProbe"]["periodSeconds"]
    assert budget_big > budget_small
    # 131 GiB at the assumed 0.5 GB/s is ~280 s of download alone: the probe allows more than that.
    assert budget_big > 280
    dep = next(o for o in render(make_spec(L70, 8192, ["H100"])) if o["kind"] == "Deployment")
    assert dep["spec"]["progressDeadlineSeconds"] >= budget_big


def test_cache_types_pvc_host_path_and_image() -> None:
    pvc = engine_pod(
        render(make_spec(L8, 8192, ["H100"], model={"cache": {"type": "pvc", "claimName": "weights"}}))
    )
    assert {"name": "models", "persistentVolumeClaim": {"claimName": "weights"}} in pvc["volumes"]
    host = engine_pod(
        render(make_spec(L8, 8192, ["H100"], model={"cache": {"type": "host-path", "hostPath": "/mnt/nvme"}}))
    )
    assert any(v.get("hostPath", {}).get("path") == "/mnt/nvme" for v in host["volumes"])
    img_spec = make_spec(
        L8, 8192, ["H100"], model={"cache": {"type": "image", "image": "registry.example/llama-8b:1"}}
    )
    img = engine_pod(render(img_spec))
    assert any(v.get("image", {}).get("reference") == "registry.example/llama-8b:1" for v in img["volumes"])
    (c,) = img["containers"]
    assert c["args"][0] == "/models/weights" and c["args"][c["args"].index("--served-model-name") + 1] == L8


def test_hf_token_is_required_when_a_secret_is_named() -> None:
    pod = engine_pod(render(make_spec(L8, 8192, ["H100"], serving={"hfTokenSecret": "hf"})))
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": "hf",
        "key": "HF_TOKEN",
        "optional": False,
    }


def test_router_has_two_replicas_a_budget_and_stays_off_gpu_nodes() -> None:
    objs = render(make_spec(L8, 8192, ["H100"]))
    router = next(o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"] == "llm-router")
    assert router["spec"]["replicas"] == 2
    pdb = next(
        o for o in objs if o["kind"] == "PodDisruptionBudget" and o["metadata"]["name"] == "llm-router"
    )
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == router["spec"]["selector"]["matchLabels"]
    aff = router["spec"]["template"]["spec"]["affinity"]
    anti = aff["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]
    assert anti["topologyKey"] == "kubernetes.io/hostname"
    pref = aff["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]["preference"]
    absent = {e["key"] for e in pref["matchExpressions"] if e["operator"] == "DoesNotExist"}
    assert {"nvidia.com/gpu.product", "cloud.google.com/gke-accelerator"} <= absent
    strict = OperatorConfig(router_node_placement="require-cpu")
    router = next(
        o
        for o in render(make_spec(L8, 8192, ["H100"]), strict)
        if o["metadata"]["name"] == "llm-router" and o["kind"] == "Deployment"
    )
    assert (
        "requiredDuringSchedulingIgnoredDuringExecution"
        in router["spec"]["template"]["spec"]["affinity"]["nodeAffinity"]
    )


def test_gb200_replica_spans_two_trays_of_one_nvlink_domain() -> None:
    objs = render(make_spec(L405, 131072, ["GB200"], placement={"gpusPerNode": 4}))
    lws = next(o for o in objs if o["kind"] == "LeaderWorkerSet")
    tmpl = lws["spec"]["leaderWorkerTemplate"]
    assert tmpl["size"] == 2
    args = tmpl["leaderTemplate"]["spec"]["containers"][0]["args"]
    assert args[args.index("--tensor-parallel-size") + 1] == "8"
    assert args[args.index("--pipeline-parallel-size") + 1] == "1"
    term = tmpl["workerTemplate"]["spec"]["affinity"]["podAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ][0]
    assert term["topologyKey"] == "nvidia.com/gpu.clique"
