"""Two GPU types plus spot (issue 25, target b): GPU-dollars against SLO misses, seed by seed.

    .venv/bin/python bench/autoscale/hetero.py run --seed 101 --days 2 --targets 0.5,0.6,0.7 \\
        --policies hpa-kv@L40S,hpa-kv@H100,request-count@L40S,request-count@H100,toposerve-hetero --out h.jsonl
    .venv/bin/python bench/autoscale/hetero.py report h.jsonl

A simulation (fleetsim.py) with one ``EngineModel`` per GPU type (the mock engine's timing and KV
model of that type: ``TimingModel(gpu_weight=throughputWeight)``, ``default_num_gpu_blocks``) and
each pod priced from the catalog (``toposerve.api.gpus``: ``hourlyPrice``, ``spotHourlyPrice``).

* **Competitors**: hpa-kv and request-count on one GPU type alone, on demand (``name@GPU``).
* **toposerve-hetero**: the leading policy of round 2 (``scalers.ToposerveLeading``: short window
  15 s, beta 0, z = 3) decides the total; the product's ``poolorder.split(total, "cost",
  "throughput", views)`` decides where the replicas go. Pools: the cheap type with spot capacity
  and an on-demand baseline (the next replica's price is the spot price above the baseline:
  ``costorder.marginal_price``), the fast type on demand. The ranking uses the planner's own
  estimate (``poolorder.decode_step_ms`` from the weights and the catalog's memory bandwidth,
  ``REFERENCE_BATCH`` sequences a step) and each pool's observed TTFT p90 against the SLO.
* **Spot reclaims**: each spot pod draws its reclaim time from a seeded exponential (rate
  ``--reclaims-per-day`` per replica). At the notice the pod leaves rotation (evacuation) and
  finishes what it can for ``--notice`` seconds; then it dies: requests still running are missed,
  waiting ones go back to the router. The spot workload's ReplicaSet creates a spot replacement at
  once (a model load). toposerve also starts an on-demand *cover* of the same type at the notice
  (``planner/spotcover.py``), which leaves once the replacement is ready.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from daytrace import DAY, Trace, TraceConfig, generate
from fleetsim import Engine, EngineModel, Fleet, Observation, Policy
from leading import base_spec, frontier, gpu_hours_at, missed_at
from run import summarize
from scalers import KVHpa, RequestCount, ToposerveLeading
from startup_phases import startup_seconds

from toposerve.api.gpus import DEFAULT_CATALOG
from toposerve.mockengine.timing import DEFAULT_PARAMS_B
from toposerve.planner import poolorder

COMPETITORS = ("hpa-kv", "request-count")
WEIGHTS_GIB = DEFAULT_PARAMS_B * 2 * 1e9 / 2**30  # bf16 weights of the mock's model


@dataclass(frozen=True)
class PoolSpec:
    """One pool: a GPU type, its prices, and whether its growth runs on spot."""

    name: str
    gpu: str
    model: EngineModel
    on_demand_price: float
    spot_price: float | None = None  # None: on demand only
    on_demand_baseline: int = 0  # replicas kept on demand (the rest is spot)
    max_replicas: int | None = None

    @property
    def step_ms(self) -> float:
        g = DEFAULT_CATALOG.get(self.gpu)
        return poolorder.decode_step_ms(WEIGHTS_GIB, 1, g.bandwidth_gbps)

    @classmethod
    def for_gpu(cls, name: str, gpu: str, model: EngineModel, spot: bool = False, **kw: Any) -> PoolSpec:
        g = DEFAULT_CATALOG.get(gpu)
        return cls(name, gpu, model, g.hourly_price, g.spot_hourly_price if spot else None, **kw)


class HeteroFleet(Fleet):
    """A fleet of pools; the policy's total is split by ``split`` (toposerve) or goes to one pool."""

    def __init__(
        self,
        trace: Trace,
        pools: list[PoolSpec],
        policy: Policy,
        *,
        split: bool = False,
        cover: bool = False,
        reclaims_per_day: float = 0.0,
        notice_s: float = 120.0,
        slo_s: float = 2.0,
        seed: int = 0,
        until: float | None = None,
    ) -> None:
        ref = max((p.model for p in pools), key=lambda m: m.kv_tokens)
        super().__init__(trace, ref, policy, timeout_s=120.0, seed=seed, until=until)
        if len(pools) > 1 and not split:
            raise ValueError("several pools need split=True")
        self.pools = pools
        self.split, self.cover = split, cover
        self.rate = reclaims_per_day / DAY
        self.notice_s, self.slo_s = notice_s, slo_s
        self._reclaim_rng = random.Random(seed * 7919 + 1)
        self.pool_of: dict[str, PoolSpec] = {}
        self.spot: dict[str, bool] = {}
        self.reclaim_at: dict[str, float] = {}
        self.kill_at: dict[str, float] = {}
        self.covers: dict[str, str] = {}  # cover pod -> the spot replacement it stands in for
        self.reclaims = self.killed_requests = self.cover_starts = 0
        self._ttft_log: dict[str, list[tuple[float, float]]] = {p.name: [] for p in pools}

    # ---- pods ---------------------------------------------------------------------------------
    def _add(self, now: float, pool: PoolSpec, spot: bool, loaded: bool = False) -> Engine:
        self.model = pool.model  # _new_engine draws the start-up from the fleet's model
        e = self._new_engine(now, loaded=loaded)
        e.model = pool.model
        e.price = pool.spot_price if spot and pool.spot_price is not None else pool.on_demand_price
        self.pool_of[e.name] = pool
        self.spot[e.name] = spot
        if spot and self.rate > 0:
            self.reclaim_at[e.name] = now + self._reclaim_rng.expovariate(self.rate)
        return e

    def members(self, pool: PoolSpec) -> list[Engine]:
        """The pool's pods that count toward its replicas (not noticed, not covers)."""
        return [
            e
            for e in self.live()
            if self.pool_of[e.name] is pool and e.name not in self.covers and e.name not in self.kill_at
        ]

    def _view(self, pool: PoolSpec, now: float) -> poolorder.PoolView:
        n = len(self.members(pool))
        spot_next = pool.spot_price is not None and n >= pool.on_demand_baseline
        price = pool.spot_price if spot_next and pool.spot_price is not None else pool.on_demand_price
        log = [x for t, x in self._ttft_log[pool.name] if t > now - 60.0]
        ttft = sorted(log)[min(len(log) - 1, int(0.9 * len(log)))] if log else None
        return poolorder.PoolView(
            pool.name, True, step_ms=pool.step_ms, cost_per_hour=price, max_replicas=pool.max_replicas,
            current=n, ttft_seconds=ttft, slo_seconds=self.slo_s, on_demand_baseline=pool.on_demand_baseline,
        )  # fmt: skip

    def scale(self, now: float, serving: int, standby: int) -> None:
        if serving != self.current:
            self.scale_events += 1
        self.current = serving
        if self.split:
            want = poolorder.split(
                serving, "cost", "throughput", [self._view(p, now) for p in self.pools]
            ).replicas
        else:
            want = {self.pools[0].name: serving}
        for pool in self.pools:
            have = self.members(pool)
            n = want[pool.name]
            od = sum(1 for e in have if not self.spot[e.name])
            for _ in range(n - len(have)):
                spot = pool.spot_price is not None and od >= pool.on_demand_baseline
                od += 0 if spot else 1
                self._add(now, pool, spot)
                self.pod_starts += 1
            if len(have) > n:
                # the spot workload shrinks first (spot_desired), each in ReplicaSet order
                order = sorted(have, key=lambda e: (not self.spot[e.name], e.ready(now), -e.created))
                for e in order[: len(have) - n]:
                    e.draining = True

    def _tick_hook(self, t0: float) -> None:
        for name, at in list(self.kill_at.items()):
            if t0 >= at:
                del self.kill_at[name]
                self._kill(name)
        for e in list(self.engines):
            if e.name in self.kill_at or e.name not in self.reclaim_at or t0 < self.reclaim_at[e.name]:
                continue
            del self.reclaim_at[e.name]
            self.reclaims += 1
            if e.draining:  # already leaving: it just goes at the deadline
                self.kill_at[e.name] = t0 + self.notice_s
                continue
            e.draining = True  # evacuation: out of the selector, finishes what it can
            self.kill_at[e.name] = t0 + self.notice_s
            pool = self.pool_of[e.name]
            repl = self._add(t0, pool, spot=True)  # the spot ReplicaSet's replacement
            self.pod_starts += 1
            if self.cover:
                c = self._add(t0, pool, spot=False)
                self.covers[c.name] = repl.name
                self.cover_starts += 1
                self.pod_starts += 1
        for c, r in list(self.covers.items()):
            rep = next((e for e in self.engines if e.name == r), None)
            if rep is None or rep.draining or rep.ready(t0):
                del self.covers[c]
                ce = next((e for e in self.engines if e.name == c), None)
                if ce is not None:
                    ce.draining = True

    def _kill(self, name: str) -> None:
        e = next((x for x in self.engines if x.name == name), None)
        if e is None:
            return  # drained and gone before its deadline
        while e.heap:
            _, rid = e.heap.pop()
            self.dropped[rid] = True
            self.ttft[rid] = math.nan
            self.killed_requests += 1
        for rid in e.waiting:
            self.held.append(rid)
        self.engines.remove(e)

    def _admit(self, e: Engine, rid: int, t: float, d_at: float) -> None:
        super()._admit(e, rid, t, d_at)
        self._ttft_log[self.pool_of[e.name].name].append((self.trace.arrival[rid], self.ttft[rid]))
        log = self._ttft_log[self.pool_of[e.name].name]
        if len(log) > 4096:
            del log[:2048]

    def _start_pods(self, n: int) -> None:
        self.current = n
        if self.split:
            want = poolorder.split(n, "cost", "throughput", [self._view(p, 0.0) for p in self.pools]).replicas
        else:
            want = {self.pools[0].name: n}
        for pool in self.pools:
            for i in range(want[pool.name]):
                spot = pool.spot_price is not None and i >= pool.on_demand_baseline
                self._add(0.0, pool, spot, loaded=True)


