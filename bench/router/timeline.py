"""When each piece of one stream arrives, direct and through each proxy: where added latency grows.

One client, one request at a time, the same short chat stream (8 tokens, usage on) sent to the
engine directly and through each proxy in turn (alternating, so drifts of the machine hit all
alike). For every read the client gets (the response head, then each body read) it prints the
median arrival time after the request was sent, and each proxy's difference from direct. A gap
that stays constant over the stream is the proxy's per-hop cost; one that grows means the engine
itself ran slower (its decode steps are paced by sleeps on the same shared cores).

Starts nothing: run the engine and the proxies first (docs/benchmarks.md has the commands).

    python bench/router/timeline.py --direct http://127.0.0.1:27101 \
        --proxy toposerve=http://127.0.0.1:27103 --proxy vllm-router=http://127.0.0.1:27105
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import aiohttp

BODY = {
    "model": "m",
    "messages": [{"role": "user", "content": "Say something short."}],
    "max_tokens": 8,
    "stream": True,
    "stream_options": {"include_usage": True},
}


async def one(s: aiohttp.ClientSession, url: str) -> list[float]:
    """Arrival times (s) of the head and of each body read, then of the response's end."""
    t0 = time.perf_counter()
    out = []
    async with s.post(url + "/v1/chat/completions", json=BODY) as r:
        out.append(time.perf_counter() - t0)
        async for _ in r.content.iter_any():
            out.append(time.perf_counter() - t0)
    out.append(time.perf_counter() - t0)
    return out


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--direct", required=True, help="the engine's URL")
    ap.add_argument("--proxy", action="append", default=[], metavar="NAME=URL")
    ap.add_argument("--requests", type=int, default=150, help="per target")
    ap.add_argument("--warmup", type=int, default=30, help="first requests per target left out")
    args = ap.parse_args()
    targets = {"direct": args.direct} | dict(p.split("=", 1) for p in args.proxy)
    res: dict[str, list[list[float]]] = {t: [] for t in targets}
    async with aiohttp.ClientSession() as s:
        for _ in range(args.requests):
            for t, url in targets.items():
                res[t].append(await one(s, url))
    med: dict[str, list[float]] = {}
    for t, runs in res.items():
        runs = runs[args.warmup :]
        n = min(len(r) for r in runs)  # reads can merge; compare the common prefix
        med[t] = [1e3 * statistics.median(r[i] for r in runs) for i in range(n)]
    n = min(len(v) for v in med.values())
    print("read:" + " " * 14 + " ".join(f"{i:>7}" for i in range(n)))
    for t, v in med.items():
        print(f"{t:18s} " + " ".join(f"{x:7.2f}" for x in v[:n]) + "  ms after sending")
    for t, v in med.items():
        if t != "direct":
            print(
                f"{t + ' - dir':18s} "
                + " ".join(f"{x - d:+7.2f}" for x, d in zip(v[:n], med["direct"][:n], strict=True))
            )


if __name__ == "__main__":
    asyncio.run(main())
