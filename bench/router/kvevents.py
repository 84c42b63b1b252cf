"""Issue 28 benchmark: routing on the engines' KV-cache events, with 1, 2 and 3 router replicas.

Four mock engines (2x H100 + 2x A100-40GB, time scale 1) publish vLLM 0.33.0's KV-cache events
(`--kv-events-config`, ZeroMQ PUB + replay ROUTER on loopback). Three scenarios, each selected by
`--only`:

* ``replicas`` (r): workload (m) of bench/router/run.py (16 tenants whose system prompts overflow
  one engine's KV cache, 4 turns each) through N independent router processes, the client picking
  a router per request at random (the worst case of a Service spreading connections): toposerve
  `auto` on KV events (x1 is the "oracle view": one router that sees the engines' real caches),
  `auto` on its own approximation, and the Rust routers' `cache_aware` (which share no state), all
  in interleaved rounds (order rotated), fresh routers and reset engine caches per cell.
* ``restart`` (k): two toposerve routers on KV events under workload (m); mid-run one is taken out
  of the client's rotation (the Service dropping a terminating pod), sent SIGTERM (it drains and
  exits), started again on the same port, and put back once /health answers. Measured: seconds
  from the new process's start until its index is trusted for every engine and holds what the
  other router's index holds (within 1 %), and failed requests over the whole run. A second pass
  kills the router with SIGKILL while it is in the rotation (a crash): its in-flight requests fail,
  and are counted.
* ``volume`` (v): 200 concurrent streams of distinct prompts (every block new) through one router
  with and without `--kv-events` (the engines publish in both): events and block hashes per second
  (a SUB socket in this process decodes every engine's batches), and the router's CPU per event
  (user+system seconds of its process group, the difference between the two runs over the same
  requests, divided by the events).

    .venv/bin/python bench/router/kvevents.py --rvenv /tmp/rvenv --only r,k,v --rounds 3 \
        --out bench/router/results-kvevents

All traffic stays on loopback; every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
from run import (  # same directory: run as a script
    HOST,
    PY,
    Policy,
    Procs,
    Workload,
    engine_delta,
    engine_snapshot,
    one_request,
    proc_cpu_s,
    reset_caches,
    router_argv,
    run_workload,
    summarise,
    tenant_workload,
    wait_ready,
    words,
)

FLEET = [("H100", 27301), ("H100", 27302), ("A100-40GB", 27303), ("A100-40GB", 27304)]


def kv_ports(port: int) -> tuple[int, int]:
    """The PUB and replay ports of the engine on HTTP ``port``."""
    return port + 100, port + 200


def tagged_backends(kv: bool) -> str:
    out = []
    for gpu, port in FLEET:
        frag = f"gpu={gpu}"
        if kv:
            pub, rep = kv_ports(port)
            frag += f"&kv-events=tcp://{HOST}:{pub}&kv-replay=tcp://{HOST}:{rep}"
        out.append(f"http://{HOST}:{port}#{frag}")
    return ",".join(out)


def toposerve_argv(strategy: str, kv: bool, port: int) -> list[str]:
    argv = [PY, "-m", "toposerve.cli", "router", "--backends", tagged_backends(kv), "--strategy", strategy,
            "--host", HOST, "--port", str(port), "--log-level", "WARNING"]  # fmt: skip
    return argv + (["--kv-events"] if kv else [])


async def start_engines(procs: Procs, kv_blocks: int) -> list[str]:
    for gpu, port in FLEET:
        pub, rep = kv_ports(port)
        cfg = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"tcp://{HOST}:{pub}",
               "replay_endpoint": f"tcp://{HOST}:{rep}"}  # fmt: skip
        procs.start(f"engine-{port}", [PY, "-m", "toposerve.cli", "mock-engine", "--host", HOST,
                    "--port", str(port), "--model", "m", "--gpu-type", gpu, "--max-model-len", "32768",
                    "--log-level", "warning", "--seed", str(port), "--enable-admin",
                    "--num-gpu-blocks", str(kv_blocks), "--kv-events-config", json.dumps(cfg)])  # fmt: skip
    urls = [f"http://{HOST}:{port}" for _, port in FLEET]
    for u in urls:
        assert await wait_ready(u), f"engine {u} did not start"
    return urls


async def metrics(url: str) -> dict[str, float]:
    """The router's own series (summed over labels), or {} when it does not answer."""
    out: dict[str, float] = {}
    with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as s,
            s.get(url + "/metrics") as r,
        ):
            for line in (await r.text()).splitlines():
                if line.startswith("toposerve_router_kv_index") and " " in line:
                    name = line.split("{", 1)[0].split(" ", 1)[0]
                    out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


