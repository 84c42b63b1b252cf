"""Issue 28's grid: toposerve `auto` (its one set of defaults, and with KV events) against the Rust
routers' `cache_aware` and round-robin over workload shapes it was not tuned on.

The grid is fixed here (``GRID``) and committed so a later run repeats it: number of tenants 8-64,
the tenants' system prompts together 0.25-4x one replica's KV cache, concurrency 8-64, output
8-256 tokens, closed-loop conversations (3 turns, history appended) and open-loop single-turn
arrivals near saturation, plus an open-loop replay of a public production trace with real prefix
reuse: the first 600 requests (201 s) of Mooncake's ``conversation_trace.jsonl`` (kvcache-ai/Mooncake
``FAST25-release/traces``, commit 3cca71d; each request lists the 512-token blocks of its prompt as
``hash_ids``, equal ids = equal content). Scaled for four mock engines: each block becomes a
16-word text fixed by its id (so equal ids stay equal prefixes), outputs are a quarter of the
trace's capped at 128 tokens, and arrivals keep the trace's order and gaps, stretched to 85 % of
the fleet's measured capacity.

One fleet for the whole run (2x H100 + 2x A100-40GB mocks, time scale 1, 1,500 KV blocks of 16
tokens = 24,000 tokens per engine, KV events on); per (cell, policy, round) a fresh router, warm
connections, reset engine caches; rounds interleave policies in a rotated order. Open-loop cells
and the trace are paced from a calibration: round-robin serving the same mix closed-loop at 64
streams (first round only), 85 % of its request rate.

    PYTHONPATH=operator .venv/bin/python bench/router/grid.py --rvenv /tmp/rvenv --rounds 3 \
        --out bench/router/results-grid
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
from kvevents import FLEET, start_engines, toposerve_argv  # same directory: run as a script
from run import (
    HOST,
    Conversation,
    Policy,
    Procs,
    Result,
    Workload,
    engine_delta,
    engine_snapshot,
    one_request,
    pct,
    reset_caches,
    router_argv,
    run_workload,
    summarise,
    wait_ready,
    words,
)

KV_TOKENS = 24_000  # one engine's KV cache at --kv-blocks 1500
TRACE = Path(__file__).resolve().parent / "traces" / "mooncake_conversation_600.jsonl"


@dataclass(frozen=True)
class Cell:
    name: str
    tenants: int
    prefix_ratio: float  # the tenants' system prompts together, over one engine's KV cache
    concurrency: int  # closed loop: streams; open loop: the calibration's streams
    output: int
    mode: str = "closed"  # closed | open | trace


GRID = [
    Cell("t8-r0.25-c8-o8", 8, 0.25, 8, 8),
    Cell("t8-r4-c24-o64", 8, 4.0, 24, 64),
    Cell("t16-r1-c24-o64", 16, 1.0, 24, 64),
    Cell("t32-r2-c64-o8", 32, 2.0, 64, 8),
    Cell("t64-r0.25-c64-o256", 64, 0.25, 64, 256),
    Cell("t64-r4-c8-o8", 64, 4.0, 8, 8),
    Cell("t16-r0.5-c64-o256", 16, 0.5, 64, 256),
    Cell("open-t16-r1-o64", 16, 1.0, 64, 64, "open"),
    Cell("open-t64-r2-o8", 64, 2.0, 64, 8, "open"),
    Cell("trace-mooncake-600", 0, 0.0, 64, 0, "trace"),
]


def closed_workload(c: Cell, seed: int = 5) -> Workload:
    """Tenants x conversations of 3 turns; the tenants' system prompts total ``prefix_ratio`` x one
    engine's cache; about 240-400 requests a cell whatever the tenant count."""
    rng = random.Random(seed)
    per_tenant = max(1, int(c.prefix_ratio * KV_TOKENS / c.tenants))
    systems = [f"Tenant {i} instructions. " + words(rng, per_tenant) for i in range(c.tenants)]
    convs_per_tenant = max(1, 96 // c.tenants)
    order = list(range(c.tenants * convs_per_tenant))
    rng.shuffle(order)
    convs = [Conversation(systems[i % c.tenants], [words(rng, 60) for _ in range(3)], f"t{i % c.tenants}-u{i}")
             for i in order]  # fmt: skip
    return Workload(c.name, concurrency=c.concurrency, max_tokens=c.output, conversations=convs)


@dataclass
class Arrival:
    at: float  # seconds from the start, before pacing
    messages: list[dict[str, str]]
    max_tokens: int
    user: str | None


def open_arrivals(c: Cell, seed: int = 9, n: int = 300) -> list[Arrival]:
    """Single-turn requests of random tenants (system prompt + a fresh question), Poisson at 1/s
    before pacing."""
    rng = random.Random(seed)
    per_tenant = max(1, int(c.prefix_ratio * KV_TOKENS / c.tenants))
    systems = [f"Tenant {i} instructions. " + words(rng, per_tenant) for i in range(c.tenants)]
    t, out = 0.0, []
    for i in range(n):
        t += rng.expovariate(1.0)
        k = rng.randrange(c.tenants)
        msgs = [
            {"role": "system", "content": systems[k]},
            {"role": "user", "content": f"Q{i}. " + words(rng, 60)},
        ]
        out.append(Arrival(t, msgs, c.output, f"t{k}"))
    return out


def trace_arrivals(path: Path = TRACE) -> list[Arrival]:
    """The Mooncake requests, each block a 16-word text fixed by its id (see the module doc)."""
    blocks: dict[int, str] = {}

    def block(h: int) -> str:
        if h not in blocks:
            blocks[h] = f"[{h}] " + words(random.Random(h), 16)
        return blocks[h]

    out = []
    for line in path.read_text().splitlines():
        r = json.loads(line)
        text = " ".join(block(h) for h in r["hash_ids"])
        out.append(Arrival(r["timestamp"] / 1000.0, [{"role": "user", "content": text}],
                           max(1, min(128, r["output_length"] // 4)), None))  # fmt: skip
    return out


async def run_open(
    url: str, arrivals: list[Arrival], speed: float, deadline: float
) -> tuple[list[Result], float]:
    """Fire each arrival at ``at / speed`` seconds, whatever is in flight (open loop)."""
    results: list[Result] = []
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as s:
        t0 = time.perf_counter()

        async def one(a: Arrival) -> None:
            delay = a.at / speed - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            if time.perf_counter() - t0 > deadline:
                return
            r, _ = await one_request(s, url, a.messages, a.max_tokens, a.user)
            results.append(r)

        await asyncio.gather(*(one(a) for a in arrivals))
        return results, time.perf_counter() - t0


async def calibrate(procs: Procs, urls: list[str], arrivals: list[Arrival], port: int) -> float:
    """Requests per second round-robin serves of this mix closed-loop at 64 streams."""
    p = procs.start(f"cal-{port}", toposerve_argv("round-robin", False, port))
    url = f"http://{HOST}:{port}"
    try:
        assert await wait_ready(url), "calibration router did not start"
        await reset_caches(urls)
        items = list(arrivals[:200])
        done: list[Result] = []
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
            t0 = time.perf_counter()

            async def worker() -> None:
                while items:
                    a = items.pop(0)
                    r, _ = await one_request(s, url, a.messages, a.max_tokens, a.user)
                    done.append(r)

            await asyncio.gather(*(worker() for _ in range(64)))
            wall = time.perf_counter() - t0
    finally:
        procs.stop(p)
    return len(done) / wall


def policies(rvenv: Path, stored_only: bool = False) -> list[tuple[str, str, str]]:
    out = [("round-robin", "toposerve", "round-robin"), ("auto", "toposerve", "auto"),
           ("auto kv", "toposerve-kv", "auto")]  # fmt: skip
    if stored_only:  # KV events without the blocks-on-their-way overlay (--kv-events-pending 0)
        out.append(("auto kv, stored only", "toposerve-kv0", "auto"))
    for kind in ("sglang-router", "vllm-router"):
        if (rvenv / "bin" / kind).exists():
            out.append((f"{kind} cache_aware", kind, "cache_aware"))
    return out


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    logdir = Path(args.logs)
    logdir.mkdir(parents=True, exist_ok=True)
    procs = Procs(logdir)
    rvenv = Path(args.rvenv)
    cells = [c for c in GRID if not args.cells or c.name in args.cells]
    pols = policies(rvenv, args.stored_only)
    report: dict[str, Any] = {"grid": [asdict(c) for c in cells], "policies": [p[0] for p in pols],
                              "argv": sys.argv[1:], "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                              "runs": {}, "pace": {}}  # fmt: skip
    engines = [(f"http://{HOST}:{port}", gpu) for gpu, port in FLEET]
    try:
        urls = await start_engines(procs, 1500)
        port = 28100
        for rnd in range(args.rounds):
            for c in cells:
                arrivals: list[Arrival] = []
                if c.mode != "closed":
                    arrivals = trace_arrivals() if c.mode == "trace" else open_arrivals(c)
                    if c.name not in report["pace"]:
                        port += 2
                        cap = await calibrate(procs, urls, arrivals, port)
                        span = arrivals[-1].at or 1.0
                        rate = len(arrivals) / span  # requests/s before pacing
                        report["pace"][c.name] = {"capacity_rps": cap, "speed": 0.85 * cap / rate}
                        print(
                            f"pace {c.name}: capacity {cap:.2f} req/s, speed x{0.85 * cap / rate:.2f}",
                            flush=True,
                        )
                k = rnd % len(pols)
                for name, kind, strategy in pols[k:] + pols[:k]:
                    port = 28100 + (port - 28100 + 2) % 400
                    if kind.startswith("toposerve"):
                        argv = toposerve_argv(strategy, kind.startswith("toposerve-kv"), port)
                        if kind == "toposerve-kv0":
                            argv += ["--kv-events-pending", "0"]
                    else:
                        argv = router_argv(Policy(name, kind, strategy), engines, port, rvenv)
                    proc = procs.start(f"g-{port}", argv)
                    url = f"http://{HOST}:{port}"
                    try:
                        if not (await wait_ready(url, "/health") or await wait_ready(url, "/v1/models", 20)):
                            print(f"{c.name} {name}: router not ready", flush=True)
                            continue
                        async with aiohttp.ClientSession() as s:
                            await asyncio.gather(*(one_request(s, url, [{"role": "user", "content": "hi"}], 2, None)
                                                   for _ in range(4)))  # fmt: skip
                        await reset_caches(urls)
                        await asyncio.sleep(0.3)
                        e0 = await engine_snapshot(urls)
                        if c.mode == "closed":
                            results, wall = await run_workload(url, closed_workload(c), args.deadline)
                        else:
                            results, wall = await run_open(
                                url, arrivals, report["pace"][c.name]["speed"], args.deadline
                            )
                        e1 = await engine_snapshot(urls)
                    finally:
                        procs.stop(proc)
                    ok = [r for r in results if r.ok]
                    row = {**summarise(results, wall), **engine_delta(e0, e1), "round": rnd,
                           "e2e_mean_ms": statistics.fmean(r.e2e for r in ok) * 1000 if ok else 0.0,
                           "ttft_mean_ms": statistics.fmean(r.ttft for r in ok) * 1000 if ok else 0.0,
                           "ttft_p90_ms": pct([r.ttft for r in ok], 90) * 1000,
                           "load_avg_1m": os.getloadavg()[0]}  # fmt: skip
                    report["runs"].setdefault(c.name, {}).setdefault(name, []).append(row)
                    print(f"r{rnd} {c.name:22s} {name:28s} hit={row['prefix_hit_rate']:.3f} "
                          f"ttft p50={row['ttft_p50_ms']:.0f} p99={row['ttft_p99_ms']:.0f} wall={wall:.1f} "
                          f"e2e={row['e2e_mean_ms']:.0f} err={row['errors']} load={row['load_avg_1m']:.1f}", flush=True)  # fmt: skip
                out = Path(args.out)
                out.mkdir(parents=True, exist_ok=True)
                (out / "results.json").write_text(json.dumps(report, indent=1))  # partial results survive
    finally:
        procs.stop_all()
    keys = ("prefix_hit_rate", "ttft_p50_ms", "ttft_p99_ms", "ttft_mean_ms", "wall_s", "e2e_mean_ms",
            "e2e_p99_ms", "engine_ttft_p50_ms", "engine_ttft_p99_ms", "errors")  # fmt: skip
    report["median"] = {
        cell: {
            p: {k: statistics.median(r[k] for r in rows if k in r) for k in keys} for p, rows in by.items()
        }
        for cell, by in report["runs"].items()
    }
    report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--rvenv", default="/tmp/rvenv")
    ap.add_argument("--out", default="bench/router/results-grid")
    ap.add_argument("--logs", default="/tmp/toposerve-bench-grid-logs")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cells", type=lambda s: set(s.split(",")), default=set())
    ap.add_argument("--deadline", type=float, default=90.0, help="max seconds per cell and policy")
    ap.add_argument(
        "--stored-only", action="store_true", help="also auto on KV events with --kv-events-pending 0"
    )
    args = ap.parse_args()
    report = asyncio.run(main_async(args))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
