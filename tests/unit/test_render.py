"""Rendered objects: GPU requests, affinity, vLLM args, LWS for multi-node, mock engine, validity."""

from __future__ import annotations

import json
from typing import Any

import kubernetes_validate
import pytest

from tests.vllm_cli import serve_argvs_in_script
from toposerve.api.errors import SpecError
from toposerve.planner.plan import plan_deployment
from toposerve.render.objects import Owner, render_deployment, workload_name

from .conftest import make_spec

L70 = "meta-llama/Llama-3.1-70B-Instruct"
L405 = "meta-llama/Llama-3.1-405B-Instruct"


def render(spec: Any, name: str = "llm", owner: Owner | None = None) -> list[dict[str, Any]]:
    return render_deployment(name, "ns1", spec, plan_deployment(name, spec), owner=owner)


def by_kind(objs: list[dict[str, Any]], kind: str, component: str = "engine") -> list[dict[str, Any]]:
    return [
        o
        for o in objs
        if o["kind"] == kind
        and o["metadata"]["labels"].get("app.kubernetes.io/component", "engine") == component
    ]


def match_expressions(pod: dict[str, Any]) -> dict[str, dict[str, Any]]:
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]
    return {e["key"]: e for e in terms[0]["matchExpressions"]}


def test_single_node_pool_is_a_deployment_with_gpu_requests_and_affinity() -> None:
    objs = render(make_spec(L70, 131072, ["H100", "A100-80GB"], replicas=3))
    (dep,) = by_kind(objs, "Deployment")
    assert dep["metadata"]["name"] == "llm-default-h100" and dep["metadata"]["namespace"] == "ns1"
    assert dep["spec"]["replicas"] == 3
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "4"
    exprs = match_expressions(pod)
    assert exprs["nvidia.com/gpu.product"]["values"] == ["NVIDIA-H100-80GB-HBM3"]
    assert exprs["nvidia.com/gpu.count"] == {"key": "nvidia.com/gpu.count", "operator": "Gt", "values": ["3"]}
    assert exprs["toposerve.io/capacity-type"]["operator"] == "NotIn"
    args = c["args"]
    assert args[args.index("--tensor-parallel-size") + 1] == "4"
    assert args[args.index("--max-model-len") + 1] == "131072"
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"
    assert any(v["emptyDir"].get("medium") == "Memory" for v in pod["volumes"])
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert labels["toposerve.io/gpu-type"] == "H100" and labels["toposerve.io/pool"] == "default"
    assert labels["app.kubernetes.io/component"] == "engine"


def test_spot_pool_tolerates_spot_and_drops_the_on_demand_constraint() -> None:
    objs = render(make_spec(L70, 8192, ["H100"], placement={"spot": {"enabled": True}}))
    pod = by_kind(objs, "Deployment")[0]["spec"]["template"]["spec"]
    assert "toposerve.io/capacity-type" not in match_expressions(pod)
    assert {
        "key": "toposerve.io/capacity-type",
        "operator": "Equal",
        "value": "spot",
        "effect": "NoSchedule",
    } in pod["tolerations"]


def test_multi_node_pool_is_a_leaderworkerset_in_one_nvlink_domain() -> None:
    objs = render(make_spec(L405, 131072, ["H100"], placement={"topologyKey": "nvidia.com/gpu.clique"}))
    assert not by_kind(objs, "Deployment")
    (lws,) = by_kind(objs, "LeaderWorkerSet")
    assert lws["apiVersion"] == "leaderworkerset.x-k8s.io/v1"
    tmpl = lws["spec"]["leaderWorkerTemplate"]
    # One group's pods share one clique (pod affinity on LWS's group key), several groups may share it.
    for role in ("leaderTemplate", "workerTemplate"):
        (term,) = tmpl[role]["spec"]["affinity"]["podAffinity"][
            "requiredDuringSchedulingIgnoredDuringExecution"
        ]
        assert term["topologyKey"] == "nvidia.com/gpu.clique"
        assert term["matchLabelKeys"] == ["leaderworkerset.sigs.k8s.io/group-key"]
        # The API server rejects a key that is both in matchLabelKeys and in the selector.
        assert "leaderworkerset.sigs.k8s.io/group-key" not in json.dumps(term["labelSelector"])
        assert term["labelSelector"]["matchLabels"]["toposerve.io/pool"] == "default"
    assert tmpl["size"] == 2
    leader = tmpl["leaderTemplate"]["spec"]["containers"][0]
    worker = tmpl["workerTemplate"]["spec"]["containers"][0]
    assert (
        leader["resources"]["limits"]["nvidia.com/gpu"]
        == "8"
        == worker["resources"]["limits"]["nvidia.com/gpu"]
    )
    # vLLM's native multi-node launch: same plan everywhere, rank 0 serves, workers are headless.
    assert leader["command"] == ["vllm", "serve"]
    # The worker first resolves the leader's name (render/multinode.py), then execs vllm serve.
    assert worker["command"][:2] == ["/bin/sh", "-c"] and worker["args"] == []
    (wa,) = serve_argvs_in_script(worker["command"][2], {})
    la = leader["args"]
    assert la[la.index("--pipeline-parallel-size") + 1] == "2" == wa[wa.index("--pipeline-parallel-size") + 1]
    assert la[la.index("--nnodes") + 1] == "2" and la[la.index("--node-rank") + 1] == "0"
    assert wa[wa.index("--node-rank") + 1] == "$(LWS_WORKER_INDEX)" and "--headless" in wa
    # Addresses, not names: the leader is the rendezvous at its own pod IP; the worker passes what
    # the leader's name resolved to.
    assert la[la.index("--master-addr") + 1] == "$(POD_IP)"
    assert wa[wa.index("--master-addr") + 1] == ""  # $LEADER_IP, set by the script at run time
    assert "$LEADER_IP" in worker["command"][2]
    assert "--headless" not in la and "--port" in la
    assert "readinessProbe" in leader and "readinessProbe" not in worker
    # The budget covers workers too: a group is down when any of its pods is.
    (pdb,) = [
        o
        for o in objs
        if o["kind"] == "PodDisruptionBudget" and o["metadata"]["name"] == lws["metadata"]["name"]
    ]
    assert "app.kubernetes.io/component" not in pdb["spec"]["selector"]["matchLabels"]
    # Counted in groups: one eviction (one pod, so one group) at a time.
    assert pdb["spec"]["minAvailable"] == lws["spec"]["replicas"] * 2 - 1


