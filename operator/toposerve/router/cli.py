"""`toposerve router` arguments and entry point.

Only the standard library at module level: `toposerve.cli` imports this eagerly to build its
parser, and `toposerve plan` must not pay for aiohttp or the Kubernetes client.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

STRATEGY_NAMES = (
    "round-robin",
    "least-request",
    "token-aware",
    "gpu-weighted",
    "prefix-aware",
    "session",
    "auto",
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--host",
        default=os.environ.get("TOPOSERVE_ROUTER_HOST", "127.0.0.1"),
        help="address to listen on: 0.0.0.0 (all IPv4), :: (all IPv6, and IPv4 where dual-stack), or one IP",
    )
    p.add_argument("--port", type=int, default=int(os.environ.get("TOPOSERVE_ROUTER_PORT", "8080")))
    p.add_argument(
        "--metrics-port",
        type=int,
        default=int(os.environ.get("TOPOSERVE_ROUTER_METRICS_PORT", "0")),
        help="also serve /metrics with per-backend series (labelled by pod address) on this port, "
        "on --host; 0 (default): off. The client port's /metrics never names backends",
    )
    p.add_argument(
        "--backends",
        default=os.environ.get("TOPOSERVE_ROUTER_BACKENDS", ""),
        help="static backends, comma-separated: http://host:port[#gpu=H100&pool=NAME&long-context=true]",
    )
    p.add_argument(
        "--strategy",
        default=os.environ.get("TOPOSERVE_ROUTER_STRATEGY", "auto"),
        choices=STRATEGY_NAMES,
        help="default strategy (a request may override it with the x-toposerve-strategy header)",
    )
    g = p.add_argument_group("EndpointSlice discovery (used when --backends is empty)")
    g.add_argument(
        "--namespace", default=os.environ.get("TOPOSERVE_NAMESPACE") or os.environ.get("POD_NAMESPACE")
    )
    g.add_argument(
        "--llmdeployment",
        default=os.environ.get("TOPOSERVE_LLMDEPLOYMENT"),
        help="watch the EndpointSlices labelled toposerve.io/deployment=NAME,app.kubernetes.io/component=engine",
    )
    g.add_argument(
        "--selector", default=os.environ.get("TOPOSERVE_ROUTER_SELECTOR"), help="label selector override"
    )
    g.add_argument("--endpoint-port-name", default="http", help="EndpointSlice port name of the engine")
    t = p.add_argument_group("tuning")
    t.add_argument(
        "--probe-interval", type=float, default=1.0, help="seconds between /health + /metrics probes"
    )
    t.add_argument(
        "--queue-timeout", type=float, default=5.0, help="seconds a request waits when all are saturated"
    )
    t.add_argument("--max-queue", type=int, default=1024)
    t.add_argument(
        "--hold-at-zero",
        type=float,
        default=0.0,
        metavar="S",
        help="with no replica ready, hold requests this long for one to appear (scale from zero; 0: 503 at once)",
    )
    t.add_argument("--max-held", type=int, default=256, help="requests held at once (more: 503)")
    t.add_argument(
        "--max-in-flight", type=int, default=512, help="per backend, before it counts as saturated"
    )
    t.add_argument(
        "--max-waiting", type=int, default=256, help="engine queue length that counts as saturated"
    )
    t.add_argument("--long-context-threshold", type=int, default=16384, help="prompt tokens")
    t.add_argument("--bounded-load-factor", type=float, default=1.25)
    t.add_argument(
        "--home-weight",
        type=float,
        default=None,
        help="weight of a conversation's rendezvous-hashed home backend (prefix-aware, auto): lets "
        "several router replicas agree on a conversation's backend; 0 (default) turns homes off, 2 is "
        "what docs/router.md measured",
    )
    t.add_argument(
        "--session-ttl", type=float, default=300.0, help="seconds (spec.routing.sessionTTLSeconds)"
    )
    t.add_argument(
        "--session-header", default="x-session-id", help="header naming the session (or the `user` field)"
    )
    t.add_argument(
        "--no-gpu-weighting",
        dest="gpu_weighting",
        action="store_false",
        help="treat every GPU type alike (spec.routing.gpuWeighting: false)",
    )
    t.add_argument("--default-max-tokens", type=int, default=256)
    t.add_argument(
        "--max-ejection-percent",
        type=float,
        default=50.0,
        help="most of the in-service backends passive ejection may take out at once (never the last)",
    )
    t.add_argument(
        "--expose-backend",
        action="store_true",
        default=os.environ.get("TOPOSERVE_ROUTER_EXPOSE_BACKEND", "").lower() in ("1", "true", "yes"),
        help="add x-toposerve-backend (the backend's address) to responses; for debugging and tests",
    )
    c = p.add_argument_group("client limits")
    c.add_argument("--max-connections", type=int, default=4096, help="open client connections; more get 503")
    c.add_argument(
        "--max-connections-per-client",
        type=int,
        default=1024,
        help="open connections from one source IP; more are answered 503 and closed (0: no cap; "
        "raise it behind a gateway or NAT that sends many clients from one address)",
    )
    c.add_argument(
        "--header-timeout", type=float, default=10.0, help="seconds to receive a request's headers"
    )
    c.add_argument("--body-timeout", type=float, default=60.0, help="seconds to receive a request body")
    c.add_argument(
        "--write-timeout",
        type=float,
        default=60.0,
        help="seconds a client may take no bytes of a response before it is cut off (0: never)",
    )
    c.add_argument(
        "--keepalive-timeout", type=float, default=75.0, help="seconds an idle client connection stays open"
    )
    c.add_argument(
        "--max-body-bytes", type=int, default=64 * 1024 * 1024, help="largest request body (413 beyond)"
    )
    c.add_argument(
        "--max-buffered-body-bytes",
        type=int,
        default=256 * 1024 * 1024,
        help="request-body bytes held at once over all requests (a body counts until its request "
        "ends); a body that would pass it gets 503 (0: no cap)",
    )
    t.add_argument(
        "--upstream-keepalive",
        type=float,
        default=4.0,
        help="seconds an idle connection to an engine is kept for reuse; keep it below the engine's "
        "own idle limit (vLLM: VLLM_HTTP_TIMEOUT_KEEP_ALIVE, 5 s)",
    )
    t.add_argument(
        "--gc-gen0-threshold",
        type=int,
        default=10_000,
        help="after start-up, freeze its objects out of Python's cyclic GC and collect the young "
        "generation every N allocations (Python: 700); 0 leaves the GC as Python sets it",
    )
    t.add_argument(
        "--drain-timeout",
        type=float,
        default=float(os.environ.get("TOPOSERVE_ROUTER_DRAIN_TIMEOUT", "120")),
        help="on SIGTERM: seconds in-flight requests get to finish (the pod's grace period must be "
        "longer; the operator renders it above the engines' --shutdown-timeout)",
    )
    t.add_argument(
        "--drain-quiet",
        type=float,
        default=5.0,
        help="on SIGTERM: stop once nothing is in flight and no request came for this long",
    )
    t.add_argument("--log-level", default=os.environ.get("TOPOSERVE_LOG_LEVEL", "INFO"))
    k = p.add_argument_group(
        "routing on the engines' KV-cache events (docs/router.md, 'Routing on KV-cache events')"
    )
    k.add_argument(
        "--kv-events",
        action="store_true",
        default=os.environ.get("TOPOSERVE_ROUTER_KV_EVENTS", "") in ("1", "true"),
        help="subscribe to every engine's KV-cache events (vLLM --kv-events-config) and score "
        "prefix-aware / auto on what the engines really cache; off: the approximate index only",
    )
    k.add_argument(
        "--kv-events-port",
        type=int,
        default=5557,
        help="the engines' event PUB port on each backend's host (a backend's kv-events= tag overrides)",
    )
    k.add_argument(
        "--kv-events-replay-port",
        type=int,
        default=5558,
        help="the engines' replay ROUTER port (kv-replay= overrides); 0: the engines serve no replay",
    )
    k.add_argument("--kv-events-topic", default="", help="the engines' topic (vLLM's default: empty)")
    k.add_argument(
        "--kv-events-block-size",
        type=int,
        default=0,
        help="the engines' KV block size in tokens; 0: read from their vllm:cache_config_info",
    )
    k.add_argument(
        "--kv-events-hash-seed",
        default=None,
        help="PYTHONHASHSEED, when the engines set it (it seeds vLLM's block hashes)",
    )
    k.add_argument(
        "--kv-events-max-blocks",
        type=int,
        default=1 << 18,
        help="most blocks indexed per engine (~128 bytes each)",
    )
    k.add_argument(
        "--kv-events-pending",
        type=float,
        default=10.0,
        help="seconds a prompt's blocks count as on their way to the engine it was routed to, until "
        "the engine's events say it stored them (0: score on stored blocks only)",
    )
    k.add_argument(
        "--kv-events-silence",
        type=float,
        default=5.0,
        help="seconds without an event that was due (new blocks were prefilled) before an engine's "
        "index counts as stale",
    )
    k.add_argument(
        "--kv-tokenize-timeout",
        type=float,
        default=0.5,
        help="seconds to wait for an engine's /tokenize before scoring on the approximation",
    )
    e = p.add_argument_group(
        "Endpoint Picker for Gateway API Inference Extension gateways (docs/gateway-api.md)"
    )
    e.add_argument(
        "--epp-port",
        type=int,
        default=int(os.environ.get("TOPOSERVE_ROUTER_EPP_PORT", "0")),
        help="also serve the Endpoint Picker Protocol (Envoy ext_proc, gRPC) on this port of --host: a "
        "GIE gateway asks it which engine gets each request (GIE's default: 9002); 0 (default): off",
    )
    e.add_argument(
        "--epp-health-port",
        type=int,
        default=int(os.environ.get("TOPOSERVE_ROUTER_EPP_HEALTH_PORT", "0")),
        help="gRPC health (liveness, readiness, the ext_proc service) on this port too (GIE's "
        "default: 9003); 0: on --epp-port only",
    )
    e.add_argument(
        "--epp-tls-cert",
        default="",
        metavar="FILE",
        help="serve ext_proc over TLS with this PEM certificate (with --epp-tls-key; a renewed "
        "pair is taken without a restart)",
    )
    e.add_argument("--epp-tls-key", default="", metavar="FILE", help="the PEM key of --epp-tls-cert")
    e.add_argument(
        "--epp-secure-serving",
        action="store_true",
        help="serve ext_proc over TLS with a self-signed certificate made at start (the reference "
        "picker's --secure-serving; needs the `cryptography` package); default: plaintext (h2c)",
    )
    a = p.add_argument_group("LoRA adapters (docs/router.md, 'LoRA adapters')")
    a.add_argument(
        "--adapter",
        dest="adapters",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="serve LoRA adapter NAME, read from PATH as the engines see it (repeatable); the router "
        "loads it on replicas at run time (vLLM /v1/load_lora_adapter, engines with "
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True)",
    )
    a.add_argument(
        "--adapter-slots",
        type=int,
        default=0,
        help="adapters kept registered per engine: its --max-cpu-loras; 0 (default): the max_lora "
        "the engine reports (vLLM's default for max_cpu_loras)",
    )
    a.add_argument(
        "--adapter-load-timeout", type=float, default=120.0, help="seconds one adapter load may take"
    )
    a.add_argument(
        "--adapter-refresh",
        type=float,
        default=5.0,
        help="seconds between reads of each engine's /v1/models (which adapters it holds)",
    )


def check_epp_ports(args: argparse.Namespace) -> str:
    """What is wrong with the Endpoint Picker's ports ("" when nothing)."""
    if not 0 <= args.epp_port < 65536 or not 0 <= args.epp_health_port < 65536:
        return "--epp-port and --epp-health-port must be 0 (off) or a port number"
    if args.epp_health_port and not args.epp_port:
        return "--epp-health-port needs --epp-port (the health it reports is the picker's)"
    if args.epp_port:
        taken = {"--port": args.port, "--metrics-port": args.metrics_port}
        for name, port in taken.items():
            if port and port in (args.epp_port, args.epp_health_port):
                return f"--epp-port and --epp-health-port must differ from {name} ({port})"
        if args.epp_port == args.epp_health_port:
            return "--epp-port and --epp-health-port must differ"
    return ""


