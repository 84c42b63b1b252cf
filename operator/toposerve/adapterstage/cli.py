"""`toposerve adapter-stage`: the adapter stager's flags and entry point (standard library only at
module level: ``toposerve.cli`` imports this module to build its parser)."""

from __future__ import annotations

import argparse

from toposerve.adapterstage.sources import STAGE_PORT, STAGE_ROOT


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default: all)")
    p.add_argument("--port", type=int, default=STAGE_PORT, help=f"port (default: {STAGE_PORT})")
    p.add_argument(
        "--root",
        default=STAGE_ROOT,
        help=f"where staged adapters go, on the engine's model cache (default: {STAGE_ROOT}; the router "
        "expects this path)",
    )
    p.add_argument("--max-bytes", type=int, default=8 << 30, help="largest download / unpacked adapter")
    p.add_argument("--max-files", type=int, default=10_000, help="most files in one adapter")
    p.add_argument("--concurrency", type=int, default=4, help="downloads at a time")
    p.add_argument(
        "--timeout", type=float, default=60.0, help="seconds without progress before a download fails"
    )
    p.add_argument("--log-level", default="info")


def run(args: argparse.Namespace) -> int:
    import asyncio
    import contextlib
    import logging

    from aiohttp import web

    from toposerve.adapterstage import fetch
    from toposerve.adapterstage.server import Stager, make_app
    from toposerve.adapterstage.sources import Limits

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.max_bytes <= 0 or args.max_files <= 0 or args.concurrency <= 0 or args.timeout <= 0:
        raise SystemExit(
            "toposerve adapter-stage: error: --max-bytes, --max-files, --concurrency, --timeout must be > 0"
        )
    fetch.sweep(args.root)

    async def main() -> None:
        stager = Stager(args.root, Limits(args.max_bytes, args.max_files), args.concurrency, args.timeout)
        runner = web.AppRunner(make_app(stager), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, args.host, args.port).start()
        logging.getLogger("toposerve.adapterstage").info(
            "adapter stager on %s:%d, root %s", args.host, args.port, args.root
        )
        await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
    return 0
