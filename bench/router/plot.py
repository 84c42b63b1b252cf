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


def main(path: str) -> int:
    data = json.loads(Path(path).read_text())
    wls = list(data["workloads"])
    metrics = [
        ("ttft_p50_ms", "client TTFT p50 (ms)"),
        ("ttft_p99_ms", "client TTFT p99 (ms)"),
        ("engine_ttft_mean_ms", "engine TTFT mean (simulated ms)"),
        ("output_tok_s", "output tok/s"),
    ]
    fig, axes = plt.subplots(
        len(wls), len(metrics), figsize=(5 * len(metrics), 3.6 * len(wls)), squeeze=False
    )
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
        f"{data.get('time_scale')}" + (f", median of {data['runs']} runs" if data.get("runs") else ""),
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
