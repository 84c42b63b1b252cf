"""PodMonitors (render/monitoring.py): valid for the Prometheus Operator's real CRD schema (v0.89.0,
vendored under tests/unit/schemas by hack/vendor_monitoring_schemas.py; strictly, an unknown field
is an error here), selecting exactly the pods that serve /metrics on the port they name, with
target labels the operator's own PromQL selectors expect."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.unit.autoscale.test_render_autoscaler import errors, strict
from tests.unit.chart_helpers import template
from toposerve.api.config import OperatorConfig
from toposerve.controller import autoscaler as autoscale_loop
from toposerve.controller import evacuation
from toposerve.planner.plan import plan_deployment
from toposerve.render.monitoring import (
    ENGINE_COMPONENTS,
    TARGET_LABELS,
    render_monitors,
    wanted,
)
from toposerve.render.objects import Owner, render_deployment

from .conftest import make_spec

SCHEMAS = Path(__file__).resolve().parent / "schemas"
OWNER = Owner(name="llm", uid="0000-1111")
ON = OperatorConfig(prometheus_operator="on")
L405 = "meta-llama/Llama-3.1-405B-Instruct"
QWEN = "Qwen/Qwen2.5-0.5B-Instruct"


def crd_validator(plural: str) -> jsonschema.Draft202012Validator:
    crd = yaml.safe_load((SCHEMAS / f"prometheus-operator-v0.89.0-{plural}.yaml").read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft202012Validator(strict(version["schema"]["openAPIV3Schema"]))


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """metav1.LabelSelector semantics (matchLabels and the four operators)."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for e in selector.get("matchExpressions") or []:
        key, op, values = e["key"], e["operator"], e.get("values") or []
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def pod_templates(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every pod template of the rendered workloads (Deployments, LeaderWorkerSet leaders and workers)."""
    out = []
    for o in objs:
        if o["kind"] == "Deployment":
            out.append(o["spec"]["template"])
        elif o["kind"] == "LeaderWorkerSet":
            t = o["spec"]["leaderWorkerTemplate"]
            out += [t["leaderTemplate"], t["workerTemplate"]]
    return out


def ports(tmpl: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for c in tmpl["spec"]["containers"] for p in c.get("ports") or []}


def sanitize(label: str) -> str:
    """Prometheus Operator's sanitizeLabelName (pkg/prometheus/promcfg.go): podTargetLabels' names."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", label)


def deployment(spec: Any, config: OperatorConfig = ON) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    objs = render_deployment("llm", "team-a", spec, plan_deployment("llm", spec, config), config, OWNER)
    return objs, render_monitors("llm", "team-a", spec, config, OWNER)


SPECS = {
    "mock": make_spec(QWEN, engine="mock"),
    "vllm-single-node": make_spec("meta-llama/Llama-3.1-70B-Instruct", 8192, ["H100"]),
    "vllm-multi-node": make_spec(L405, 131072, ["H100"], placement={"topologyKey": "nvidia.com/gpu.clique"}),
    "no-router": make_spec(QWEN, engine="mock", routing={"enabled": False}),
}


@pytest.mark.parametrize("case", SPECS)
def test_monitors_validate_against_the_prometheus_operator_crd(case: str) -> None:
    _, monitors = deployment(SPECS[case])
    v = crd_validator("podmonitors")
    assert monitors
    for m in monitors:
        assert errors(v, m) == [], m
        assert (m["apiVersion"], m["kind"]) == ("monitoring.coreos.com/v1", "PodMonitor")
        assert m["metadata"]["namespace"] == "team-a"
        assert m["metadata"]["ownerReferences"][0]["uid"] == "0000-1111"
        # the operator's watches and pruning find its children by this label
        assert m["metadata"]["labels"]["toposerve.io/deployment"] == "llm"


@pytest.mark.parametrize("case", SPECS)
def test_each_monitor_selects_exactly_the_pods_that_serve_its_port(case: str) -> None:
    objs, monitors = deployment(SPECS[case])
    by_name = {m["metadata"]["name"]: m for m in monitors}
    routing = SPECS[case].routing.enabled
    assert set(by_name) == ({"llm-engine", "llm-router"} if routing else {"llm-engine"})
    templates = pod_templates(objs)
    for name, component, port in (("llm-engine", "engine", 8000), ("llm-router", "router", 8080)):
        if name not in by_name:
            continue
        m = by_name[name]["spec"]
        picked = [t for t in templates if selects(m["selector"], t["metadata"]["labels"])]
        expected = [
            t for t in templates if t["metadata"]["labels"]["app.kubernetes.io/component"] == component
        ]
        assert picked == expected and picked, (name, [t["metadata"]["labels"] for t in templates])
        (ep,) = m["podMetricsEndpoints"]
        assert ep["path"] == "/metrics"
        for t in picked:  # the named port is the container's, on the component's port number
            assert ports(t)[ep["port"]] == port
    # multi-node workers run vLLM headless (no HTTP server): not scraped
    workers = [t for t in templates if t["metadata"]["labels"]["app.kubernetes.io/component"] == "worker"]
    assert bool(workers) == (case == "vllm-multi-node")
    for t in workers:
        assert not any(selects(m["spec"]["selector"], t["metadata"]["labels"]) for m in monitors)


