"""The chart's gateway (templates/gateway.yaml): HA, drained on rollouts, scoped, configurable."""

from __future__ import annotations

from typing import Any

from tests.unit.chart_helpers import by_kind, template


def gateway_objs(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    return [
        o
        for o in template(values)
        if (o["metadata"].get("labels") or {}).get("app.kubernetes.io/component") == "gateway"
    ]


def test_default_gateway_is_two_spread_replicas_behind_a_service_with_a_pdb() -> None:
    objs = gateway_objs()
    assert sorted(o["kind"] for o in objs) == sorted(
        [
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "Deployment",
            "PodDisruptionBudget",
            "Service",
        ]
    )
    (dep,) = by_kind(objs, "Deployment")
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert dep["spec"]["replicas"] == 2
    assert c["args"][0] == "gateway" and "--hold-at-zero=300" in c["args"] and "--strategy=auto" in c["args"]
    assert not [a for a in c["args"] if a.startswith("--watch-namespace")]  # every namespace
    assert c["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert pod["serviceAccountName"] == "toposerve-gateway"
    assert pod["terminationGracePeriodSeconds"] > 60 + c["lifecycle"]["preStop"]["sleep"]["seconds"]
    term = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    labels = dep["spec"]["template"]["metadata"]["labels"]
    (pdb,) = by_kind(objs, "PodDisruptionBudget")
    (svc,) = by_kind(objs, "Service")
    for sel in (
        pdb["spec"]["selector"]["matchLabels"],
        svc["spec"]["selector"],
        dep["spec"]["selector"]["matchLabels"],
    ):
        assert sel.items() <= labels.items()
    assert labels["app.kubernetes.io/component"] == "gateway"  # never selects the operator's pods
    assert pdb["spec"]["maxUnavailable"] == 1
    assert svc["spec"]["ports"] == [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]


def test_values_reach_the_gateway_and_it_can_be_turned_off() -> None:
    values = {
        "gateway": {
            "replicas": 3,
            "watchNamespace": "team-a",
            "strategy": "session",
            "holdAtZeroSeconds": 0,
            "service": {"type": "LoadBalancer", "port": 8000},
            "extraArgs": ["--max-held=32"],
        }
    }
    objs = gateway_objs(values)
    (dep,) = by_kind(objs, "Deployment")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert dep["spec"]["replicas"] == 3
    assert {"--watch-namespace=team-a", "--strategy=session", "--hold-at-zero=0", "--max-held=32"} <= set(
        c["args"]
    )
    (svc,) = by_kind(objs, "Service")
    assert svc["spec"]["type"] == "LoadBalancer" and svc["spec"]["ports"][0]["port"] == 8000
    assert {o["kind"] for o in objs} >= {"Role", "RoleBinding"}
    assert all(o["metadata"]["namespace"] == "team-a" for o in objs if o["kind"] in ("Role", "RoleBinding"))
    assert gateway_objs({"gateway": {"enabled": False}}) == []


def test_the_gateway_args_parse_with_the_real_cli() -> None:
    """What the chart passes is what `toposerve gateway` accepts."""
    from toposerve.cli import build_parser

    (dep,) = by_kind(gateway_objs({"gateway": {"watchNamespace": "team-a"}}), "Deployment")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    args = build_parser().parse_args(c["args"])
    assert args.watch_namespace == "team-a" and args.hold_at_zero == 300 and args.host == "::"


def test_the_gateways_metrics_are_scraped_where_the_chart_scrapes_the_operators() -> None:
    """With the Prometheus Operator and a monitor enabled, a PodMonitor scrapes the gateway pods'
    /metrics on their http port (per model and per tenant: `toposerve cost --by tenant` reads them)."""
    api = ["monitoring.coreos.com/v1"]
    for metrics in ({"podMonitor": {"enabled": True}}, {"serviceMonitor": {"enabled": True}}):
        objs = template({"metrics": metrics}, api_versions=api)
        (pm,) = [o for o in by_kind(objs, "PodMonitor") if o["metadata"]["name"].endswith("-gateway")]
        (gw,) = [d for d in by_kind(objs, "Deployment") if d["metadata"]["name"].endswith("-gateway")]
        labels = gw["spec"]["template"]["metadata"]["labels"]
        assert all(labels.get(k) == v for k, v in pm["spec"]["selector"]["matchLabels"].items())
        ends = pm["spec"]["podMetricsEndpoints"]
        ports = {p["name"] for c in gw["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
        assert ends[0]["port"] in ports and ends[0]["path"] == "/metrics"
    assert not [o for o in by_kind(template({"metrics": {"podMonitor": {"enabled": True}}}), "PodMonitor")]
    off = template(
        {"metrics": {"podMonitor": {"enabled": True}}, "gateway": {"enabled": False}}, api_versions=api
    )
    assert [o["metadata"]["name"] for o in by_kind(off, "PodMonitor")] == ["toposerve"]
