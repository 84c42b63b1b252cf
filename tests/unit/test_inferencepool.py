"""InferencePools (render/inferencepool.py) judged by the Gateway API Inference Extension's own CRD
(v1.6.2, vendored under tests/unit/schemas by hack/vendor_gie_schemas.py): its openAPIV3Schema
(strictly: an unknown field is an error here) and its CEL rules (evaluated by cel-python), for
every example with the pool enabled in modes dedicated and gateway; the pool selects exactly the
pods that serve HTTP; the router serves the picker's ports only when it is the picker; bad input is
refused naming the field, by the spec's validator and by our CRD's CEL rule alike."""

from __future__ import annotations

import copy
import io
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from tests.unit.autoscale.test_render_autoscaler import errors, strict
from tests.unit.test_monitoring import pod_templates, ports, selects
from toposerve.api.config import OperatorConfig
from toposerve.api.crd import crd
from toposerve.api.errors import spec_error
from toposerve.api.spec import INFERENCE_POOL_NEEDS_PICKER, LLMDeploymentSpec, RoutingSpec
from toposerve.cli import main
from toposerve.planner.plan import plan_deployment
from toposerve.render.inferencepool import (
    CRD_URL,
    INFERENCE_POOL,
    REASON_CRD_MISSING,
    REASON_NO_PICKER,
    render_inference_pool,
)
from toposerve.render.objects import EPP_HEALTH_PORT, EPP_PORT, Owner, render_deployment

from .conftest import EXAMPLES

SCHEMAS = Path(__file__).resolve().parent / "schemas"
GIE_CRD = SCHEMAS / "gie-v1.6.2-inferencepools.yaml"
NS = "team-a"
OWNER = Owner(name="llm", uid="0000-1111")
# Mock engines by default (no GPU fleet to detect offline); vLLM ones too, for multi-node replicas.
MOCK = OperatorConfig(auto_engine="mock", gateway_namespace=NS)
VLLM = OperatorConfig(auto_engine="vllm", gateway_namespace=NS)
_CEL = celpy.Environment()


def gie_version() -> dict[str, Any]:
    doc = yaml.safe_load(GIE_CRD.read_text())
    assert doc["spec"]["group"] == "inference.networking.k8s.io"
    (v,) = [v for v in doc["spec"]["versions"] if v["name"] == "v1"]
    return dict(v["schema"]["openAPIV3Schema"])


def cel_rules(schema: dict[str, Any], obj: Any, path: str = "") -> list[str]:
    """Every x-kubernetes-validations rule of ``schema`` that ``obj`` breaks, as the API server
    evaluates them: at each node present in the object, with ``self`` bound to that node."""
    out: list[str] = []
    for rule in schema.get("x-kubernetes-validations") or []:
        program = _CEL.program(_CEL.compile(rule["rule"]))
        result = program.evaluate({"self": celpy.json_to_cel(obj)})
        if not (isinstance(result, celpy.celtypes.BoolType) and bool(result)):  # an error counts as False
            out.append(f"{path or '.'}: {rule['message']}")
    if isinstance(obj, dict):
        for key, child in (schema.get("properties") or {}).items():
            if key in obj:
                out += cel_rules(child, obj[key], f"{path}.{key}")
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(obj):
            out += cel_rules(schema["items"], item, f"{path}[{i}]")
    return out


SCHEMA = gie_version()
VALIDATOR = jsonschema.Draft202012Validator(strict(SCHEMA))


def judged(obj: dict[str, Any]) -> list[str]:
    """What the vendored CRD finds wrong with ``obj``: schema errors, then broken CEL rules."""
    return errors(VALIDATOR, obj) + cel_rules(SCHEMA, obj)


def example_raw(path: Path) -> tuple[str, dict[str, Any]]:
    (doc,) = [d for d in yaml.safe_load_all(path.read_text()) if d and d.get("kind") == "LLMDeployment"]
    return doc["metadata"]["name"], doc["spec"]


def with_pool(raw: dict[str, Any], mode: str, **pool: Any) -> LLMDeploymentSpec:
    raw = copy.deepcopy(raw)
    routing = raw.setdefault("routing", {})
    routing["mode"] = mode
    routing["inferencePool"] = {"enabled": True, **pool}
    return LLMDeploymentSpec.model_validate(raw)