def epp_tls(args: argparse.Namespace, prog: str = "toposerve router") -> Any:
    """The ext_proc port's TLS credentials from the flags (router/epp/tls.py, docs/gateway-api.md
    "TLS"), or None (plaintext); SystemExit with the reason when they cannot be had."""
    cert, key = getattr(args, "epp_tls_cert", ""), getattr(args, "epp_tls_key", "")
    secure = getattr(args, "epp_secure_serving", False)
    if not (cert or key or secure):
        return None
    if not args.epp_port:
        raise SystemExit(f"{prog}: error: --epp-tls-cert/--epp-tls-key/--epp-secure-serving need --epp-port")
    if secure and (cert or key):
        raise SystemExit(f"{prog}: error: --epp-secure-serving or --epp-tls-cert/--epp-tls-key, not both")
    from toposerve.router.epp import tls

    try:
        hosts = [h for h in (os.environ.get("POD_IP", ""), args.host) if h and h not in ("::", "0.0.0.0")]
        return tls.server_credentials(cert, key, hosts if secure else None)[0]
    except tls.TlsError as e:
        raise SystemExit(f"{prog}: error: {e}") from None


async def start_epp(router: Any, args: argparse.Namespace, registry: Any = None, tls: Any = None) -> Any:
    """The Endpoint Picker (router/epp/) on --epp-port, or None when off; ``tls``: server
    credentials (``epp_tls``), None: plaintext. grpcio is imported only here: a router without the
    picker does not load it."""
    if not args.epp_port:
        return None
    from toposerve.router.epp.server import EndpointPicker

    epp = EndpointPicker(router, registry)
    await epp.start(args.host, args.epp_port, args.epp_health_port or None, tls=tls)
    return epp


