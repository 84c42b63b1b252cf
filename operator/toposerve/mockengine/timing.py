"""How long one engine step takes on a given GPU, and how many KV blocks fit on it.

The shape follows what dominates a real forward pass, with constants for an 8B model on one
A100-80GB (throughput weight 1.0), then divided by the GPU's relative speed:

* every step pays a fixed cost (reading the weights once; kernel launches): ``decode_base_s``;
* prefill is compute bound, linear in the tokens actually computed (a prefix-cache hit skips
  them): ``prefill_s_per_token``;
* decode grows with the batch (``decode_s_per_seq``) and with the KV bytes read, i.e. the
  context held by the batch (``s_per_context_token``).

Tensor parallelism splits the work over ``tp`` GPUs with imperfect scaling
(speedup ``1 + (tp - 1) * tp_efficiency``). Everything is a pure function of its inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from toposerve.api.gpus import DEFAULT_CATALOG, GPUCatalog, throughput_weight

# Defaults: Llama-3-8B-class model in bf16.
DEFAULT_PARAMS_B = 8.0
DEFAULT_KV_BYTES_PER_TOKEN = 131072  # 32 layers x 8 KV heads x 128 dims x (K,V) x 2 bytes
DEFAULT_GPU_MEMORY_UTILIZATION = 0.9
DEFAULT_ACTIVATION_RESERVE_GIB = 2.0
FALLBACK_GPU_MEMORY_GIB = 80.0


@dataclass(frozen=True)
class TimingModel:
    """Step-time model; constants are for speed 1.0 (one A100-80GB), in seconds."""

    gpu_weight: float = 1.6  # H100
    tensor_parallel_size: int = 1
    tp_efficiency: float = 0.75
    decode_base_s: float = 0.012
    decode_s_per_seq: float = 0.0002
    s_per_context_token: float = 6e-8
    prefill_s_per_token: float = 5e-5

    @property
    def speed(self) -> float:
        tp = max(1, self.tensor_parallel_size)
        return self.gpu_weight * (1.0 + (tp - 1) * self.tp_efficiency)

    def step_time(self, prefill_tokens: int, decode_seqs: int, context_tokens: int) -> float:
        """Simulated seconds for one scheduler iteration (0 when nothing was scheduled)."""
        if prefill_tokens <= 0 and decode_seqs <= 0:
            return 0.0
        t = (
            self.decode_base_s
            + prefill_tokens * self.prefill_s_per_token
            + decode_seqs * self.decode_s_per_seq
            + context_tokens * self.s_per_context_token
        )
        return t / self.speed

    def prefill_time(self, uncached_tokens: int) -> float:
        """Time of a lone prefill of ``uncached_tokens`` (what TTFT is on an idle engine)."""
        return self.step_time(uncached_tokens, 0, 0)

    def decode_step_time(self, batch: int, context_tokens: int = 0) -> float:
        return self.step_time(0, batch, context_tokens)


def canonical_gpu(name: str, catalog: GPUCatalog = DEFAULT_CATALOG) -> str | None:
    """The catalog name for a short name or a GFD product label (``NVIDIA-H100-80GB-HBM3``)."""
    if name in catalog:
        return name
    g = catalog.by_product(name)
    return g.name if g is not None else None


def gpu_weight_for(name: str, catalog: GPUCatalog = DEFAULT_CATALOG) -> tuple[float, bool]:
    """(relative decode speed, known?) for a GPU type; unknown names count as 1.0."""
    canon = canonical_gpu(name, catalog)
    return (throughput_weight(canon, catalog), True) if canon else (1.0, False)


def default_num_gpu_blocks(
    gpu_type: str,
    tensor_parallel_size: int = 1,
    block_size: int = 16,
    params_b: float = DEFAULT_PARAMS_B,
    kv_bytes_per_token: int = DEFAULT_KV_BYTES_PER_TOKEN,
    gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION,
    catalog: GPUCatalog = DEFAULT_CATALOG,
) -> int:
    """KV blocks vLLM would profile: usable memory minus bf16 weights and activations.

    With TP the weights and the KV heads are split over the GPUs, so the pool scales with tp.
    Never below 64 blocks, so a mis-sized config still serves small requests.
    """
    tp = max(1, tensor_parallel_size)
    canon = canonical_gpu(gpu_type, catalog)
    mem_gib = catalog.get(canon).memory_gib if canon else FALLBACK_GPU_MEMORY_GIB
    usable = mem_gib * gpu_memory_utilization * tp - params_b * 2 * 1e9 / 2**30
    usable -= DEFAULT_ACTIVATION_RESERVE_GIB * tp
    blocks = math.floor(usable * 2**30 / (kv_bytes_per_token * block_size))
    return max(64, blocks)
