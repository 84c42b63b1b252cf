"""Deploying the health agent: its API calls, permissions.py, the chart's RBAC and the example
manifest agree; the values schema knows exactly the agent's thresholds; the DaemonSet is valid
Kubernetes and PodSecurity restricted."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.unit.chart_helpers import CHART, by_kind, template
from tests.unit.test_chart import pss_restricted_violations
from toposerve.controller.permissions import AGENT_PERMISSIONS, grants
from toposerve.health.node import plan_node_update, publish, read_node
from toposerve.health.verdict import Thresholds

ROOT = Path(__file__).resolve().parents[3]
EXAMPLE = ROOT / "examples" / "health-agent" / "health-agent.yaml"
Grant = tuple[str, str, str, str]


class RecordingKube:
    """Records (method, url); GET answers a node with one foreign taint."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def request(self, method: str, url: str, body: Any = None, content_type: str = "application/json") -> Any:
        self.calls.append((method, url))
        return {
            "metadata": {"name": "n", "resourceVersion": "1"},
            "spec": {"taints": [{"key": "x", "effect": "NoSchedule"}]},
        }


_VERBS = {"GET": "get", "PATCH": "patch"}


def _grant(method: str, url: str) -> Grant:
    parts = url.removeprefix("/api/v1/").split("/")  # nodes/<name>[/status]
    resource = parts[0] + (f"/{parts[2]}" if len(parts) > 2 else "")
    return ("", resource, _VERBS[method], "")


def test_the_agents_api_calls_are_exactly_agent_permissions() -> None:
    from datetime import UTC, datetime

    kube = RecordingKube()
    node = read_node(kube, "gpu-1")
    now = datetime(2026, 12, 1, tzinfo=UTC)
    publish(kube, "gpu-1", plan_node_update(node, False, "GPUsUnhealthy", "m", now))
    used = {_grant(m, u) for m, u in kube.calls}
    assert used == grants(list(AGENT_PERMISSIONS))  # nothing missing, nothing granted in vain


def _rule_grants(rules: list[dict[str, Any]]) -> set[Grant]:
    return {
        (g, r, v, "")
        for rule in rules
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }


def example() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(EXAMPLE.read_text()) if d]


def test_the_example_manifest_grants_exactly_agent_permissions_and_is_valid() -> None:
    objs = example()
    (role,) = by_kind(objs, "ClusterRole")
    assert _rule_grants(role["rules"]) == grants(list(AGENT_PERMISSIONS))
    for obj in objs:
        kubernetes_validate.validate(obj, "1.35", strict=True)
    (ds,) = by_kind(objs, "DaemonSet")
    assert pss_restricted_violations(ds["spec"]["template"]["spec"]) == []


def test_the_example_selects_the_nodes_and_tolerations_the_chart_defaults_to() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())["healthAgent"]
    (ds,) = by_kind(example(), "DaemonSet")
    spec = ds["spec"]["template"]["spec"]
    assert spec["affinity"] == values["affinity"] and spec["tolerations"] == values["tolerations"]


def _schema() -> dict[str, Any]:
    import json

    return dict(json.loads((CHART / "values.schema.json").read_text()))


def test_values_schema_knows_exactly_the_agents_thresholds() -> None:
    props = _schema()["properties"]["healthAgent"]["properties"]["thresholds"]["properties"]
    aliases = {f.alias or name for name, f in Thresholds.model_fields.items()}
    assert set(props) == aliases


@pytest.mark.parametrize(
    ("agent", "ok"),
    [
        ({"enabled": True, "thresholds": {"maxTemperatureC": 83, "unhealthyAfter": 3}}, True),
        ({"thresholds": {"maxTempC": 83}}, False),  # a typo is refused, not ignored
        ({"thresholds": {"maxMemoryUsedFraction": 1.5}}, False),
        ({"metricsPort": 0}, False),
        ({"enable": True}, False),
    ],
)
def test_values_schema_checks_the_agent_values(agent: dict[str, Any], ok: bool) -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    values["healthAgent"].update(agent)
    validator = jsonschema.Draft7Validator(_schema())
    assert (not list(validator.iter_errors(values))) == ok


def test_chart_defaults_pass_their_schema_and_thresholds_parse() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert not list(jsonschema.Draft7Validator(_schema()).iter_errors(values))
    Thresholds.model_validate(values["healthAgent"]["thresholds"])


# ---- rendered by helm (skips loudly without the helm binary, like every chart test) ----------


def test_the_agent_is_off_by_default_and_renders_when_enabled() -> None:
    assert not by_kind(template(), "DaemonSet")
    objs = template({"healthAgent": {"enabled": True, "thresholds": {"maxTemperatureC": 83}, "taint": False}})
    (ds,) = by_kind(objs, "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    args = pod["containers"][0]["args"]
    assert (
        args[0] == "health-agent"
        and "--no-taint" in args
        and "--config=/etc/toposerve-health/thresholds.yaml" in args
    )
    assert pss_restricted_violations(pod) == []
    (role,) = [r for r in by_kind(objs, "ClusterRole") if r["metadata"]["name"].endswith("health-agent")]
    assert _rule_grants(role["rules"]) == grants(list(AGENT_PERMISSIONS))
    (cm,) = [c for c in by_kind(objs, "ConfigMap") if c["metadata"]["name"].endswith("health-agent")]
    assert Thresholds.model_validate(yaml.safe_load(cm["data"]["thresholds.yaml"])).max_temperature_c == 83
    (binding,) = [
        b for b in by_kind(objs, "ClusterRoleBinding") if b["metadata"]["name"].endswith("health-agent")
    ]
    assert binding["subjects"][0]["name"] == pod["serviceAccountName"]
    for obj in objs:
        if obj["kind"] != "CustomResourceDefinition":
            kubernetes_validate.validate(obj, "1.35", strict=True)