def test_pods_out_of_rotation_are_still_scraped() -> None:
    """Draining (evacuation) and warm standby pods keep running requests: their series stay, told
    apart by the component label."""
    assert ENGINE_COMPONENTS == (autoscale_loop.ENGINE, autoscale_loop.STANDBY, evacuation.COMPONENT_DRAINING)
    _, (engine, _router) = deployment(SPECS["mock"])
    for component in ENGINE_COMPONENTS:
        labels = {"toposerve.io/deployment": "llm", "app.kubernetes.io/component": component}
        assert selects(engine["spec"]["selector"], labels)
    assert not selects(engine["spec"]["selector"], {"toposerve.io/deployment": "other",
                                                    "app.kubernetes.io/component": "engine"})  # fmt: skip


def test_target_labels_are_what_the_operators_promql_selectors_use() -> None:
    """The default prometheusSelector / prometheusRouterSelector must find these series unchanged."""
    _, monitors = deployment(SPECS["mock"])
    config = OperatorConfig()
    used = set(re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)=", config.prometheus_selector))
    used |= set(re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)=", config.prometheus_router_selector))
    for m in monitors:
        got = {sanitize(label) for label in m["spec"]["podTargetLabels"]} | {"namespace"}
        assert used <= got, used - got
    assert m["spec"]["podTargetLabels"] == TARGET_LABELS


@pytest.mark.parametrize(
    ("mode", "served", "rendered"),
    [("auto", True, True), ("auto", False, False), ("auto", None, False), ("on", False, True),
     ("on", None, True), ("off", True, False)],
)  # fmt: skip
def test_mode_auto_on_off(mode: Any, served: bool | None, rendered: bool) -> None:
    assert wanted(mode, served) is rendered
    config = OperatorConfig(prometheus_operator=mode)
    assert bool(render_monitors("llm", "team-a", SPECS["mock"], config, OWNER, served=served)) is rendered


def test_default_is_auto_and_the_config_knobs_reach_the_monitor() -> None:
    assert OperatorConfig().prometheus_operator == "auto"
    config = OperatorConfig.model_validate(
        {"prometheusOperator": "on", "monitorLabels": {"release": "kps", "toposerve.io/deployment": "x"},
         "monitorInterval": "30s"}
    )  # fmt: skip
    (engine, _) = render_monitors("llm", "team-a", SPECS["mock"], config, OWNER)
    labels = engine["metadata"]["labels"]
    assert labels["release"] == "kps"
    assert labels["toposerve.io/deployment"] == "llm"  # ours win: the watches select by it
    assert engine["spec"]["podMetricsEndpoints"][0]["interval"] == "30s"
    quiet = OperatorConfig(prometheus_operator="on", monitor_interval=None)
    (engine, _) = render_monitors("llm", "team-a", SPECS["mock"], quiet, OWNER)
    assert "interval" not in engine["spec"]["podMetricsEndpoints"][0]
    assert errors(crd_validator("podmonitors"), engine) == []
    with pytest.raises(ValueError):
        OperatorConfig.model_validate({"monitorInterval": "15 seconds"})
    with pytest.raises(ValueError):
        OperatorConfig.model_validate({"prometheusOperator": "yes"})


def test_the_charts_own_monitors_validate_too() -> None:
    objs = template(
        {"metrics": {"serviceMonitor": {"enabled": True}, "podMonitor": {"enabled": True}}},
        api_versions=["monitoring.coreos.com/v1"],
    )
    found = [o for o in objs if o["apiVersion"] == "monitoring.coreos.com/v1"]
    assert sorted(o["kind"] for o in found) == [
        "PodMonitor",
        "PodMonitor",
        "ServiceMonitor",
    ]  # + the gateway's
    for o in found:
        assert errors(crd_validator(o["kind"].lower() + "s"), o) == []
