"""`toposerve gateway`: the router's gateway mode (one endpoint for every LLMDeployment in scope).

Takes the router's flags (they are the member routers' defaults: strategy, timeouts, front-door
limits, hold at zero) plus `--watch-namespace`. Only the standard library at module level, as
for `toposerve router`.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from toposerve.router import cli as router_cli


def add_arguments(p: argparse.ArgumentParser) -> None:
    router_cli.add_arguments(p)
    p.add_argument(
        "--watch-namespace",
        default=os.environ.get("TOPOSERVE_GATEWAY_NAMESPACE", ""),
        help="route the LLMDeployments of this namespace only (default: every namespace)",
    )
    p.add_argument(
        "--static-config",
        default="",
        metavar="FILE",
        help="no Kubernetes: a YAML file with `deployments` (LLMDeployment objects) and `backends` "
        "({namespace/name: [http://IP:PORT, ...]}), for benchmarks and local runs",
    )
    add_tenant_arguments(p)


def add_tenant_arguments(p: argparse.ArgumentParser) -> None:
    """Tenants, API keys, budgets and flow control (docs/tenants.md)."""
    g = p.add_argument_group("tenants (docs/tenants.md)")
    g.add_argument(
        "--tenants-file",
        default="",
        metavar="FILE",
        help="YAML `tenants: {name: {models, priority, weight, budgets, keySha256}}`; re-read when it "
        "changes (a bad version is logged and the previous one stays)",
    )
    g.add_argument(
        "--tenant-secrets",
        action="store_true",
        help="watch API-key Secrets labelled toposerve.io/tenant=<name> (data key api-keys, one key "
        "a line) in --tenants-namespace; keys rotate without a restart",
    )
    g.add_argument(
        "--tenants-namespace",
        default=os.environ.get("POD_NAMESPACE", ""),
        help="the namespace of the key Secrets (default: $POD_NAMESPACE, the gateway's own)",
    )
    g.add_argument(
        "--require-api-key",
        action="store_true",
        help="401 without a known key (default: keys optional; keyless requests are tenant `anonymous`)",
    )
    g.add_argument(
        "--flow-max-wait",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="longest wait in the flow-control queue while replicas are saturated, then 429 (default 30)",
    )
    g.add_argument(
        "--flow-max-bytes",
        type=int,
        default=64 * 1024 * 1024,
        metavar="BYTES",
        help="request bodies waiting per deployment; past it the lowest band is shed (default 64 MiB)",
    )
    g.add_argument(
        "--peer-port",
        type=int,
        default=0,
        metavar="PORT",
        help="share tenant budgets with the other gateway replicas: serve this replica's usage on "
        "this internal port and fetch theirs (default 0: off, each replica enforces whole budgets)",
    )
    g.add_argument(
        "--peer-service",
        default="",
        metavar="NAME",
        help="the gateway's Service in --tenants-namespace: its EndpointSlices list the replicas "
        "(list + watch on endpointslices there)",
    )
    g.add_argument(
        "--peers",
        default="",
        metavar="HOST:PORT,...",
        help="the other replicas' peer addresses, without Kubernetes (benchmarks, local runs)",
    )
    g.add_argument(
        "--peer-interval",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="how often usage is exchanged; a report lives 3 intervals (default 1)",
    )


def static_config(path: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(LLMDeployments, engine EndpointSlices) from a --static-config file: one slice per backend,
    shaped as the API serves them (so the same rules as with watches apply)."""
    from urllib.parse import urlsplit

    import yaml

    with open(path) as f:
        doc = yaml.safe_load(f) or {}
    objs = list(doc.get("deployments") or [])
    slices: list[dict[str, Any]] = []
    for key, urls in (doc.get("backends") or {}).items():
        ns, name = str(key).split("/", 1)
        for i, url in enumerate(urls):
            u = urlsplit(url)
            slices.append({
                "metadata": {"name": f"{name}-{i}", "namespace": ns,
                             "labels": {"toposerve.io/deployment": name, "app.kubernetes.io/component": "engine"}},
                "addressType": "IPv6" if ":" in (u.hostname or "") else "IPv4",
                "ports": [{"name": "http", "port": u.port or 80}],
                "endpoints": [{"addresses": [u.hostname], "conditions": {"ready": True}}],
            })  # fmt: skip
    return objs, slices


