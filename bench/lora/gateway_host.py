"""The toposerve gateway as `toposerve gateway --static-config FILE` runs it, plus SIGHUP: re-read
FILE and hand its deployments to the gateway (what the LLMDeployment watch does when a spec
changes). bench/lora/run.py uses it to add and remove adapters mid-run without Kubernetes.

    PYTHONPATH=operator python bench/lora/gateway_host.py --static-config F --port P [router flags]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

from toposerve.router import cli as router_cli
from toposerve.router import gateway_cli
from toposerve.router.gateway import Gateway
from toposerve.router.proxy import serve, tune_gc


def main() -> int:
    p = argparse.ArgumentParser()
    gateway_cli.add_arguments(p)
    args = p.parse_args()
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    cfg = router_cli.config_from_args(args)
    log = logging.getLogger("bench.lora.gateway_host")

    async def run() -> None:
        gw = Gateway(cfg, None)
        runner = await serve(gw, args.host, args.port)
        objs, slices = gateway_cli.static_config(args.static_config)
        gw.deployments_listed(objs)
        gw.slices_listed(slices)
        tune_gc(args.gc_gen0_threshold)
        loop = asyncio.get_running_loop()

        def reload() -> None:
            objs, _ = gateway_cli.static_config(args.static_config)
            gw.deployments_listed(objs)
            log.info("re-read %s: %d deployments", args.static_config, len(objs))

        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGHUP, reload)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await runner.cleanup()

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