def rendered(
    name: str, spec: LLMDeploymentSpec, config: OperatorConfig
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(every child of the deployment, its InferencePools)."""
    objs = render_deployment(name, NS, spec, plan_deployment(name, spec, config), config, OWNER)
    pools, notices = render_inference_pool(name, NS, spec, config, OWNER)
    assert notices == []
    return objs, pools


CASES = [(p, mode) for p in EXAMPLES for mode in ("dedicated", "gateway")]


@pytest.mark.parametrize(("path", "mode"), CASES, ids=[f"{p.stem}-{m}" for p, m in CASES])
def test_every_example_renders_a_pool_the_gie_crd_accepts(path: Path, mode: str) -> None:
    name, raw = example_raw(path)
    for config in (MOCK, VLLM):
        spec = with_pool(raw, mode)
        objs, (pool,) = rendered(name, spec, config)
        assert judged(pool) == [], pool
        assert (pool["apiVersion"], pool["kind"]) == INFERENCE_POOL
        meta = pool["metadata"]
        assert (meta["name"], meta["namespace"]) == (name, NS)
        assert meta["ownerReferences"] == [OWNER.reference()]
        assert meta["labels"]["toposerve.io/deployment"] == name  # the operator's watch and prune
        ref = pool["spec"]["endpointPickerRef"]
        assert ref["port"] == {"number": EPP_PORT} and ref["failureMode"] == "FailClose"
        services = {o["metadata"]["name"]: o for o in objs if o["kind"] == "Service"}
        if mode == "dedicated":
            # the deployment's router Service, whose grpc-epp port is the one named
            picker = services[ref["name"]]
            assert {p["name"]: p["port"] for p in picker["spec"]["ports"]}["grpc-epp"] == EPP_PORT
            assert picker["metadata"]["labels"]["app.kubernetes.io/component"] == "router"
        else:
            assert ref["name"] == config.gateway_service and ref["name"] not in services
        # the same members as the deployment's engine Service
        assert pool["spec"]["selector"]["matchLabels"] == services[f"{name}-engine"]["spec"]["selector"]


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_the_pool_selects_exactly_the_pods_that_serve_http_on_its_target_port(path: Path) -> None:
    name, raw = example_raw(path)
    for config in (MOCK, VLLM):
        objs, (pool,) = rendered(name, with_pool(raw, "dedicated"), config)
        templates = pod_templates(objs)
        members = [t for t in templates if selects(pool["spec"]["selector"], t["metadata"]["labels"])]
        serving = [t for t in templates if t["metadata"]["labels"]["app.kubernetes.io/component"] == "engine"]
        assert members == serving and members
        (target,) = pool["spec"]["targetPorts"]
        for t in members:
            assert ports(t)["http"] == target["number"]


def test_multi_node_workers_are_not_members() -> None:
    """vLLM multi-node: the leader serves HTTP, the workers run --headless and are left out."""
    (path,) = [p for p in EXAMPLES if p.stem == "llama-405b-multinode"]
    name, raw = example_raw(path)
    objs, (pool,) = rendered(name, with_pool(raw, "dedicated"), VLLM)
    (lws,) = [o for o in objs if o["kind"] == "LeaderWorkerSet"]
    t = lws["spec"]["leaderWorkerTemplate"]
    assert selects(pool["spec"]["selector"], t["leaderTemplate"]["metadata"]["labels"])
    assert not selects(pool["spec"]["selector"], t["workerTemplate"]["metadata"]["labels"])
    assert "--headless" in t["workerTemplate"]["spec"]["containers"][0]["command"][-1]
    assert judged(pool) == []


def _router(objs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    (dep,) = [o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"].endswith("-router")]
    (svc,) = [o for o in objs if o["kind"] == "Service" and o["metadata"]["name"] == "llm"]
    return dep["spec"]["template"]["spec"]["containers"][0], svc


def test_the_router_serves_the_picker_ports_only_when_it_is_the_picker() -> None:
    raw = {"model": {"name": "Qwen/Qwen2.5-0.5B-Instruct"}}
    objs, _ = rendered("llm", with_pool(raw, "dedicated"), MOCK)
    container, svc = _router(objs)
    args = container["args"]
    assert args[args.index("--epp-port") + 1] == str(EPP_PORT)
    assert args[args.index("--epp-health-port") + 1] == str(EPP_HEALTH_PORT)
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {
        "http": 8080, "grpc-epp": EPP_PORT, "grpc-health": EPP_HEALTH_PORT,
    }  # fmt: skip
    by_name = {p["name"]: p for p in svc["spec"]["ports"]}
    assert (by_name["grpc-epp"]["port"], by_name["grpc-epp"]["targetPort"]) == (EPP_PORT, "grpc-epp")
    assert (by_name["grpc-health"]["port"], by_name["grpc-health"]["targetPort"]) == (
        EPP_HEALTH_PORT,
        "grpc-health",
    )
    assert by_name["grpc-epp"]["appProtocol"] == "kubernetes.io/h2c"
    # without a pool: the router as it was
    plain = LLMDeploymentSpec.model_validate(raw)
    container, svc = _router(render_deployment("llm", NS, plain, plan_deployment("llm", plain, MOCK), MOCK))
    assert "--epp-port" not in container["args"]
    assert [p["name"] for p in container["ports"]] == ["http"]
    assert [p["name"] for p in svc["spec"]["ports"]] == ["http"]


def test_gateway_mode_has_no_router_and_points_at_the_gateway_service() -> None:
    spec = with_pool({"model": {"name": "Qwen/Qwen2.5-0.5B-Instruct"}}, "gateway", failureMode="FailOpen")
    config = OperatorConfig(auto_engine="mock", gateway_namespace=NS, gateway_service="edge-gateway")
    objs, (pool,) = rendered("llm", spec, config)
    assert not [o for o in objs if o["metadata"]["name"].endswith("-router")]
    assert pool["spec"]["endpointPickerRef"] == {
        "group": "", "kind": "Service", "name": "edge-gateway", "port": {"number": EPP_PORT},
        "failureMode": "FailOpen",
    }  # fmt: skip
    assert judged(pool) == []


def test_gateway_mode_outside_the_gateways_namespace_says_why_and_renders_none() -> None:
    spec = with_pool({"model": {"name": "Qwen/Qwen2.5-0.5B-Instruct"}}, "gateway")
    for gw in ("toposerve-system", None):
        objs, notices = render_inference_pool("llm", NS, spec, OperatorConfig(gateway_namespace=gw), OWNER)
        assert objs == []
        ((reason, message),) = notices
        assert reason == REASON_NO_PICKER
        assert "spec.routing.inferencePool" in message and "routing.mode dedicated" in message
        assert ("toposerve-system" in message) == (gw is not None)
        assert ("gatewayNamespace" in message) == (gw is None)


def test_without_the_crd_the_pool_is_a_notice_naming_how_to_install_it() -> None:
    spec = with_pool({"model": {"name": "Qwen/Qwen2.5-0.5B-Instruct"}}, "dedicated")
    objs, notices = render_inference_pool("llm", NS, spec, MOCK, OWNER, served=False)
    assert objs == []
    ((reason, message),) = notices
    assert reason == REASON_CRD_MISSING and CRD_URL in message and "kubectl apply" in message
    assert CRD_URL.endswith("/v1.6.2/config/crd/bases/inference.networking.k8s.io_inferencepools.yaml")


@pytest.mark.parametrize(
    ("spec_pool", "cluster", "mode", "rendered_"),
    [
        (None, False, "dedicated", False),  # off unless asked
        (None, True, "dedicated", True),  # the cluster-wide default
        (None, True, "gateway", True),
        (None, True, "none", False),  # no picker: the default skips it quietly
        (False, True, "dedicated", False),  # a deployment opts out
        (True, False, "dedicated", True),  # or in
    ],
)
def test_the_spec_overrides_the_operator_config(
    spec_pool: bool | None, cluster: bool, mode: str, rendered_: bool
) -> None:
    raw: dict[str, Any] = {"model": {"name": "Qwen/Qwen2.5-0.5B-Instruct"}, "routing": {"mode": mode}}
    if spec_pool is not None:
        raw["routing"]["inferencePool"] = {"enabled": spec_pool}
    spec = LLMDeploymentSpec.model_validate(raw)
    config = OperatorConfig.model_validate(
        {"gatewayNamespace": NS, "inferencePool": {"enabled": cluster, "failureMode": "FailOpen"}}
    )
    objs, notices = render_inference_pool("llm", NS, spec, config)
    assert notices == [] and len(objs) == int(rendered_)
    for o in objs:
        assert o["spec"]["endpointPickerRef"]["failureMode"] == "FailOpen"  # the config's, unset in the spec


def _pydantic_refuses(routing: dict[str, Any]) -> str | None:
    try:
        LLMDeploymentSpec.model_validate({"model": {"name": "x/y"}, "routing": routing})
    except ValidationError as e:
        return str(spec_error(e))
    return None


def _cel_refuses(routing: dict[str, Any]) -> list[str]:
    """Our own CRD's CEL rules on spec.routing (what the API server says on kubectl apply)."""
    routing_schema = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"][
        "properties"
    ]["routing"]
    return cel_rules(routing_schema, routing, ".spec.routing")


