"""How much streaming the mock engine sustains, so it is never the bottleneck of router benchmarks.

Starts ``toposerve mock-engine --time-scale 0`` as its own process pinned to one CPU core, drives
it from this process (pinned to another core when there is one) with N concurrent streaming
completions, and reports streamed output tokens/s counted on the client from the SSE events
actually received, the mock's own CPU seconds (so tokens per mock CPU-second, independent of
how noisy the machine is), TTFT and end-to-end latency percentiles.

    .venv/bin/python bench/mockengine/bench_stream.py --concurrency 50 200 --max-tokens 256

Results are printed and written as JSON to bench/mockengine/results/. Loopback only; bounded in
request count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

HERE = Path(__file__).resolve().parent


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_mock(port: int, max_num_seqs: int, core: int | None) -> tuple[subprocess.Popen[str], int]:
    cmd = [
        sys.executable, "-c", "import sys; from toposerve.cli import main; sys.exit(main(sys.argv[1:]))",
        "mock-engine", "--host", "127.0.0.1", "--port", str(port), "--model", "bench",
        "--time-scale", "0", "--max-num-seqs", str(max_num_seqs), "--max-waiting", "100000",
        "--log-level", "warning",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    if core is not None:
        os.sched_setaffinity(proc.pid, {core})
    return proc, proc.pid


async def wait_ready(base: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            try:
                async with s.get(base + "/health") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError("mock engine did not become ready")


async def one_stream(
    s: aiohttp.ClientSession, url: str, max_tokens: int, i: int, t0: float, prompt_words: int
) -> tuple[int, float, float, bool]:
    prompt = f"request {i}: tell me a long story" + " about GPUs" * (prompt_words // 2)
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "stream": True, "ignore_eos": True}
    events, ttft, carry, tail = 0, -1.0, b"", b""
    async with s.post(url, json=body) as r:
        r.raise_for_status()
        async for chunk in r.content.iter_any():
            if ttft < 0:
                ttft = time.perf_counter() - t0
            buf = carry + chunk
            events += buf.count(b"\n\n")
            carry = buf[-1:]
            tail = (tail + chunk)[-32:]
    tokens = events - 2  # minus the finish chunk and [DONE]
    return tokens, ttft, time.perf_counter() - t0, tail.endswith(b"data: [DONE]\n\n")


async def run_level(
    base: str, pid: int, concurrency: int, max_tokens: int, prompt_words: int = 0
) -> dict[str, Any]:
    url = base + "/v1/completions"
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=600)) as s:
        cpu0, client0, t0 = cpu_seconds(pid), time.process_time(), time.perf_counter()
        results = await asyncio.gather(
            *(one_stream(s, url, max_tokens, i, t0, prompt_words) for i in range(concurrency))
        )
        wall, cpu = time.perf_counter() - t0, cpu_seconds(pid) - cpu0
        client_cpu = time.process_time() - client0
    tokens = sum(r[0] for r in results)
    ttfts = sorted(r[1] for r in results)
    e2es = sorted(r[2] for r in results)

    def q(xs: list[float], p: float) -> float:
        return xs[min(len(xs) - 1, int(p * len(xs)))]

    return {
        "concurrency": concurrency,
        "max_tokens": max_tokens,
        "prompt_words": prompt_words,
        "completed_streams": sum(1 for r in results if r[3] and r[0] == max_tokens),
        "streamed_tokens": tokens,
        "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 1),
        "mock_cpu_s": round(cpu, 3),
        "tokens_per_mock_cpu_s": round(tokens / cpu, 1) if cpu > 0 else None,
        "mock_cpu_utilisation": round(cpu / wall, 2),
        "client_cpu_s": round(client_cpu, 3),
        "ttft_p50_s": round(statistics.median(ttfts), 4),
        "ttft_p99_s": round(q(ttfts, 0.99), 4),
        "e2e_p50_s": round(statistics.median(e2es), 4),
        "e2e_p99_s": round(q(e2es, 0.99), 4),
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    ncpu = os.cpu_count() or 1
    mock_core, client_core = (0, 1) if ncpu >= 2 and not args.no_pin else (None, None)
    proc, pid = start_mock(args.port, args.max_num_seqs, mock_core)
    if client_core is not None:
        os.sched_setaffinity(0, {client_core})
    base = f"http://127.0.0.1:{args.port}"
    try:
        await wait_ready(base)
        await run_level(base, pid, 8, 16)  # warm-up
        levels = []
        for c in args.concurrency:
            for rep in range(args.repeat):
                r = await run_level(base, pid, c, args.max_tokens, args.prompt_words)
                r["repeat"] = rep
                levels.append(r)
                print(json.dumps(r), flush=True)
        async with aiohttp.ClientSession() as s, s.get(base + "/metrics") as resp:
            text = await resp.text()
        gen = re.search(r'^vllm:generation_tokens_total\{model_name="bench"\} (\S+)$', text, re.M)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return {
        "benchmark": "mockengine streaming overhead (time-scale 0)",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "host": {"cpus": ncpu, "python": platform.python_version(), "machine": platform.machine()},
        "pinned": {"mock_core": mock_core, "client_core": client_core},
        "levels": levels,
        "engine_generation_tokens_total": float(gen.group(1)) if gen else None,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--concurrency", type=int, nargs="+", default=[50, 200])
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--prompt-words", type=int, default=0, help="extra prompt words (long-context runs)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--port", type=int, default=18931)
    p.add_argument("--no-pin", action="store_true", help="do not pin mock and client to separate cores")
    p.add_argument("--out", default=str(HERE / "results" / "stream.json"))
    args = p.parse_args()
    result = asyncio.run(main_async(args))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
