"""The memory model's arithmetic, checked by hand-computed numbers."""

from __future__ import annotations

import pytest

from toposerve.planner.memory import (
    GIB,
    MIB,
    Layout,
    ModelMemory,
    evaluate,
    kv_bytes_per_token_per_gpu,
    usable_bytes,
)

LLAMA_70B = ModelMemory(parameters_b=70.6, layers=80, kv_heads=8, head_dim=128, weight_bytes=2, kv_bytes=2)


def test_usable_is_utilisation_minus_reserve() -> None:
    assert usable_bytes(81559, 0.9, 2.0) == pytest.approx(81559 * MIB * 0.9 - 2 * GIB)


def test_kv_bytes_per_token_splits_heads_layers_and_sequence() -> None:
    # 2 (K and V) x 80 layers x 8 heads x 128 x 2 bytes = 327680 bytes per token on one GPU.
    assert kv_bytes_per_token_per_gpu(LLAMA_70B, Layout(tp=1)) == 327680
    assert kv_bytes_per_token_per_gpu(LLAMA_70B, Layout(tp=4)) == 327680 / 4
    # TP beyond the KV heads replicates them: never below one head per GPU.
    assert kv_bytes_per_token_per_gpu(LLAMA_70B, Layout(tp=16)) == 327680 / 8
    assert kv_bytes_per_token_per_gpu(LLAMA_70B, Layout(tp=8, pp=2)) == 327680 / 8 / 2
    assert kv_bytes_per_token_per_gpu(LLAMA_70B, Layout(tp=8, cp=2)) == 327680 / 8 / 2


def test_uneven_layers_round_up_to_the_fullest_stage() -> None:
    m = ModelMemory(parameters_b=1, layers=81, kv_heads=8, head_dim=128, weight_bytes=2, kv_bytes=2)
    assert kv_bytes_per_token_per_gpu(m, Layout(pp=2)) == 2 * 41 * 8 * 128 * 2


def test_capacity_and_fit_verdicts() -> None:
    fit = evaluate(LLAMA_70B, Layout(tp=4), 81559, 0.9, 2.0, 131072)
    weights = 70.6e9 * 2 / 4
    assert fit.weights_bytes_per_gpu == pytest.approx(weights)
    assert fit.kv_capacity_tokens == int((usable_bytes(81559, 0.9, 2.0) - weights) // (327680 / 4))
    assert fit.fits
    too_small = evaluate(LLAMA_70B, Layout(tp=2), 81559, 0.9, 2.0, 131072)
    assert not too_small.fits and "KV cache holds" in too_small.shortfall()
    no_room = evaluate(LLAMA_70B, Layout(tp=1), 81559, 0.9, 2.0, 1)
    assert not no_room.fits and no_room.kv_capacity_tokens == 0 and "weights need" in no_room.shortfall()


def test_concurrency_multiplies_the_requirement() -> None:
    one = evaluate(LLAMA_70B, Layout(tp=4), 81559, 0.9, 2.0, 131072, min_sequences=1)
    many = evaluate(LLAMA_70B, Layout(tp=4), 81559, 0.9, 2.0, 131072, min_sequences=8)
    assert one.fits and not many.fits and many.required_tokens == 8 * 131072
