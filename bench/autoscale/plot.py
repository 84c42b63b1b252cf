"""Chart for bench/autoscale/run.py results: one day of replicas per policy against the load, and
SLO attainment against GPU-hours (with the competitors' target sweep, when the run has one).

Run with any Python that has matplotlib (the product's virtualenv does not need it):
`/tmp/pvenv/bin/python bench/autoscale/plot.py bench/autoscale/results/results.json`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

COLORS = {
    "fixed-max": "tab:gray",
    "request-count": "tab:orange",
    "hpa-kv": "tab:red",
    "toposerve": "tab:blue",
    "toposerve-sqrt": "tab:green",
    "toposerve-standby": "tab:cyan",
    "toposerve-standby1": "tab:olive",
    "toposerve-defaults": "tab:purple",
}


def main(path: str) -> int:
    data = json.loads(Path(path).read_text())
    data["timeline"] = json.loads(Path(path).with_name("timeline.json").read_text())
    d = data["timeline_day"]  # run.py keeps one day of per-minute timeline
    lo, hi = 0, len(data["timeline"]["arrivals_per_min"])
    hours = [i / (3600 / data["record_s"]) for i in range(hi - lo)]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(19, 5.2), gridspec_kw={"width_ratios": [2, 1, 1]})
    load = ax1.twinx()
    load.fill_between(hours, data["timeline"]["arrivals_per_min"][lo:hi], color="0.88", step="mid")
    load.set_ylabel("arrivals per minute (grey)")
    ax1.set_zorder(load.get_zorder() + 1)
    ax1.patch.set_visible(False)
    for name, color in COLORS.items():
        if name in data["timeline"]:
            ax1.plot(hours, data["timeline"][name]["pods"][lo:hi], color=color, lw=1.2, label=f"{name} pods")
    for s, e in data["trace"]["spikes"]:
        if d * 86400 <= s < (d + 1) * 86400:
            ax1.axvspan((s / 3600) - 24 * d, (e / 3600) - 24 * d, color="gold", alpha=0.3)
    ax1.set_xlabel(f"hour of day {d} (spikes shaded)")
    ax1.set_ylabel("GPU pods (serving + starting + standby + draining)")
    ax1.set_xlim(0, 24)
    ax1.legend(loc="upper left", fontsize=8)
    for ax, zoom in ((ax2, False), (ax3, True)):
        for name, s in data["policies"].items():
            x, y = s["gpu_hours_per_day"], 100 * s["slo_attainment"]
            if zoom and (y < 99.0 or name == "fixed-max"):
                continue
            base = name.split("@")[0]
            ax.scatter(x, y, color=COLORS.get(base, "k"), marker="o" if "@" not in name else "x")
            label = name if not zoom or "@" not in name else name.split("@")[1]
            ax.annotate(label, (x, y), fontsize=7, xytext=(3, 2), textcoords="offset points")
        ax.set_xlabel("GPU-hours per day")
        ax.grid(alpha=0.3)
    ax2.set_ylabel(f"% requests with TTFT <= {data['slo_ttft_s']} s")
    ax2.set_title("SLO attainment vs cost (x: competitors at other targets)", fontsize=9)
    ax3.set_title("zoom: 99-100 %, autoscalers only (labels: competitor target)", fontsize=9)
    fig.suptitle(
        f"autoscaling benchmark (simulated, {data['gpu']} replicas, {data['startup_s']:.0f} s model load, "
        f"seed {data['seed']}, {data['days']} days, figures over days {data['warmup_days']}..{data['days'] - 1})",
        fontsize=10,
    )
    fig.tight_layout()
    out = Path(path).with_name("autoscale.png")
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
