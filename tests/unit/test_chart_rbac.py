"""RBAC derived from the code: permissions.py covers every call the operator makes, and the chart
grants exactly permissions.py (no more, no wildcards), so the router's Role needs no escalation."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest

from tests.unit.chart_helpers import by_kind, template
from toposerve import API_GROUP, API_VERSION
from toposerve.api.spec import LLMDeploymentSpec
from toposerve.controller import kube, permissions
from toposerve.controller.permissions import Scope, grants, needed
from toposerve.planner.plan import plan_deployment
from toposerve.render.objects import render_deployment

CONTROLLER = Path(kube.__file__).parent
NS = "toposerve-system"
Grant = tuple[str, str, str, str]


def _group(api_version: str) -> str:
    return api_version.rsplit("/", 1)[0] if "/" in api_version else ""


def all_grants(scope: Scope, namespaced: bool = False) -> set[Grant]:
    return grants(needed(scope, namespaced))


def holds(group: str, resource: str, verb: str, scope: Scope | None = None) -> bool:
    scopes: tuple[Scope, ...] = (scope,) if scope else permissions.SCOPES
    return any((group, resource, verb, "") in all_grants(s, True) for s in scopes)


# ---- permissions.py against the code ----------------------------------------------------------


def test_every_kind_the_client_knows_is_covered() -> None:
    for (api_version, _kind), plural in kube.PLURALS.items():
        group = _group(api_version)
        assert any(p.group == group and p.resource == plural for p in permissions.PERMISSIONS), (
            f"{plural}.{group} is in kube.PLURALS but not in permissions.py"
        )


def test_every_child_kind_can_be_watched_applied_and_pruned() -> None:
    # controller/children.py lists and watches the pods and every child kind in each namespace
    for api_version, kind in [("v1", "Pod"), *kube.CHILD_KINDS]:
        plural = kube.PLURALS[(api_version, kind)]
        verbs = ("list", "watch") if kind == "Pod" else ("list", "watch", "create", "patch", "delete")
        for verb in verbs:  # SSA of a new object also checks create
            assert holds(_group(api_version), plural, verb, "watched"), (plural, verb)


def _kopf_watches() -> list[tuple[str, str]]:
    """(group, plural) of every @kopf.on.<event|create|...>(group, version, plural) in controller/."""
    out = []
    for f in CONTROLLER.glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if not isinstance(node, ast.Call):
                continue
            fn = node.func
            if not (isinstance(fn, ast.Attribute) and isinstance(fn.value, ast.Attribute)):
                continue
            if not (
                isinstance(fn.value.value, ast.Name) and fn.value.value.id == "kopf" and fn.value.attr == "on"
            ):
                continue
            if fn.attr in ("startup", "cleanup", "login", "probe"):
                continue
            args = [_literal(a) for a in node.args]
            assert len(args) == 3, f"{f.name}:{node.lineno}: use kopf.on.{fn.attr}(group, version, plural)"
            out.append((str(args[0]), str(args[2])))
    return out


def _literal(node: ast.expr) -> Any:
    if isinstance(node, ast.Constant):
        return node.value
    names = {"API_GROUP": API_GROUP, "API_VERSION": API_VERSION}
    if isinstance(node, ast.Name) and node.id in names:
        return names[node.id]
    raise AssertionError(f"not a literal: {ast.dump(node)}")


def test_every_kopf_watch_can_list_and_watch() -> None:
    watches = _kopf_watches()
    assert ("toposerve.io", "llmdeployments") in watches
    for group, plural in watches:
        for verb in ("list", "watch"):
            assert holds(group, plural, verb, "watched"), f"kopf watches {plural}.{group}: needs {verb}"


_METHOD_VERBS = {"get": ("get",), "list": ("list",), "apply": ("create", "patch"), "delete": ("delete",)}


def _kube_calls() -> list[tuple[str, str, str, str, bool]]:
    """(file:line, method, apiVersion, kind, cluster-wide) of Kube calls with literal kinds."""
    out = []
    for f in CONTROLLER.glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            if node.func.attr not in (*_METHOD_VERBS, "patch_status") or len(node.args) < 3:
                continue
            try:
                api_version, kind = _literal_api(node.args[0]), _literal(node.args[1])
            except AssertionError:
                continue  # a loop over CHILD_KINDS: covered by the child test
            cluster = isinstance(node.args[2], ast.Constant) and node.args[2].value is None
            out.append((f"{f.name}:{node.lineno}", node.func.attr, api_version, str(kind), cluster))
    return out


def _literal_api(node: ast.expr) -> str:
    if isinstance(node, ast.Name) and node.id == "API":
        return f"{API_GROUP}/{API_VERSION}"
    return str(_literal(node))


def test_every_literal_kube_call_is_granted_in_its_scope() -> None:
    calls = _kube_calls()
    assert any(c[2:4] == ("v1", "Node") for c in calls), "the AST scan found nothing: fix the scanner"
    for where, method, api_version, kind, cluster in calls:
        plural = kube.PLURALS[(api_version, kind)]
        group = _group(api_version)
        if method == "patch_status":
            plural, verbs = f"{plural}/status", ("patch",)
        else:
            verbs = _METHOD_VERBS[method]
        scope: Scope = "cluster" if cluster or kind == "Node" else ("own" if kind == "Lease" else "watched")
        for verb in verbs:
            ok = holds(group, plural, verb, scope) or (
                kind == "Lease" and (group, plural, verb, permissions.LEASE_NAME) in all_grants("own")
            )
            assert ok, f"{where}: {method} {plural}.{group} needs {verb} ({scope})"


def test_leader_election_and_events_and_crd_checks() -> None:
    own = all_grants("own")
    name = permissions.LEASE_NAME
    assert {("coordination.k8s.io", "leases", v, name) for v in ("get", "update")} <= own
    assert ("coordination.k8s.io", "leases", "create", "") in own
    src = (CONTROLLER / "operator.py").read_text()
    assert f'lease_name: str = "{name}"' in src
    assert 'f"/apis/coordination.k8s.io/v1/namespaces/{self.namespace}/leases"' in src
    assert 'kube.request("POST", url' in src and 'kube.request("PUT", f"{url}/{self.name}"' in src
    assert holds("", "events", "create", "watched")
    assert holds("apiextensions.k8s.io", "customresourcedefinitions", "get", "cluster")


def test_no_wildcards_and_no_dangerous_verbs() -> None:
    for p in permissions.PERMISSIONS:
        assert "*" not in (p.group, p.resource, *p.verbs)
        assert not {"escalate", "bind", "impersonate", "deletecollection"} & set(p.verbs)
        assert p.why


def test_the_router_role_is_grantable_without_escalation() -> None:
    """RBAC lets the operator create a Role only with rules it holds itself in that namespace."""
    spec = LLMDeploymentSpec.model_validate(
        {"model": {"name": "Qwen/Qwen2.5-0.5B-Instruct"}, "engine": "mock"}
    )
    objs = render_deployment("q", "team-a", spec, plan_deployment("q", spec))
    roles = [o for o in objs if o["kind"] == "Role"]
    assert roles
    for role in roles:
        for rule in role["rules"]:
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    for verb in rule["verbs"]:
                        assert holds(group, resource, verb, "watched"), (group, resource, verb)


# ---- the chart grants exactly permissions.py ----------------------------------------------------


def _rule_grants(rules: list[dict[str, Any]]) -> set[Grant]:
    out: set[Grant] = set()
    for r in rules:
        for field in ("apiGroups", "resources", "verbs", "resourceNames"):
            assert "*" not in (r.get(field) or []), f"wildcard in {field}: {r}"
        for g in r["apiGroups"]:
            for res in r["resources"]:
                for v in r["verbs"]:
                    for n in r.get("resourceNames") or [""]:
                        out.add((g, res, v, n))
    return out


def chart_grants(objs: list[dict[str, Any]], sa: str = "toposerve") -> dict[str, set[Grant]]:
    """Grants of one of the chart's ServiceAccounts per place: 'cluster' or a namespace."""
    roles = {(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]): o for o in objs
             if o["kind"] in ("Role", "ClusterRole")}  # fmt: skip
    out: dict[str, set[Grant]] = {}
    for b in by_kind(objs, "ClusterRoleBinding") + by_kind(objs, "RoleBinding"):
        if b["subjects"] != [{"kind": "ServiceAccount", "name": sa, "namespace": NS}]:
            continue
        ref = b["roleRef"]
        ns = b["metadata"].get("namespace")
        role = roles[(ref["kind"], ns if ref["kind"] == "Role" else None, ref["name"])]
        where = "cluster" if b["kind"] == "ClusterRoleBinding" else ns
        out.setdefault(where, set()).update(_rule_grants(role["rules"]))
    return out


