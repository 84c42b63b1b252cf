"""Property tests of the planner: monotonicity in GPU memory and context, exact replica shares."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from toposerve.api.config import OperatorConfig
from toposerve.api.gpus import DEFAULT_CATALOG, GPUType
from toposerve.api.llm_catalog import MODEL_CATALOG
from toposerve.planner.plan import plan_deployment
from toposerve.planner.replicas import distribute

from .conftest import make_spec

MODELS = sorted(MODEL_CATALOG)


def gpus_needed(model: str, ctx: int, memory_mib: int, seqs: int = 1) -> int | None:
    gpu = DEFAULT_CATALOG.get("H100").model_copy(
        update={"name": "X", "product": "X", "memory_mib": memory_mib}
    )
    cfg = OperatorConfig(extra_gpu_types=[GPUType.model_validate(gpu.model_dump(by_alias=True))])
    spec = make_spec(model, ctx, ["X"], serving={"minConcurrentSequences": seqs})
    p = plan_deployment("p", spec, cfg).pools[0]
    return p.gpus_per_replica if p.fits else None


def native(model: str) -> int:
    return MODEL_CATALOG[model].max_position_embeddings or 8192


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(MODELS), st.integers(8_000, 200_000), st.integers(1, 100_000), st.data())
def test_more_gpu_memory_never_needs_more_gpus(model: str, mem: int, extra: int, data: st.DataObject) -> None:
    ctx = data.draw(st.integers(1, native(model)))
    small, big = gpus_needed(model, ctx, mem), gpus_needed(model, ctx, mem + extra)
    if small is not None:
        assert big is not None and big <= small


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(MODELS), st.integers(20_000, 200_000), st.data())
def test_longer_context_never_needs_fewer_gpus(model: str, mem: int, data: st.DataObject) -> None:
    short = data.draw(st.integers(1, native(model)))
    long = data.draw(st.integers(short, native(model)))
    g_short, g_long = gpus_needed(model, short, mem), gpus_needed(model, long, mem)
    if g_long is not None:
        assert g_short is not None and g_short <= g_long


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 500), st.lists(st.integers(0, 20), min_size=1, max_size=8))
def test_replica_shares_are_exact_and_proportional(total: int, weights: list[int]) -> None:
    named = [(f"p{i}", w) for i, w in enumerate(weights)]
    shares = distribute(total, named)
    if sum(weights) == 0:
        assert set(shares.values()) == {0}
        return
    assert sum(shares.values()) == total
    for name, w in named:
        exact = total * w / sum(weights)
        assert abs(shares[name] - exact) < 1, (name, shares[name], exact)
        if w == 0:
            assert shares[name] == 0