async def engines_cached(urls: list[str]) -> int:
    total = 0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as s:
        for u in urls:
            async with s.get(u + "/admin/state") as r:
                total += int((await r.json())["cached_blocks"])
    return total


# ------------------------------------------------------------------------------------ replicas (r)


async def replicas(args: argparse.Namespace, procs: Procs, urls: list[str]) -> dict[str, Any]:
    w = tenant_workload(args.scale)
    rvenv = Path(args.rvenv)
    setups: list[tuple[str, str, str, int]] = [("round-robin x1", "toposerve", "round-robin", 1)]
    for n in args.counts:
        setups.append((f"auto kv x{n}", "toposerve-kv", "auto", n))
        setups.append((f"auto approx x{n}", "toposerve", "auto", n))
        for kind in ("sglang-router", "vllm-router"):
            if (rvenv / "bin" / kind).exists():
                setups.append((f"{kind} cache_aware x{n}", kind, "cache_aware", n))
    runs: dict[str, list[dict[str, Any]]] = {s[0]: [] for s in setups}
    port = 27600
    engines = [(u, gpu) for u, (gpu, _) in zip(urls, FLEET, strict=True)]
    for rnd in range(args.rounds):
        k = rnd % len(setups)
        for name, kind, strategy, n in setups[k:] + setups[:k]:
            started, routers = [], []
            for _ in range(n):
                port = 27600 + (port - 27600 + 2) % 300
                if kind.startswith("toposerve"):
                    argv = toposerve_argv(strategy, kind == "toposerve-kv", port)
                else:
                    argv = router_argv(Policy(name, kind, strategy), engines, port, rvenv)
                started.append(procs.start(f"r-{port}", argv))
                routers.append(f"http://{HOST}:{port}")
            try:
                ready = [
                    await wait_ready(u, "/health") or await wait_ready(u, "/v1/models", 20) for u in routers
                ]
                if not all(ready):
                    print(f"{name}: a router did not become ready", flush=True)
                    continue
                async with aiohttp.ClientSession() as s:  # warm connections, then cold caches
                    await asyncio.gather(*(one_request(s, u, [{"role": "user", "content": "hi"}], 2, None)
                                           for u in routers for _ in range(4)))  # fmt: skip
                await reset_caches(urls)
                await asyncio.sleep(0.5)  # the AllBlocksCleared events reach the routers
                e0 = await engine_snapshot(urls)
                results, wall = await run_workload(routers, w, args.deadline, seed=rnd)
                e1 = await engine_snapshot(urls)
            finally:
                for p in started:
                    procs.stop(p)
            summary: dict[str, Any] = {**summarise(results, wall), **engine_delta(e0, e1), "round": rnd,
                                       "load_avg_1m": os.getloadavg()[0]}  # fmt: skip
            runs[name].append(summary)
            print(f"r{rnd} {name:30s} hit={summary['prefix_hit_rate']:.3f} ttft p50={summary['ttft_p50_ms']:.0f} "
                  f"p99={summary['ttft_p99_ms']:.0f} wall={wall:.1f} errors={summary['errors']}", flush=True)  # fmt: skip
    keys = ("prefix_hit_rate", "ttft_p50_ms", "ttft_p99_ms", "e2e_p50_ms", "engine_ttft_mean_ms",
            "engine_ttft_p50_ms", "engine_ttft_p99_ms", "wall_s", "errors", "max_share", "min_share")  # fmt: skip
    medians = {
        name: {k: statistics.median(r[k] for r in rs if k in r) for k in keys if any(k in r for r in rs)}
        for name, rs in runs.items()
        if rs
    }
    return {"workload": w.name, "rounds": args.rounds, "runs": runs, "median": medians}


# ------------------------------------------------------------------------------------- restart (k)