def test_chart_rbac_equals_permissions_when_watching_all_namespaces() -> None:
    got = chart_grants(template())
    assert got == {
        "cluster": all_grants("cluster") | all_grants("watched"),
        NS: all_grants("own"),
    }


def test_chart_rbac_equals_permissions_when_watching_some_namespaces() -> None:
    got = chart_grants(template({"watchNamespaces": ["team-a", NS]}))
    assert got == {
        "cluster": all_grants("cluster", namespaced=True),
        "team-a": all_grants("watched"),
        NS: all_grants("watched") | all_grants("own"),
    }
    assert ("", "namespaces", "watch", "") in got["cluster"]
    assert ("", "namespaces", "watch", "") not in chart_grants(template())["cluster"]


def test_rbac_create_false_renders_no_rbac() -> None:
    objs = template({"rbac": {"create": False}})
    assert not [o for o in objs if o["kind"] in ("Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding")]


@pytest.mark.parametrize("values", [{}, {"watchNamespaces": ["a"]}])
def test_the_chart_grants_nothing_to_anyone_else(values: dict[str, Any]) -> None:
    for b in by_kind(template(values), "ClusterRoleBinding") + by_kind(template(values), "RoleBinding"):
        assert [s["name"] for s in b["subjects"]] in (["toposerve"], ["toposerve-gateway"])
        assert b["subjects"][0]["namespace"] == NS


