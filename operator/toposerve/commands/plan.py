"""`toposerve plan`: the plan of each LLMDeployment in a file, as a table or JSON."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from toposerve.commands.common import load_config, load_deployments, load_inventory
from toposerve.planner.plan import DeploymentPlan, plan_deployment


def plans_json(plans: list[DeploymentPlan]) -> dict[str, Any]:
    return {"deployments": [p.model_dump(by_alias=True, mode="json") for p in plans]}


def table(plans: list[DeploymentPlan]) -> str:
    head = ("NAME", "POOL", "ENGINE", "GPU", "TP", "PP", "CP", "EP", "GPUS/REPLICA", "NODES", "REPLICAS",
            "KV TOKENS", "$/HOUR", "FITS")  # fmt: skip
    rows: list[tuple[str, ...]] = [head]
    notes: list[str] = []
    for d in plans:
        for p in d.pools:
            rows.append((
                d.name, p.name, d.engine, p.gpu_type or "-", str(p.tensor_parallel or "-"),
                str(p.pipeline_parallel or "-"), str(p.context_parallel or "-"), str(p.expert_parallel),
                str(p.gpus_per_replica or "-"), str(p.nodes_per_replica or "-"), str(p.replicas),
                str(p.kv_cache_tokens_per_replica or "-"), f"{p.cost_per_hour:.2f}", "yes" if p.fits else "NO",
            ))  # fmt: skip
            for r in p.alternatives:
                notes.append(f"  {d.name}/{p.name}: skipped {r.gpu_type}: {r.reason}")
            if p.spot_note:
                notes.append(f"  {d.name}/{p.name}: {p.spot_note}")
            if not p.fits and p.reason:
                notes.append(f"  {d.name}/{p.name}: {p.reason}")
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    if notes:
        lines += ["", "Why not the preferred GPU types:", *notes]
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    inventory = load_inventory(args.inventory, config)
    plans = [plan_deployment(d.name, d.spec, config, inventory) for d in load_deployments(args.filename)]
    if args.output == "json":
        json.dump(plans_json(plans), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(table(plans))
    return 0
