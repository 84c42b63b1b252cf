"""Tenants under two-times overload (issue 27): priority bands and fair queuing in the gateway
against the same gateway without flow control, in one run, interleaved.

Setup (all on this machine): 2 mock engines (vLLM 0.33 timing model, `--max-num-seqs 8
--time-scale 1`), `toposerve gateway --static-config` in front (one deployment `m`), `--max-in-flight
8` per replica (so the gateway, not the engines, holds the excess). Nine tenants in three bands:

* critical: `c1 c2 c3`, each 0.1 C requests/s;
* standard: `s1 s2` at 0.12 C each and `s3` at 1.2 C (ten times more);
* sheddable: `b1 b2 b3`, 0.09 C each;

where C is the fleet's capacity in requests/s, measured first (closed loop, 32 concurrent, same
request shape: 256-token prompts of distinct text, 48 output tokens). Offered: about 2 C. Arrivals
are Poisson per tenant (seeded), every request streams with `stream_options.include_usage`, a
client gives up after 60 s.

Policies, same arrivals:

* `flow`: `--tenants-file` (the nine tenants with their bands and key digests) and
  `--require-api-key`: admission, bands, weighted fair queuing on tokens (router/flowcontrol.py),
  `--flow-max-wait 20`;
* `none`: the same gateway without tenants (every request routed at once; the excess queues on the
  replicas the way the router alone does).

Reported per policy: per band offered/ok/429/failed and TTFT p50/p99 of the served requests; per
standard tenant the completion tokens served; Jain's fairness index over the standard tenants'
served tokens, raw and relative to their max-min fair shares of what the band was served (a
tenant asking less than an equal share is entitled to what it asks: that is the "a tenant sending
10x more does not starve the others" reading); the critical band's p99 TTFT against the SLO
(`--slo`, 2 s by default).

    PYTHONPATH=operator .venv/bin/python bench/tenants/overload.py --rounds 2 --out bench/tenants/results
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import importlib.util
import json
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench/router"))  # run.py imports its neighbours as a script does
_spec = importlib.util.spec_from_file_location("router_bench", ROOT / "bench/router/run.py")
assert _spec and _spec.loader
rb = importlib.util.module_from_spec(_spec)
sys.modules["router_bench"] = rb  # dataclasses look their module up
_spec.loader.exec_module(rb)  # Procs, wait_ready, HOST, PY: the router benchmark's process handling
HOST, PY = rb.HOST, rb.PY

PROMPT_WORDS = 230  # about 256 mock tokens
OUTPUT = 48
BANDS = {"critical": ("c1", "c2", "c3"), "standard": ("s1", "s2", "s3"), "sheddable": ("b1", "b2", "b3")}
SHARE = {
    "c1": 0.1,
    "c2": 0.1,
    "c3": 0.1,
    "s1": 0.12,
    "s2": 0.12,
    "s3": 1.2,
    "b1": 0.09,
    "b2": 0.09,
    "b3": 0.09,
}


def key_of(tenant: str) -> str:
    return f"sk-bench-{tenant}-0123456789abcdef"


def band_of(tenant: str) -> str:
    return next(b for b, ts in BANDS.items() if tenant in ts)


@dataclass
class Result:
    tenant: str
    status: int
    ttft: float | None = None
    tokens: int = 0


@dataclass
class Run:
    policy: str
    round: int
    results: list[Result] = field(default_factory=list)


def prompt(rng: random.Random, tenant: str, i: int) -> str:
    return f"{tenant} request {i}: " + " ".join(f"w{rng.randrange(10**6)}" for _ in range(PROMPT_WORDS))


async def one(s: aiohttp.ClientSession, url: str, tenant: str, text: str) -> Result:
    body = {"model": "m", "messages": [{"role": "user", "content": text}], "max_tokens": OUTPUT,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    t0 = time.monotonic()
    ttft = None
    tokens = 0
    try:
        async with s.post(url + "/v1/chat/completions", json=body,
                          headers={"Authorization": f"Bearer {key_of(tenant)}"}) as r:  # fmt: skip
            if r.status != 200:
                text = await r.text()
                if r.status not in (429,):
                    print(f"{tenant}: {r.status} {text[:300]}", file=sys.stderr, flush=True)
                return Result(tenant, r.status)
            async for raw in r.content:
                line = raw.strip()
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                doc = json.loads(line[6:])
                if ttft is None and doc.get("choices") and doc["choices"][0].get("delta", {}).get("content"):
                    ttft = time.monotonic() - t0
                if doc.get("usage"):
                    tokens = int(doc["usage"].get("completion_tokens") or 0)
            return Result(tenant, 200, ttft, tokens)
    except (aiohttp.ClientError, TimeoutError):
        return Result(tenant, 0)


async def capacity(engines: list[str], seconds: float) -> float:
    """Requests/s the fleet completes at this request shape, closed loop (32 concurrent)."""
    rng = random.Random(0)
    done = 0
    stop = time.monotonic() + seconds
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as s:

        async def worker(i: int) -> None:
            nonlocal done
            while time.monotonic() < stop:
                r = await one(s, engines[i % len(engines)], "cal", prompt(rng, "cal", i))
                done += r.status == 200

        t0 = time.monotonic()
        await asyncio.gather(*(worker(i) for i in range(32)))
        return done / (time.monotonic() - t0)


async def offered(url: str, cap: float, seconds: float, seed: int) -> list[Result]:
    """Poisson arrivals per tenant at SHARE x capacity for `seconds`; every answer awaited."""
    timeout = aiohttp.ClientTimeout(total=60)
    tasks: list[asyncio.Task[Result]] = []
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as s:

        async def tenant_loop(tenant: str) -> None:
            rng = random.Random(f"{seed}-{tenant}")
            rate = SHARE[tenant] * cap
            t, i = 0.0, 0
            start = time.monotonic()
            while True:
                t += rng.expovariate(rate)
                if t >= seconds:
                    return
                await asyncio.sleep(max(0.0, start + t - time.monotonic()))
                tasks.append(asyncio.create_task(one(s, url, tenant, prompt(rng, tenant, i))))
                i += 1

        await asyncio.gather(*(tenant_loop(t) for t in SHARE))
        return list(await asyncio.gather(*tasks))


def tenants_file(path: Path) -> None:
    doc = {"tenants": {
        t: {"models": ["m"], "priority": band_of(t), "weight": 1,
            "keySha256": [hashlib.sha256(key_of(t).encode()).hexdigest()]}
        for t in SHARE
    }}  # fmt: skip
    path.write_text(json.dumps(doc))


def jain(xs: list[float]) -> float:
    return sum(xs) ** 2 / (len(xs) * sum(x * x for x in xs)) if any(xs) else 0.0


def maxmin(demands: list[float], total: float) -> list[float]:
    """Max-min fair shares of `total` for these demands (water filling)."""
    share = [0.0] * len(demands)
    left, open_ = total, list(range(len(demands)))
    while open_ and left > 1e-9:
        each = left / len(open_)
        done = [i for i in open_ if demands[i] - share[i] <= each]
        if not done:
            for i in open_:
                share[i] += each
            break
        for i in done:
            left -= demands[i] - share[i]
            share[i] = demands[i]
        open_ = [i for i in open_ if i not in done]
    return share


def summarize(run: Run, slo: float) -> dict[str, Any]:
    out: dict[str, Any] = {"policy": run.policy, "round": run.round, "bands": {}, "tenants": {}}
    for band, ts in BANDS.items():
        rs = [r for r in run.results if r.tenant in ts]
        ttfts = [r.ttft for r in rs if r.status == 200 and r.ttft is not None]
        out["bands"][band] = {
            "offered": len(rs), "ok": sum(r.status == 200 for r in rs), "429": sum(r.status == 429 for r in rs),
            "failed": sum(r.status not in (200, 429) for r in rs),
            "codes": {str(c): sum(r.status == c for r in rs) for c in sorted({r.status for r in rs})},
            "ttft_p50": rb.pct(ttfts, 50) if ttfts else None, "ttft_p99": rb.pct(ttfts, 99) if ttfts else None,
        }  # fmt: skip
    for t in SHARE:
        rs = [r for r in run.results if r.tenant == t]
        out["tenants"][t] = {"offered": len(rs), "ok": sum(r.status == 200 for r in rs),
                             "tokens": sum(r.tokens for r in rs if r.status == 200)}  # fmt: skip
    std = BANDS["standard"]
    served = [float(out["tenants"][t]["tokens"]) for t in std]
    demand = [float(out["tenants"][t]["offered"] * OUTPUT) for t in std]
    fair = maxmin(demand, sum(served))
    out["jain_raw"] = round(jain(served), 3)
    out["jain_maxmin"] = round(jain([s / f for s, f in zip(served, fair, strict=True) if f > 0]), 3)
    p99 = out["bands"]["critical"]["ttft_p99"]
    out["critical_meets_slo"] = p99 is not None and p99 <= slo
    return out


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals per run")
    ap.add_argument("--calibrate", type=float, default=15.0, help="seconds of the capacity measurement")
    ap.add_argument("--slo", type=float, default=2.0, help="critical band's p99 TTFT target, seconds")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--policies", default="flow,none", help="which of flow,none to run")
    ap.add_argument("--port", type=int, default=18400)
    ap.add_argument("--out", type=Path, default=ROOT / "bench/tenants/results")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    logs = Path(tempfile.mkdtemp(prefix="toposerve-bench-tenants-"))
    procs = rb.Procs(logs)
    engines = [f"http://{HOST}:{args.port + i}" for i in range(2)]
    try:
        for i in range(len(engines)):
            procs.start(f"engine-{i}", [PY, "-m", "toposerve.cli", "mock-engine", "--host", HOST,
                                        "--port", str(args.port + i), "--model", "m", "--max-num-seqs", "8",
                                        "--time-scale", "1", "--seed", str(i)])  # fmt: skip
        for url in engines:
            assert await rb.wait_ready(url), f"engine {url} did not start (logs: {logs})"
        cap = await capacity(engines, args.calibrate)
        print(f"capacity: {cap:.2f} requests/s (offered about {sum(SHARE.values()) * cap:.2f})", flush=True)
        static = logs / "static.json"
        static.write_text(json.dumps({
            "deployments": [{"metadata": {"name": "m", "namespace": "bench", "creationTimestamp": "2026-01-01T00:00:00Z"},
                             "spec": {"model": {"name": "m"}}}],
            "backends": {"bench/m": engines},
        }))  # fmt: skip
        tfile = logs / "tenants.json"
        tenants_file(tfile)
        gw = f"http://{HOST}:{args.port + 10}"
        summaries: list[dict[str, Any]] = []
        for rnd in range(args.rounds):
            order = ("flow", "none") if rnd % 2 == 0 else ("none", "flow")
            for policy in [p for p in order if p in args.policies.split(",")]:
                argv = [PY, "-m", "toposerve.cli", "gateway", "--static-config", str(static), "--host", HOST,
                        "--port", str(args.port + 10), "--max-in-flight", "8", "--log-level", "WARNING",
                        # every tenant comes from this one loopback address: no per-client cap
                        "--max-connections-per-client", "0"]  # fmt: skip
                if policy == "flow":
                    argv += ["--tenants-file", str(tfile), "--require-api-key", "--flow-max-wait", "20"]
                p = procs.start(f"gateway-{policy}-{rnd}", argv)
                try:
                    assert await rb.wait_ready(gw), f"gateway did not start (logs: {logs})"
                    t0 = time.monotonic()
                    results = await offered(gw, cap, args.duration, args.seed * 1000 + rnd)
                    run = Run(policy, rnd, results)
                    s = summarize(run, args.slo)
                    s["capacity_rps"] = round(cap, 3)
                    s["wall_s"] = round(time.monotonic() - t0, 1)
                    summaries.append(s)
                    print(json.dumps(s), flush=True)
                finally:
                    procs.stop(p)
                with contextlib.suppress(Exception):
                    await rb.reset_caches(engines)
        (args.out / f"overload-seed{args.seed}.jsonl").write_text(
            "".join(json.dumps(s) + "\n" for s in summaries)
        )
        for policy in ("flow", "none"):
            mine = [s for s in summaries if s["policy"] == policy]
            crit = [s["bands"]["critical"]["ttft_p99"] for s in mine]
            print(policy, "critical p99 TTFT:", crit, "jain max-min:", [s["jain_maxmin"] for s in mine],
                  "sheddable ok/offered:", [(s["bands"]["sheddable"]["ok"], s["bands"]["sheddable"]["offered"])
                                            for s in mine], "median crit p99:",
                  statistics.median([c for c in crit if c is not None]) if any(crit) else None)  # fmt: skip
        return 0
    finally:
        procs.stop_all()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
