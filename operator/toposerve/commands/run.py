"""`toposerve run`: parse flags, build the context, hand over to the kopf operator."""

from __future__ import annotations

import argparse
import os

from toposerve.commands.common import load_config


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-n", "--namespace", action="append", default=[], help="watch this namespace (repeat); default: all"
    )
    p.add_argument("--config", default=os.environ.get("TOPOSERVE_CONFIG"), help="operator config YAML")
    p.add_argument("--kubeconfig", default=None, help="kubeconfig (default: in-cluster, else KUBECONFIG)")
    p.add_argument("--workers", type=int, default=4, help="concurrent reconciles")
    p.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        default=os.environ.get("TOPOSERVE_LOG_LEVEL", "info"),
        help="log level of the operator's JSON log lines (kopf's included)",
    )
    p.add_argument("--metrics-port", type=int, default=8080, help="Prometheus metrics port (0: off)")
    p.add_argument(
        "--metrics-address",
        default="0.0.0.0",
        help="address of the metrics port (the chart passes the pod IP, as for --liveness)",
    )
    p.add_argument(
        "--liveness", default=None, help="kopf liveness endpoint, e.g. http://0.0.0.0:8081/healthz"
    )
    p.add_argument("--fallback-after", type=float, default=60.0,
                   help="seconds a replica may stay unschedulable before it moves to the next GPU type")  # fmt: skip
    p.add_argument("--resync", type=float, default=300.0,
                   help="seconds between full resyncs (a safety net: watch events drive reconciles)")  # fmt: skip
    p.add_argument("--return-cooldown", type=float, default=120.0,
                   help="seconds after a GPU fallback before replicas may move back")  # fmt: skip
    p.add_argument(
        "--leader-elect", action="store_true", help="run several replicas; one holds a Lease and acts"
    )
    p.add_argument("--lease-namespace", default=os.environ.get("POD_NAMESPACE", "default"))


def run(args: argparse.Namespace) -> int:
    from toposerve.controller import operator
    from toposerve.controller.kube import Kube, load_client
    from toposerve.controller.reconcile import Context, Settings

    config = load_config(args.config)
    if args.kubeconfig:
        os.environ["KUBECONFIG"] = args.kubeconfig
    ctx = Context(
        kube=Kube(load_client(args.kubeconfig)),
        config=config,
        settings=Settings(
            fallback_after_seconds=args.fallback_after,
            resync_seconds=args.resync,
            return_cooldown_seconds=args.return_cooldown,
        ),
    )
    if config.prometheus_url:
        from toposerve.controller.throughput import PrometheusThroughput

        ctx.throughput = PrometheusThroughput(config.prometheus_url, config.throughput_window)
    rt = operator.Runtime(
        ctx=ctx,
        namespaces=args.namespace,
        workers=args.workers,
        leader_elect=args.leader_elect,
        lease_namespace=args.lease_namespace,
    )
    if args.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(args.metrics_port, addr=args.metrics_address)
    operator.run(rt, None, args.liveness, log_level=args.log_level)
    return 0