class HeteroLeading(ToposerveLeading):
    """ToposerveLeading whose KV tokens per replica is the serving pods' mean (mixed types)."""

    fleet: HeteroFleet | None = None

    def decide(self, obs: Observation, history: Any) -> int:
        f = self.fleet
        if f is not None:
            names = {p.name for p in obs.pods if not p.standby}
            kv = [f.pool_of[e.name].model.kv_tokens for e in f.engines if e.name in names]
            if kv:
                self.kv_tokens = round(sum(kv) / len(kv))
        return super().decide(obs, history)


def engine(gpu: str, startup: float, sigma: float) -> EngineModel:
    return EngineModel.for_gpu(gpu, startup_s=startup, startup_sigma=sigma)


def cmd_run(args: argparse.Namespace) -> int:
    cfg = TraceConfig(days=args.days, seed=args.seed, peak_rps=3.6 * args.load, night_rps=0.3 * args.load)
    trace = generate(cfg)
    start, end = args.warmup_days * DAY, trace.duration
    mean_tokens = sum(trace.prompt[i] + trace.output[i] for i in range(len(trace))) / max(1, len(trace))
    startup = startup_seconds(False)
    fast = engine(args.fast, startup, 0.25)
    cheap = engine(args.cheap, startup, 0.25)
    for spec in args.policies.split(","):
        name, _, gpu = spec.partition("@")
        gpu, _, capacity = gpu.partition(":")  # "L40S:spot": the competitor on spot, no cover
        for target in [float(x) for x in args.targets.split(",")]:
            kw: dict[str, Any] = {}
            if name == "toposerve-hetero":
                pools = [
                    PoolSpec.for_gpu("cheap", args.cheap, cheap, spot=args.reclaims_per_day >= 0,
                                     on_demand_baseline=args.baseline, max_replicas=args.cheap_max),
                    PoolSpec.for_gpu("fast", args.fast, fast, max_replicas=args.fast_max),
                ]  # fmt: skip
                grace = 1.5 * cheap.startup_quantile(0.9)
                spec_ = {**base_spec(target, args.cheap_max + args.fast_max, grace), "syncPeriodSeconds": 5}
                p: Policy = HeteroLeading(spec_, cheap.kv_tokens, short_s=15.0, demand_headroom=0, z=3)
                p.name = "toposerve-hetero"
                kw = {
                    "split": True,
                    "cover": not args.no_cover,
                    "reclaims_per_day": max(0.0, args.reclaims_per_day),
                }
            else:
                m = fast if gpu == args.fast else cheap
                if gpu not in (args.fast, args.cheap):
                    raise SystemExit(f"unknown GPU {gpu!r}")
                mx = args.fast_max if gpu == args.fast else args.cheap_max + args.fast_max
                pools = [PoolSpec.for_gpu(gpu, gpu, m, spot=capacity == "spot")]
                if capacity == "spot":
                    kw = {"reclaims_per_day": max(0.0, args.reclaims_per_day)}
                if name == "hpa-kv":
                    p = KVHpa(1, mx, target)
                elif name == "request-count":
                    p = RequestCount(1, mx, round(target * m.kv_tokens / mean_tokens, 2))
                else:
                    raise SystemExit(f"unknown policy {name!r}")
            t = time.monotonic()
            fleet = HeteroFleet(trace, pools, p, seed=args.seed, until=end, **kw)
            if isinstance(p, HeteroLeading):
                p.fleet = fleet
            res = fleet.run()
            s = summarize(trace, res, 2.0, start, end)
            first, last = int(start // DAY), math.ceil(end / DAY)
            row = {"seed": args.seed, "days": args.days, "load": args.load, "policy": name, "gpu": spec.partition("@")[2] or "mixed",
                   "label": args.label or spec, "target": target, "reclaims_per_day": kw.get("reclaims_per_day", 0.0),
                   "cover": kw.get("cover", False), "requests": s["requests"],
                   "missed": round((1 - s["slo_attainment"]) * s["requests"]), "slo_attainment": s["slo_attainment"],
                   "gpu_hours": s["gpu_hours"], "gpu_dollars": round(sum(res.usd_by_day[first:last]), 2),
                   "reclaims": fleet.reclaims, "killed_requests": fleet.killed_requests,
                   "cover_starts": fleet.cover_starts, "model_loads": s["model_loads"],
                   "ttft_p99_s": s["ttft_p99_s"], "sim_seconds": round(time.monotonic() - t, 1)}  # fmt: skip
            print(json.dumps(row), flush=True)
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    rows = [json.loads(line) for p in args.files for line in p.read_text().splitlines() if line.strip()]
    for seed in sorted({r["seed"] for r in rows}):
        rs = [r for r in rows if r["seed"] == seed]
        curves = {}
        for gpu in sorted({r["gpu"] for r in rs if r["policy"] in COMPETITORS}):
            curves[gpu] = frontier([(r["gpu_dollars"], r["missed"]) for r in rs
                                    if r["policy"] in COMPETITORS and r["gpu"] == gpu])  # fmt: skip
        # the headline curve: the competitors on demand (a spot competitor, "GPU:spot", is reported apart)
        both = frontier([pt for g, c in curves.items() if not g.endswith(":spot") for pt in c])
        for r in rs:
            if r["label"] != args.policy:
                continue
            need = gpu_hours_at(both, r["missed"])
            miss = missed_at(both, r["gpu_dollars"])
            per = {g: gpu_hours_at(c, r["missed"]) for g, c in curves.items()}
            out = {"seed": seed, "label": r["label"], "target": r["target"],
                   "reclaims_per_day": r["reclaims_per_day"], "missed": r["missed"], "requests": r["requests"],
                   "gpu_dollars": r["gpu_dollars"], "reclaims": r["reclaims"], "killed": r["killed_requests"],
                   "best_single_type_usd_at_equal_misses": round(need, 2) if need else None,
                   "usd_saving": round(1 - r["gpu_dollars"] / need, 4) if need else None,
                   "per_type_usd_at_equal_misses": {g: round(v, 2) if v else None for g, v in per.items()},
                   "competitor_missed_at_equal_usd": round(miss, 1) if miss is not None else None}  # fmt: skip
            print(json.dumps(out))
    if args.table:
        print(table(rows, args.policy))
    return 0


def _pp(r: dict[str, Any] | None, base: dict[str, Any] | None) -> str:
    """Percentage points of extra misses of ``r`` over the run without reclaims."""
    if r is None or base is None:
        return "-"
    return f"{100 * (r['missed'] - base['missed']) / r['requests']:+.2f}"


def _saving(top: dict[str, Any], need: float | None) -> str:
    return f"{need:.2f} ({1 - top['gpu_dollars'] / need:+.1%})" if need else "not reached"


def table(rows: list[dict[str, Any]], label: str) -> str:
    """The docs table: per seed, the saving at equal misses against the best single type on demand,
    the spot competitor's, and the misses reclaims add (against the same run without reclaims)."""
    out = ["| seed | toposerve: missed / GPU-$ | best single type on demand at equal misses: GPU-$ (saving) "
           "| its missed at equal GPU-$ | spot L40S HPA/request-count at equal misses: GPU-$ (saving) "
           "| reclaims (killed requests) | spot-induced extra misses, pp (no cover) |",
           "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for seed in sorted({r["seed"] for r in rows}):
        rs = [r for r in rows if r["seed"] == seed]
        top = next((r for r in rs if r["label"] == label), None)
        if top is None:
            continue
        comp = [r for r in rs if r["policy"] in COMPETITORS]
        od = frontier([(r["gpu_dollars"], r["missed"]) for r in comp if not r["gpu"].endswith(":spot")])
        spot = frontier([(r["gpu_dollars"], r["missed"]) for r in comp if r["gpu"].endswith(":spot")])
        need, need_s = gpu_hours_at(od, top["missed"]), gpu_hours_at(spot, top["missed"])
        miss = missed_at(od, top["gpu_dollars"])
        base = next(
            (r for r in rs if r["label"] == label + "-noreclaim" and r["target"] == top["target"]), None
        )
        nocov = next(
            (r for r in rs if r["label"] == label + "-nocover" and r["target"] == top["target"]), None
        )

        out.append(f"| {seed} | {top['missed']:,} / {top['gpu_dollars']:.2f} | {_saving(top, need)} | "
                   f"{'-' if miss is None else f'{miss:,.0f}'} | {_saving(top, need_s)} | {top['reclaims']} "
                   f"({top['killed_requests']}) | {_pp(top, base)} ({_pp(nocov, base)}) |")  # fmt: skip
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--seed", type=int, required=True)
    r.add_argument("--days", type=int, default=2)
    r.add_argument("--warmup-days", type=int, default=1)
    r.add_argument("--load", type=float, default=4.0, help="the day trace's rates times this")
    r.add_argument("--fast", default="H100")
    r.add_argument("--cheap", default="L40S")
    r.add_argument("--fast-max", type=int, default=8)
    r.add_argument("--cheap-max", type=int, default=12)
    r.add_argument("--baseline", type=int, default=0, help="the cheap pool's on-demand baseline")
    r.add_argument("--reclaims-per-day", type=float, default=2.0, help="per spot replica; < 0: no spot")
    r.add_argument("--no-cover", action="store_true", help="toposerve without the on-demand cover")
    r.add_argument("--targets", default="0.5,0.6,0.7,0.8")
    r.add_argument("--policies", default="hpa-kv@L40S,hpa-kv@H100,request-count@L40S,request-count@H100")
    r.add_argument("--label", default="")
    r.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("report")
    p.add_argument("files", type=Path, nargs="+")
    p.add_argument("--policy", default="toposerve-hetero", help="the label to report")
    p.add_argument("--table", action="store_true", help="also the docs table (markdown)")
    args = ap.parse_args(argv)
    if args.cmd == "run" and not 0 <= args.warmup_days < args.days:
        ap.error("--warmup-days must be >= 0 and < --days")
    return cmd_run(args) if args.cmd == "run" else cmd_report(args)


if __name__ == "__main__":
    raise SystemExit(main())