def check_peer_args(args: argparse.Namespace) -> str:
    """An error message for inconsistent budget-sharing flags, or ""."""
    if not 0 <= args.peer_port < 65536:
        return "--peer-port must be 0 (off) or a port number"
    taken = (
        args.port,
        getattr(args, "epp_port", 0),
        getattr(args, "epp_health_port", 0),
        getattr(args, "metrics_port", 0),
    )
    if args.peer_port and args.peer_port in taken:
        return "--peer-port must differ from --port, --epp-port, --epp-health-port and --metrics-port"
    if (args.peer_service or args.peers) and not args.peer_port:
        return "--peer-service and --peers need --peer-port"
    if args.peer_service and not args.tenants_namespace:
        return "--peer-service needs --tenants-namespace (or $POD_NAMESPACE): the Service's namespace"
    if not args.peer_interval > 0:
        return "--peer-interval must be more than 0 seconds"
    return ""


async def start_peer_sync(gw: Any, args: argparse.Namespace, loop: Any, ws: list[Any]) -> Any:
    """Budgets shared across replicas (docs/tenants.md), or None when --peer-port is 0."""
    if not args.peer_port:
        return None
    from toposerve.router.budget_share import SharedBudgets
    from toposerve.router.peer_sync import PeerSync

    shared = SharedBudgets(ttl_s=3 * args.peer_interval, interval_s=args.peer_interval)
    gw.tenants.admission.shared = shared
    sync = PeerSync(shared, args.peer_port, os.environ.get("POD_IP", ""), gw.gw_registry)
    gw.tenants.sharing = sync
    sync.set_static(args.peers.split(",") if args.peers else [])
    if args.peer_service:
        ws.append(sync.watch(args.tenants_namespace, args.peer_service, loop))
    await sync.start(args.host)
    return sync


async def start_epp(gw: Any, args: argparse.Namespace, credentials: Any) -> Any:
    """The Endpoint Picker on --epp-port, with the gateway's registry (and TLS when asked)."""
    return await router_cli.start_epp(gw, args, gw.gw_registry, credentials)


def run(args: argparse.Namespace) -> int:
    import asyncio
    import logging
    import signal

    from toposerve.router import tenant_watch
    from toposerve.router.gateway import Gateway
    from toposerve.router.gateway_watch import watches
    from toposerve.router.proxy import serve, tune_gc

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.drain_timeout < 0 or args.drain_quiet < 0:
        raise SystemExit(
            "toposerve gateway: error: --drain-timeout and --drain-quiet must be 0 or more seconds"
        )
    epp_error = router_cli.check_epp_ports(args)
    if epp_error:
        raise SystemExit(f"toposerve gateway: error: {epp_error}")
    peer_error = check_peer_args(args)
    if peer_error:
        raise SystemExit(f"toposerve gateway: error: {peer_error}")
    credentials = router_cli.epp_tls(args, "toposerve gateway")
    cfg = router_cli.config_from_args(args)
    scope = args.watch_namespace or None
    try:
        policies = tenant_watch.check_args(args)
    except ValueError as e:
        raise SystemExit(f"toposerve gateway: error: {e}") from None

    async def main() -> None:
        log = logging.getLogger("toposerve.router.gateway")
        gw = Gateway(cfg, scope)
        runner = await serve(gw, args.host, args.port)
        epp = await start_epp(gw, args, credentials)  # `model` picks the member
        ws = [] if args.static_config else watches(gw, asyncio.get_running_loop())
        ws += tenant_watch.start(gw, args, policies, asyncio.get_running_loop())
        sharing = await start_peer_sync(gw, args, asyncio.get_running_loop(), ws)
        if args.static_config:
            objs, slices = static_config(args.static_config)
            gw.deployments_listed(objs)
            gw.slices_listed(slices)
        for w in ws:
            w.start()
        tune_gc(args.gc_gen0_threshold)
        log.info("gateway listening on %s port %d, scope %s", args.host, args.port, scope or "all namespaces")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        gw.begin_drain()
        log.info("SIGTERM: draining (%d in flight, up to %.0fs)", gw.active, args.drain_timeout)
        if not await gw.drained(min(args.drain_quiet, args.drain_timeout), args.drain_timeout):
            log.warning("drain timeout: %d requests still in flight are cut", gw.active)
        for w in ws:
            w.stop()
        await runner.cleanup()
        if sharing is not None:
            await sharing.stop()
        if epp is not None:
            await epp.stop()

    try:
        import uvloop
    except ImportError:
        asyncio.run(main())
    else:
        uvloop.run(main())
    return 0