async def restart(args: argparse.Namespace, procs: Procs, urls: list[str], crash: bool) -> dict[str, Any]:
    """Two routers on KV events; one restarted mid-run (see the module doc)."""
    ports = [27950, 27952]
    routers = [f"http://{HOST}:{p}" for p in ports]
    proc = {p: procs.start(f"k-{p}", toposerve_argv("auto", True, p)) for p in ports}
    for u in routers:
        assert await wait_ready(u), f"router {u} did not start"
    await reset_caches(urls)
    w = tenant_workload(args.scale * 2)  # long enough to restart in the middle
    live = list(routers)  # the "Service endpoints" the client picks from, mutated in place
    out: dict[str, Any] = {"crash": crash}

    async def drive() -> None:
        await asyncio.sleep(args.restart_at)
        victim_port, victim = ports[1], routers[1]
        if not crash:
            live.remove(victim)  # the endpoint goes first, then SIGTERM: the router drains and exits
            await asyncio.sleep(1.0)
            t_stop = time.perf_counter()
            procs.stop(proc[victim_port])
            out["drain_s"] = round(time.perf_counter() - t_stop, 2)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc[victim_port].pid, signal.SIGKILL)
            proc[victim_port].wait(5)
            live.remove(victim)  # the endpoint is dropped once the kubelet sees the container die
        t0 = time.perf_counter()
        proc[victim_port] = procs.start(f"k-{victim_port}-b", toposerve_argv("auto", True, victim_port))
        assert await wait_ready(victim, tries=300), "restarted router not ready"
        out["ready_s"] = round(time.perf_counter() - t0, 2)
        live.append(victim)
        trace = []
        while time.perf_counter() - t0 < 30:
            mine, other, eng = await metrics(victim), await metrics(routers[0]), await engines_cached(urls)
            b = mine.get("toposerve_router_kv_index_blocks", -1.0)
            a = other.get("toposerve_router_kv_index_blocks", -1.0)
            stale = mine.get("toposerve_router_kv_index_stale", -1.0)
            t = round(time.perf_counter() - t0, 2)
            trace.append({"t": t, "blocks": b, "other": a, "engines": eng, "stale": stale})
            if stale == 0 and a > 0 and abs(b - a) <= 0.01 * a:
                out["index_back_s"] = t
                break
            await asyncio.sleep(0.1)
        out["trace"] = trace[-5:]

    driver = asyncio.create_task(drive())
    results, wall = await run_workload(live, w, args.deadline * 3, seed=7)
    await driver
    out.update(summarise(results, wall))
    out["requests"] = len(results)
    for p in proc.values():
        procs.stop(p)
    print(f"restart crash={crash}: {json.dumps({k: v for k, v in out.items() if k != 'trace'})}", flush=True)
    return out


# -------------------------------------------------------------------------------------- volume (v)


class EventCounter:
    """Subscribes to every engine's PUB socket in a thread and counts batches, events and hashes."""

    def __init__(self) -> None:
        self.batches = self.events = self.hashes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> EventCounter:
        self._thread.start()
        time.sleep(0.5)  # the SUB sockets connect before the first batch
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        import zmq

        from toposerve.kvevents.wire import decode

        ctx = zmq.Context()
        poller = zmq.Poller()
        socks = []
        for _, port in FLEET:
            s = ctx.socket(zmq.SUB)
            s.setsockopt(zmq.SUBSCRIBE, b"")
            s.connect(f"tcp://{HOST}:{kv_ports(port)[0]}")
            poller.register(s, zmq.POLLIN)
            socks.append(s)
        while not self._stop.is_set():
            for s, _ in poller.poll(200):
                parts = s.recv_multipart()
                batch = decode(parts[-1])
                self.batches += 1
                self.events += len(batch.events)
                self.hashes += sum(len(getattr(e, "block_hashes", ())) for e in batch.events)
        for s in socks:
            s.close(0)
        ctx.term()


def distinct_prompts(n: int, seed: int) -> Workload:
    rng = random.Random(seed)
    return Workload("v_distinct", concurrency=200, max_tokens=32,
                    prompts=[(f"Request {seed}-{i}. " + words(rng, 200), 32) for i in range(n)])  # fmt: skip


def apply_cost(n: int = 20_000) -> dict[str, float]:
    """The index's own cost per event, in this process: decode + apply of ``n`` batches shaped like
    the volume run's (a BlockStored of 2 hashes, then a BlockRemoved of one, per batch), so the
    router's per-event cost can be told from its per-request cost (/tokenize, hashing)."""
    from toposerve.kvevents import hashing, wire
    from toposerve.kvevents.index import EngineIndex

    payloads = []
    for i in range(n):
        stored = wire.BlockStored(block_hashes=[hashing.sha256((i, 0)), hashing.sha256((i, 1))], parent_block_hash=None,
                                  token_ids=list(range(32)), block_size=16, lora_id=None, medium="GPU", lora_name=None)  # fmt: skip
        gone = wire.BlockRemoved(block_hashes=[hashing.sha256((i - 100, 0))], medium="GPU")
        payloads.append(wire.encode(wire.KVEventBatch(ts=float(i), events=[stored, gone])))
    idx = EngineIndex()
    t0 = time.process_time()
    for seq, p in enumerate(payloads):
        idx.apply(seq, p)
    cpu = time.process_time() - t0
    return {
        "us_per_batch": cpu / n * 1e6,
        "us_per_event": cpu / (2 * n) * 1e6,
        "us_per_hash": cpu / (3 * n) * 1e6,
    }


