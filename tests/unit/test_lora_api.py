"""LoRA adapters, model aliases and routing.mode: the API (messages naming fields, CEL rules in the
CRD), the rendered engine flags, router arguments and engine Service annotations (docs/lora.md)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from toposerve.api.config import OperatorConfig
from toposerve.api.crd import crd
from toposerve.api.errors import spec_error
from toposerve.api.spec import ROUTING_RULES, SPEC_RULES, LLMDeploymentSpec, RoutingSpec
from toposerve.planner.plan import plan_deployment
from toposerve.render.monitoring import render_monitors
from toposerve.render.objects import endpoint_url, render_deployment, router_args

QWEN = "Qwen/Qwen2.5-0.5B-Instruct"
L8 = "meta-llama/Llama-3.1-8B-Instruct"
L405 = "meta-llama/Llama-3.1-405B-Instruct"
LORA = {"maxLoras": 4, "maxLoraRank": 64, "maxCpuLoras": 12}
ADAPTERS = [
    {"name": "support", "source": "hf://org/support-lora"},
    {"name": "sql", "source": "org/sql-lora", "revision": "v2"},
    {"name": "legal", "source": "cache://adapters/legal"},
    {"name": "fin", "source": "/models/adapters/fin"},
    {"name": "ops", "source": "s3://bucket/ops-lora"},
]


def spec(model: str = QWEN, **fields: Any) -> LLMDeploymentSpec:
    raw: dict[str, Any] = {"model": {"name": model, **fields.pop("model_fields", {})}, **fields}
    return LLMDeploymentSpec.model_validate(raw)


def error(model: str = QWEN, **fields: Any) -> str:
    with pytest.raises(ValidationError) as e:
        spec(model, **fields)
    return str(spec_error(e.value))


def render(s: LLMDeploymentSpec, name: str = "llm") -> list[dict[str, Any]]:
    return render_deployment(name, "ns1", s, plan_deployment(name, s))


def containers(objs: list[dict[str, Any]], component: str = "engine") -> list[dict[str, Any]]:
    """The containers of the engine (or router) pod templates."""
    out = []
    for o in objs:
        if o["kind"] == "Deployment":
            labels = o["spec"]["template"]["metadata"]["labels"]
            if labels.get("app.kubernetes.io/component") == component:
                out += o["spec"]["template"]["spec"]["containers"]
        elif o["kind"] == "LeaderWorkerSet" and component == "engine":
            t = o["spec"]["leaderWorkerTemplate"]
            out += t["leaderTemplate"]["spec"]["containers"] + t["workerTemplate"]["spec"]["containers"]
    return out


def value(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


# --- API --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "where", "text"),
    [
        ({"adapters": ADAPTERS[:1]}, "spec.adapters", "adapters need spec.lora"),
        ({"lora": {"maxLoras": 4, "maxCpuLoras": 2}}, "spec.lora.maxCpuLoras", "maxCpuLoras must be >= maxLoras"),
        ({"lora": {"maxLoraRank": 24}}, "spec.lora.maxLoraRank", "1, 8, 16, 32, 64, 128, 256, 320 or 512"),
        ({"lora": {"maxLoras": 0}}, "spec.lora.maxLoras", "greater than or equal to 1"),
        ({"model_fields": {"aliases": [QWEN]}}, "spec.model.aliases", "must not repeat the served name"),
        ({"model_fields": {"servedName": "q", "aliases": ["q"]}}, "spec.model.aliases", "must not repeat"),
        ({"model_fields": {"aliases": ["a b"]}}, "spec.model.aliases[0]", "pattern"),
        ({"lora": {}, "adapters": [{"name": QWEN, "source": "o/r"}]}, "spec.adapters", "must differ from"),
        ({"model_fields": {"aliases": ["q"]}, "lora": {}, "adapters": [{"name": "q", "source": "o/r"}]},
         "spec.adapters", "must differ from"),
        ({"lora": {}, "adapters": [{"name": "a", "source": "o/r"}, {"name": "a", "source": "o/s"}]},
         "spec.adapters", "adapter names must be unique"),
        ({"lora": {}, "adapters": [{"name": "a=b", "source": "o/r"}]}, "spec.adapters[0].name", "pattern"),
        ({"lora": {}, "adapters": [{"name": "a", "source": "/etc/lora"}]}, "spec.adapters[0].source",
         "cache://relative/path or /models/path"),
        ({"lora": {}, "adapters": [{"name": "a", "source": "ftp://x/y"}]}, "spec.adapters[0].source",
         "hf://org/repo or org/repo"),
        ({"lora": {}, "adapters": [{"name": "a", "source": "cache://a/../../etc"}]}, "spec.adapters[0].source",
         "must not contain '..'"),
        ({"lora": {}, "adapters": [{"name": "a", "source": "s3://b/k", "revision": "main"}]},
         "spec.adapters[0].revision", "revision is for Hugging Face sources"),
        ({"lora": {}, "adapters": [{"name": "a", "source": "o/r"}] * 1001}, "spec.adapters", "at most 1000"),
        ({"routing": {"mode": "none", "enabled": True}}, "spec.routing.mode", "mode none contradicts enabled: true"),
        ({"routing": {"mode": "gateway", "enabled": False}}, "spec.routing.mode",
         "contradicts enabled: false"),
        ({"routing": {"mode": "dedicated", "enabled": False}}, "spec.routing.mode",
         "contradicts enabled: false"),
        ({"routing": {"mode": "shared"}}, "spec.routing.mode", "'dedicated', 'gateway' or 'none'"),
    ],
)  # fmt: skip
def test_bad_values_are_one_message_naming_the_field(fields: dict[str, Any], where: str, text: str) -> None:
    message = error(**fields)
    assert message.startswith(f"{where}: "), message
    assert text in message, message


def test_lora_defaults_are_vllms() -> None:
    """vLLM 0.33.0 LoRAConfig: max_loras 1, max_lora_rank 16, max_cpu_loras = max_loras."""
    s = spec(lora={})
    assert s.lora is not None
    assert (s.lora.max_loras, s.lora.max_lora_rank, s.lora.effective_max_cpu_loras) == (1, 16, 1)
    assert spec().lora is None and spec().adapters == []


def test_adapter_sources_resolve_for_the_engine() -> None:
    s = spec(lora=LORA, adapters=ADAPTERS)
    assert [(a.source_kind, a.engine_source) for a in s.adapters] == [
        ("hf", "org/support-lora"),
        ("hf", "hf://org/sql-lora@v2"),  # vLLM cannot pin a revision: kept as a URI for the loader
        ("cache", "/models/adapters/legal"),
        ("cache", "/models/adapters/fin"),
        ("url", "s3://bucket/ops-lora"),
    ]
    assert s.openai_model_names == [QWEN, "support", "sql", "legal", "fin", "ops"]


@pytest.mark.parametrize(
    ("routing", "mode"),
    [
        ({}, "dedicated"),
        ({"enabled": True}, "dedicated"),
        ({"enabled": False}, "none"),
        ({"mode": "gateway"}, "gateway"),
        ({"mode": "gateway", "enabled": True}, "gateway"),  # enabled: true (the old default) allows it
        ({"mode": "none"}, "none"),
        ({"mode": "none", "enabled": False}, "none"),
        ({"mode": "dedicated", "enabled": True}, "dedicated"),
    ],
)
def test_routing_mode_and_the_older_enabled_switch(routing: dict[str, Any], mode: str) -> None:
    r = RoutingSpec.model_validate(routing)
    assert r.effective_mode == mode
    assert r.dedicated_router is (mode == "dedicated") and r.enabled is r.dedicated_router
    # what was written is what is written back (enabled is not defaulted any more)
    assert r.model_dump(by_alias=True, exclude_defaults=True) == routing


def _spec_schema() -> dict[str, Any]:
    schema: dict[str, Any] = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema["properties"]["spec"]


def test_the_crd_carries_the_rules_and_bounds() -> None:
    spec_schema = _spec_schema()
    props = spec_schema["properties"]
    rules = {(r["message"], r["fieldPath"]) for r in spec_schema["x-kubernetes-validations"]}
    assert {(r.message, f".{r.field}") for r in SPEC_RULES} <= rules
    routing = props["routing"]
    assert {(r["message"], r["fieldPath"]) for r in routing["x-kubernetes-validations"]} == {
        (r.message, f".{r.field}") for r in ROUTING_RULES
    }
    assert routing["properties"]["mode"]["enum"] == ["dedicated", "gateway", "none"]
    assert "default" not in routing["properties"]["enabled"]  # else mode none would contradict it
    lora = props["lora"]
    assert "default" not in lora  # present means on
    assert lora["properties"]["maxLoraRank"]["enum"] == [1, 8, 16, 32, 64, 128, 256, 320, 512]
    assert lora["properties"]["maxLoras"]["default"] == 1
    assert lora["x-kubernetes-validations"][0]["fieldPath"] == ".maxCpuLoras"
    adapters = props["adapters"]
    assert adapters["maxItems"] == 1000 and adapters["x-kubernetes-list-map-keys"] == ["name"]
    item = adapters["items"]["properties"]
    assert item["source"]["pattern"] and item["source"]["maxLength"] == 512
    assert item["name"]["maxLength"] == 128
    assert props["model"]["properties"]["aliases"]["x-kubernetes-list-type"] == "set"


# --- rendering --------------------------------------------------------------------------------------


def test_vllm_gets_the_lora_flags_the_env_and_the_aliases_after_the_served_name() -> None:
    s = spec(L8, engine="vllm", model_fields={"servedName": "llama", "aliases": ["llama-8b", "default"]},
             lora=LORA, adapters=ADAPTERS[:2])  # fmt: skip
    (c,) = containers(render(s))
    args = c["args"]
    i = args.index("--served-model-name")
    assert args[i + 1 : i + 4] == ["llama", "llama-8b", "default"]  # the first labels the metrics
    assert args[i + 4].startswith("--")
    assert "--enable-lora" in args
    assert (value(args, "--max-loras"), value(args, "--max-lora-rank"), value(args, "--max-cpu-loras")) == (
        "4",
        "64",
        "12",
    )
    assert {"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "True"} in c["env"]
    assert "--lora-modules" not in args  # runtime loading by the router, not a static list


def test_without_lora_nothing_changes_on_the_engine() -> None:
    (c,) = containers(render(spec(L8, engine="vllm")))
    assert not any("lora" in a for a in c["args"])
    assert args_count(c["args"], "--served-model-name") == 1
    assert all(e["name"] != "VLLM_ALLOW_RUNTIME_LORA_UPDATING" for e in c["env"])


def args_count(args: list[str], flag: str) -> int:
    return sum(a == flag for a in args)


def test_multinode_leader_and_workers_all_get_the_lora_flags() -> None:
    s = spec(L405, engine="vllm", lora={"maxLoras": 2}, parallelism={"tensor": 8, "pipeline": 2},
             placement={"gpuTypes": ["H100"], "topologyKey": "nvidia.com/gpu.clique"})  # fmt: skip
    cs = containers(render(s))
    assert len(cs) == 2
    for c in cs:  # the leader runs vllm serve, a worker a script that execs it (--headless)
        assert "--enable-lora --max-loras 2 --max-lora-rank 16 --max-cpu-loras 2" in " ".join(
            [*c["command"], *c.get("args", [])]
        ), c
        assert {"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "True"} in c["env"]


def test_the_mock_engine_gets_the_same_flags_and_names() -> None:
    s = spec(engine="mock", model_fields={"aliases": ["qwen"]}, lora=LORA, adapters=ADAPTERS[:1])
    (c,) = containers(render(s))
    args = c["args"]
    assert c["command"] == ["toposerve", "mock-engine"]
    i = args.index("--served-model-name")
    assert args[i + 1 : i + 3] == [QWEN, "qwen"]
    tail = args[args.index("--enable-lora") :]
    assert tail == ["--enable-lora", "--max-loras", "4", "--max-lora-rank", "64", "--max-cpu-loras", "12"]
    assert {"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "True"} in c["env"]
    # the mock's own parser takes them (--served-model-name today; the LoRA flags as vLLM names them)
    assert "--served-model-name" in args and args.count(QWEN) == 2


def test_the_mock_with_lora_mounts_the_model_cache_where_cache_adapters_resolve() -> None:
    """cache:// adapters are /models/... in the engine pod: the mock reads them there as vLLM does,
    and its own parser accepts every rendered argument."""
    from toposerve.mockengine.cli import add_arguments

    cache = {"type": "host-path", "hostPath": "/var/lib/models"}
    s = spec(engine="mock", model_fields={"cache": cache}, lora=LORA,
             adapters=[{"name": "sql", "source": "cache://adapters/sql"}])  # fmt: skip
    objs = render(s)
    (c,) = containers(objs)
    (pod,) = [o["spec"]["template"]["spec"] for o in objs if o["kind"] == "Deployment"
              and o["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component") == "engine"]  # fmt: skip
    assert {"name": "models", "mountPath": "/models"} in c["volumeMounts"]
    assert {"name": "models", "hostPath": {"path": "/var/lib/models", "type": "DirectoryOrCreate"}} in pod[
        "volumes"
    ]
    router = containers(objs, "router")[0]["args"]
    assert "sql=/models/adapters/sql" in router
    import argparse

    p = argparse.ArgumentParser()
    add_arguments(p)
    parsed = p.parse_args(c["args"])
    assert parsed.enable_lora and parsed.max_loras == 4
    no_lora = containers(render(spec(engine="mock", model_fields={"cache": cache})))[0]
    assert all(m["mountPath"] != "/models" for m in no_lora.get("volumeMounts") or [])


def test_the_router_gets_the_adapter_table() -> None:
    s = spec(lora=LORA, adapters=ADAPTERS)
    args = router_args("llm", s)
    pairs = [args[i + 1] for i, a in enumerate(args) if a == "--adapter"]
    assert pairs == [
        "support=org/support-lora",
        "sql=hf://org/sql-lora@v2",
        "legal=/models/adapters/legal",
        "fin=/models/adapters/fin",
        "ops=s3://bucket/ops-lora",
    ]
    assert value(args, "--adapter-slots") == "12"  # the engines' --max-cpu-loras
    (router,) = containers(render(s), "router")
    assert router["args"] == args
    assert not {"--adapter", "--adapter-slots"} & set(router_args("llm", spec()))


def test_engine_services_carry_the_model_names_and_the_routing_mode() -> None:
    s = spec(engine="mock", model_fields={"aliases": ["qwen"]}, lora={}, adapters=ADAPTERS[:2])
    services = [o for o in render(s) if o["kind"] == "Service" and o["metadata"]["name"] != "llm"]
    names = sorted(o["metadata"]["name"] for o in services)
    assert len(names) == 2 and names[0].startswith("llm-default-") and names[1] == "llm-engine", names
    for svc in services:
        ann = svc["metadata"]["annotations"]
        assert json.loads(ann["toposerve.io/models"]) == {
            "servedName": QWEN,
            "aliases": ["qwen"],
            "adapters": ["support", "sql"],
        }
        assert ann["toposerve.io/routing-mode"] == "dedicated"
        assert svc["metadata"]["labels"]["app.kubernetes.io/component"] == "engine"


@pytest.mark.parametrize("routing", [{"mode": "gateway"}, {"mode": "none"}, {"enabled": False}])
def test_gateway_and_none_render_no_router(routing: dict[str, Any]) -> None:
    s = spec(engine="mock", routing=routing, lora={}, adapters=ADAPTERS[:1])
    objs = render(s)
    assert not [o for o in objs if o["metadata"]["labels"].get("app.kubernetes.io/component") == "router"]
    assert "llm" not in {o["metadata"]["name"] for o in objs if o["kind"] == "Service"}
    (svc,) = [o for o in objs if o["metadata"]["name"] == "llm-engine"]
    assert svc["metadata"]["labels"]["toposerve.io/deployment"] == "llm"  # discovery by label
    assert svc["metadata"]["annotations"]["toposerve.io/routing-mode"] == s.routing.effective_mode
    assert endpoint_url("llm", "ns1", s) == "http://llm-engine.ns1.svc:8000/v1"
    monitors = render_monitors("llm", "ns1", s, OperatorConfig(prometheus_operator="on"))
    assert [m["metadata"]["name"] for m in monitors] == ["llm-engine"]


def test_dedicated_mode_is_todays_router() -> None:
    for routing in ({}, {"mode": "dedicated"}, {"enabled": True}):
        s = spec(engine="mock", routing=routing)
        objs = render(s)
        assert any(o["kind"] == "Deployment" and o["metadata"]["name"] == "llm-router" for o in objs)
        assert endpoint_url("llm", "ns1", s) == "http://llm.ns1.svc:8000/v1"


def _pods(objs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for o in objs:
        if (
            o["kind"] == "Deployment"
            and o["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component") == "engine"
        ):
            out.append(("pod", o["spec"]["template"]["spec"]))
        elif o["kind"] == "LeaderWorkerSet":
            t = o["spec"]["leaderWorkerTemplate"]
            out += [("leader", t["leaderTemplate"]["spec"]), ("worker", t["workerTemplate"]["spec"])]
    return out


@pytest.mark.parametrize("engine", ["vllm", "mock"])
def test_engine_pods_with_lora_run_the_adapter_stager_as_a_native_sidecar(engine: str) -> None:
    """docs/lora.md "Staging": a restartPolicy Always init container of the project's image on the
    stage port, sharing the model cache, with HF_TOKEN from serving.hfTokenSecret."""
    from toposerve.adapterstage.cli import add_arguments as stage_arguments
    from toposerve.adapterstage.sources import STAGE_PORT, STAGE_ROOT

    s = spec(engine=engine, lora=LORA, adapters=ADAPTERS, serving={"hfTokenSecret": "hf"})
    ((_, pod),) = _pods(render(s))
    (side,) = pod["initContainers"]
    assert side["restartPolicy"] == "Always" and side["command"] == ["toposerve", "adapter-stage"]
    assert side["image"].startswith("ghcr.io/toposerve/toposerve")
    assert side["ports"] == [{"name": "adapter-stage", "containerPort": STAGE_PORT, "protocol": "TCP"}]
    assert side["volumeMounts"] == [{"name": "models", "mountPath": "/models"}]
    assert any(v["name"] == "models" for v in pod["volumes"])
    assert {
        "name": "HF_TOKEN",
        "valueFrom": {"secretKeyRef": {"name": "hf", "key": "HF_TOKEN", "optional": False}},
    } in side["env"]
    assert side["startupProbe"]["httpGet"] == {"path": "/health", "port": "adapter-stage"}
    assert "envFrom" not in side
    s2 = spec(engine=engine, lora={**LORA, "stagingSecret": "adapter-creds"}, adapters=ADAPTERS)
    ((_, pod2),) = _pods(render(s2))
    assert pod2["initContainers"][0]["envFrom"] == [
        {"secretRef": {"name": "adapter-creds", "optional": False}}
    ]
    if engine == "mock":  # restricted, as the mock engine
        assert side["securityContext"]["readOnlyRootFilesystem"] is True
        assert "runAsUser" not in side["securityContext"]
    import argparse

    p = argparse.ArgumentParser()
    stage_arguments(p)
    a = p.parse_args(side["args"])  # the stager's own parser takes what is rendered
    assert (a.port, a.root) == (STAGE_PORT, STAGE_ROOT)


def test_no_stager_without_lora_and_none_on_multinode_workers() -> None:
    ((_, pod),) = _pods(render(spec(engine="vllm")))
    assert "initContainers" not in pod
    s = spec(L405, engine="vllm", lora={"maxLoras": 2}, parallelism={"tensor": 8, "pipeline": 2},
             placement={"gpuTypes": ["H100"], "topologyKey": "nvidia.com/gpu.clique"})  # fmt: skip
    pods = dict(_pods(render(s)))
    assert [c["name"] for c in pods["leader"]["initContainers"]] == ["adapter-stage"]
    assert "initContainers" not in pods["worker"]
