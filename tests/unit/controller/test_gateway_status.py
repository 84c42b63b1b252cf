"""status.gateway (controller/gateway_status.py): what the gateway's /health says about a spec, and
the pass that writes it only when it changes."""

from __future__ import annotations

from typing import Any

from toposerve.api.manifest import parse_spec
from toposerve.controller import gateway_status as gs
from toposerve.router.gateway import Gateway

SPEC = {
    "model": {"name": "Qwen/Qwen2.5-0.5B-Instruct", "servedName": "small", "aliases": ["s"]},
    "lora": {"maxLoras": 2},
    "adapters": [{"name": "sql", "source": "org/sql"}],
    "routing": {"mode": "gateway"},
}


def health_of(objs: list[dict[str, Any]], ready: dict[str, int] | None = None) -> dict[str, Any]:
    """A real Gateway's /health body for these LLMDeployments (the shape the operator parses)."""
    gw = Gateway()
    gw.deployments_listed(objs)
    gw.slices_listed([])
    deployments = gw.by_deployment()
    for d in deployments.values():
        d["readyReplicas"] = max((ready or {}).get(m, 0) for m in d["models"]) if d["models"] else 0
    return {"status": "ok", "models": gw.routable(), "deployments": deployments,
            "conflicts": [c.model for c in gw.table.conflicts]}  # fmt: skip


def obj(name: str, spec: dict[str, Any], created: str = "2026-01-01T00:00:00Z") -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "ns", "creationTimestamp": created}, "spec": spec}


def test_routed_under_every_name_with_its_ready_replicas() -> None:
    h = health_of([obj("a", SPEC)], {"small": 2})
    assert gs.gateway_status("ns/a", parse_spec(SPEC), h, True) == {
        "routed": True, "models": ["small", "s", "sql"], "readyReplicas": 2,
        "adapters": [{"name": "sql", "replicas": 0}],
    }  # fmt: skip


def test_an_adapter_whose_load_failed_is_named_with_the_engines_error_and_becomes_a_false_condition() -> None:
    from toposerve.controller.conditions import adapters_loaded

    h = health_of([obj("a", SPEC)], {"small": 2})
    err = "404 Loading lora sql failed: No adapter found for org/sql"
    h["deployments"]["ns/a"]["adapters"] = {"sql": {"replicas": 0, "lastError": err}}
    st = gs.gateway_status("ns/a", parse_spec(SPEC), h, True)
    assert st["adapters"] == [{"name": "sql", "replicas": 0, "lastError": err}]
    assert st["routed"] is True  # the base model is not affected
    c = adapters_loaded(["sql"], st, 3, "now", {})
    assert c is not None and (c.status, c.reason) == ("False", "AdapterLoadFailed") and err in c.message
    ok = {"adapters": [{"name": "sql", "replicas": 1}]}
    assert adapters_loaded(["sql"], ok, 3, "now", {}).status == "True"  # type: ignore[union-attr]
    assert adapters_loaded(["sql"], None, 3, "now", {}).status == "Unknown"  # type: ignore[union-attr]
    assert adapters_loaded([], None, 3, "now", {}) is None


def test_a_name_kept_by_an_elder_deployment_is_said() -> None:
    elder = obj("old", {"model": {"name": "x/y", "servedName": "s"}}, created="2025-01-01T00:00:00Z")
    h = health_of([elder, obj("a", SPEC)])
    st = gs.gateway_status("ns/a", parse_spec(SPEC), h, True)
    assert st["routed"] is True and st["models"] == [
        "small",
        "sql",
    ]  # "s" went to the elder: listed, not ours
    assert "s" in h["models"] and st["reason"] == "name(s) kept by an older LLMDeployment: s"


def test_not_routed_and_why() -> None:
    spec = parse_spec(SPEC)
    assert gs.gateway_status("ns/a", spec, None, False)["reason"].startswith("no gateway pods")
    assert gs.gateway_status("ns/a", spec, None, True) == {
        "routed": False,
        "reason": "no gateway pod answered /health",
    }
    st = gs.gateway_status("ns/a", spec, {"models": {}}, True)
    assert st["routed"] is False and st["reason"] == "not (yet) in the gateway's table: small, s, sql"
    none = parse_spec({**SPEC, "routing": {"mode": "none"}})
    assert gs.gateway_status("ns/a", none, health_of([obj("a", SPEC)]), True)["routed"] is False


class FakeKube:
    def __init__(self, pods: list[dict[str, Any]]) -> None:
        self.pods = pods
        self.patches: list[tuple[str, dict[str, Any]]] = []

    def list(
        self, api_version: str, kind: str, ns: str | None, selector: str | None = None
    ) -> list[dict[str, Any]]:
        assert (api_version, kind, ns, selector) == ("v1", "Pod", None, "sel")
        return self.pods

    def patch_status(self, api: str, kind: str, ns: str, name: str, status: dict[str, Any]) -> dict[str, Any]:
        self.patches.append((name, status))
        return {}


def test_the_pass_writes_only_what_changed_and_skips_invalid_and_deleted() -> None:
    ready = {"status": {"podIP": "10.0.0.1", "conditions": [{"type": "Ready", "status": "True"}]}}
    kube = FakeKube([ready])
    h = health_of([obj("a", SPEC)], {"small": 1})
    a = obj("a", SPEC)
    bad = obj("bad", {"model": {"name": ""}})
    gone = obj("gone", SPEC)
    gone["metadata"]["deletionTimestamp"] = "2026-12-07T00:00:00Z"
    asked: list[Any] = []
    fetch = lambda pods: asked.append(pods) or h  # noqa: E731
    assert gs.sync_once(kube, [a, bad, gone], "sel", None, fetch) == 1  # type: ignore[arg-type]
    assert asked == [[ready]] and kube.patches == [
        ("a", {"gateway": gs.gateway_status("ns/a", parse_spec(SPEC), h, True)})
    ]
    a["status"] = {"gateway": kube.patches[0][1]["gateway"]}
    assert gs.sync_once(kube, [a], "sel", None, fetch) == 0  # unchanged: no write  # type: ignore[arg-type]
    unready = FakeKube([{"status": {"podIP": "10.0.0.2", "conditions": []}}])
    assert gs.sync_once(unready, [a], "sel", None, fetch) == 1  # type: ignore[arg-type]
    assert unready.patches[0][1]["gateway"]["reason"].startswith("no gateway pods")


def test_the_replicas_answers_are_merged_an_error_seen_by_one_replica_counts() -> None:
    one = health_of([obj("a", SPEC)], {"small": 2})
    two = health_of([obj("a", SPEC)], {"small": 1})
    one["deployments"]["ns/a"]["adapters"] = {"sql": {"replicas": 1, "lastError": None}}
    two["deployments"]["ns/a"]["adapters"] = {"sql": {"replicas": 0, "lastError": "404 gone"}}
    merged = gs.merge([one, two])
    assert merged is not None
    assert merged["deployments"]["ns/a"]["adapters"]["sql"] == {"replicas": 1, "lastError": "404 gone"}
    assert merged["deployments"]["ns/a"]["readyReplicas"] == 2 and set(merged["models"]) == {
        "small",
        "s",
        "sql",
    }
    assert gs.merge([]) is None
    st = gs.gateway_status("ns/a", parse_spec(SPEC), merged, True)
    assert st["adapters"] == [{"name": "sql", "replicas": 1, "lastError": "404 gone"}]