async def volume(args: argparse.Namespace, procs: Procs, urls: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"index_apply": apply_cost()}
    print("index apply cost: " + json.dumps(out["index_apply"]), flush=True)
    for rnd in range(args.rounds):
        for kv in (True, False) if rnd % 2 == 0 else (False, True):
            port = 27980
            p = procs.start(f"v-{port}", toposerve_argv("auto", kv, port))
            url = f"http://{HOST}:{port}"
            assert await wait_ready(url), "router did not start"
            await reset_caches(urls)
            await asyncio.sleep(0.5)
            with EventCounter() as ec:
                c0, t0 = proc_cpu_s(p.pid), time.perf_counter()
                results, wall = await run_workload(
                    url, distinct_prompts(args.volume_requests, rnd), args.deadline
                )
                await asyncio.sleep(0.5)
                cpu, secs = proc_cpu_s(p.pid) - c0, time.perf_counter() - t0
            m = await metrics(url)
            procs.stop(p)
            row = {**summarise(results, wall), "router_cpu_s": cpu, "seconds": secs, "batches": ec.batches,
                   "events": ec.events, "hashes": ec.hashes, "router_batches": m.get("toposerve_router_kv_index_batches_total", 0.0),
                   "load_avg_1m": os.getloadavg()[0]}  # fmt: skip
            out.setdefault("kv" if kv else "approx", []).append(row)
            print(f"volume r{rnd} kv={kv}: " + json.dumps({k: round(v, 3) if isinstance(v, float) else v
                                                          for k, v in row.items()}), flush=True)  # fmt: skip
    kv_rows, ap_rows = out.get("kv", []), out.get("approx", [])
    if kv_rows and ap_rows:
        med = lambda rows, k: statistics.median(r[k] for r in rows)  # noqa: E731
        events = med(kv_rows, "events")
        out["summary"] = {
            "events_per_s": med(kv_rows, "events") / med(kv_rows, "seconds"),
            "hashes_per_s": med(kv_rows, "hashes") / med(kv_rows, "seconds"),
            "batches_per_s": med(kv_rows, "batches") / med(kv_rows, "seconds"),
            "router_cpu_kv_s": med(kv_rows, "router_cpu_s"),
            "router_cpu_approx_s": med(ap_rows, "router_cpu_s"),
            "cpu_us_per_event": (med(kv_rows, "router_cpu_s") - med(ap_rows, "router_cpu_s")) / events * 1e6,
            "cpu_us_per_hash": (med(kv_rows, "router_cpu_s") - med(ap_rows, "router_cpu_s")) / med(kv_rows, "hashes") * 1e6,
            "ttft_p50_ms_kv": med(kv_rows, "ttft_p50_ms"),
            "ttft_p50_ms_approx": med(ap_rows, "ttft_p50_ms"),
        }  # fmt: skip
        print("volume summary: " + json.dumps(out["summary"]), flush=True)
    return out


# ------------------------------------------------------------------------------------------- main


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    logdir = Path(args.logs)
    logdir.mkdir(parents=True, exist_ok=True)
    procs = Procs(logdir)
    report: dict[str, Any] = {"fleet": FLEET, "kv_blocks": args.kv_blocks, "argv": sys.argv[1:],
                              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}  # fmt: skip
    try:
        urls = await start_engines(procs, args.kv_blocks)
        if "r" in args.only:
            report["replicas"] = await replicas(args, procs, urls)
        if "k" in args.only:
            report["restart"] = [await restart(args, procs, urls, crash=False),
                                 await restart(args, procs, urls, crash=True)]  # fmt: skip
        if "v" in args.only:
            report["volume"] = await volume(args, procs, urls)
    finally:
        procs.stop_all()
    report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    report["load_avg"] = [round(x, 1) for x in os.getloadavg()]
    return report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--rvenv", default="/tmp/rvenv", help="virtualenv with vllm-router and sglang-router")
    ap.add_argument("--out", default="bench/router/results-kvevents")
    ap.add_argument("--logs", default="/tmp/toposerve-bench-kvevents-logs")
    ap.add_argument("--only", default="r,k,v", help="scenarios: r (replicas), k (restart), v (volume)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--counts", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 3])
    ap.add_argument("--kv-blocks", type=int, default=1500, help="KV blocks per engine (1500: 24k tokens)")
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--deadline", type=float, default=120.0, help="max seconds per cell")
    ap.add_argument("--restart-at", type=float, default=15.0, help="seconds into the restart run")
    ap.add_argument("--volume-requests", type=int, default=2000)
    args = ap.parse_args()
    args.only = set(args.only.split(","))
    report = asyncio.run(main_async(args))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
