"""Chart for bench/router/run.py results: p50 TTFT, p99 TTFT and throughput per policy and workload.

Run with any Python that has matplotlib: `python bench/router/plot.py bench/router/results/results.json`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def runs_of(data: dict[str, object]) -> int:
    """How many runs the cells are medians of: run.py --runs N, or summarize.py --median-out."""
    n = data.get("runs_count") or data.get("runs") or 1
    return n if isinstance(n, int) else 1


def overhead_row(axes: list[plt.Axes], ov: dict[str, dict[str, dict[str, float]]]) -> None:
    """Added TTFT p50 / p99, added e2e p50 and CPU per relayed chunk, grouped by stream count."""
    levels = list(ov)
    names = [n for n in ov[levels[0]] if n != "direct"]
    width = 0.8 / max(len(names), 1)
    for ax, (key, label) in zip(
        axes,
        [
            ("added_ttft_p50_ms", "added TTFT p50 (ms)"),
            ("added_ttft_p99_ms", "added TTFT p99 (ms)"),
            ("added_e2e_p50_ms", "added e2e p50 (ms)"),
            ("cpu_us_per_chunk", "router CPU per SSE chunk (us)"),
        ],
        strict=False,
    ):
        for i, n in enumerate(names):
            vals = [ov[c].get(n, {}).get(key, 0.0) for c in levels]
            xs = [j + i * width for j in range(len(levels))]
            ax.bar(xs, vals, width, label=n)
        ax.set_xticks(
            [j + width * (len(names) - 1) / 2 for j in range(len(levels))], [f"{c} streams" for c in levels]
        )
        ax.set_title(f"overhead vs direct: {label}", fontsize=9)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)


def main(path: str) -> int:
    data = json.loads(Path(path).read_text())
    wls = list(data["workloads"])
    metrics = [
        ("ttft_p50_ms", "client TTFT p50 (ms)"),
        ("ttft_p99_ms", "client TTFT p99 (ms)"),
        ("engine_ttft_mean_ms", "engine TTFT mean (simulated ms)"),
        ("output_tok_s", "output tok/s"),
    ]
    ov = {c: lv for c, lv in (data.get("overhead") or {}).items() if isinstance(lv, dict) and "direct" in lv}
    rows_n = len(wls) + (1 if ov else 0)
    fig, axes = plt.subplots(rows_n, len(metrics), figsize=(5 * len(metrics), 3.6 * rows_n), squeeze=False)
    if ov:
        overhead_row(axes[len(wls)], ov)
    for i, w in enumerate(wls):
        rows = data["workloads"][w]
        names = list(rows)
        for j, (key, label) in enumerate(metrics):
            ax = axes[i][j]
            vals = [rows[n].get(key, 0.0) for n in names]
            colors = ["tab:blue" if n.startswith("toposerve") else "tab:orange" for n in names]
            ax.barh(names, vals, color=colors)
            ax.invert_yaxis()
            ax.set_title(f"{w}: {label}", fontsize=9)
            ax.tick_params(labelsize=7)
            for k, v in enumerate(vals):
                ax.text(v, k, f" {v:.0f}", va="center", fontsize=6)
    fig.suptitle(
        f"router benchmark: mock engines {[g for g, _ in data.get('fleet', [])]}, time scale "
        f"{data.get('time_scale')}" + (f", median of {n} runs" if (n := runs_of(data)) > 1 else ""),
        fontsize=10,
    )
    fig.tight_layout()
    stem = Path(path).stem  # results.json -> router.png, results-median.json -> router-median.png
    out = Path(path).with_name("router" + stem.removeprefix("results") + ".png")
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
