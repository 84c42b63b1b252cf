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

from azuretrace import load as load_azure
from daytrace import DAY, Trace, TraceConfig, generate
from fleetsim import RECORD_S, EngineModel, Fleet, Policy
from run import HPA_BEHAVIOUR, summarize
from scalers import KVHpa, RequestCount, Toposerve, ToposerveLeading
from startup_phases import startup_seconds

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


def engine_for(name: str, args: argparse.Namespace) -> EngineModel:
    """The replica model a policy runs on. ``--startup-model phases``: the product's phase model
    (startup_phases.py), cold for the competitors and for toposerve unless its lever says
    ``"startup": "warm"`` (model.cache host-path + model.cache.prefetch); else log-normal around
    ``--startup`` for every policy."""
    median = args.startup
    if args.startup_model == "phases":
        warm = args.warm_all or (
            name.startswith("toposerve") and json.loads(args.leading).get("startup") == "warm"
        )
        median = startup_seconds(warm)
    return EngineModel.for_gpu("L4", startup_s=median, startup_sigma=args.startup_sigma)


def make(
    name: str, target: float, args: argparse.Namespace, engine: EngineModel, per_replica: float
) -> Policy:
    # toposerve plans with the measured start-up: p90 x 1.5 (docs/autoscaling.md "Measured start-up")
    grace = 1.5 * engine.startup_quantile(0.9)
    if name == "hpa-kv":
        return KVHpa(1, args.max_replicas, target, down_window_s=args.hpa_down)
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
        if "down_s" in lever:  # the HPA's default scale-down with a shorter window
            spec["scaleDown"] = {**HPA_BEHAVIOUR["scaleDown"], "stabilizationWindowSeconds": lever["down_s"]}
        z = lever.get("z", "default")
        return ToposerveLeading(
            spec,
            engine.kv_tokens,
            short_s=lever.get("short_s", 5.0),
            demand_headroom=lever.get("beta"),
            z=None if z == "off" else z,
        )
    raise ValueError(f"unknown policy {name!r}")


def trace_for(args: argparse.Namespace) -> tuple[Trace, float, float]:
    """(trace, start, end) of the measured span: days after the warm-up, or the Azure hour's
    second copy (azuretrace.py)."""
    if args.trace == "day":
        trace = generate(TraceConfig(days=args.days, seed=args.seed))
        return trace, args.warmup_days * DAY, trace.duration
    trace, period = load_azure(args.trace.removeprefix("azure-"), args.seed)
    return trace, period, 2 * period


def gpu_hours_between(timeline: dict[str, list[float]], start: float, end: float) -> float:
    """GPU-hours of the pods in [start, end) from the per-minute pod means (any span, not whole days)."""
    pods = timeline["pods"][int(start // RECORD_S) : math.ceil(end / RECORD_S)]
    return round(sum(pods) * RECORD_S / 3600.0, 2)


def cmd_run(args: argparse.Namespace) -> int:
    trace, start, end = trace_for(args)
    mean_tokens = sum(trace.prompt[i] + trace.output[i] for i in range(len(trace))) / max(1, len(trace))
    for name in args.policies.split(","):
        engine = engine_for(name, args)
        per_replica = engine.kv_tokens / mean_tokens
        for target in [float(x) for x in args.targets.split(",")]:
            p = make(name, target, args, engine, per_replica)
            t = time.monotonic()
            res = Fleet(trace, engine, p, timeout_s=120.0, seed=args.seed, until=end).run()
            s = summarize(trace, res, 2.0, start, end)
            if args.trace != "day":
                s["gpu_hours"] = gpu_hours_between(res.timeline, start, end)
            row = {"seed": args.seed, "days": args.days, "trace": args.trace, "policy": name,
                   "label": args.label or name, "target": target, "startup_median_s": round(engine.startup_s, 1),
                   "hpa_down_s": args.hpa_down if name == "hpa-kv" else None,
                   "lever": json.loads(args.leading) if name == "toposerve-leading" else {},
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
            hpas = [h for h in rs if h["label"] == args.hpa_label]
            hpa = next((h for h in hpas if h["target"] == r["target"]), None)
            near = min(hpas, key=lambda h: abs(h["gpu_hours"] - r["gpu_hours"]), default=None)
            absorb = _mean(r["spike_absorb_s"])
            hpa_absorb = _mean(hpa["spike_absorb_s"]) if hpa else None
            out.append({
                "seed": seed, "target": r["target"], "missed": r["missed"], "requests": r["requests"],
                "gpu_hours": r["gpu_hours"],
                "competitor_gpu_hours_at_equal_slo": round(need, 1) if need is not None else None,
                "gpu_hours_saving": round(1 - r["gpu_hours"] / need, 4) if need else None,
                "competitor_missed_at_equal_gpu_hours": round(miss, 1) if miss is not None else None,
                "missed_reduction": round(1 - r["missed"] / miss, 4) if miss else None,
                "absorb_mean_s": absorb, "hpa_same_target_absorb_mean_s": hpa_absorb,
                "hpa_nearest_gpu_hours": {"target": near["target"], "gpu_hours": near["gpu_hours"],
                                          "missed": near["missed"], "absorb_mean_s": _mean(near["spike_absorb_s"])}
                if near else None,
            })  # fmt: skip
    for o in out:
        print(json.dumps(o))
    for key in ("gpu_hours_saving", "missed_reduction"):
        vals = [o[key] for o in out if o[key] is not None]
        if vals:
            print(json.dumps({"summary": key, "n": len(vals), "of": len(out), "min": min(vals),
                              "max": max(vals), "mean": round(sum(vals) / len(vals), 4)}))  # fmt: skip
    return 0


def _mean(xs: list[float]) -> float | None:
    return round(sum(xs) / len(xs), 1) if xs else None


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
    r.add_argument(
        "--leading",
        default="{}",
        help='levers: {"short_s": 5, "beta": 1, "z": 3 or "off", '
        '"down_s": 120, "startup": "warm", "spec": {...}}',
    )
    r.add_argument("--label", default="", help="the row's label (default: the policy's name)")
    r.add_argument(
        "--trace",
        choices=("day", "azure-conv", "azure-code"),
        default="day",
        help="the synthetic day (daytrace.py) or an Azure 2023 hour (azuretrace.py)",
    )
    r.add_argument(
        "--startup-model",
        choices=("lognormal", "phases"),
        default="lognormal",
        help="phases: the product's start-up phases, cold, or warm with the lever "
        '"startup": "warm" (startup_phases.py)',
    )
    r.add_argument("--hpa-down", type=float, default=300.0, help="hpa-kv's scale-down window, s")
    r.add_argument(
        "--warm-all",
        action="store_true",
        help="with phases: every policy starts warm (what the start-up levers give an HPA "
        "on the same pods; keep these rows out of the competitors' file)",
    )
    r.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("report")
    p.add_argument("files", type=Path, nargs="+")
    p.add_argument("--policy", default="toposerve-leading", help="the label to report")
    p.add_argument("--target", type=float, default=None, help="only this grid point")
    p.add_argument("--hpa-label", default="hpa-kv", help="the HPA rows for spike absorption (target c)")
    args = ap.parse_args(argv)
    if args.cmd == "run" and not 0 <= args.warmup_days < args.days:
        ap.error("--warmup-days must be >= 0 and < --days")
    return cmd_run(args) if args.cmd == "run" else cmd_report(args)


if __name__ == "__main__":
    raise SystemExit(main())
