"""The chart's gateway tenants (templates/gateway.yaml, gateway.tenants): the policy ConfigMap is
what the gateway's own parser accepts, the flags are the gateway's, the schema refuses bad values."""

from __future__ import annotations

import argparse
from typing import Any

import yaml

from tests.unit.chart_helpers import by_kind, template, template_error
from toposerve.router import gateway_cli, tenant_watch
from toposerve.router import tenants as tn

POLICIES = {
    "search": {"models": ["meta-llama/*"], "priority": "critical", "weight": 2,
               "budgets": {"requestsPerSecond": 20, "concurrentRequests": 64, "tokensPerMinute": 2000000}},
    "batch": {"priority": "sheddable"},
}  # fmt: skip


def tenants_on(**extra: Any) -> dict[str, Any]:
    return {"gateway": {"tenants": {"enabled": True, "policies": POLICIES, **extra}}}


def test_tenants_off_by_default_renders_nothing_of_them() -> None:
    objs = template()
    assert not [o for o in objs if o["metadata"]["name"].endswith("-tenants")]
    (dep,) = [d for d in by_kind(objs, "Deployment") if d["metadata"]["name"] == "toposerve-gateway"]
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert not [a for a in args if "tenant" in a or "api-key" in a]


def test_policy_configmap_mounted_and_flags_the_gateway_parses(tmp_path: Any) -> None:
    objs = template(tenants_on())
    (cm,) = [c for c in by_kind(objs, "ConfigMap") if c["metadata"]["name"] == "toposerve-gateway-tenants"]
    f = tmp_path / "tenants.yaml"
    f.write_text(cm["data"]["tenants.yaml"])
    policies = tenant_watch.load_policy_file(str(f))
    assert policies["search"].budgets == tn.Budgets(20, 64, 2000000)
    assert policies["batch"].priority == "sheddable"
    (dep,) = [d for d in by_kind(objs, "Deployment") if d["metadata"]["name"] == "toposerve-gateway"]
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert {"name": "tenants", "configMap": {"name": "toposerve-gateway-tenants"}} in pod["volumes"]
    assert c["volumeMounts"][0]["mountPath"] == "/etc/toposerve/tenants"
    assert {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}} in c[
        "env"
    ]
    p = argparse.ArgumentParser()
    gateway_cli.add_arguments(p)
    args = p.parse_args(c["args"][1:])
    assert (args.tenants_file, args.tenant_secrets, args.require_api_key) == (
        "/etc/toposerve/tenants/tenants.yaml",
        True,
        True,
    )
    assert (args.flow_max_wait, args.flow_max_bytes) == (30.0, 67108864)
    # budgets shared across the replicas (the default): the peer port and the Service to list
    assert (args.peer_port, args.peer_service) == (8082, "toposerve-gateway")
    args.tenants_namespace = "toposerve-system"  # $POD_NAMESPACE in the pod (its env, above)
    assert gateway_cli.check_peer_args(args) == ""
    assert {"name": "peers", "containerPort": 8082, "protocol": "TCP"} in c["ports"]
    assert {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}} in c["env"]
    objectives = template(tenants_on(objectives={"batch": "sheddable", "chat": 10}))
    (cm,) = [
        c for c in by_kind(objectives, "ConfigMap") if c["metadata"]["name"] == "toposerve-gateway-tenants"
    ]
    f.write_text(cm["data"]["tenants.yaml"])
    assert tenant_watch.load_policy_file(str(f)).objectives == {"batch": "sheddable", "chat": "critical"}
    off = template(tenants_on(requireApiKey=False))
    (dep,) = [d for d in by_kind(off, "Deployment") if d["metadata"]["name"] == "toposerve-gateway"]
    assert "--require-api-key" not in dep["spec"]["template"]["spec"]["containers"][0]["args"]


def test_empty_policy_renders_a_file_the_gateway_accepts(tmp_path: Any) -> None:
    (cm,) = [c for c in by_kind(template({"gateway": {"tenants": {"enabled": True}}}), "ConfigMap")
             if c["metadata"]["name"] == "toposerve-gateway-tenants"]  # fmt: skip
    assert yaml.safe_load(cm["data"]["tenants.yaml"]) == {"tenants": {}}


def test_schema_refuses_bad_tenant_values() -> None:
    assert "priority" in template_error({"gateway": {"tenants": {"policies": {"a": {"priority": "urgent"}}}}})
    assert "rps" in template_error({"gateway": {"tenants": {"policies": {"a": {"budgets": {"rps": 1}}}}}})
    assert template_error({"gateway": {"tenants": {"policies": {"Team A": {}}}}})
    assert "weight" in template_error({"gateway": {"tenants": {"policies": {"a": {"weight": 0}}}}})
    assert template_error({"gateway": {"tenants": {"objectives": {"batch": "low"}}}})
