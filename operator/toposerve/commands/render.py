"""`toposerve render`: every child object of each LLMDeployment as multi-document YAML (like helm template).

``--kubernetes-version X.Y`` checks the objects against that API server version as the operator
does (api/kubeversion.py) and refuses, naming the field, what it would not serve: an ``image``
model cache before 1.35, multi-node group co-location before 1.31, ...

``--inventory nodes.yaml`` (``kubectl get nodes -o yaml``) plans against those nodes and renders the
fabric they offer to multi-node replicas (render/fabric.py).

The output is what the operator applies: the serving objects, PodMonitors (offline only with
``prometheusOperator: on``) and, in hpa / keda autoscaling modes, the HorizontalPodAutoscaler or
KEDA ScaledObject, and with ``spec.routing.inferencePool`` (or the config's ``inferencePool``) the
Gateway API Inference Extension's InferencePool; what stops one (keda without ``prometheusUrl``, a
gateway-mode pool outside ``gatewayNamespace``) is said on stderr.
"""

from __future__ import annotations

import argparse
import sys

import yaml

from toposerve.api import kubeversion
from toposerve.api.errors import SpecError
from toposerve.commands.common import load_config, load_deployments, load_inventory
from toposerve.planner.plan import plan_deployment
from toposerve.render.autoscaling import render_autoscaler
from toposerve.render.inferencepool import render_inference_pool
from toposerve.render.monitoring import render_monitors
from toposerve.render.objects import render_deployment


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    inventory = load_inventory(args.inventory, config)
    server: kubeversion.Version | None = None
    if getattr(args, "kubernetes_version", None):
        try:
            server = kubeversion.parse_version(args.kubernetes_version)
        except ValueError as e:
            raise SpecError("--kubernetes-version", str(e)) from None
    docs = []
    for d in load_deployments(args.filename):
        plan = plan_deployment(d.name, d.spec, config, inventory)
        if not plan.fits:
            reasons = "; ".join(p.reason or "" for p in plan.pools if not p.fits)
            path = "spec.pools" if d.spec.pools else "spec.placement.gpuTypes"
            raise SpecError(f"{d.name}: {path}", reasons)
        namespace = d.namespace or args.namespace or "default"
        # With --inventory, a multi-node replica's pods ask for the fabric those nodes offer (EFA,
        # RDMA, a GB200 ComputeDomain; render/fabric.py), as the operator renders them; without, none.
        objs = render_deployment(d.name, namespace, d.spec, plan, config, inventory=inventory)
        # Offline there is no API discovery: PodMonitors only with prometheusOperator: on.
        objs += render_monitors(d.name, namespace, d.spec, config)
        # hpa / keda modes: the HPA or ScaledObject the operator applies (it owns spec.replicas).
        autoscaler, notices = render_autoscaler(d.name, namespace, d.spec, config)
        objs += autoscaler
        # spec.routing.inferencePool (or the config's default): the Gateway API Inference Extension's
        # InferencePool (offline, the CRD is taken to be installed); why there is none is said.
        pool, pool_notices = render_inference_pool(d.name, namespace, d.spec, config)
        objs += pool
        notices = [*notices, *pool_notices]
        for reason, message in notices:  # e.g. keda without prometheusUrl: said, not silently dropped
            print(f"toposerve render: {d.name}: {reason}: {message}", file=sys.stderr)
        if server is not None:
            text = f"{args.kubernetes_version} (--kubernetes-version)"
            found = kubeversion.missing(
                server, d.spec, plan, objs, config.enabled_feature_gates, server_text=text
            )
            if found:
                raise SpecError(d.name, "; ".join(found))
        docs += objs
    sys.stdout.write(yaml.safe_dump_all(docs, sort_keys=False, width=120))
    return 0
