"""Tables of the leading-signal benchmark, round 2 (issue 25): per seed, toposerve-leading cold
and warm against the competitors' interpolated curve, and warm against an HPA on the same warm
start-up (what the start-up levers alone give), with the spread over seeds.

    .venv/bin/python bench/autoscale/round2.py bench/autoscale/results/leading2/report2.jsonl \\
        [--hpa-warm bench/autoscale/results/leading2/report2-hpa-warm.jsonl] [--cold 0.7 --warm 0.8]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
_spec = importlib.util.spec_from_file_location("leading", Path(__file__).resolve().parent / "leading.py")
assert _spec is not None and _spec.loader is not None
leading = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(leading)


def _rows(paths: list[Path]) -> list[dict[str, Any]]:
    return [json.loads(x) for p in paths for x in p.read_text().splitlines() if x.strip()]


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def compare(r: dict[str, Any], curve: list[tuple[float, float]]) -> tuple[float | None, float | None]:
    need = leading.gpu_hours_at(curve, r["missed"])
    miss = leading.missed_at(curve, r["gpu_hours"])
    return (1 - r["gpu_hours"] / need if need else None, 1 - r["missed"] / miss if miss else None)


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x * 100:+.1f} %"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("files", type=Path, nargs="+")
    ap.add_argument("--hpa-warm", type=Path, default=None)
    ap.add_argument("--cold", type=float, default=0.7)
    ap.add_argument("--warm", type=float, default=0.8)
    a = ap.parse_args()
    rows = _rows(a.files)
    warm_hpa = _rows([a.hpa_warm]) if a.hpa_warm and a.hpa_warm.exists() else []
    print(
        f"| seed | cold@{a.cold:g}: missed / GPU-h | saving ; fewer misses | warm@{a.warm:g}: missed / GPU-h | "
        "saving ; fewer "
        "misses | warm vs HPA on the warm start-up: saving ; fewer misses | spike absorbed, mean: cold / warm / "
        "hpa-kv same target (cold, warm) / hpa-kv nearest GPU-h |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    agg: dict[str, list[float]] = {}
    for seed in sorted({r["seed"] for r in rows}):
        rs = [r for r in rows if r["seed"] == seed]
        comp = leading.frontier(
            [(r["gpu_hours"], r["missed"]) for r in rs if r["policy"] in leading.COMPETITORS]
        )
        wh = [r for r in warm_hpa if r["seed"] == seed]
        wcurve = leading.frontier([(r["gpu_hours"], r["missed"]) for r in wh])
        cold = next((r for r in rs if r["label"] == "leading-cold" and r["target"] == a.cold), None)
        warm = next((r for r in rs if r["label"] == "leading-warm" and r["target"] == a.warm), None)
        cells = [str(seed)]
        absorb = []
        for key, r in (("cold", cold), ("warm", warm)):
            if r is None:
                cells += ["-", "-"]
                absorb.append("-")
                continue
            s, m = compare(r, comp)
            for k, v in ((f"{key}_saving", s), (f"{key}_fewer", m)):
                if v is not None:
                    agg.setdefault(k, []).append(v)
            cells += [f"{r['missed']:,} / {r['gpu_hours']:.1f}", f"{pct(s)} ; {pct(m)}"]
            ab = _mean(r["spike_absorb_s"])
            absorb.append("-" if ab is None else f"{ab:.0f}")
        if warm is not None and wcurve:
            s, m = compare(warm, wcurve)
            for k, v in (("warm_vs_hpawarm_saving", s), ("warm_vs_hpawarm_fewer", m)):
                if v is not None:
                    agg.setdefault(k, []).append(v)
            cells.append(f"{pct(s)} ; {pct(m)}")
        else:
            cells.append("-")
        hpa = [r for r in rs if r["label"] == "hpa-kv"]
        same_c = next((h for h in hpa if h["target"] == a.cold), None)
        same_w = next((h for h in hpa if h["target"] == a.warm), None)
        ref = warm or cold
        near = min(hpa, key=lambda h: abs(h["gpu_hours"] - ref["gpu_hours"])) if hpa and ref else None
        f = lambda h: "-" if h is None else f"{_mean(h['spike_absorb_s']) or 0:.0f}"  # noqa: E731
        near_s = "-" if near is None else f"{f(near)} (@{near['target']:g}, {near['gpu_hours']:.0f} GPU-h)"
        cells.append(f"{absorb[0]} / {absorb[1]} / {f(same_c)}, {f(same_w)} / {near_s}")
        print("| " + " | ".join(cells) + " |")
    for k, v in agg.items():
        print(
            f"{k}: n={len(v)} min {min(v) * 100:+.1f} % max {max(v) * 100:+.1f} % mean {sum(v) / len(v) * 100:+.1f} %"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
