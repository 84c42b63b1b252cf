"""Router benchmark: toposerve's strategies vs vllm-router and sglang-router on the same mock engines.

One run starts one fleet of mock engines (2x H100 + 2x A100-40GB, realistic time scale) on
127.0.0.1 and, for every (policy, workload), starts a fresh router in front of it, resets the
engines' prefix caches, replays the same deterministic request list, and records client-side
TTFT / end-to-end latency / output tokens per second plus the engines' prefix-cache hit rate.
Then it measures the proxy's added latency vs direct access at 1, 50 and 200 concurrent streams.

    .venv/bin/python bench/router/run.py --rvenv /tmp/rvenv --out bench/router/results

`--runs N` repeats everything N times, interleaved (policies in an order rotated per run), and
reports per-cell medians; `--only m,o --kv-blocks 1500` is the issue-11 comparison with the Rust
routers: the many-tenant cache-heavy workload (m) and the added latency at 1/50/200 streams with
the router's CPU per relayed SSE chunk (see docs/benchmarks.md, "against the Rust routers").

`--only r` instead compares one toposerve router with two independent ones (the client picking a
router per request) on workload (a) or (h); see docs/benchmarks.md, "two router replicas".

The Rust routers are run from a separate virtualenv (`--rvenv`, with `pip install vllm-router
sglang-router matplotlib`); missing ones are skipped and reported. All traffic stays on loopback
and every loop is bounded in count and time. Results: results.json and router.png in --out.
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
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from summarize import median_of  # same directory: run as a script

HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
WORDS = [
    "the",
    "model",
    "token",
    "cache",
    "batch",
    "kernel",
    "tensor",
    "memory",
    "latency",
    "request",
    "stream",
    "router",
    "replica",
    "cluster",
    "node",
    "pool",
    "prefix",
    "decode",
    "prefill",
    "block",
    "queue",
    "engine",
    "serving",
    "throughput",
    "bandwidth",
    "scale",
    "time",
    "first",
    "other",
    "which",
    "about",
    "would",
    "could",
    "there",
    "their",
    "when",
    "what",
    "some",
    "more",
    "into",
    "only",
    "also",
    "these",
    "new",
    "like",
    "may",
    "any",
    "two",
    "then",
    "than",
    "its",
]

# --------------------------------------------------------------------------------------------- workloads


@dataclass
class Conversation:
    system: str
    turns: list[str]
    user: str


@dataclass
class Workload:
    name: str
    concurrency: int
    max_tokens: int
    conversations: list[Conversation] = field(default_factory=list)  # multi-turn (a)
    prompts: list[tuple[str, int]] = field(default_factory=list)  # single-turn: (text, max_tokens)


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def make_workloads(scale: float) -> list[Workload]:
    rng = random.Random(7)
    n = lambda x: max(1, int(x * scale))  # noqa: E731
    systems = [f"System prompt {i}: you are assistant number {i}. " + words(rng, 1500) for i in range(4)]
    convs = [
        Conversation(systems[i % 4], [words(rng, 300) for _ in range(4)], f"user-{i}") for i in range(n(48))
    ]
    a = Workload("a_shared_prefix_multiturn", concurrency=24, max_tokens=48, conversations=convs)
    mixed = []
    for i in range(n(200)):
        if i % 7 == 3:
            mixed.append((f"Document {i}. " + words(rng, 12000) + " Summarise.", 48))
        else:
            mixed.append((f"Question {i}. " + words(rng, 120), 48))
    b = Workload("b_mixed_short_long", concurrency=32, max_tokens=48, prompts=mixed)
    c = Workload(
        "c_heterogeneous_throughput",
        concurrency=64,
        max_tokens=128,
        prompts=[(f"Task {i}. " + words(rng, 400), 128) for i in range(n(256))],
    )
    return [a, b, c]


def tenant_workload(scale: float) -> Workload:
    """(m): many tenants, cache-heavy, multi-turn (issue 11). 16 tenants with ~2,000-word system
    prompts (~32k tokens together): with `--kv-blocks 1500` (24k tokens per replica) they overflow
    one replica's KV cache but fit the fleet's (96k), so a router that spreads every tenant over
    every replica makes them evict each other. 96 conversations (6 per tenant) x 4 turns of ~150
    words, 32-token replies appended to the history, 16 conversations at a time, `user` set."""
    rng = random.Random(13)
    systems = [f"Tenant {i} system prompt. " + words(rng, 2000) for i in range(16)]
    order = list(range(max(1, int(96 * scale))))
    rng.shuffle(order)  # tenants interleave in time, as independent customers would
    convs = [Conversation(systems[i % 16], [words(rng, 150) for _ in range(4)], f"tenant-{i % 16}-user-{i}")
             for i in order]  # fmt: skip
    return Workload("m_multitenant_cache_heavy", concurrency=16, max_tokens=32, conversations=convs)


def history_workload(scale: float) -> Workload:
    """(h): like (a) but the history dominates: 150-word system prompts, 1,200-word user turns
    (long agentic sessions). Only the replicas scenario uses it (`--replica-workload h`)."""
    rng = random.Random(11)
    systems = [f"System prompt {i}. " + words(rng, 150) for i in range(4)]
    convs = [
        Conversation(systems[i % 4], [words(rng, 1200) for _ in range(4)], f"user-{i}")
        for i in range(max(1, int(48 * scale)))
    ]
    return Workload("h_long_history_multiturn", concurrency=24, max_tokens=48, conversations=convs)


# --------------------------------------------------------------------------------------------- client


@dataclass
class Result:
    ttft: float
    e2e: float
    out_tokens: int
    ok: bool
    events: int = 0  # SSE `data:` events received: the chunks a router relayed for this request


async def one_request(
    s: aiohttp.ClientSession, url: str, messages: list[dict[str, str]], max_tokens: int, user: str | None
) -> tuple[Result, str]:
    body: dict[str, Any] = {
        "model": "m",
        "messages": messages,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if user:
        body["user"] = user
    t0 = time.perf_counter()
    ttft = 0.0
    text: list[str] = []
    out = 0
    events = 0
    try:
        async with s.post(url + "/v1/chat/completions", json=body) as r:
            if r.status != 200:
                await r.read()
                return Result(0, time.perf_counter() - t0, 0, False), ""
            buf = b""
            async for chunk in r.content.iter_any():
                buf += chunk
                while b"\n\n" in buf:
                    event, buf = buf.split(b"\n\n", 1)
                    events += event.startswith(b"data: ")
                    if not event.startswith(b"data: ") or event == b"data: [DONE]":
                        continue
                    d = json.loads(event[6:])
                    if d.get("error"):
                        return Result(0, time.perf_counter() - t0, 0, False), ""
                    for ch in d.get("choices") or ():
                        c = (ch.get("delta") or {}).get("content")
                        if c:
                            if not ttft:
                                ttft = time.perf_counter() - t0
                            text.append(c)
                    if d.get("usage"):
                        out = d["usage"].get("completion_tokens", 0)
    except (TimeoutError, aiohttp.ClientError):
        return Result(0, time.perf_counter() - t0, 0, False), ""
    return Result(ttft, time.perf_counter() - t0, out or len(text), bool(ttft), events), "".join(text)


async def run_workload(
    url: str | list[str], w: Workload, deadline_s: float, seed: int = 0
) -> tuple[list[Result], float]:
    """Replay `w`; with several router URLs each request picks one at random (seeded), as a
    Kubernetes Service in front of router replicas spreads a client's connections."""
    urls = [url] if isinstance(url, str) else url
    pick = random.Random(seed)
    results: list[Result] = []
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as s:
        t0 = time.perf_counter()
        stop_at = t0 + deadline_s
        if w.conversations:
            queue: list[Conversation] = list(w.conversations)

            async def conv_worker() -> None:
                while queue and time.perf_counter() < stop_at:
                    c = queue.pop(0)
                    msgs = [{"role": "system", "content": c.system}]
                    for turn in c.turns:
                        msgs.append({"role": "user", "content": turn})
                        target = urls[0] if len(urls) == 1 else pick.choice(urls)
                        r, reply = await one_request(s, target, msgs, w.max_tokens, c.user)
                        results.append(r)
                        msgs.append({"role": "assistant", "content": reply or "ok"})

            await asyncio.gather(*(conv_worker() for _ in range(w.concurrency)))
        else:
            items = list(w.prompts)

            async def worker() -> None:
                while items and time.perf_counter() < stop_at:
                    text, mt = items.pop(0)
                    target = urls[0] if len(urls) == 1 else pick.choice(urls)
                    r, _ = await one_request(s, target, [{"role": "user", "content": text}], mt, None)
                    results.append(r)

            await asyncio.gather(*(worker() for _ in range(w.concurrency)))
        return results, time.perf_counter() - t0


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def summarise(results: list[Result], wall: float) -> dict[str, float]:
    ok = [r for r in results if r.ok]
    return {
        "requests": len(results),
        "errors": len(results) - len(ok),
        "ttft_p50_ms": pct([r.ttft for r in ok], 50) * 1000,
        "ttft_p99_ms": pct([r.ttft for r in ok], 99) * 1000,
        "e2e_p50_ms": pct([r.e2e for r in ok], 50) * 1000,
        "e2e_p99_ms": pct([r.e2e for r in ok], 99) * 1000,
        "output_tok_s": sum(r.out_tokens for r in ok) / wall if wall else 0.0,
        "wall_s": wall,
    }


