"""Router benchmark: toposerve's strategies vs vllm-router and sglang-router on the same mock engines.

One run starts one fleet of mock engines (2x H100 + 2x A100-40GB, realistic time scale) on
127.0.0.1 and, for every (policy, workload), starts a fresh router in front of it, resets the
engines' prefix caches, replays the same deterministic request list, and records client-side
TTFT / end-to-end latency / output tokens per second plus the engines' prefix-cache hit rate.
Then it measures the proxy's added latency vs direct access at 1, 50 and 200 concurrent streams.

    .venv/bin/python bench/router/run.py --rvenv /tmp/rvenv --out bench/router/results

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
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

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


# --------------------------------------------------------------------------------------------- client


@dataclass
class Result:
    ttft: float
    e2e: float
    out_tokens: int
    ok: bool


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
    return Result(ttft, time.perf_counter() - t0, out or len(text), bool(ttft)), "".join(text)


async def run_workload(url: str, w: Workload, deadline_s: float) -> tuple[list[Result], float]:
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
                        r, reply = await one_request(s, url, msgs, w.max_tokens, c.user)
                        results.append(r)
                        msgs.append({"role": "assistant", "content": reply or "ok"})

            await asyncio.gather(*(conv_worker() for _ in range(w.concurrency)))
        else:
            items = list(w.prompts)

            async def worker() -> None:
                while items and time.perf_counter() < stop_at:
                    text, mt = items.pop(0)
                    r, _ = await one_request(s, url, [{"role": "user", "content": text}], mt, None)
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
    snap: dict[str, Any] = {"hits": 0.0, "queries": 0.0, "ttft_sum": 0.0, "ttft_count": 0.0, "buckets": {}}
    async with aiohttp.ClientSession() as s:
        for e in engines:
            async with s.get(e + "/metrics") as r:
                for line in (await r.text()).splitlines():
                    if line.startswith("#"):
                        continue
                    value = float(line.rsplit(" ", 1)[1]) if " " in line else 0.0
                    if line.startswith("vllm:prefix_cache_hits_total"):
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


def engine_delta(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float]:
    """Hit rate and engine-side TTFT (mean; p50/p99 interpolated in histogram buckets) between snapshots."""
    out = {
        "prefix_hit_rate": (b["hits"] - a["hits"]) / (b["queries"] - a["queries"])
        if b["queries"] > a["queries"]
        else 0.0
    }
    n = b["ttft_count"] - a["ttft_count"]
    out["engine_ttft_mean_ms"] = (b["ttft_sum"] - a["ttft_sum"]) / n * 1000 if n else float("nan")
    bounds = sorted(
        ((float(le), b["buckets"][le] - a["buckets"].get(le, 0.0)) for le in b["buckets"]), key=lambda x: x[0]
    )
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


def router_argv(p: Policy, engines: list[tuple[str, str]], port: int, rvenv: Path) -> list[str]:
    urls = [u for u, _ in engines]
    if p.kind == "toposerve":
        tagged = ",".join(f"{u}#gpu={g}" for u, g in engines)
        return [PY, "-m", "toposerve.cli", "router", "--backends", tagged, "--strategy", p.arg,
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
                        "--enable-admin"])  # fmt: skip
        for u, _ in engines:
            assert await wait_ready(u), f"engine {u} did not start"
        policies = [Policy(f"toposerve {s}", "toposerve", s) for s in args.strategies.split(",")]
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
        workloads = [w for w in make_workloads(args.scale) if not args.only or w.name[0] in args.only]
        port = 27200
        for w in workloads:
            report["workloads"][w.name] = {}
            for p in policies:
                port += 2
                proc = procs.start(f"{p.kind}-{p.arg}-{w.name[0]}", router_argv(p, engines, port, rvenv))
                url = f"http://{HOST}:{port}"
                if not await wait_ready(url, "/health") and not await wait_ready(url, "/v1/models", 20):
                    report["skipped"].append(f"{p.name} on {w.name}: router did not become ready")
                    procs.stop(proc)
                    continue
                async with aiohttp.ClientSession() as s:  # warm connections, then start from cold caches
                    await asyncio.gather(*(one_request(s, url, [{"role": "user", "content": "hi"}], 2, None)
                                           for _ in range(8)))  # fmt: skip
                await reset_caches([u for u, _ in engines])
                e0 = await engine_snapshot([u for u, _ in engines])
                results, wall = await run_workload(url, w, args.deadline)
                e1 = await engine_snapshot([u for u, _ in engines])
                summary = summarise(results, wall)
                summary.update(engine_delta(e0, e1))
                report["workloads"][w.name][p.name] = summary
                print(f"{w.name:28s} {p.name:30s} " + " ".join(
                    f"{k}={v:.1f}" for k, v in summary.items() if k != "wall_s"), flush=True)  # fmt: skip
                procs.stop(proc)
        if not args.only or "o" in args.only:
            report["overhead"] = await overhead(args, procs, engines[0], rvenv)
    finally:
        procs.stop_all()
    report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return report


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
    """User + system CPU seconds of a process so far (Linux /proc); 0 without a pid."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def overhead(
    args: argparse.Namespace, procs: Procs, engine: tuple[str, str], rvenv: Path
) -> dict[str, Any]:
    """Added latency of each proxy vs direct access to one engine, same short streaming request.

    All proxies run at once in front of the same engine and the targets are measured in
    alternating rounds (order rotated each round), so slow drifts of this shared machine's load
    hit every target alike; the added latency is the target's p50 minus direct's p50.
    """
    cands = [Policy("toposerve", "toposerve", "round-robin")]
    if (rvenv / "bin" / "vllm-router").exists():
        cands.append(Policy("vllm-router", "vllm-router", "round_robin"))
    if (rvenv / "bin" / "sglang-router").exists():
        cands.append(Policy("sglang-router", "sglang-router", "round_robin"))
    targets = {"direct": engine[0]}
    pids: dict[str, int] = {}
    port = 27400
    # --variant NAME=DIR: the same toposerve router from another source tree (e.g. an older commit
    # exported with `git archive`), measured side by side in the same alternating rounds
    variants = [(v.split("=", 1)[0], v.split("=", 1)[1]) for v in args.variant]
    for p, src in [(c, "") for c in cands] + [
        (Policy(n, "toposerve", "round-robin"), d) for n, d in variants
    ]:
        port += 2
        env = {**os.environ, "PYTHONPATH": str(Path(src).resolve())} if src else None
        proc = procs.start(f"overhead-{p.name}", router_argv(p, [engine], port, rvenv), env)
        url = f"http://{HOST}:{port}"
        if await wait_ready(url):
            targets[p.name] = url
            pids[p.name] = proc.pid
    msg = [{"role": "user", "content": "Say something short."}]
    mt = args.overhead_max_tokens
    res: dict[str, Any] = {"rounds": args.overhead_rounds, "max_tokens": mt}
    for conc in (int(c) for c in args.overhead_levels.split(",")):
        n = {1: 40, 50: 150, 200: 400}.get(conc, max(40, 3 * conc))
        samples: dict[str, list[Result]] = {t: [] for t in targets}
        cpu: dict[str, float] = dict.fromkeys(targets, 0.0)
        names = list(targets)
        for r in range(args.overhead_rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for t in order:
                c0 = proc_cpu_s(pids.get(t))
                samples[t] += await closed_loop(targets[t], msg, conc, n, mt)
                cpu[t] += proc_cpu_s(pids.get(t)) - c0
        level: dict[str, Any] = {}
        for t, rs in samples.items():
            summ = summarise(rs, 0.0)
            level[t] = {
                k: summ[k] for k in ("requests", "errors", "ttft_p50_ms", "ttft_p99_ms", "e2e_p50_ms")
            }
            # the proxy's own CPU per request (utime + stime of its process; 0 for direct):
            # much less sensitive to this shared machine's load than latency
            level[t]["cpu_ms_per_request"] = 1000 * cpu[t] / max(len(rs), 1)
        for t in names:
            level[t]["added_ttft_p50_ms"] = level[t]["ttft_p50_ms"] - level["direct"]["ttft_p50_ms"]
            level[t]["added_e2e_p50_ms"] = level[t]["e2e_p50_ms"] - level["direct"]["e2e_p50_ms"]
            print(f"overhead c={conc:<4d} {t:14s} ttft_p50={level[t]['ttft_p50_ms']:.2f}ms "
                  f"(+{level[t]['added_ttft_p50_ms']:.2f}) e2e_p50={level[t]['e2e_p50_ms']:.2f}ms "
                  f"(+{level[t]['added_e2e_p50_ms']:.2f}) cpu={level[t]['cpu_ms_per_request']:.3f}ms/req",
                  flush=True)  # fmt: skip
        res[str(conc)] = level
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
    ap.add_argument("--overhead-max-tokens", type=int, default=8, help="tokens per overhead stream")
    ap.add_argument("--overhead-levels", default="1,50,200", help="concurrent streams, comma-separated")
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="overhead: also measure the toposerve router from source dir DIR (its PYTHONPATH)",
    )
    ap.add_argument("--only", default="", help="subset of workloads by letter: a, b, c, o (overhead)")
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
