"""Tuning sweep for toposerve's builtin policy alone: one trace, many spec.autoscaling settings.

run.py runs every policy (and the competitors' sweep) on a seed; tuning wants the opposite, many
toposerve settings on the tuning seed, so this generates the trace once and runs only toposerve
with each setting merged into run.py's ``toposerve`` spec. Same trace, engine, measurement days and
figures as run.py (its ``summarize``), so a line here equals the ``toposerve`` line of run.py with
``--toposerve-spec`` set to that setting.

    .venv/bin/python bench/autoscale/tune.py --seed 1 \\
        --grid '[{"targetKVCacheUtilization": 0.5, "burstHeadroom": 1}, ...]' --out tune.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from daytrace import DAY, TraceConfig, generate
from fleetsim import EngineModel, Fleet
from run import TOPOSERVE_DEFAULTS, TOPOSERVE_SPEC, summarize
from scalers import Toposerve


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--days", type=int, default=7)
    ap.add_argument("--warmup-days", type=int, default=1)
    ap.add_argument(
        "--base",
        choices=("toposerve", "defaults"),
        default="toposerve",
        help="which of run.py's specs each setting is merged into (defaults: toposerve-defaults)",
    )
    ap.add_argument("--grid", required=True, help="JSON list of objects merged into the toposerve spec")
    ap.add_argument("--out", type=Path, required=True, help="JSON lines, one per setting (appended)")
    args = ap.parse_args(argv)
    grid: list[dict[str, Any]] = json.loads(args.grid)
    # run.py's defaults: L4, 300 s loads, 12 replicas at most, 2 s SLO, 120 s timeout
    trace = generate(TraceConfig(days=args.days, seed=args.seed))
    engine = EngineModel.for_gpu("L4", startup_s=300.0)
    for setting in grid:
        base = TOPOSERVE_SPEC if args.base == "toposerve" else TOPOSERVE_DEFAULTS
        spec = {**base, "maxReplicas": 12, "startupGraceSeconds": 300, **setting}
        t = time.monotonic()
        res = Fleet(trace, engine, Toposerve(spec), timeout_s=120.0).run()
        s = summarize(trace, res, 2.0, args.warmup_days * DAY, trace.duration)
        row = {"seed": args.seed, "base": args.base, "setting": setting, "slo_attainment": s["slo_attainment"],
               "missed": round((1 - s["slo_attainment"]) * s["requests"]), "gpu_hours": s["gpu_hours"],
               "ttft_p99_s": s["ttft_p99_s"], "scale_events": s["scale_events"],
               "model_loads": s["model_loads"], "sim_seconds": round(time.monotonic() - t, 1)}  # fmt: skip
        print(json.dumps(row), flush=True)
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
