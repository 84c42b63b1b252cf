"""`toposerve cost`: what each LLMDeployment costs now, from the live cluster.

GPUs held (serving pods bound to nodes, priced by each node's capacity type), observed output
tokens/s from Prometheus (``rate(vllm:generation_tokens_total[window])``) and cost per million
output tokens, per pool and per deployment; the plan's $/hour (status.costPerHour) beside it.
`toposerve plan` keeps the offline estimate. The arithmetic is ``planner.cost``; this is the shell.

``--by tenant`` (docs/tenants.md): the gateway's ``toposerve_tenant_tokens_total{tenant, model,
kind}`` over the window, from Prometheus, each model priced at its deployment's observed $ per
output token (the same figure as the deployment table; the model's deployment comes from the
gateway's own model table, router/models.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from toposerve import API_GROUP, API_VERSION
from toposerve.api.config import OperatorConfig
from toposerve.api.errors import SpecError
from toposerve.api.manifest import parse_spec
from toposerve.commands.common import load_config
from toposerve.planner.cost import DeploymentCost, PoolCost
from toposerve.planner.inventory import inventory_from_nodes

LABEL_DEPLOYMENT = "toposerve.io/deployment"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--namespace", default=None, help="only this namespace (default: all)")
    p.add_argument("--kubeconfig", default=None, help="kubeconfig (default: KUBECONFIG, else in-cluster)")
    p.add_argument(
        "--config", default=os.environ.get("TOPOSERVE_CONFIG"), help="operator config YAML (prices)"
    )
    p.add_argument(
        "--prometheus-url",
        default=os.environ.get("TOPOSERVE_PROMETHEUS_URL"),
        help="Prometheus scraping the engines (default: the config's prometheusUrl); none: no throughput",
    )
    p.add_argument("--window", default=None, help="rate() window, e.g. 5m (default: the config's)")
    p.add_argument("-o", "--output", choices=["table", "json"], default="table")
    p.add_argument(
        "--by",
        choices=["deployment", "tenant"],
        default="deployment",
        help="tenant: tokens and cost per gateway tenant and model over --window (docs/tenants.md)",
    )


Lister = Callable[[str, str, str | None, str | None], list[dict[str, Any]]]


def collect(
    list_objects: Lister,
    config: OperatorConfig,
    rates: Callable[[str], Mapping[str, float] | None] | None,
    namespace: str | None,
) -> list[tuple[DeploymentCost, Mapping[str, Any]]]:
    """Each deployment's observed cost and its status; ``list_objects(apiVersion, kind, ns, selector)``."""
    from toposerve.controller.throughput import deployment_cost

    inventory = inventory_from_nodes(
        list_objects("v1", "Node", None, None), config.catalog(), config.label_schemes
    )
    out = []
    items = list_objects(f"{API_GROUP}/{API_VERSION}", "LLMDeployment", namespace, None)
    for d in sorted(items, key=lambda d: (d["metadata"].get("namespace", ""), d["metadata"]["name"])):
        ns, name = d["metadata"].get("namespace", ""), d["metadata"]["name"]
        try:
            spec = parse_spec(d.get("spec") or {})
        except SpecError:
            continue  # status says why; nothing of it is priced from an invalid spec
        pods = list_objects("v1", "Pod", ns, f"{LABEL_DEPLOYMENT}={name}")
        pools = [p["name"] for p in (d.get("status") or {}).get("pools") or []]
        cost = deployment_cost(ns, name, spec, pods, inventory, config, rates, pools)
        out.append((cost, d.get("status") or {}))
    return out


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(rows: Sequence[tuple[DeploymentCost, Mapping[str, Any]]]) -> str:
    head = ("NAMESPACE", "NAME", "POOL", "GPUS", "SPOT GPUS", "$/HOUR", "PLANNED $/HOUR", "OUTPUT TOK/S",
            "$/M OUTPUT TOK")  # fmt: skip
    lines: list[tuple[str, ...]] = [head]
    for cost, status in rows:
        planned = {p["name"]: p.get("costPerHour") for p in status.get("pools") or []}
        entries: list[tuple[PoolCost, float | None]] = [(p, planned.get(p.name)) for p in cost.pools]
        entries.append((cost.total, status.get("costPerHour")))
        for c, plan in entries:
            lines.append((
                cost.namespace, cost.name, c.name if c.name != "total" else "(total)", str(c.gpus),
                str(c.spot_gpus), f"{c.cost_per_hour:.2f}", _fmt(plan, ".2f"),
                _fmt(c.output_tokens_per_second, ".1f"), _fmt(c.cost_per_million_output_tokens, ".3f"),
            ))  # fmt: skip
    widths = [max(len(r[i]) for r in lines) for i in range(len(head))]
    return (
        "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in lines)
        + "\n"
    )


def _pool_json(c: PoolCost) -> dict[str, Any]:
    return {
        "gpus": c.gpus,
        "spotGpus": c.spot_gpus,
        "costPerHour": round(c.cost_per_hour, 4),
        "outputTokensPerSecond": c.output_tokens_per_second,
        "costPerMillionOutputTokens": c.cost_per_million_output_tokens,
    }


def as_json(rows: Sequence[tuple[DeploymentCost, Mapping[str, Any]]]) -> dict[str, Any]:
    return {
        "deployments": [
            {
                "namespace": cost.namespace,
                "name": cost.name,
                **_pool_json(cost.total),
                "plannedCostPerHour": status.get("costPerHour"),
                "pools": [{"name": p.name, **_pool_json(p)} for p in cost.pools],
            }
            for cost, status in rows
        ]
    }


TENANT_TOKENS = "toposerve_tenant_tokens_total"


