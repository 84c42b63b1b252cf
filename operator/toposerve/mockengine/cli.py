"""`toposerve mock-engine`: flags and entry point of the CPU mock of the vLLM OpenAI server.

Only the standard library is imported at module level: ``toposerve.cli`` imports this module to
build its parser, and ``toposerve plan`` must not pay for aiohttp. Flag names follow vLLM's
where vLLM has one, so the renderer can pass the same arguments to either engine.
"""

from __future__ import annotations

import argparse
import os
from typing import Any


def _rate(v: str) -> float:
    f = float(v)
    if not 0.0 <= f <= 1.0:
        raise argparse.ArgumentTypeError(f"must be within [0, 1], got {v}")
    return f


def _positive_int(v: str) -> int:
    i = int(v)
    if i < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return i


def _non_negative(v: str) -> float:
    f = float(v)
    if f < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return f


def _non_negative_int(v: str) -> int:
    i = int(v)
    if i < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return i


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server")
    g.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: 127.0.0.1; pods pass their IP or 0.0.0.0)",
    )
    g.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 picks a free one)")
    g.add_argument(
        "--model", default="mock-model", help="model name (served under it unless --served-model-name)"
    )
    g.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        metavar="NAME",
        help="names the API accepts (first one labels the metrics)",
    )
    g.add_argument(
        "--shutdown-timeout",
        type=_non_negative_int,
        default=0,
        metavar="S",
        help="as vLLM 0.33.0: on SIGTERM, 0 aborts in-flight requests (finish_reason abort), "
        "S > 0 lets them finish for up to S seconds (default: 0, vLLM's)",
    )
    g.add_argument(
        "--max-waiting",
        type=_positive_int,
        default=4096,
        help="waiting-queue bound; beyond it requests get 503 (default: 4096)",
    )
    g.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    g.add_argument(
        "--enable-admin",
        action="store_true",
        help="serve /admin/* and /reset_prefix_cache (off by default, like vLLM's dev-mode endpoints)",
    )
    g.add_argument(
        "--admin-token",
        default=os.environ.get("TOPOSERVE_MOCK_ADMIN_TOKEN") or None,
        help="enables the admin endpoints behind Authorization: Bearer TOKEN "
        "(default: $TOPOSERVE_MOCK_ADMIN_TOKEN)",
    )

    e = p.add_argument_group("engine (vLLM flag names)")
    e.add_argument(
        "--gpu-type",
        default="H100",
        help="GPU type from the catalog; scales speed and KV memory (default: H100)",
    )
    e.add_argument("--tensor-parallel-size", "-tp", type=_positive_int, default=1)
    e.add_argument(
        "--max-num-seqs", type=_positive_int, default=256, help="running-batch limit (default: 256)"
    )
    e.add_argument(
        "--max-num-batched-tokens",
        type=_positive_int,
        default=8192,
        help="token budget per step, chunked prefill (default: 8192)",
    )
    e.add_argument(
        "--num-gpu-blocks",
        "--num-gpu-blocks-override",
        dest="num_gpu_blocks",
        type=_positive_int,
        default=None,
        help="KV-cache blocks (default: derived from GPU memory, 8B bf16 model)",
    )
    e.add_argument("--block-size", type=_positive_int, default=16, help="tokens per KV block (default: 16)")
    e.add_argument("--max-model-len", type=_positive_int, default=8192, help="context limit (default: 8192)")
    e.add_argument(
        "--no-enable-prefix-caching",
        dest="enable_prefix_caching",
        action="store_false",
        help="disable automatic prefix caching",
    )
    e.add_argument("--enable-prefix-caching", dest="enable_prefix_caching", action="store_true", default=True)
    e.add_argument(
        "--kv-events-config",
        type=_kv_events_config,
        default=None,
        help='vLLM\'s KV-cache events, as JSON: {"enable_kv_cache_events": true, "publisher": "zmq", '
        '"endpoint": "tcp://*:5557", "replay_endpoint": "tcp://*:5558", "topic": "..."} '
        "(published in vLLM 0.33.0's wire format; kvevents/)",
    )
    e.add_argument(
        "--enable-deprecated-gpu-cache-metric",
        action="store_true",
        help="also export vllm:gpu_cache_usage_perc for older routers",
    )
    e.add_argument("--seed", type=int, default=0, help="seed for generated text and fault draws (default: 0)")
    e.add_argument(
        "--output-len-range",
        nargs=2,
        type=_positive_int,
        default=[16, 256],
        metavar=("MIN", "MAX"),
        help="output length when a request sets no max_tokens (default: 16 256)",
    )

    lo = p.add_argument_group("LoRA adapters (vLLM 0.33.0 flag names; the load times are the mock's)")
    lo.add_argument("--enable-lora", action="store_true", help="serve LoRA adapters (default: off)")
    lo.add_argument(
        "--max-loras",
        type=_positive_int,
        default=1,
        help="GPU adapter slots = distinct adapters one batch may use (default: 1, vLLM's)",
    )
    lo.add_argument(
        "--max-lora-rank",
        type=int,
        default=16,
        choices=[1, 8, 16, 32, 64, 128, 256, 320, 512],
        help="largest adapter rank accepted (default: 16, vLLM's)",
    )
    lo.add_argument(
        "--max-cpu-loras",
        type=int,
        default=None,
        help="adapters kept in CPU memory, >= --max-loras (default: --max-loras, vLLM's)",
    )
    lo.add_argument(
        "--lora-modules",
        nargs="+",
        default=None,
        metavar="MODULE",
        help="adapters loaded at startup: name=path or JSON "
        '{"name": ..., "path": ..., "base_model_name": ...}',
    )
    lo.add_argument(
        "--lora-load-seconds",
        type=_non_negative,
        default=0.3,
        metavar="S",
        help="mock: time to read a rank-16 adapter from disk into a CPU slot, scaled by rank/16; "
        "the engine loop stalls meanwhile (default: 0.3)",
    )
    lo.add_argument(
        "--lora-swap-seconds",
        type=_non_negative,
        default=0.003,
        metavar="S",
        help="mock: time to copy a rank-16 adapter from its CPU slot into a GPU slot, scaled by "
        "rank/16 (default: 0.003)",
    )
    lo.add_argument(
        "--lora-hub-dir",
        default=None,
        metavar="DIR",
        help="mock: a directory standing in for the Hugging Face hub: lora_path ORG/NAME that is not "
        "a local path is read from DIR/ORG/NAME (default: none, every hub id is not found)",
    )

    st = p.add_argument_group(
        "start-up model (mock: vLLM 0.33.0's phases, startup.py; every one off by default; times are "
        "multiplied by --time-scale; caches under HF_HOME and VLLM_CACHE_ROOT, as vLLM's)"
    )
    st.add_argument(
        "--startup-weights-gib",
        type=_non_negative,
        default=0.0,
        metavar="GIB",
        help="the checkpoint's size: what is downloaded and loaded (default: 0, no such phases)",
    )
    st.add_argument(
        "--download-gib-per-s",
        type=_non_negative,
        default=0.0,
        metavar="R",
        help="download rate when the weights are not in HF_HOME yet (default: 0, not modelled)",
    )
    st.add_argument(
        "--load-gib-per-s",
        type=_non_negative,
        default=0.0,
        metavar="R",
        help="disk to GPU memory (default: 0, not modelled)",
    )
    st.add_argument(
        "--compile-seconds",
        type=_non_negative,
        default=0.0,
        metavar="S",
        help="torch.compile without an entry in VLLM_CACHE_ROOT (default: 0, not modelled)",
    )
    st.add_argument(
        "--compile-cached-seconds",
        type=_non_negative,
        default=0.0,
        metavar="S",
        help="loading the compiled graphs from that cache (default: 0)",
    )
    st.add_argument(
        "--prefetch-only",
        action="store_true",
        help="download the weights into HF_HOME (the download phase only), then answer /health "
        "with 200 until SIGTERM: a warm-node prefetch pod (docs/operator.md)",
    )
    st.add_argument("--graph-capture-seconds", type=_non_negative, default=0.0, metavar="S",
                    help="CUDA graph capture, at every start (default: 0)")  # fmt: skip

    t = p.add_argument_group("timing model (seconds at speed 1.0 = one A100-80GB)")
    t.add_argument(
        "--time-scale",
        type=_non_negative,
        default=1.0,
        help="multiply simulated step times by this for real sleeping; 0 = as fast as possible",
    )
    t.add_argument(
        "--decode-base",
        type=_non_negative,
        default=0.012,
        metavar="S",
        help="fixed cost of every step (default: 0.012)",
    )
    t.add_argument(
        "--decode-per-seq",
        type=_non_negative,
        default=0.0002,
        metavar="S",
        help="added step cost per decoding sequence (default: 0.0002)",
    )
    t.add_argument(
        "--per-context-token",
        type=_non_negative,
        default=6e-8,
        metavar="S",
        help="added step cost per KV token read by the batch (default: 6e-8)",
    )
    t.add_argument(
        "--prefill-per-token",
        type=_non_negative,
        default=5e-5,
        metavar="S",
        help="added step cost per prefilled (uncached) token (default: 5e-5)",
    )
    t.add_argument(
        "--tp-efficiency",
        type=_rate,
        default=0.75,
        help="speedup per extra tensor-parallel GPU, 1 + (tp-1)*eff (default: 0.75)",
    )

    f = p.add_argument_group("fault injection (also at runtime: POST /admin/faults)")
    f.add_argument("--fail-rate", type=_rate, default=0.0, help="fraction of requests answered with an error")
    f.add_argument(
        "--fail-status", type=int, default=500, help="HTTP status of injected failures (default: 500)"
    )
    f.add_argument(
        "--hang-rate", type=_rate, default=0.0, help="fraction of requests that never get an answer"
    )
    f.add_argument(
        "--die-rate",
        type=_rate,
        default=0.0,
        help="fraction of requests whose connection is cut mid-response",
    )
    f.add_argument("--die-after-tokens", type=int, default=1, help="tokens sent before the cut (default: 1)")
    f.add_argument("--unready", action="store_true", help="start with /health failing (503)")
    f.add_argument(
        "--poison",
        default="",
        metavar="TEXT",
        help="prompts containing TEXT fail with --fail-status on every request (a query of death)",
    )
    f.add_argument(
        "--slowdown",
        type=float,
        default=1.0,
        help="multiply every step time (thermal throttling; default: 1.0)",
    )
    f.add_argument(
        "--health-delay",
        type=_non_negative,
        default=0.0,
        metavar="S",
        help="/health answers after S seconds while requests run (a busy API server loop; default: 0)",
    )


