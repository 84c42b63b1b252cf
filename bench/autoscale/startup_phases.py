"""A replica's start-up from the product's phase model, with and without toposerve's levers.

The phases and what each cache skips are the mock engine's (``toposerve.mockengine.startup.plan``,
written from vLLM 0.33.0: download unless the weights are in ``HF_HOME``, load, torch.compile
unless ``VLLM_CACHE_ROOT`` holds the graphs, CUDA graphs every start). The durations are the ones
the operator gives the mock (``toposerve.render.objects.mock_startup_args``): weights fetched at
the operator's ``modelLoadGBps`` (default 0.5 GB/s), read into GPU memory at ``VLLM_LOAD_GBPS``
(2 GB/s), 300 s of compile + graphs split 4/5 compile, 1/5 capture, a compiled-graph cache hit at a
tenth of the compile. Those are the product's assumptions, not measurements.

* **cold** (a competitor's replica: no persistent cache, a fresh node): download + load + compile +
  graphs.
* **warm** (toposerve with ``model.cache`` on a host path and ``model.cache.prefetch``: the
  prefetch DaemonSet has put the weights on every node of the pool, and the compile cache on the
  same host path holds the graphs once any replica compiled on that node): load + cached compile +
  graphs. The simulation takes every node as warm (the day-0 warm-up compiles once per node).
"""

from __future__ import annotations

from toposerve.api.config import OperatorConfig
from toposerve.mockengine.startup import StartupModel, plan
from toposerve.render.objects import (
    COMPILE_AND_GRAPHS_S,
    MOCK_CACHED_COMPILE_SHARE,
    MOCK_COMPILE_SHARE,
    VLLM_LOAD_GBPS,
    _gib_per_s,
)

GIB = 1024**3
# the simulated engine's model: an 8B checkpoint in bf16 (Llama-3.1-8B: 8.03e9 parameters), the
# planner's figure (planner/plan.py: parameters x dtype bytes / GiB, one decimal)
WEIGHTS_GIB = round(8.03e9 * 2 / GIB, 1)


def startup_model(weights_gib: float = WEIGHTS_GIB) -> StartupModel:
    compile_s = COMPILE_AND_GRAPHS_S * MOCK_COMPILE_SHARE
    load_gbps = OperatorConfig.model_fields["model_load_gbps"].default
    return StartupModel(
        weights_gib=weights_gib,
        download_gib_per_s=_gib_per_s(load_gbps),
        load_gib_per_s=_gib_per_s(VLLM_LOAD_GBPS),
        compile_s=compile_s,
        compile_cached_s=compile_s * MOCK_CACHED_COMPILE_SHARE,
        graph_capture_s=COMPILE_AND_GRAPHS_S - compile_s,
    )


def startup_seconds(warm: bool, weights_gib: float = WEIGHTS_GIB) -> float:
    """Seconds from pod created to ready: the sum of ``plan``'s phases (cold or warm, above)."""
    return sum(p.seconds for p in plan(startup_model(weights_gib), weights_cached=warm, compile_cached=warm))


def phases(warm: bool, weights_gib: float = WEIGHTS_GIB) -> list[tuple[str, float]]:
    return [(p.name, round(p.seconds, 1)) for p in plan(startup_model(weights_gib), warm, warm)]


if __name__ == "__main__":
    for w in (False, True):
        print("warm" if w else "cold", phases(w), round(startup_seconds(w), 1))
