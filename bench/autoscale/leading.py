"""The leading-signal benchmark (issue 25): every policy on the same target grid, seed by seed.

    # one seed: every policy at every grid point, one JSON line per (policy, target)
    .venv/bin/python bench/autoscale/leading.py run --seed 11 --days 2 --out grid.jsonl
    # the figures: toposerve-leading against the best competitor's interpolated curve, per seed
    .venv/bin/python bench/autoscale/leading.py report grid.jsonl --policy toposerve-leading

A simulation (fleetsim.py). Start-up is log-normal around ``--startup`` (``--startup-sigma``),
drawn per pod from a generator seeded with the trace's seed, so every policy of a seed sees the
same distribution. ``toposerve`` is the builtin KV policy; ``toposerve-leading`` adds the router's
demand (``scalers.ToposerveLeading``). No forecast for either: the comparison is about the
reactive signal, and short runs give a forecast no history.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from daytrace import DAY, TraceConfig, generate
from fleetsim import EngineModel, Fleet, Policy
from run import HPA_BEHAVIOUR, summarize
from scalers import KVHpa, RequestCount, Toposerve, ToposerveLeading

GRID = (0.3, 0.35, 0.4, 0.45, 0.5, 0.6, 0.7)
COMPETITORS = ("hpa-kv", "request-count")


def base_spec(target: float, max_replicas: int, grace: float) -> dict[str, Any]:
    return {
        "minReplicas": 1,
        "maxReplicas": max_replicas,
        "targetKVCacheUtilization": target,
        "startupGraceSeconds": math.ceil(grace),
        **HPA_BEHAVIOUR,
    }


def make(
    name: str, target: float, args: argparse.Namespace, engine: EngineModel, per_replica: float
) -> Policy:
    # toposerve plans with the measured start-up: p90 x 1.5 (docs/autoscaling.md "Measured start-up")
    grace = 1.5 * engine.startup_quantile(0.9)
    if name == "hpa-kv":
        return KVHpa(1, args.max_replicas, target)
    if name == "request-count":
        return RequestCount(1, args.max_replicas, round(target * per_replica, 2))
    if name == "toposerve":
        return Toposerve(base_spec(target, args.max_replicas, grace))
    if name == "toposerve-leading":
        lever: dict[str, Any] = json.loads(args.leading)
        spec = {
            **base_spec(target, args.max_replicas, grace),
            "syncPeriodSeconds": 5,
            **lever.get("spec", {}),
        }
        return ToposerveLeading(
            spec, engine.kv_tokens, short_s=lever.get("short_s", 5.0), demand_headroom=lever.get("beta")
        )
    raise ValueError(f"unknown policy {name!r}")


def cmd_run(args: argparse.Namespace) -> int:
    trace = generate(TraceConfig(days=args.days, seed=args.seed))
    engine = EngineModel.for_gpu("L4", startup_s=args.startup, startup_sigma=args.startup_sigma)
    mean_tokens = sum(trace.prompt[i] + trace.output[i] for i in range(len(trace))) / max(1, len(trace))
    per_replica = engine.kv_tokens / mean_tokens
    for name in args.policies.split(","):
        for target in [float(x) for x in args.targets.split(",")]:
            p = make(name, target, args, engine, per_replica)
            t = time.monotonic()
            res = Fleet(trace, engine, p, timeout_s=120.0, seed=args.seed).run()
            s = summarize(trace, res, 2.0, args.warmup_days * DAY, trace.duration)
            row = {"seed": args.seed, "days": args.days, "policy": name, "label": args.label or name,
                   "target": target, "lever": json.loads(args.leading) if name == "toposerve-leading" else {},
                   "requests": s["requests"], "missed": round((1 - s["slo_attainment"]) * s["requests"]),
                   "slo_attainment": s["slo_attainment"], "gpu_hours": s["gpu_hours"],
                   "ttft_p99_s": s["ttft_p99_s"], "scale_events": s["scale_events"],
                   "model_loads": s["model_loads"], "spike_absorb_s": s["spike_absorb_s"],
                   "sim_seconds": round(time.monotonic() - t, 1)}  # fmt: skip
            print(json.dumps(row), flush=True)
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")
    return 0


# ---- the report ---------------------------------------------------------------------------------


def frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (GPU-hours, missed) points no other point beats on both, sorted by GPU-hours."""
    out: list[tuple[float, float]] = []
    for g, m in sorted(points):
        if not out or m < out[-1][1]:
            out.append((g, m))
    return out