@pytest.mark.parametrize("engine", ["vllm", "mock"])
def test_kv_events_are_published_by_engines_and_read_by_routers_only_when_asked(engine: str) -> None:
    on = render(make_spec(L70, 8192, ["H100"], engine=engine, routing={"kvEvents": True}))
    off = render(make_spec(L70, 8192, ["H100"], engine=engine))
    for objs, wanted in ((on, True), (off, False)):
        (dep,) = by_kind(objs, "Deployment")
        (router,) = by_kind(objs, "Deployment", "router")
        c = dep["spec"]["template"]["spec"]["containers"][0]
        args = c["args"]
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ("--kv-events-config" in args) is wanted and ("kv-events" in ports) is wanted
        assert ("--kv-events" in router["spec"]["template"]["spec"]["containers"][0]["args"]) is wanted
        if wanted:
            config = json.loads(args[args.index("--kv-events-config") + 1])
            # vLLM's default PUB port, and the ports the router connects to by default (router/cli.py)
            assert config == {"enable_kv_cache_events": True, "publisher": "zmq",
                              "endpoint": "tcp://*:5557", "replay_endpoint": "tcp://*:5558"}  # fmt: skip
            assert (ports["kv-events"], ports["kv-replay"]) == (5557, 5558)


def test_mock_engine_renders_the_same_objects_without_gpus() -> None:
    objs = render(make_spec(L70, 8192, ["H100"], engine="mock"))
    dep = by_kind(objs, "Deployment")[0]
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["image"].startswith("ghcr.io/toposerve/toposerve:")
    assert c["command"] == ["toposerve", "mock-engine"]
    assert (
        "nvidia.com/gpu" not in c["resources"]["requests"]
        and "nvidia.com/gpu" not in c["resources"]["limits"]
    )
    assert c["args"][c["args"].index("--gpu-type") + 1] == "H100"
    assert c["args"][c["args"].index("--host") + 1] == "0.0.0.0"  # port-forward reaches loopback
    plan = plan_deployment("llm", make_spec(L70, 8192, ["H100"], engine="mock")).pools[0]
    assert c["args"][c["args"].index("--num-gpu-blocks") + 1] == str(plan.kv_cache_tokens_per_replica // 16)
    # No GPU constraint is required of a mock pod, only the on-demand rule (NotIn matches label-less kind nodes).
    exprs = match_expressions(pod)
    assert all(e["operator"] == "NotIn" for e in exprs.values())
    assert exprs["toposerve.io/capacity-type"]["values"] == ["spot"]
    assert exprs["cloud.google.com/gke-spot"]["values"] == ["true"]
    assert dep["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scrape"] == "true"


def test_mock_engine_holds_the_plans_gpus_when_configured() -> None:
    from toposerve.api.config import OperatorConfig

    spec = make_spec(L70, 8192, ["H100"], engine="mock")
    config = OperatorConfig.model_validate({"mockHoldsGPUs": True})
    plan = plan_deployment("llm", spec, config)
    objs = render_deployment("llm", "ns1", spec, plan, config)
    pod = by_kind(objs, "Deployment")[0]["spec"]["template"]["spec"]
    c = pod["containers"][0]
    gpus = str(plan.pools[0].gpus_per_pod)
    assert c["command"] == ["toposerve", "mock-engine"]
    assert c["resources"]["requests"]["nvidia.com/gpu"] == c["resources"]["limits"]["nvidia.com/gpu"] == gpus
    # required on the plan's GPU type, like vLLM (not merely preferred, as without GPUs)
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]
    assert any(e["operator"] == "In" for t in terms for e in t["matchExpressions"])
    assert "preferredDuringSchedulingIgnoredDuringExecution" not in pod["affinity"]["nodeAffinity"]


