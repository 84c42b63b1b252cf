"""Markdown table of a bench/autoscale/run.py results.json (what docs/benchmarks.md shows), so the
figures in the docs are copied by a program, not by hand.

    .venv/bin/python bench/autoscale/table.py bench/autoscale/results/seed2/results.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def table(data: dict[str, Any]) -> str:
    fixed = data["policies"]["fixed-max"]["gpu_hours"]
    rows = [
        "| policy | SLO attainment (TTFT <= {slo:g} s) | TTFT p50 / p99 | dropped | GPU-hours (share of fixed) "
        "| scale events | model loads | spike absorbed: mean / max |".format(slo=data["slo_ttft_s"]),
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, s in data["policies"].items():
        rows.append(
            f"| {name} | {100 * s['slo_attainment']:.2f} % | {s['ttft_p50_s']:.2f} / {s['ttft_p99_s']:.2f} s "
            f"| {s['dropped']:,} | {s['gpu_hours']:,.0f} ({100 * s['gpu_hours'] / fixed:.1f} %) "
            f"| {s['scale_events']:,} | {s['model_loads']:,} "
            f"| {s['spike_absorb_mean_s']:.0f} / {s['spike_absorb_max_s']:.0f} s |"
        )
    return "\n".join(rows)


def main(path: str) -> int:
    print(table(json.loads(Path(path).read_text())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