def tenant_query(window: str) -> str:
    """Tokens per tenant, model and kind over the window, summed over gateway replicas."""
    return f"sum by (tenant, model, kind) (increase({TENANT_TOKENS}[{window}]))"


@dataclass(frozen=True)
class TenantCost:
    tenant: str
    model: str
    deployment: str  # namespace/name; "" when no deployment serves the name now
    prompt_tokens: float
    completion_tokens: float
    cost_per_million_output_tokens: float | None  # the deployment's observed figure

    @property
    def cost(self) -> float | None:
        if self.cost_per_million_output_tokens is None:
            return None
        return self.completion_tokens * self.cost_per_million_output_tokens / 1e6


def tenant_costs(
    result: Iterable[Mapping[str, Any]],
    deployments: Iterable[Mapping[str, Any]],
    rows: Sequence[tuple[DeploymentCost, Mapping[str, Any]]],
) -> list[TenantCost]:
    """Price each (tenant, model)'s tokens (an instant-vector result of `tenant_query`) at the
    observed $ per output token of the deployment the gateway routes that model to."""
    from toposerve.router.models import build

    table = build(deployments)
    price = {f"{c.namespace}/{c.name}": c.total.cost_per_million_output_tokens for c, _ in rows}
    tokens: dict[tuple[str, str], dict[str, float]] = {}
    for s in result:
        m = s.get("metric") or {}
        value = s.get("value") or []
        try:
            v = float(value[1])
        except (IndexError, TypeError, ValueError):
            continue
        if v != v or v in (float("inf"), float("-inf")) or not m.get("tenant"):
            continue
        kinds = tokens.setdefault((str(m["tenant"]), str(m.get("model", ""))), {})
        kinds[str(m.get("kind", ""))] = kinds.get(str(m.get("kind", "")), 0.0) + v
    out = []
    for (tenant, model), kinds in sorted(tokens.items()):
        route = table.resolve(model)
        key = route.key if route is not None else ""
        out.append(
            TenantCost(
                tenant, model, key, kinds.get("prompt", 0.0), kinds.get("completion", 0.0), price.get(key)
            )
        )
    return out


def tenant_table(costs: Sequence[TenantCost]) -> str:
    head = ("TENANT", "MODEL", "DEPLOYMENT", "PROMPT TOK", "COMPLETION TOK", "$/M OUTPUT TOK", "$")
    lines: list[tuple[str, ...]] = [head]
    totals: dict[str, float | None] = {}
    for c in costs:
        lines.append((c.tenant, c.model, c.deployment or "-", f"{c.prompt_tokens:.0f}",
                      f"{c.completion_tokens:.0f}", _fmt(c.cost_per_million_output_tokens, ".3f"),
                      _fmt(c.cost, ".4f")))  # fmt: skip
        t = totals.get(c.tenant, 0.0)
        totals[c.tenant] = None if t is None or c.cost is None else t + c.cost
    for tenant, total in sorted(totals.items()):
        lines.append((tenant, "(total)", "", "", "", "", _fmt(total, ".4f")))
    widths = [max(len(r[i]) for r in lines) for i in range(len(head))]
    return "".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() + "\n" for r in lines
    )


def tenant_json(costs: Sequence[TenantCost], window: str) -> dict[str, Any]:
    return {
        "window": window,
        "tenants": [
            {"tenant": c.tenant, "model": c.model, "deployment": c.deployment or None,
             "promptTokens": c.prompt_tokens, "completionTokens": c.completion_tokens,
             "costPerMillionOutputTokens": c.cost_per_million_output_tokens, "cost": c.cost}
            for c in costs
        ],
    }  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from toposerve.controller.kube import Kube, load_client
    from toposerve.controller.throughput import PrometheusThroughput

    config = load_config(args.config)
    url = args.prometheus_url or config.prometheus_url
    rates = PrometheusThroughput(url, args.window or config.throughput_window) if url else None
    kube = Kube(load_client(args.kubeconfig))

    def list_objects(
        api_version: str, kind: str, ns: str | None, selector: str | None
    ) -> list[dict[str, Any]]:
        return kube.list(api_version, kind, ns, selector=selector)

    rows = collect(list_objects, config, rates, args.namespace)
    if args.by == "tenant":
        return _run_by_tenant(args, url, args.window or config.throughput_window, rows, list_objects)
    if args.output == "json":
        json.dump(as_json(rows), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(table(rows))
        if rates is None:
            sys.stdout.write("(no Prometheus URL: throughput unknown; pass --prometheus-url)\n")
    return 0


def _run_by_tenant(
    args: argparse.Namespace,
    url: str | None,
    window: str,
    rows: Sequence[tuple[DeploymentCost, Mapping[str, Any]]],
    list_objects: Lister,
) -> int:
    if not url:
        sys.stderr.write(
            "toposerve cost --by tenant: needs --prometheus-url (or the config's prometheusUrl)\n"
        )
        return 2
    from prometheus_api_client import PrometheusConnect
    from urllib3.util.retry import Retry

    prom = PrometheusConnect(url=url, timeout=10, retry=Retry(total=0))
    try:
        result = prom.custom_query(tenant_query(window))
    except Exception as e:  # connection refused, timeout, non-200, bad JSON
        sys.stderr.write(f"toposerve cost --by tenant: Prometheus at {url} did not answer: {e}\n")
        return 1
    deployments = list_objects(f"{API_GROUP}/{API_VERSION}", "LLMDeployment", None, None)
    costs = tenant_costs(result, deployments, rows)
    if args.output == "json":
        json.dump(tenant_json(costs, window), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(tenant_table(costs))
    return 0
