"""The Azure LLM inference traces (2023) as a benchmark trace: real arrival times and token lengths.

Source: github.com/Azure/AzurePublicDataset, ``data/AzureLLMInferenceTrace_conv.csv`` and
``_code.csv`` (CC-BY; Patel et al., "Splitwise", ISCA 2024): one hour of one Azure service's
requests each (TIMESTAMP, ContextTokens, GeneratedTokens; conv 19,366 requests at 5.5 req/s, code
8,819 at 2.6 req/s). ``build`` derives a small file per trace (``azure/<name>.csv.gz``: arrival
offset in ms, prompt tokens, output tokens, in arrival order), which is what the repository keeps:

    git -C /path/to/AzurePublicDataset show HEAD:data/AzureLLMInferenceTrace_conv.csv > conv.csv
    .venv/bin/python bench/autoscale/azuretrace.py build conv.csv bench/autoscale/azure/conv.csv.gz

**Scaled to the simulated fleet** (``load``): arrival times are stretched by one factor so that the
trace's mean token arrival rate (prompt + output tokens/s) equals the synthetic day's plateau
(3.6 req/s x the log-normal means, 1,197 prompt + 191 output tokens: 4,998 tokens/s), which the
12-replica fleet serves with room for its 1.6x spikes. The token lengths and the shape of the
arrivals (bursts, their order) are the trace's own. The hour is played twice: the first copy warms
the fleet up (every policy starts from one replica), the second is measured.
"""

from __future__ import annotations

import csv
import gzip
import math
import sys
from datetime import datetime
from pathlib import Path

from daytrace import Trace, TraceConfig

HERE = Path(__file__).resolve().parent / "azure"
# the synthetic day's plateau in tokens/s (daytrace.TraceConfig defaults; clipping ignored)
_CFG = TraceConfig()
PLATEAU_TOKENS_PER_S = _CFG.peak_rps * (
    _CFG.prompt_median * math.exp(_CFG.prompt_sigma**2 / 2)
    + _CFG.output_median * math.exp(_CFG.output_sigma**2 / 2)
)


def build(src: Path, dst: Path) -> int:
    rows = list(csv.DictReader(src.open()))
    ts = [datetime.fromisoformat(r["TIMESTAMP"][:26]).timestamp() for r in rows]
    t0 = min(ts)
    out = sorted(
        (round((t - t0) * 1000), int(r["ContextTokens"]), int(r["GeneratedTokens"]))
        for t, r in zip(ts, rows, strict=True)
    )
    dst.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(dst, "wt", newline="") as f:
        w = csv.writer(f)
        w.writerow(["offset_ms", "prompt", "output"])
        w.writerows(out)
    return len(out)


def read(name: str) -> list[tuple[float, int, int]]:
    with gzip.open(HERE / f"{name}.csv.gz", "rt") as f:
        r = csv.reader(f)
        next(r)
        return [(int(a) / 1000.0, int(p), int(o)) for a, p, o in r]


def stretch(rows: list[tuple[float, int, int]]) -> float:
    """The factor on arrival times that brings the trace's token rate to the synthetic plateau's."""
    span = rows[-1][0] - rows[0][0]
    tokens_per_s = sum(p + o for _, p, o in rows) / span
    return tokens_per_s / PLATEAU_TOKENS_PER_S


def load(name: str, seed: int) -> tuple[Trace, float]:
    """(trace, T): the stretched hour played at [0, T) (warm-up) and [T, 2T) (measured)."""
    rows = read(name)
    k = stretch(rows)
    period = math.ceil(rows[-1][0] * k) + 1.0
    arrival = [a * k for a, _, _ in rows] + [period + a * k for a, _, _ in rows]
    prompt = [p for _, p, _ in rows] * 2
    output = [o for _, _, o in rows] * 2
    return Trace(arrival, prompt, output, (), TraceConfig(days=1, seed=seed), (1.0,)), period


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "build":
        print(build(Path(sys.argv[2]), Path(sys.argv[3])), "requests")
    elif len(sys.argv) == 3 and sys.argv[1] == "info":
        rows = read(sys.argv[2])
        k = stretch(rows)
        print(
            f"{len(rows)} requests over {rows[-1][0]:.0f} s; stretch x{k:.3f} -> {len(rows) / (rows[-1][0] * k):.2f} req/s"
        )
    else:
        raise SystemExit("usage: azuretrace.py build SRC.csv DST.csv.gz | info NAME")