def config_from_args(args: argparse.Namespace) -> Any:
    """The RouterConfig the flags describe (also the gateway's member routers' template)."""
    from toposerve.router import strategies as st
    from toposerve.router.kvindex import KVEventsOptions
    from toposerve.router.lora import Options as AdapterOptions
    from toposerve.router.proxy import RouterConfig

    return RouterConfig(
        strategy=args.strategy,
        routing=st.Config(
            bounded_load_factor=args.bounded_load_factor,
            w_home=st.Config().w_home if args.home_weight is None else max(args.home_weight, 0.0),
            long_context_threshold=args.long_context_threshold,
            max_in_flight=args.max_in_flight,
            max_waiting=args.max_waiting,
            session_ttl_s=args.session_ttl,
        ),
        default_max_tokens=args.default_max_tokens,
        session_header=args.session_header.lower(),
        gpu_weighting=args.gpu_weighting,
        probe_interval_s=args.probe_interval,
        queue_timeout_s=args.queue_timeout,
        max_queue=args.max_queue,
        hold_at_zero_s=args.hold_at_zero,
        max_held=args.max_held,
        max_ejection_percent=args.max_ejection_percent,
        expose_backend=args.expose_backend,
        max_connections=args.max_connections,
        max_connections_per_client=args.max_connections_per_client,
        max_buffered_body_bytes=args.max_buffered_body_bytes,
        header_timeout_s=args.header_timeout,
        body_timeout_s=args.body_timeout,
        keepalive_timeout_s=args.keepalive_timeout,
        max_body_bytes=args.max_body_bytes,
        write_timeout_s=args.write_timeout,
        upstream_keepalive_s=args.upstream_keepalive,
        kv_events=KVEventsOptions(
            enabled=args.kv_events,
            port=args.kv_events_port,
            replay_port=args.kv_events_replay_port,
            topic=args.kv_events_topic,
            block_size=max(args.kv_events_block_size, 0),
            hash_seed=args.kv_events_hash_seed,
            max_blocks=max(args.kv_events_max_blocks, 1),
            silence_s=args.kv_events_silence,
            pending_s=args.kv_events_pending,
            tokenize_timeout_s=args.kv_tokenize_timeout,
        ),
        adapters=AdapterOptions(
            slots=max(args.adapter_slots, 0),
            load_timeout_s=args.adapter_load_timeout,
            refresh_s=args.adapter_refresh,
        ),
    )