# --------------------------------------------------------------------------------------------- processes


class Procs:
    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.items: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = open(self.logdir / f"{name}.log", "ab")  # noqa: SIM115
        p = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT, env=env
        )
        self.items.append(p)
        return p

    def stop(self, p: subprocess.Popen[bytes]) -> None:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)
        if p in self.items:
            self.items.remove(p)

    def stop_all(self) -> None:
        for p in list(self.items):
            self.stop(p)


async def wait_ready(url: str, path: str = "/health", tries: int = 150) -> bool:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as s:
        for _ in range(tries):
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                async with s.get(url + path) as r:
                    if r.status == 200:
                        return True
            await asyncio.sleep(0.2)
    return False


async def engine_snapshot(engines: list[str]) -> dict[str, Any]:
    """Prefix-cache counters and the engine-side TTFT histogram, summed over the fleet.

    The mock engines time themselves in simulated seconds, so these numbers do not move with
    this machine's CPU contention, unlike the client-side ones.
    """
    snap: dict[str, Any] = {"hits": 0.0, "queries": 0.0, "ttft_sum": 0.0, "ttft_count": 0.0, "buckets": {},
                            "requests": {}}  # fmt: skip
    async with aiohttp.ClientSession() as s:
        for e in engines:
            async with s.get(e + "/metrics") as r:
                for line in (await r.text()).splitlines():
                    if line.startswith("#"):
                        continue
                    value = float(line.rsplit(" ", 1)[1]) if " " in line else 0.0
                    if line.startswith("vllm:request_success_total"):
                        snap["requests"][e] = snap["requests"].get(e, 0.0) + value
                    elif line.startswith("vllm:prefix_cache_hits_total"):
                        snap["hits"] += value
                    elif line.startswith("vllm:prefix_cache_queries_total"):
                        snap["queries"] += value
                    elif line.startswith("vllm:time_to_first_token_seconds_bucket"):
                        le = line.split('le="', 1)[1].split('"', 1)[0]
                        snap["buckets"][le] = snap["buckets"].get(le, 0.0) + value
                    elif line.startswith("vllm:time_to_first_token_seconds_sum"):
                        snap["ttft_sum"] += value
                    elif line.startswith("vllm:time_to_first_token_seconds_count"):
                        snap["ttft_count"] += value
    return snap


