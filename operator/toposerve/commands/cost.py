"""`toposerve cost`: what each LLMDeployment costs now, from the live cluster.

GPUs held (serving pods bound to nodes, priced by each node's capacity type), observed output
tokens/s from Prometheus (``rate(vllm:generation_tokens_total[window])``) and cost per million
output tokens, per pool and per deployment; the plan's $/hour (status.costPerHour) beside it.
`toposerve plan` keeps the offline estimate. The arithmetic is ``planner.cost``; this is the shell.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
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
    if args.output == "json":
        json.dump(as_json(rows), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(table(rows))
        if rates is None:
            sys.stdout.write("(no Prometheus URL: throughput unknown; pass --prometheus-url)\n")
    return 0