@given(
    mode=st.sampled_from([None, "dedicated", "gateway", "none"]),
    enabled=st.sampled_from([None, True, False]),
    pool=st.sampled_from([None, True, False]),
)
def test_the_validator_and_the_api_server_refuse_the_same_pools(
    mode: str | None, enabled: bool | None, pool: bool | None
) -> None:
    """A pool needs a picker: refused with mode none (or enabled: false), by pydantic and by CEL
    alike, naming spec.routing.inferencePool.enabled."""
    routing: dict[str, Any] = {}
    if mode is not None:
        routing["mode"] = mode
    if enabled is not None:
        routing["enabled"] = enabled
    if pool is not None:
        routing["inferencePool"] = {"enabled": pool}
    said, cel = _pydantic_refuses(routing), _cel_refuses(routing)
    assert (said is None) == (cel == [])
    no_picker = mode == "none" or (mode is None and enabled is False)
    contradiction = (mode == "none" and enabled is True) or (
        mode in ("dedicated", "gateway") and enabled is False
    )
    if pool is True and no_picker and not contradiction:
        assert said == f"spec.routing.inferencePool.enabled: {INFERENCE_POOL_NEEDS_PICKER}"
        assert cel == [f".spec.routing: {INFERENCE_POOL_NEEDS_PICKER}"]
    if said is None:
        spec = RoutingSpec.model_validate(routing)
        assert spec.inference_pool_on(True) == (not no_picker and pool is not False)


