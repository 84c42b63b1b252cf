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
}


def main(path: str, day: int | None = None) -> int:
    data = json.loads(Path(path).read_text())
    per_day = int(86400 // data["record_s"])
    d = data["days"] - 1 if day is None else day
    lo, hi = d * per_day, (d + 1) * per_day
    hours = [i / (3600 / data["record_s"]) for i in range(hi - lo)]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(15, 5), gridspec_kw={"width_ratios": [2, 1]})
    load = ax1.twinx()
    load.fill_between(hours, data["timeline"]["arrivals_per_min"][lo:hi], color="0.88", step="mid")
    load.set_ylabel("arrivals per minute (grey)")
    ax1.set_zorder(load.get_zorder() + 1)
    ax1.patch.set_visible(False)
    for name, color in COLORS.items():
        if name in data["timeline"]:
            ax1.plot(hours, data["timeline"][name]["pods"][lo:hi], color=color, lw=1.2, label=f"{name} pods")
    for s, e in data["trace"]["spikes"]:
        if lo * data["record_s"] <= s < hi * data["record_s"]:
            ax1.axvspan((s / 3600) - 24 * d, (e / 3600) - 24 * d, color="gold", alpha=0.3)
    ax1.set_xlabel(f"hour of day {d} (spikes shaded)")
    ax1.set_ylabel("GPU pods (serving + starting + standby + draining)")
    ax1.set_xlim(0, 24)
    ax1.legend(loc="upper left", fontsize=8)
    for name, s in data["policies"].items():
        base = name.split("@")[0]
        marker = "o" if "@" not in name else "x"
        ax2.scatter(
            s["gpu_hours_per_day"], 100 * s["slo_attainment"], color=COLORS.get(base, "k"), marker=marker
        )
        ax2.annotate(name, (s["gpu_hours_per_day"], 100 * s["slo_attainment"]), fontsize=7)
    ax2.set_xlabel("GPU-hours per day")
    ax2.set_ylabel(f"% requests with TTFT <= {data['slo_ttft_s']} s")
    ax2.set_title("SLO attainment vs cost (x: competitor target sweep)", fontsize=9)
    ax2.grid(alpha=0.3)
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
    raise SystemExit(main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else None))
