"""Markdown tables from bench/router results.json (what docs/benchmarks.md quotes).

python bench/router/summarize.py bench/router/results/results.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

COLS = (
    ("ttft_p50_ms", "TTFT p50"),
    ("ttft_p99_ms", "TTFT p99"),
    ("e2e_p50_ms", "e2e p50"),
    ("e2e_p99_ms", "e2e p99"),
    ("output_tok_s", "out tok/s"),
    ("wall_s", "wall s"),
    ("prefix_hit_rate", "prefix hit"),
    ("engine_ttft_mean_ms", "engine TTFT mean"),
    ("engine_ttft_p50_ms", "engine TTFT p50"),
    ("engine_ttft_p99_ms", "engine TTFT p99"),
)


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Cell-wise median of numeric leaves present in the first run (missing ones skipped)."""

    def merge(parts: list[Any]) -> Any:
        head = parts[0]
        if isinstance(head, dict):
            return {k: merge([p[k] for p in parts if isinstance(p, dict) and k in p]) for k in head}
        if isinstance(head, int | float) and not isinstance(head, bool):
            return statistics.median(float(p) for p in parts)
        return head

    out = merge(runs)
    out["runs"] = len(runs)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("results", nargs="+")
    ap.add_argument("--median-out")
    args = ap.parse_args()
    runs = [json.loads(Path(p).read_text()) for p in args.results]
    data = median_of(runs) if len(runs) > 1 else runs[0]
    if args.median_out:
        Path(args.median_out).write_text(json.dumps(data, indent=2))
    inner = int(data.get("runs_count") or 1)  # run.py --runs N: one file, cells already medians
    n = len(runs) * inner
    print(f"{n} run(s){'; cells are medians' if n > 1 else ''}; load average {data.get('load_avg', 'n/a')}")
    for w, rows in data["workloads"].items():
        print(f"\n**{w}** (ms unless noted; errors in brackets when any)\n")
        print("| policy | " + " | ".join(label for _, label in COLS) + " |")
        print("| --- |" + " ---: |" * len(COLS))
        for name, r in rows.items():
            cells = [
                f"{r[k]:.2f}" if k == "prefix_hit_rate" else f"{r[k]:.1f}" if k == "wall_s" else f"{r[k]:.0f}"
                for k, _ in COLS
            ]
            err = f" [{r['errors']:.0f} err]" if r.get("errors") else ""
            print(f"| {name}{err} | " + " | ".join(cells) + " |")
    ov = data.get("overhead") or {}
    if ov:
        print(
            "\n**added latency vs direct** (ms; one engine, short streams) and router CPU per relayed chunk\n"
        )
        names = [n for n in ov.get("1", {}) if n != "direct"]
        print(
            "| streams | router | +TTFT p50 | +TTFT p99 | +e2e p50 | +e2e p99 | CPU us/chunk | net of idle |"
        )
        print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for conc, lv in ov.items():
            if not isinstance(lv, dict) or "direct" not in lv:
                continue
            for n in names:
                x = lv.get(n)
                if not isinstance(x, dict) or "added_ttft_p99_ms" not in x:
                    continue
                print(f"| {conc} | {n} | {x['added_ttft_p50_ms']:+.1f} | {x['added_ttft_p99_ms']:+.1f} | "
                      f"{x['added_e2e_p50_ms']:+.1f} | {x['added_e2e_p99_ms']:+.1f} | "
                      f"{x.get('cpu_us_per_chunk', float('nan')):.1f} | "
                      f"{x.get('cpu_us_per_chunk_net', float('nan')):.1f} |")  # fmt: skip
    if data.get("skipped"):
        print("\nskipped: " + "; ".join(data["skipped"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
