"""The Endpoint Picker's overhead (issue 27): decision latency of `toposerve router --epp-port` as
a GIE picker at a fixed rate, beside the router's own proxy path at the same rate.

One `toposerve router` process over 4 mock engines (`--time-scale 0`: they answer at once, so what
is measured is the router's work, not the engines'), with its picker on. Open-loop arrivals at
`--rate` per second for `--seconds`, two phases on the same router:

* `epp`: each arrival is one ext_proc stream played from the real Envoy protos (the client of
  tests/unit/router/epp_client.py, as Envoy in FULL_DUPLEX_STREAMED mode): request headers, the
  chat body (end of stream); **decision latency** = from writing the body's last piece to reading
  the picker's headers answer (the routing decision), then the response path (headers with the
  served endpoint, body end) releases the load;
* `proxy`: each arrival is one non-streaming chat completion (`max_tokens: 1`) through the router's
  HTTP port, and the same request straight to an engine in the `direct` phase; added latency =
  router minus direct, per percentile.

The client shares the 2-core box with the router and engines: its own gRPC/HTTP work is in every
figure, so the figures are upper bounds on the router's share. Achieved rates are printed.

    PYTHONPATH=operator:. .venv/bin/python bench/router/epp.py --rate 500 --seconds 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import grpc

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench/router"))
from run import HOST, PY, Procs, pct, wait_ready  # noqa: E402  (run as a script, beside run.py)
from tests.unit.router.epp_client import Stream, chat, request_body, request_headers  # noqa: E402


async def open_loop(rate: float, seconds: float, fn: Any) -> tuple[list[float], float]:
    """Call `fn()` (returning a latency or None) at Poisson arrivals; (latencies, achieved/s)."""
    rng = random.Random(1)
    tasks: list[asyncio.Task[float | None]] = []
    start = time.monotonic()
    t = 0.0
    while t < seconds:
        t += rng.expovariate(rate)
        await asyncio.sleep(max(0.0, start + t - time.monotonic()))
        tasks.append(asyncio.create_task(fn()))
    got = [x for x in await asyncio.gather(*tasks) if x is not None]
    return got, len(got) / (time.monotonic() - start)


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=float, default=500.0)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--port", type=int, default=18600)
    ap.add_argument("--out", type=Path, default=ROOT / "bench/router/results-epp")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    procs = Procs(Path(tempfile.mkdtemp(prefix="toposerve-bench-epp-")))
    engines = [f"http://{HOST}:{args.port + i}" for i in range(4)]
    try:
        for i in range(4):
            procs.start(f"engine-{i}", [PY, "-m", "toposerve.cli", "mock-engine", "--host", HOST,
                                        "--port", str(args.port + i), "--model", "m", "--time-scale", "0"])  # fmt: skip
        router, epp = args.port + 10, args.port + 11
        procs.start("router", [PY, "-m", "toposerve.cli", "router", "--backends", ",".join(engines),
                               "--host", HOST, "--port", str(router), "--epp-port", str(epp),
                               "--epp-health-port", str(args.port + 12), "--log-level", "WARNING"])  # fmt: skip
        for url in [*engines, f"http://{HOST}:{router}"]:
            assert await wait_ready(url), url
        body = chat("m", "say hi", max_tokens=1)
        channel = grpc.aio.insecure_channel(f"{HOST}:{epp}")

        async def decide() -> float | None:
            s = Stream(channel)
            try:
                await s.send(request_headers())
                t0 = time.perf_counter()
                await s.send(request_body(body, True))
                first = await s.read(1)
                took = time.perf_counter() - t0
                if not first or first[0].WhichOneof("response") != "request_headers":
                    return None
                await s.read(1)  # the echoed body
                await s.respond(None)
                await s.close()
                return took
            except grpc.aio.AioRpcError:
                return None

        results: dict[str, Any] = {"rate": args.rate, "seconds": args.seconds}
        await open_loop(50, 2, decide)  # warm
        lat, achieved = await open_loop(args.rate, args.seconds, decide)
        results["epp"] = {"n": len(lat), "achieved_per_s": round(achieved, 1),
                          "p50_ms": round(pct(lat, 50) * 1e3, 3), "p99_ms": round(pct(lat, 99) * 1e3, 3)}  # fmt: skip
        print("epp", results["epp"], flush=True)
        await channel.close()

        conn = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=30)) as s:
            payload = json.loads(body)

            def post(url: str) -> Any:
                async def one() -> float | None:
                    t0 = time.perf_counter()
                    async with s.post(url + "/v1/chat/completions", json=payload) as r:
                        await r.read()
                        return time.perf_counter() - t0 if r.status == 200 else None

                return one

            i = 0

            def direct() -> Any:
                nonlocal i
                i += 1
                return post(engines[i % 4])()

            for name, fn in (("direct", direct), ("proxy", post(f"http://{HOST}:{router}"))):
                await open_loop(50, 2, fn)
                lat, achieved = await open_loop(args.rate, args.seconds, fn)
                results[name] = {"n": len(lat), "achieved_per_s": round(achieved, 1),
                                 "p50_ms": round(pct(lat, 50) * 1e3, 3), "p99_ms": round(pct(lat, 99) * 1e3, 3)}  # fmt: skip
                print(name, results[name], flush=True)
        results["proxy_added_p50_ms"] = round(results["proxy"]["p50_ms"] - results["direct"]["p50_ms"], 3)
        results["proxy_added_p99_ms"] = round(results["proxy"]["p99_ms"] - results["direct"]["p99_ms"], 3)
        (args.out / f"epp-{int(args.rate)}.json").write_text(json.dumps(results, indent=1) + "\n")
        print(json.dumps(results), flush=True)
        return 0
    finally:
        procs.stop_all()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
