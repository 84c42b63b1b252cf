"""The memory model that decides whether a replica layout fits a GPU.

    usable per GPU      = memory x gpuMemoryUtilization - runtime reserve
    weights per GPU     = parameters x bytes(dtype) / (TP x PP)
    KV bytes/token/GPU  = 2 x (layers / PP) x max(1, kvHeads / TP) x headDim x bytes(kvCacheDtype) / CP
    KV capacity/replica = (usable - weights per GPU) / KV bytes per token per GPU   [tokens]
    fits                = usable > weights per GPU and capacity >= maxContextLength x minConcurrentSequences

Every GPU of a replica holds its slice of every token's KV (TP splits heads, PP splits layers,
context parallelism splits the sequence), so the per-GPU free memory divided by the per-GPU cost of
one token is the replica's token capacity. KV heads are replicated when TP exceeds them (GQA),
hence ``max(1, kvHeads / TP)``. Layers that do not divide evenly by PP are rounded up: the
fullest stage decides.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

GIB = 1024**3
MIB = 1024**2


@dataclass(frozen=True)
class Layout:
    """A parallel layout of one replica (data parallel ranks each hold a full TP x PP copy)."""

    tp: int = 1
    pp: int = 1
    cp: int = 1
    dp: int = 1

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.cp * self.dp


@dataclass(frozen=True)
class ModelMemory:
    """The memory-relevant numbers of a model at a given precision."""

    parameters_b: float
    layers: int
    kv_heads: int
    head_dim: int
    weight_bytes: float
    kv_bytes: float


@dataclass(frozen=True)
class Fit:
    """The memory verdict for one layout on one GPU type."""

    usable_bytes: float
    weights_bytes_per_gpu: float
    kv_bytes_per_token_per_gpu: float
    kv_capacity_tokens: int
    required_tokens: int

    @property
    def free_bytes_per_gpu(self) -> float:
        return self.usable_bytes - self.weights_bytes_per_gpu

    @property
    def fits(self) -> bool:
        return self.free_bytes_per_gpu > 0 and self.kv_capacity_tokens >= self.required_tokens

    def shortfall(self) -> str:
        """Which constraint fails and by how much, in words."""
        if self.free_bytes_per_gpu <= 0:
            return (
                f"weights need {self.weights_bytes_per_gpu / GIB:.1f} GiB per GPU but only "
                f"{self.usable_bytes / GIB:.1f} GiB is usable (short by {-self.free_bytes_per_gpu / GIB:.1f} GiB)"
            )
        need_gib = self.required_tokens * self.kv_bytes_per_token_per_gpu / GIB
        return (
            f"KV cache holds {self.kv_capacity_tokens} tokens but {self.required_tokens} are needed "
            f"({need_gib:.1f} GiB per GPU needed, {self.free_bytes_per_gpu / GIB:.1f} GiB left after weights)"
        )


def usable_bytes(memory_mib: int, utilization: float, reserve_gib: float) -> float:
    return memory_mib * MIB * utilization - reserve_gib * GIB


def weights_per_gpu(m: ModelMemory, layout: Layout) -> float:
    return m.parameters_b * 1e9 * m.weight_bytes / (layout.tp * layout.pp)


def kv_bytes_per_token_per_gpu(m: ModelMemory, layout: Layout) -> float:
    layers_per_stage = math.ceil(m.layers / layout.pp)
    heads_per_gpu = max(1.0, m.kv_heads / layout.tp)
    return 2 * layers_per_stage * heads_per_gpu * m.head_dim * m.kv_bytes / layout.cp


def evaluate(
    m: ModelMemory,
    layout: Layout,
    memory_mib: int,
    utilization: float,
    reserve_gib: float,
    context_length: int,
    min_sequences: int = 1,
) -> Fit:
    """The memory verdict for ``layout`` on a GPU with ``memory_mib``."""
    usable = usable_bytes(memory_mib, utilization, reserve_gib)
    weights = weights_per_gpu(m, layout)
    per_token = kv_bytes_per_token_per_gpu(m, layout)
    free = usable - weights
    capacity = int(free // per_token) if free > 0 else 0
    return Fit(
        usable_bytes=usable,
        weights_bytes_per_gpu=weights,
        kv_bytes_per_token_per_gpu=per_token,
        kv_capacity_tokens=capacity,
        required_tokens=context_length * min_sequences,
    )
