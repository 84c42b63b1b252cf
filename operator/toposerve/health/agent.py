"""`toposerve health-agent`: sample NVML, decide (pure), export metrics, publish the node verdict.

Runs as a DaemonSet on GPU nodes (charts/toposerve ``healthAgent``). Each sample: read every GPU
(``health.nvml``), fold it into the debounced state (``health.verdict.step``), swap it into the
metrics collector, and bring the Node's ``GPUHealthy`` condition and taint in line. A failed API
call is logged and retried on the next sample; nothing NVML or the API server says stops the loop.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
import threading
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from toposerve.health.verdict import HealthState, Thresholds, step, summary

log = logging.getLogger("toposerve.health")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--node-name", default=os.environ.get("NODE_NAME"),
                   help="Node to publish the GPUHealthy condition and taint on (default: $NODE_NAME; none: only metrics)")  # fmt: skip
    p.add_argument("--interval", type=float, default=10.0, help="seconds between samples")
    p.add_argument("--config", default=os.environ.get("TOPOSERVE_HEALTH_CONFIG"),
                   help="YAML with thresholds (maxTemperatureC, maxMemoryUsedFraction, unhealthyAfter, ...)")  # fmt: skip
    p.add_argument(
        "--metrics-port", type=int, default=9401, help="Prometheus port (0: off); dcgm-exporter uses 9400"
    )
    p.add_argument("--metrics-address", default="0.0.0.0")
    p.add_argument("--no-taint", action="store_true", help="publish the condition only, never taint the node")
    p.add_argument(
        "--heartbeat", type=float, default=300.0, help="rewrite an unchanged condition this often (s)"
    )
    p.add_argument("--kubeconfig", default=None)
    p.add_argument(
        "--once", action="store_true", help="sample once, print readings and verdicts as JSON, exit"
    )


def load_thresholds(path: str | None) -> Thresholds:
    if not path:
        return Thresholds()
    return Thresholds.model_validate(yaml.safe_load(Path(path).read_text()) or {})


def run(args: argparse.Namespace) -> int:
    from toposerve.health.nvml import NVMLReader

    thresholds = load_thresholds(args.config)
    reader = NVMLReader()
    if args.once:
        reading = reader.sample()
        result = step(HealthState(), reading, thresholds)
        reader.close()
        out: dict[str, Any] = {
            "initError": reading.init_error,
            "initErrorText": reading.init_error_text,
            "gpus": [asdict(g) for g in reading.gpus],
            "verdicts": [asdict(v) for v in result.verdicts],
            "problems": list(result.state.reasons),
        }
        json.dump(out, sys.stdout, indent=2, default=list)
        sys.stdout.write("\n")
        return 0
    return loop(args, reader, thresholds)


def loop(args: argparse.Namespace, reader: Any, thresholds: Thresholds) -> int:
    from prometheus_client import CollectorRegistry, start_http_server

    from toposerve.health.exporter import GPUCollector
    from toposerve.health.node import plan_node_update, publish, read_node

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    hostname = args.node_name or socket.gethostname()
    collector = GPUCollector(hostname)
    if args.metrics_port:
        registry = CollectorRegistry()
        registry.register(collector)
        start_http_server(args.metrics_port, addr=args.metrics_address, registry=registry)
    kube = None
    if args.node_name:
        from toposerve.controller.kube import Kube, load_client

        kube = Kube(load_client(args.kubeconfig), timeout=10.0)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    state = HealthState()
    while not stop.is_set():
        reading = reader.sample()
        result = step(state, reading, thresholds)
        state = result.state
        collector.update(reading, result.verdicts, state)
        if result.changed:
            log.warning(
                "node GPU verdict: %s (%s)",
                "healthy" if state.healthy else "UNHEALTHY",
                "; ".join(state.reasons),
            )
        if kube is not None:
            try:
                node = read_node(kube, args.node_name)
                reason, message = summary(state, len(reading.gpus))
                update = plan_node_update(
                    node,
                    state.healthy,
                    reason,
                    message,
                    datetime.now(UTC),
                    args.heartbeat,
                    taint=not args.no_taint,
                )
                publish(kube, args.node_name, update)
            except Exception as e:  # API server down, 409 on the taint list: next sample retries
                log.warning("publishing the GPU verdict on node %s failed: %s", args.node_name, e)
        stop.wait(args.interval)
    reader.close()
    return 0