def gpu_hours_at(curve: list[tuple[float, float]], missed: float) -> float | None:
    """GPU-hours the curve needs to miss at most ``missed`` (linear between its points); None when
    even its costliest point misses more (the curve does not reach it)."""
    if not curve or curve[-1][1] > missed:
        return None
    if curve[0][1] <= missed:
        return curve[0][0]  # its cheapest point already does (no extrapolation below it)
    for (g0, m0), (g1, m1) in itertools.pairwise(curve):
        if m0 > missed >= m1:
            return g0 + (g1 - g0) * (m0 - missed) / (m0 - m1)
    return None


def missed_at(curve: list[tuple[float, float]], gpu: float) -> float | None:
    """Requests the curve misses at ``gpu`` GPU-hours (linear between points); None outside it."""
    if not curve or gpu < curve[0][0]:
        return None
    if gpu >= curve[-1][0]:
        return curve[-1][1]
    for (g0, m0), (g1, m1) in itertools.pairwise(curve):
        if g0 <= gpu <= g1:
            return m0 + (m1 - m0) * (gpu - g0) / (g1 - g0) if g1 > g0 else min(m0, m1)
    return None


def cmd_report(args: argparse.Namespace) -> int:
    rows = [json.loads(line) for p in args.files for line in p.read_text().splitlines() if line.strip()]
    seeds = sorted({r["seed"] for r in rows})
    out: list[dict[str, Any]] = []
    for seed in seeds:
        rs = [r for r in rows if r["seed"] == seed]
        comp = frontier([(r["gpu_hours"], r["missed"]) for r in rs if r["policy"] in COMPETITORS])
        for r in rs:
            if r["label"] != args.policy or (args.target is not None and r["target"] != args.target):
                continue
            need = gpu_hours_at(comp, r["missed"])
            miss = missed_at(comp, r["gpu_hours"])
            hpa = next((h for h in rs if h["policy"] == "hpa-kv" and h["target"] == r["target"]), None)
            absorb = sum(r["spike_absorb_s"]) / len(r["spike_absorb_s"]) if r["spike_absorb_s"] else None
            hpa_absorb = (
                sum(hpa["spike_absorb_s"]) / len(hpa["spike_absorb_s"])
                if hpa and hpa["spike_absorb_s"]
                else None
            )
            out.append({
                "seed": seed, "target": r["target"], "missed": r["missed"], "requests": r["requests"],
                "gpu_hours": r["gpu_hours"],
                "competitor_gpu_hours_at_equal_slo": round(need, 1) if need is not None else None,
                "gpu_hours_saving": round(1 - r["gpu_hours"] / need, 4) if need else None,
                "competitor_missed_at_equal_gpu_hours": round(miss, 1) if miss is not None else None,
                "missed_reduction": round(1 - r["missed"] / miss, 4) if miss else None,
                "absorb_mean_s": absorb, "hpa_same_target_absorb_mean_s": hpa_absorb,
            })  # fmt: skip
    for o in out:
        print(json.dumps(o))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--seed", type=int, required=True)
    r.add_argument("--days", type=int, default=2)
    r.add_argument("--warmup-days", type=int, default=1)
    r.add_argument("--startup", type=float, default=300.0, help="median model load, seconds")
    r.add_argument("--startup-sigma", type=float, default=0.25, help="log-normal sigma of a model load")
    r.add_argument("--max-replicas", type=int, default=12)
    r.add_argument("--targets", default=",".join(f"{t:g}" for t in GRID))
    r.add_argument("--policies", default="hpa-kv,request-count,toposerve,toposerve-leading")
    r.add_argument("--leading", default="{}", help='levers: {"short_s": 5, "beta": 1, "spec": {...}}')
    r.add_argument("--label", default="", help="the row's label (default: the policy's name)")
    r.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("report")
    p.add_argument("files", type=Path, nargs="+")
    p.add_argument("--policy", default="toposerve-leading", help="the label to report")
    p.add_argument("--target", type=float, default=None, help="only this grid point")
    args = ap.parse_args(argv)
    if args.cmd == "run" and not 0 <= args.warmup_days < args.days:
        ap.error("--warmup-days must be >= 0 and < --days")
    return cmd_run(args) if args.cmd == "run" else cmd_report(args)


if __name__ == "__main__":
    raise SystemExit(main())