def _kv_events_config(raw: str) -> Any:
    """--kv-events-config as vLLM parses it: a JSON object of KVEventsConfig's fields."""
    import json

    from toposerve.kvevents.publisher import KVEventsConfig

    try:
        data = json.loads(raw)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(data, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    try:
        return KVEventsConfig.from_json(data)
    except (TypeError, ValueError) as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def config_from_args(args: argparse.Namespace) -> object:
    """Build an EngineConfig (imports the engine, so only call it when actually serving)."""
    from toposerve.mockengine.faults import FaultConfig
    from toposerve.mockengine.lora import LoRAConfig, parse_lora_module
    from toposerve.mockengine.server import EngineConfig
    from toposerve.mockengine.startup import StartupModel

    lo, hi = args.output_len_range
    return EngineConfig(
        model=args.model,
        served_model_names=list(args.served_model_name or []),
        gpu_type=args.gpu_type,
        tensor_parallel_size=args.tensor_parallel_size,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        num_gpu_blocks=args.num_gpu_blocks,
        block_size=args.block_size,
        max_model_len=args.max_model_len,
        enable_prefix_caching=args.enable_prefix_caching,
        kv_events=args.kv_events_config,
        time_scale=args.time_scale,
        seed=args.seed,
        max_waiting=args.max_waiting,
        default_output_range=(min(lo, hi), max(lo, hi)),
        tp_efficiency=args.tp_efficiency,
        decode_base_s=args.decode_base,
        decode_s_per_seq=args.decode_per_seq,
        s_per_context_token=args.per_context_token,
        prefill_s_per_token=args.prefill_per_token,
        deprecated_gpu_cache_metric=args.enable_deprecated_gpu_cache_metric,
        faults=FaultConfig(
            fail_rate=args.fail_rate,
            fail_status=args.fail_status,
            hang_rate=args.hang_rate,
            die_rate=args.die_rate,
            die_after_tokens=args.die_after_tokens,
            unready=args.unready,
            slowdown=args.slowdown,
            health_delay=args.health_delay,
            poison=args.poison,
        ),
        shutdown_timeout_s=args.shutdown_timeout,
        admin=args.enable_admin,
        admin_token=args.admin_token,
        startup=StartupModel(
            weights_gib=args.startup_weights_gib,
            download_gib_per_s=args.download_gib_per_s,
            load_gib_per_s=args.load_gib_per_s,
            compile_s=args.compile_seconds,
            compile_cached_s=args.compile_cached_seconds,
            graph_capture_s=args.graph_capture_seconds,
        ),
        lora=LoRAConfig(
            enabled=args.enable_lora,
            max_loras=args.max_loras,
            max_lora_rank=args.max_lora_rank,
            max_cpu_loras=args.max_cpu_loras,
            modules=tuple(parse_lora_module(m) for m in args.lora_modules or [] if m),
            load_s=args.lora_load_seconds,
            swap_s=args.lora_swap_seconds,
            hub_dir=args.lora_hub_dir,
        ),
    )


def run(args: argparse.Namespace) -> int:
    import asyncio
    import logging
    import signal
    import sys

    from toposerve.mockengine.server import EngineConfig, MockServer

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    log = logging.getLogger("toposerve.mockengine")
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        print(f"mock-engine: {e}", file=sys.stderr)
        return 2
    assert isinstance(cfg, EngineConfig)

    async def until_signal() -> None:
        """SIGTERM or SIGINT: what ends both modes."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()

    async def prefetch_then_wait() -> int:
        from aiohttp import web

        from toposerve.mockengine.startup import prefetch

        fetched = await prefetch(cfg.startup, cfg.startup_caches(), cfg.time_scale)
        log.info("prefetch of %s done (%s)", cfg.model, "downloaded" if fetched else "already on the node")

        async def health(_: web.Request) -> web.Response:
            return web.Response(text="")

        app = web.Application()
        app.router.add_get("/health", health)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, args.host, args.port).start()
        await until_signal()
        await runner.cleanup()
        return 0

    async def serve() -> int:
        if args.prefetch_only:
            return await prefetch_then_wait()
        server = MockServer(cfg, args.host, args.port)
        try:
            await server.start()
        except ValueError as err:  # e.g. a --lora-modules adapter that does not load
            print(f"mock-engine: {err}", file=sys.stderr)
            return 2
        assert server.engine is not None
        e = server.engine
        log.info(
            "mock engine serving %s on %s (gpu=%s tp=%d speed=%.2f blocks=%d x %d "
            "max_model_len=%d time_scale=%g)",
            ",".join(cfg.names),
            server.url,
            cfg.gpu_type,
            cfg.tensor_parallel_size,
            e.timing.speed,
            e.sched_config.num_gpu_blocks,
            cfg.block_size,
            e.max_model_len,
            cfg.time_scale,
        )
        await until_signal()
        mode = "abort" if cfg.shutdown_timeout_s == 0 else "drain"
        log.info("[shutdown] mode=%s timeout=%ss, %d in flight", mode, cfg.shutdown_timeout_s, e.inflight)
        left = await server.shutdown()
        if left:
            log.warning("shutdown timeout over with %d requests still in flight", left)
        return 0

    return asyncio.run(serve())