@pytest.mark.parametrize(
    ("routing", "needle"),
    [
        ({"inferencePool": {"failureMode": "FailOpn"}}, "spec.routing.inferencePool.failureMode"),
        ({"inferencePool": {"enabled": "yes"}}, "spec.routing.inferencePool.enabled"),
        ({"inferencePool": {"enable": True}}, "spec.routing.inferencePool.enable"),
    ],
)
def test_bad_pool_fields_are_named(routing: dict[str, Any], needle: str) -> None:
    said = _pydantic_refuses(routing)
    assert said is not None and said.startswith(needle), said


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        ({"inferencePool": {"failureMode": "Open"}}, "inferencePool.failureMode"),
        ({"gatewayService": "Not_A_Name"}, "gatewayService"),
    ],
)
def test_bad_operator_config_is_named(config: dict[str, Any], needle: str) -> None:
    with pytest.raises(ValidationError) as e:
        OperatorConfig.model_validate(config)
    assert needle.split(".")[-1] in str(e.value)


def test_the_crd_judge_can_fail() -> None:
    """The vendored CRD is a real judge: what GIE refuses, these checks refuse too."""
    spec = with_pool({"model": {"name": "Qwen/Qwen2.5-0.5B-Instruct"}}, "dedicated")
    (pool,) = render_inference_pool("llm", NS, spec, MOCK, OWNER)[0]
    bad = copy.deepcopy(pool)
    bad["spec"]["targetPorts"] = [{"number": 8000}, {"number": 8000}]
    assert judged(bad) == [".spec.targetPorts: port number must be unique"]
    bad = copy.deepcopy(pool)
    del bad["spec"]["endpointPickerRef"]["port"]
    assert judged(bad) == [
        ".spec.endpointPickerRef: port is required when kind is 'Service' or unspecified (defaults to 'Service')"
    ]
    bad = copy.deepcopy(pool)
    bad["spec"]["selector"] = {"matchLabels": {}}
    assert judged(bad)
    bad = copy.deepcopy(pool)
    bad["spec"]["endpointPickerRef"]["namespace"] = "elsewhere"  # GIE v1 has no such field
    assert judged(bad)


def test_toposerve_render_prints_the_pool(tmp_path: Path) -> None:
    manifest = tmp_path / "llm.yaml"
    manifest.write_text(
        yaml.safe_dump(
            {"apiVersion": "toposerve.io/v1alpha1", "kind": "LLMDeployment", "metadata": {"name": "llm"},
             "spec": {"model": {"name": "Qwen/Qwen2.5-0.5B-Instruct"},
                      "routing": {"inferencePool": {"enabled": True}}}}
        )
    )  # fmt: skip
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        assert main(["render", "-f", str(manifest), "--namespace", NS]) == 0
    docs = [d for d in yaml.safe_load_all(out.getvalue()) if d]
    (pool,) = [d for d in docs if d["kind"] == "InferencePool"]
    assert judged(pool) == [] and pool["spec"]["endpointPickerRef"]["name"] == "llm"
    # gateway mode outside the gateway's namespace: said on stderr, nothing rendered
    manifest.write_text(manifest.read_text().replace("inferencePool:", "mode: gateway\n    inferencePool:"))
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        assert main(["render", "-f", str(manifest), "--namespace", NS]) == 0
    assert not [d for d in yaml.safe_load_all(out.getvalue()) if d and d["kind"] == "InferencePool"]
    assert REASON_NO_PICKER in err.getvalue()