def engine_delta(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Hit rate and engine-side TTFT (mean; p50/p99 interpolated in histogram buckets) between snapshots."""
    out: dict[str, Any] = {
        "prefix_hit_rate": (b["hits"] - a["hits"]) / (b["queries"] - a["queries"])
        if b["queries"] > a["queries"]
        else 0.0
    }
    n = b["ttft_count"] - a["ttft_count"]
    out["engine_ttft_mean_ms"] = (b["ttft_sum"] - a["ttft_sum"]) / n * 1000 if n else float("nan")
    bounds = sorted(
        ((float(le), b["buckets"][le] - a["buckets"].get(le, 0.0)) for le in b["buckets"]), key=lambda x: x[0]
    )
    per = [b["requests"].get(e, 0.0) - a["requests"].get(e, 0.0) for e in b.get("requests", {})]
    if per and sum(per):  # request balance across engines (the fleet is 2x H100 + 2x A100-40GB)
        out["engine_requests"] = per
        out["max_share"] = max(per) / sum(per)
        out["min_share"] = min(per) / sum(per)
    for q in (50, 99):
        target = n * q / 100
        prev_le, prev_c, val = 0.0, 0.0, float("nan")
        for le, c in bounds:
            if c >= target and n:
                val = (
                    le
                    if le == float("inf")
                    else prev_le + (le - prev_le) * ((target - prev_c) / max(c - prev_c, 1e-9))
                )
                break
            prev_le, prev_c = le, c
        out[f"engine_ttft_p{q}_ms"] = val * 1000
    return out


async def reset_caches(engines: list[str]) -> None:
    async with aiohttp.ClientSession() as s:
        for e in engines:
            async with s.post(e + "/reset_prefix_cache") as r:
                await r.read()


@dataclass
class Policy:
    name: str
    kind: str  # toposerve | vllm-router | sglang-router | direct
    arg: str
    src: str = ""  # toposerve from another source tree (its PYTHONPATH; `--variant`)
    extra: tuple[str, ...] = ()  # more toposerve flags (`--flags-variant`)


def router_argv(p: Policy, engines: list[tuple[str, str]], port: int, rvenv: Path) -> list[str]:
    urls = [u for u, _ in engines]
    if p.kind == "toposerve":
        tagged = ",".join(f"{u}#gpu={g}" for u, g in engines)
        return [PY, "-m", "toposerve.cli", "router", "--backends", tagged, "--strategy", p.arg,
                "--host", HOST, "--port", str(port), "--log-level", "WARNING"]  # fmt: skip
    if p.kind == "gateway":  # toposerve gateway, its table from a static file: one deployment, "m"
        cfg = Path(tempfile.gettempdir()) / f"toposerve-bench-gateway-{port}.yaml"
        cfg.write_text(json.dumps({
            "deployments": [{"metadata": {"name": "m", "namespace": "bench"}, "spec": {"model": {"name": "m"}}}],
            "backends": {"bench/m": urls},
        }))  # fmt: skip
        return [PY, "-m", "toposerve.cli", "gateway", "--static-config", str(cfg), "--strategy", p.arg,
                "--host", HOST, "--port", str(port), "--log-level", "WARNING"]  # fmt: skip
    if p.kind == "vllm-router":
        return [str(rvenv / "bin" / "vllm-router"), "--worker-urls", *urls, "--policy", p.arg,
                "--host", HOST, "--port", str(port), "--prometheus-host", HOST, "--prometheus-port", str(port + 1),
                "--log-level", "warning"]  # fmt: skip
    if p.kind == "sglang-router":
        return [str(rvenv / "bin" / "sglang-router"), "launch", "--worker-urls", *urls,
                "--policy", p.arg, "--host", HOST, "--port", str(port),
                "--prometheus-host", HOST, "--prometheus-port", str(port + 1)]  # fmt: skip
    raise ValueError(p.kind)


# --------------------------------------------------------------------------------------------- main


async def run_cell(
    args: argparse.Namespace,
    procs: Procs,
    engines: list[tuple[str, str]],
    rvenv: Path,
    p: Policy,
    w: Workload,
    port: int,
) -> dict[str, Any] | None:
    """One (policy, workload): a fresh router, warm connections, cold engine caches, replay."""
    argv = router_argv(p, engines, port, rvenv)
    if p.kind == "toposerve":
        argv += args.toposerve_args.split() + list(p.extra)
    env = {**os.environ, "PYTHONPATH": str(Path(p.src).resolve())} if p.src else None
    proc = procs.start(f"{p.kind}-{p.arg}-{w.name[0]}", argv, env)
    url = f"http://{HOST}:{port}"
    try:
        if not await wait_ready(url, "/health") and not await wait_ready(url, "/v1/models", 20):
            return None
        async with aiohttp.ClientSession() as s:  # warm connections, then start from cold caches
            await asyncio.gather(*(one_request(s, url, [{"role": "user", "content": "hi"}], 2, None)
                                   for _ in range(8)))  # fmt: skip
        await reset_caches([u for u, _ in engines])
        e0 = await engine_snapshot([u for u, _ in engines])
        c0 = proc_cpu_s(proc.pid)
        results, wall = await run_workload(url, w, args.deadline)
        cpu = proc_cpu_s(proc.pid) - c0
        e1 = await engine_snapshot([u for u, _ in engines])
    finally:
        procs.stop(proc)
    summary = summarise(results, wall)
    summary.update(engine_delta(e0, e1))
    summary["router_cpu_s"] = cpu
    summary["load_avg_1m"] = os.getloadavg()[0]
    return summary


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logdir = Path(args.logs)  # outside the repository: per-process logs are not results
    logdir.mkdir(parents=True, exist_ok=True)
    rvenv = Path(args.rvenv)
    procs = Procs(logdir)
    fleet = [("H100", 27101), ("H100", 27102), ("A100-40GB", 27103), ("A100-40GB", 27104)]
    engines = [(f"http://{HOST}:{port}", gpu) for gpu, port in fleet]
    report: dict[str, Any] = {"fleet": fleet, "time_scale": args.time_scale, "workloads": {}, "overhead": {},
                              "skipped": [], "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}  # fmt: skip
    try:
        for gpu, port in fleet:  # --enable-admin: /reset_prefix_cache between runs
            procs.start(f"engine-{port}", [PY, "-m", "toposerve.cli", "mock-engine", "--host", HOST,
                        "--port", str(port), "--model", "m", "--gpu-type", gpu, "--time-scale", str(args.time_scale),
                        "--max-model-len", "32768", "--log-level", "warning", "--seed", str(port),
                        "--enable-admin", *(["--num-gpu-blocks", str(args.kv_blocks)] if args.kv_blocks else [])])  # fmt: skip
        for u, _ in engines:
            assert await wait_ready(u), f"engine {u} did not start"
        policies = [Policy(f"toposerve {s}", "toposerve", s) for s in args.strategies.split(",")]
        for v in args.variant:  # the same strategies from another source tree, in the same runs
            name, src = v.split("=", 1)
            policies += [Policy(f"toposerve {s} [{name}]", "toposerve", s, src)
                         for s in args.variant_strategies.split(",") if s]  # fmt: skip
        for v in args.flags_variant:  # the same strategies with other flags, in the same runs
            name, flags = v.split("=", 1)
            policies += [Policy(f"toposerve {s} [{name}]", "toposerve", s, extra=tuple(flags.split()))
                         for s in args.variant_strategies.split(",") if s]  # fmt: skip
        for kind, exe, names in (
            ("vllm-router", rvenv / "bin" / "vllm-router", args.vllm_policies),
            ("sglang-router", rvenv / "bin" / "sglang-router", args.sglang_policies),
        ):
            if not names:
                continue
            if exe.exists():
                policies += [Policy(f"{kind} {n}", kind, n) for n in names.split(",")]
            else:
                report["skipped"].append(f"{kind}: {exe} not found")
        workloads = [w for w in [*make_workloads(args.scale), tenant_workload(args.scale)]
                     if (not args.only and not w.name.startswith("m")) or w.name[0] in args.only]  # fmt: skip
        if "r" in args.only:  # only with --only: the scenario is not part of the default run
            report["replicas"] = await replicas(args, procs, engines)
        port = 27200
        runs: list[dict[str, Any]] = []
        for run in range(args.runs):
            # Interleaved: every run visits every cell once, policies in an order rotated per run,
            # so a slow drift of this shared machine's load hits every policy alike.
            one: dict[str, Any] = {"workloads": {}, "load_avg": os.getloadavg()}
            runs.append(one)
            for w in workloads:
                one["workloads"][w.name] = {}
                k = run % max(len(policies), 1)
                for p in policies[k:] + policies[:k]:
                    port = 27200 + (port - 27200 + 2) % 180
                    summary = await run_cell(args, procs, engines, rvenv, p, w, port)
                    if summary is None:
                        report["skipped"].append(f"{p.name} on {w.name} (run {run + 1}): router not ready")
                        continue
                    one["workloads"][w.name][p.name] = summary
                    print(f"run {run + 1} {w.name:26s} {p.name:28s} " + " ".join(
                        f"{k}={v:.1f}" for k, v in summary.items() if isinstance(v, float | int) and k != "wall_s"),
                        flush=True)  # fmt: skip
                one["workloads"][w.name] = {p.name: one["workloads"][w.name][p.name] for p in policies
                                            if p.name in one["workloads"][w.name]}  # fmt: skip
            if not args.only or "o" in args.only:
                one["overhead"] = await overhead(args, procs, engines[0], rvenv)
        report["runs"] = runs
        merged = median_of(runs) if len(runs) > 1 else dict(runs[0]) if runs else {}
        report["workloads"] = merged.get("workloads", {})
        report["overhead"] = merged.get("overhead", {})
        report["runs_count"] = len(runs)
        report["load_avg"] = [round(x, 1) for x in os.getloadavg()]  # 1/5/15 min at the end
    finally:
        procs.stop_all()
    report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return report


@dataclass
class ReplicaSetup:
    name: str
    strategy: str
    routers: int
    src: str  # PYTHONPATH of the router processes ("" = this tree)
    extra: tuple[str, ...] = ()  # more router flags


async def replicas(args: argparse.Namespace, procs: Procs, engines: list[tuple[str, str]]) -> dict[str, Any]:
    """Workload (a) through one router vs two independent router processes (issue 13).

    Two router replicas behind a Kubernetes Service each learn prefix state from their own half
    of the traffic; the client here picks a router per request at random, the worst case of a
    Service spreading connections. Every setup runs once per round, the order rotated each
    round, with fresh routers and reset engine caches each time; `--variant NAME=DIR` adds the
    same setups from another source tree (the old routing code) into the same rounds.
    """
    if args.replica_workload == "h":
        w = history_workload(args.scale)
    else:
        w = next(x for x in make_workloads(args.scale) if x.name.startswith("a_"))
    trees: list[tuple[str, str, tuple[str, ...]]] = [("HEAD", "", ())]
    trees += [(v.split("=", 1)[0], v.split("=", 1)[1], ()) for v in args.variant]
    trees += [(v.split("=", 1)[0], "", tuple(v.split("=", 1)[1].split())) for v in args.replica_router_args]
    setups = [ReplicaSetup("round-robin x1", "round-robin", 1, "")]
    for strategy in args.replica_strategies.split(","):
        for tree, src, extra in trees:
            for n in (1, 2):
                setups.append(ReplicaSetup(f"{strategy} x{n} [{tree}]", strategy, n, src, extra))
    urls = [u for u, _ in engines]
    runs: dict[str, list[dict[str, Any]]] = {x.name: [] for x in setups}
    port = 27500
    for rnd in range(args.replica_rounds):
        order = setups[rnd % len(setups) :] + setups[: rnd % len(setups)]
        for x in order:
            env = {**os.environ, "PYTHONPATH": str(Path(x.src).resolve())} if x.src else None
            started, routers = [], []
            for _ in range(x.routers):
                port += 1
                pol = Policy(x.name, "toposerve", x.strategy)
                argv = router_argv(pol, engines, port, Path(".")) + list(x.extra)
                started.append(procs.start(f"replicas-{port}", argv, env))
                routers.append(f"http://{HOST}:{port}")
            try:
                if not all([await wait_ready(u) for u in routers]):
                    print(f"replicas {x.name}: router did not become ready", flush=True)
                    continue
                async with aiohttp.ClientSession() as s:  # warm connections, then cold caches
                    await asyncio.gather(*(one_request(s, u, [{"role": "user", "content": "hi"}], 2, None)
                                           for u in routers for _ in range(4)))  # fmt: skip
                await reset_caches(urls)
                e0 = await engine_snapshot(urls)
                results, wall = await run_workload(routers, w, args.deadline, seed=rnd)
                e1 = await engine_snapshot(urls)
            finally:
                for p in started:
                    procs.stop(p)
            summary: dict[str, Any] = {**summarise(results, wall), **engine_delta(e0, e1), "round": rnd}
            runs[x.name].append(summary)
            print(f"replicas r{rnd} {x.name:28s} hit={summary['prefix_hit_rate']:.3f} "
                  f"ttft_p50={summary['ttft_p50_ms']:.0f} p99={summary['ttft_p99_ms']:.0f} "
                  f"engine_ttft_p50={summary['engine_ttft_p50_ms']:.0f} p99={summary['engine_ttft_p99_ms']:.0f} "
                  f"errors={summary['errors']} per-engine={summary.get('engine_requests')}", flush=True)  # fmt: skip
    keys = ("prefix_hit_rate", "ttft_p50_ms", "ttft_p99_ms", "engine_ttft_mean_ms", "engine_ttft_p50_ms",
            "engine_ttft_p99_ms", "e2e_p50_ms", "output_tok_s", "max_share", "min_share", "errors")  # fmt: skip
    medians = {
        name: {k: statistics.median(r[k] for r in rs if k in r) for k in keys if any(k in r for r in rs)}
        for name, rs in runs.items()
        if rs
    }
    return {"workload": w.name, "rounds": args.replica_rounds, "setups": [x.__dict__ for x in setups],
            "runs": runs, "median": medians}  # fmt: skip


async def closed_loop(
    url: str, msg: list[dict[str, str]], conc: int, n: int, max_tokens: int = 8
) -> list[Result]:
    """`n` identical short streaming requests from `conc` concurrent clients."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        await asyncio.gather(*(one_request(s, url, msg, 2, None) for _ in range(min(conc, 20))))
        left = [n]
        results: list[Result] = []

        async def worker() -> None:
            while left[0] > 0:
                left[0] -= 1
                r, _ = await one_request(s, url, msg, max_tokens, None)
                results.append(r)

        await asyncio.gather(*(worker() for _ in range(conc)))
        return results


def proc_cpu_s(pid: int | None) -> float:
    """User + system CPU seconds so far of a process and every process in its group (Linux /proc;
    the routers are started as group leaders, so worker processes count too); 0 without a pid."""
    if pid is None:
        return 0.0
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pid:  # field 5, pgrp (after the state and ppid)
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


async def overhead(
    args: argparse.Namespace, procs: Procs, engine: tuple[str, str], rvenv: Path
) -> dict[str, Any]:
    """Added latency of each proxy vs direct access to one engine, same short streaming request.

    All proxies run at once in front of the same engine and the targets are measured in
    alternating rounds (order rotated each round), so slow drifts of this shared machine's load
    hit every target alike; the added latency is the target's p50 minus direct's p50.
    """
    cands = [Policy("toposerve", "toposerve", "round-robin")]
    if args.gateway:  # the gateway mode (docs/gateway.md): one more lookup and a member router
        cands.append(Policy("toposerve-gateway", "gateway", "round-robin"))
    if (rvenv / "bin" / "vllm-router").exists():
        cands.append(Policy("vllm-router", "vllm-router", "round_robin"))
    if (rvenv / "bin" / "sglang-router").exists():
        cands.append(Policy("sglang-router", "sglang-router", "round_robin"))
    targets = {"direct": engine[0]}
    pids: dict[str, int] = {}
    started: list[subprocess.Popen[bytes]] = []
    port = 27400
    # --variant NAME=DIR: the same toposerve router from another source tree (e.g. an older commit
    # exported with `git archive`), measured side by side in the same alternating rounds
    variants = [(v.split("=", 1)[0], v.split("=", 1)[1]) for v in args.variant]
    # --flags-variant NAME=FLAGS: this tree's router with more flags (e.g. --workers 2), likewise
    flagged = [(v.split("=", 1)[0], tuple(v.split("=", 1)[1].split())) for v in args.flags_variant]
    for p, src in (
        [(c, "") for c in cands]
        + [(Policy(n, "toposerve", "round-robin"), d) for n, d in variants]
        + [(Policy(n, "toposerve", "round-robin", extra=f), "") for n, f in flagged]
    ):
        port += 2
        env = {**os.environ, "PYTHONPATH": str(Path(src).resolve())} if src else None
        argv = router_argv(p, [engine], port, rvenv)
        if p.kind in ("toposerve", "gateway"):
            argv += args.toposerve_args.split() + list(p.extra)
        proc = procs.start(f"overhead-{p.name}", argv, env)
        started.append(proc)
        url = f"http://{HOST}:{port}"
        if await wait_ready(url):
            targets[p.name] = url
            pids[p.name] = proc.pid
    msg = [{"role": "user", "content": "Say something short."}]
    mt = args.overhead_max_tokens
    await asyncio.sleep(2)  # let the routers' first probes and scrapes settle
    res: dict[str, Any] = {"rounds": args.overhead_rounds, "max_tokens": mt}
    for conc in (int(c) for c in args.overhead_levels.split(",")):
        n = {1: 40, 50: 150, 200: 400}.get(conc, max(40, 3 * conc))
        samples: dict[str, list[Result]] = {t: [] for t in targets}
        cpu: dict[str, float] = dict.fromkeys(targets, 0.0)
        idle_cpu: dict[str, float] = dict.fromkeys(targets, 0.0)  # probes, timers: not per chunk
        idle_s: dict[str, float] = dict.fromkeys(targets, 0.0)
        busy_s: dict[str, float] = dict.fromkeys(targets, 0.0)
        names = list(targets)
        for r in range(args.overhead_rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for t in order:
                c0 = {x: proc_cpu_s(pid) for x, pid in pids.items()}
                t0 = time.perf_counter()
                samples[t] += await closed_loop(targets[t], msg, conc, n, mt)
                for x, pid in pids.items():  # the others idle meanwhile: their background CPU
                    (cpu if x == t else idle_cpu)[x] += proc_cpu_s(pid) - c0[x]
                    if x != t:
                        idle_s[x] += time.perf_counter() - t0
                busy_s[t] += time.perf_counter() - t0
        level: dict[str, Any] = {}
        for t, rs in samples.items():
            summ = summarise(rs, 0.0)
            level[t] = {
                k: summ[k]
                for k in ("requests", "errors", "ttft_p50_ms", "ttft_p99_ms", "e2e_p50_ms", "e2e_p99_ms")
            }
            # the proxy's own CPU (utime + stime of its processes; 0 for direct) per request and
            # per relayed SSE chunk (events the client received): much less sensitive to this
            # shared machine's load than latency
            chunks = sum(r.events for r in rs)
            level[t]["chunks"] = chunks
            level[t]["cpu_ms_per_request"] = 1000 * cpu[t] / max(len(rs), 1)
            level[t]["cpu_us_per_chunk"] = 1e6 * cpu[t] / max(chunks, 1)
            # the same less what the router burns idle over as long (probes, scrapes, timers)
            idle_rate = idle_cpu[t] / idle_s[t] if idle_s[t] else 0.0
            level[t]["idle_cpu_pct"] = 100 * idle_rate
            # share of one core the router used while measured: near 100 % would make the single
            # process the limit (then several worker processes could help)
            level[t]["cpu_util_pct"] = 100 * cpu[t] / busy_s[t] if busy_s[t] else 0.0
            level[t]["cpu_us_per_chunk_net"] = 1e6 * max(cpu[t] - idle_rate * busy_s[t], 0.0) / max(chunks, 1)
        for t in names:
            for q in ("p50", "p99"):
                level[t][f"added_ttft_{q}_ms"] = level[t][f"ttft_{q}_ms"] - level["direct"][f"ttft_{q}_ms"]
                level[t][f"added_e2e_{q}_ms"] = level[t][f"e2e_{q}_ms"] - level["direct"][f"e2e_{q}_ms"]
            lv = level[t]
            print(f"overhead c={conc:<4d} {t:14s} +ttft p50/p99={lv['added_ttft_p50_ms']:+.2f}/"
                  f"{lv['added_ttft_p99_ms']:+.2f}ms +e2e p50/p99={lv['added_e2e_p50_ms']:+.2f}/"
                  f"{lv['added_e2e_p99_ms']:+.2f}ms cpu={lv['cpu_us_per_chunk']:.1f}us/chunk "
                  f"(net of idle {lv['cpu_us_per_chunk_net']:.1f}) util={lv['cpu_util_pct']:.0f}% "
                  f"({lv['chunks']} chunks) errors={lv['errors']}", flush=True)  # fmt: skip
        res[str(conc)] = level
    for proc in started:  # the next run starts its own on the same ports
        procs.stop(proc)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument(
        "--rvenv", default="/tmp/rvenv", help="virtualenv with vllm-router, sglang-router, matplotlib"
    )
    ap.add_argument("--out", default=str(ROOT / "bench" / "router" / "results"))
    ap.add_argument("--logs", default="/tmp/toposerve-bench-router-logs", help="engine and router logs")
    ap.add_argument("--time-scale", type=float, default=1.0)
    ap.add_argument(
        "--scale", type=float, default=1.0, help="multiply request counts (0.25 for a quick look)"
    )
    ap.add_argument("--deadline", type=float, default=90.0, help="max seconds per (policy, workload)")
    ap.add_argument("--strategies", default="round-robin,least-request,token-aware,gpu-weighted,prefix-aware,"
                    "session,auto")  # fmt: skip
    ap.add_argument("--vllm-policies", default="cache_aware,power_of_two")
    ap.add_argument("--sglang-policies", default="cache_aware,power_of_two")
    ap.add_argument("--overhead-rounds", type=int, default=3)
    ap.add_argument(
        "--runs", type=int, default=1, help="interleaved runs; cells and overhead are per-cell medians"
    )
    ap.add_argument("--kv-blocks", type=int, default=0, help="KV blocks per engine (0: from the GPU's memory); "
                    "workload m is sized for 1500")  # fmt: skip
    ap.add_argument(
        "--toposerve-args", default="", help="extra flags for every toposerve router, e.g. '--workers 2'"
    )
    ap.add_argument("--overhead-max-tokens", type=int, default=8, help="tokens per overhead stream")
    ap.add_argument("--overhead-levels", default="1,50,200", help="concurrent streams, comma-separated")
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="also measure the toposerve router from source dir DIR (its PYTHONPATH): in the overhead, "
        "in r, and on the workloads with --variant-strategies",
    )
    ap.add_argument("--flags-variant", action="append", default=[], metavar="NAME=FLAGS",
                    help="workloads: also run --variant-strategies with these extra router flags; overhead: "
                    "also measure this tree's router with them")  # fmt: skip
    ap.add_argument(
        "--variant-strategies", default="auto", help="workloads: strategies run from each --variant"
    )
    ap.add_argument(
        "--gateway",
        action="store_true",
        help="overhead: also measure `toposerve gateway` in front of the engine",
    )
    ap.add_argument("--only", default="", help="subset of workloads by letter: a, b, c, m (many tenants, "
                    "cache-heavy; only when named), o (overhead), r (one vs two router replicas on workload a; only when named)")  # fmt: skip
    ap.add_argument("--replica-strategies", default="auto", help="r: strategies to compare, comma-separated")
    ap.add_argument("--replica-rounds", type=int, default=3, help="r: interleaved rounds")
    ap.add_argument("--replica-workload", choices=("a", "h"), default="a", help="r: workload (a) or (h)")
    ap.add_argument("--replica-router-args", action="append", default=[], metavar="NAME=FLAGS",
                    help="r: also run this tree's router with extra flags, e.g. 'home1=--home-weight 1'")  # fmt: skip
    args = ap.parse_args()
    report = asyncio.run(bench(args))
    out = Path(args.out)
    (out / "results.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {out / 'results.json'}")
    plot = Path(__file__).with_name("plot.py")
    py = Path(args.rvenv) / "bin" / "python"
    with contextlib.suppress(Exception):
        subprocess.run([str(py if py.exists() else PY), str(plot), str(out / "results.json")], check=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