def _gateway_grants(scope: str = "watched") -> set[Grant]:
    return {
        (p.group, p.resource, v, "")
        for p in permissions.GATEWAY_PERMISSIONS
        if p.scope == scope
        for v in p.verbs
    }


def test_the_gateway_reads_llmdeployments_and_endpointslices_only_cluster_wide_or_in_its_namespace() -> None:
    assert chart_grants(template(), "toposerve-gateway") == {"cluster": _gateway_grants()}
    scoped = template({"gateway": {"watchNamespace": "team-a"}})
    assert chart_grants(scoped, "toposerve-gateway") == {"team-a": _gateway_grants()}
    assert chart_grants(template({"gateway": {"enabled": False}}), "toposerve-gateway") == {}
    assert all(set(p.verbs) <= {"get", "list", "watch"} for p in permissions.GATEWAY_PERMISSIONS)


def test_with_tenants_the_gateway_reads_secrets_in_its_own_namespace_only() -> None:
    """gateway.tenants.enabled adds exactly the "own" GATEWAY_PERMISSIONS, as a Role in the release
    namespace (tenant_watch.py lists Secrets there); never a ClusterRole on Secrets."""
    on = {"gateway": {"tenants": {"enabled": True}}}
    assert chart_grants(template(on), "toposerve-gateway") == {
        "cluster": _gateway_grants(),
        NS: _gateway_grants("own"),
    }
    scoped = template({"gateway": {"watchNamespace": "team-a", "tenants": {"enabled": True}}})
    assert chart_grants(scoped, "toposerve-gateway") == {
        "team-a": _gateway_grants(),
        NS: _gateway_grants("own"),
    }
    assert _gateway_grants("own") == {("", "secrets", v, "") for v in ("get", "list", "watch")} | {
        ("discovery.k8s.io", "endpointslices", v, "") for v in ("list", "watch")
    }  # the gateway's own replicas (peer_sync.py: budgets shared across them)
    unshared = template({"gateway": {"tenants": {"enabled": True, "shareBudgets": False}}})
    assert chart_grants(unshared, "toposerve-gateway")[NS] == {
        ("", "secrets", v, "") for v in ("get", "list", "watch")
    }
    from toposerve.router import peer_sync

    assert "list_namespaced_endpoint_slice" in Path(peer_sync.__file__).read_text()
    from toposerve.router import tenant_watch

    assert "list_namespaced_secret" in Path(tenant_watch.__file__).read_text()


def test_the_gateway_watches_what_it_is_granted() -> None:
    """gateway_watch.py lists and watches exactly the kinds GATEWAY_PERMISSIONS grants."""
    from toposerve.router import gateway_watch

    src = Path(gateway_watch.__file__).read_text()
    assert "list_cluster_custom_object" in src and "list_namespaced_custom_object" in src
    assert gateway_watch.PLURAL == "llmdeployments"
    assert "list_endpoint_slice_for_all_namespaces" in src and "list_namespaced_endpoint_slice" in src
    kinds = {(p.group, p.resource) for p in permissions.GATEWAY_PERMISSIONS if p.scope == "watched"}
    assert kinds == {("toposerve.io", "llmdeployments"), ("discovery.k8s.io", "endpointslices")}


def test_every_inventory_reflector_can_list_and_watch_cluster_wide() -> None:
    """controller/cache.py lists and watches whole kinds across the cluster (Reflector(kube, ...))."""
    import ast

    src = (CONTROLLER / "cache.py").read_text()
    kinds = [
        (n.args[1].value, n.args[2].value)
        for n in ast.walk(ast.parse(src))
        if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "Reflector"
        and all(isinstance(a, ast.Constant) for a in n.args[1:3])
    ]  # fmt: skip
    assert ("v1", "Node") in kinds and ("v1", "Pod") in kinds, kinds
    for api_version, kind in kinds:
        plural = kind.lower() + "s"
        for verb in ("list", "watch"):
            assert holds(_group(api_version), plural, verb, "cluster"), (plural, verb)
