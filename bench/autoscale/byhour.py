"""Where in the day the SLO misses and the GPU-hours fall: toposerve, toposerve-sqrt and hpa-kv@0.33
on one seed, by band of the day (days after the first, as run.py measures).

    .venv/bin/python bench/autoscale/byhour.py --seed 2

Prints, per policy, {band: [missed requests, pod-hours]}; the figures of docs/benchmarks.md's
square-root staffing round. Each band's misses sum to run.py's missed count for the policy.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from daytrace import DAY, TraceConfig, generate
from fleetsim import RECORD_S, EngineModel, Fleet, Policy
from run import TOPOSERVE_SPEC, TOPOSERVE_SQRT
from scalers import KVHpa, Toposerve

BANDS = ((0, 6), (6, 9), (9, 17), (17, 22), (22, 24))


def band(t: float) -> tuple[int, int]:
    h = (t % DAY) / 3600
    return next(b for b in BANDS if b[0] <= h < b[1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=2)
    ap.add_argument("--days", type=int, default=7)
    args = ap.parse_args(argv)
    trace = generate(TraceConfig(days=args.days, seed=args.seed))
    engine = EngineModel.for_gpu("L4", startup_s=300.0)
    extra = {"maxReplicas": 12, "startupGraceSeconds": 300}
    hpa = KVHpa(1, 12, 0.33)
    hpa.name = "hpa-kv@0.33"
    policies: list[Policy] = [
        Toposerve({**TOPOSERVE_SPEC, **extra}),
        Toposerve({**TOPOSERVE_SQRT, **extra}, name="toposerve-sqrt"),
        hpa,
    ]
    for p in policies:
        res = Fleet(trace, engine, p, timeout_s=120.0).run()
        miss = dict.fromkeys(BANDS, 0)
        pod_h = dict.fromkeys(BANDS, 0.0)
        for i, t in enumerate(trace.arrival):
            if t >= DAY and (math.isnan(res.ttft[i]) or res.ttft[i] > 2.0):
                miss[band(t)] += 1
        for k, pods in enumerate(res.timeline["pods"]):
            if k * RECORD_S >= DAY:
                pod_h[band(k * RECORD_S)] += pods * RECORD_S / 3600
        row = {f"{a:02d}-{b:02d}": [miss[(a, b)], round(pod_h[(a, b)], 1)] for a, b in BANDS}
        print(p.name, json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