def test_heterogeneous_pools_render_one_workload_each_and_one_service() -> None:
    spec = make_spec(
        L70, 32768, replicas=3,
        pools=[{"name": "h100", "gpuTypes": ["H100"], "weight": 2},
               {"name": "a100", "gpuTypes": ["A100-40GB"], "dtype": "int4", "weight": 1,
                "checkpoint": "hugging-quants/Meta-Llama-3.1-70B-Instruct-AWQ-INT4"}],
    )  # fmt: skip
    objs = render(spec)
    deps = {d["metadata"]["name"]: d for d in by_kind(objs, "Deployment")}
    assert set(deps) == {"llm-h100-h100", "llm-a100-a100-40gb"}
    assert (
        deps["llm-h100-h100"]["spec"]["replicas"] == 2 and deps["llm-a100-a100-40gb"]["spec"]["replicas"] == 1
    )
    svcs = {s["metadata"]["name"]: s for s in by_kind(objs, "Service")}
    assert set(svcs) == {"llm-engine", "llm-h100-h100-http", "llm-a100-a100-40gb-http"}
    assert svcs["llm-engine"]["spec"]["selector"] == {
        "toposerve.io/deployment": "llm",
        "app.kubernetes.io/component": "engine",
    }
    # Per-pool Services carry the pool and GPU type on their EndpointSlices for the router.
    a100 = svcs["llm-a100-a100-40gb-http"]["metadata"]["labels"]
    assert a100["toposerve.io/pool"] == "a100" and a100["toposerve.io/gpu-type"] == "A100-40GB"
    assert svcs["llm-a100-a100-40gb-http"]["spec"]["selector"]["toposerve.io/gpu-type"] == "A100-40GB"
    # one budget per pool, and one for the pods the operator moves (render_evacuation_budget)
    assert sorted(p["metadata"]["name"] for p in by_kind(objs, "PodDisruptionBudget")) == [
        "llm-a100-a100-40gb",
        "llm-evacuating",
        "llm-h100-h100",
    ]


def test_router_is_rendered_with_discovery_rbac_and_routing_knobs() -> None:
    spec = make_spec(
        L70, 8192, ["H100"], routing={"strategy": "prefix-aware", "replicas": 2, "gpuWeighting": False}
    )
    objs = render(spec)
    (dep,) = by_kind(objs, "Deployment", "router")
    assert dep["metadata"]["name"] == "llm-router" and dep["spec"]["replicas"] == 2
    pod = dep["spec"]["template"]["spec"]
    args = pod["containers"][0]["args"]
    assert pod["containers"][0]["command"] == ["toposerve", "router"]
    assert (
        args[args.index("--llmdeployment") + 1] == "llm"
        and args[args.index("--strategy") + 1] == "prefix-aware"
    )
    assert "--no-gpu-weighting" in args and pod["serviceAccountName"] == "llm-router"
    (role,) = by_kind(objs, "Role", "router")
    assert role["rules"][0]["resources"] == ["endpointslices"] and "watch" in role["rules"][0]["verbs"]
    (svc,) = by_kind(objs, "Service", "router")
    assert svc["metadata"]["name"] == "llm" and svc["spec"]["ports"][0]["port"] == 8000
    assert svc["spec"]["selector"]["app.kubernetes.io/component"] == "router"
    assert not by_kind(
        render(make_spec(L70, 8192, ["H100"], routing={"enabled": False})), "Deployment", "router"
    )


def test_owner_references_on_every_child() -> None:
    objs = render(make_spec(L70, 8192, ["H100"]), owner=Owner(name="llm", uid="1234"))
    for o in objs:
        (ref,) = o["metadata"]["ownerReferences"]
        assert ref["uid"] == "1234" and ref["kind"] == "LLMDeployment" and ref["controller"] is True


def test_names_too_long_for_children_are_rejected() -> None:
    with pytest.raises(SpecError) as e:
        render(make_spec(L70, 8192, ["H100"]), name="x" * 43)
    assert e.value.field == "metadata.name"


def test_workload_names_stay_short_and_unique() -> None:
    a, b = (
        workload_name("x" * 42, "p" * 20, "A100-80GB"),
        workload_name("x" * 42, "p" * 19 + "q", "A100-80GB"),
    )
    assert len(a) <= 52 and len(b) <= 52 and a != b
    assert workload_name("llm", "default", "A100-80GB") == "llm-default-a100-80gb"


def test_rendering_is_deterministic() -> None:
    spec = make_spec(L70, 8192, ["H100"])
    assert render(spec) == render(spec)


@pytest.mark.parametrize("engine", ["vllm", "mock"])
def test_rendered_core_objects_validate_against_the_kubernetes_schema(engine: str) -> None:
    spec = make_spec(
        L70, 32768, engine=engine,
        pools=[{"name": "h100", "gpuTypes": ["H100"]}, {"name": "a100", "gpuTypes": ["A100-40GB"], "dtype": "int4", "checkpoint": "org/awq"}],
        placement={"tolerations": [{"key": "team", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}]},
    )  # fmt: skip
    for obj in render(spec, owner=Owner(name="llm", uid="u")):
        kubernetes_validate.validate(obj, "1.32", strict=True)