def run(args: argparse.Namespace) -> int:
    import asyncio
    import logging
    import signal

    from toposerve.router.endpoints import engine_selector, parse_backends
    from toposerve.router.lora import parse_adapter_flags
    from toposerve.router.proxy import Router, serve, serve_metrics, tune_gc

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        backends = parse_backends(args.backends)
        adapters = parse_adapter_flags(args.adapters)
    except ValueError as e:
        raise SystemExit(f"toposerve router: error: {e}") from None
    if args.write_timeout < 0:
        raise SystemExit("toposerve router: error: --write-timeout must be 0 (off) or more seconds")
    if args.upstream_keepalive < 0:
        raise SystemExit("toposerve router: error: --upstream-keepalive must be 0 (no reuse) or more seconds")
    if args.drain_timeout < 0 or args.drain_quiet < 0:
        raise SystemExit(
            "toposerve router: error: --drain-timeout and --drain-quiet must be 0 or more seconds"
        )
    if min(args.max_connections_per_client, args.max_buffered_body_bytes, args.metrics_port) < 0:
        raise SystemExit(
            "toposerve router: error: --max-connections-per-client, --max-buffered-body-bytes and "
            "--metrics-port must be 0 (off) or more"
        )
    if args.adapter_slots < 0 or args.adapter_load_timeout <= 0 or args.adapter_refresh <= 0:
        raise SystemExit(
            "toposerve router: error: --adapter-slots must be 0 (the engines' max_lora) or more; "
            "--adapter-load-timeout and --adapter-refresh more than 0 seconds"
        )
    if args.gc_gen0_threshold < 0:
        raise SystemExit("toposerve router: error: --gc-gen0-threshold must be 0 (off) or more")
    epp_error = check_epp_ports(args)
    if epp_error:
        raise SystemExit(f"toposerve router: error: {epp_error}")
    credentials = epp_tls(args)
    selector = args.selector or (engine_selector(args.llmdeployment) if args.llmdeployment else None)
    if not backends and not (selector and args.namespace):
        raise SystemExit(
            "toposerve router: error: give --backends, or --namespace with --llmdeployment "
            "(or --selector) for EndpointSlice discovery"
        )
    cfg = config_from_args(args)

    async def main() -> None:
        router = Router(backends, cfg, discovering=not backends)
        if adapters:
            router.set_adapters(adapters)
        runner = await serve(router, args.host, args.port)
        metrics_runner = (
            await serve_metrics(router, args.host, args.metrics_port) if args.metrics_port else None
        )
        epp = await start_epp(router, args, tls=credentials)
        watcher = None
        if not backends:
            from toposerve.router.discovery import SliceWatcher

            watcher = SliceWatcher(
                args.namespace,
                selector or "",
                router.reconcile,
                asyncio.get_running_loop(),
                args.endpoint_port_name,
            )
            watcher.start()
        tune_gc(args.gc_gen0_threshold)  # after start-up (discovery's imports too): it stays for good
        logging.getLogger("toposerve.router").info(
            "listening on %s port %d, strategy %s, %s",
            args.host,
            args.port,
            cfg.strategy,
            f"{len(backends)} static backends" if backends else f"discovery {args.namespace}/{selector}",
        )
        if epp is not None:
            logging.getLogger("toposerve.router").info(
                "endpoint picker (ext_proc) on port %d, gRPC health on %s",
                args.epp_port,
                f"ports {args.epp_port} and {args.epp_health_port}"
                if args.epp_health_port
                else "the same port",
            )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        # Drain: unready, `Connection: close` on every answer, in-flight streams finish (the
        # engines behind keep being discovered, for retries); then close what is left.
        log = logging.getLogger("toposerve.router")
        router.begin_drain()
        log.info("SIGTERM: draining (%d in flight, up to %.0fs)", router.active, args.drain_timeout)
        if not await router.drained(min(args.drain_quiet, args.drain_timeout), args.drain_timeout):
            log.warning("drain timeout: %d requests still in flight are cut", router.active)
        if watcher is not None:
            watcher.stop()
        await runner.cleanup()  # stops listening, closes idle connections, cancels what is left
        if epp is not None:
            await epp.stop()
        if metrics_runner is not None:
            await metrics_runner.cleanup()

    try:  # a dependency (less CPU per relayed chunk); plain asyncio where it cannot be installed
        import uvloop
    except ImportError:
        asyncio.run(main())
    else:
        uvloop.run(main())
    return 0
