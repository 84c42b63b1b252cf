"""`toposerve render`: every child object of each LLMDeployment as multi-document YAML (like helm template)."""

from __future__ import annotations

import argparse
import sys

import yaml

from toposerve.api.errors import SpecError
from toposerve.commands.common import load_config, load_deployments, load_inventory
from toposerve.planner.plan import plan_deployment
from toposerve.render.objects import render_deployment


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    inventory = load_inventory(args.inventory, config)
    docs = []
    for d in load_deployments(args.filename):
        plan = plan_deployment(d.name, d.spec, config, inventory)
        if not plan.fits:
            reasons = "; ".join(p.reason or "" for p in plan.pools if not p.fits)
            path = "spec.pools" if d.spec.pools else "spec.placement.gpuTypes"
            raise SpecError(f"{d.name}: {path}", reasons)
        namespace = d.namespace or args.namespace or "default"
        docs += render_deployment(d.name, namespace, d.spec, plan, config)
    sys.stdout.write(yaml.safe_dump_all(docs, sort_keys=False, width=120))
    return 0
