"""The tables of bench/router/grid.py's results for docs/benchmarks.md: per cell, the medians over
rounds of every policy, and how each toposerve policy stands against the better Rust router.

    .venv/bin/python bench/router/grid_table.py bench/router/results-grid/results.json

"Better Rust router" is chosen per metric (the lower of sglang-router's and vllm-router's
medians). A toposerve figure **ties** when it is within 5 % of it or within 5 ms (TTFT; run-to-run
noise on this machine is larger than either), is **ahead** when lower by more, **behind** when
higher by more. Wall time is the closed-loop cells' makespan; for open-loop cells (arrivals fixed by
the schedule) the mean end-to-end latency stands in for it.
"""

from __future__ import annotations

import json
import statistics
import sys
from typing import Any

RUST = ("sglang-router cache_aware", "vllm-router cache_aware")
OURS = ("auto", "auto kv")


def verdict(ours: float, theirs: float, abs_ms: float) -> str:
    if ours <= theirs * 1.05 or ours - theirs <= abs_ms:
        return "ahead" if ours < theirs * 0.95 and theirs - ours > abs_ms else "tie"
    return "behind"


def medians(rows: list[dict[str, Any]]) -> dict[str, float]:
    keys = rows[0].keys()
    return {k: statistics.median(r[k] for r in rows) for k in keys if isinstance(rows[0][k], int | float)}


def main(path: str) -> int:
    with open(path) as f:
        r = json.load(f)
    grid = {c["name"]: c for c in r["grid"]}
    print("| cell | policy | rounds | hit | TTFT p50 | TTFT p99 | wall (s) or e2e mean (ms) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    verdicts: dict[str, dict[str, list[str]]] = {p: {"p50": [], "p99": [], "wall": []} for p in OURS}
    for cell, by in r["runs"].items():
        closed = grid[cell]["mode"] == "closed"
        med = {p: medians(rows) for p, rows in by.items()}
        for p, m in med.items():
            w = f"{m['wall_s']:.1f}" if closed else f"{m['e2e_mean_ms']:.0f}"
            print(f"| {cell} | {p} | {len(by[p])} | {m['prefix_hit_rate']:.3f} | {m['ttft_p50_ms']:.0f} | "
                  f"{m['ttft_p99_ms']:.0f} | {w} |")  # fmt: skip
        rust = [med[p] for p in RUST if p in med]
        if not rust:
            continue
        best = {
            "p50": min(m["ttft_p50_ms"] for m in rust),
            "p99": min(m["ttft_p99_ms"] for m in rust),
            "wall": min(m["wall_s"] * 1000 if closed else m["e2e_mean_ms"] for m in rust),
        }
        for p in OURS:
            if p not in med:
                continue
            m = med[p]
            wall = m["wall_s"] * 1000 if closed else m["e2e_mean_ms"]
            verdicts[p]["p50"].append(verdict(m["ttft_p50_ms"], best["p50"], 5))
            verdicts[p]["p99"].append(verdict(m["ttft_p99_ms"], best["p99"], 5))
            verdicts[p]["wall"].append(verdict(wall, best["wall"], 0))
    print()
    print("| toposerve policy | metric | ahead | tie | behind |")
    print("| --- | --- | ---: | ---: | ---: |")
    for p, by_metric in verdicts.items():
        for metric, vs in by_metric.items():
            print(f"| {p} | {metric} | {vs.count('ahead')} | {vs.count('tie')} | {vs.count('behind')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "bench/router/results-grid/results.json"))
