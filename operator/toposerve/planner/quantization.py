"""Which vLLM quantization a pool runs, and on which GPU generations it can (pure).

Two kinds of method exist in vLLM (docs "Quantization" and its hardware-support table, v0.33):

- **in-flight**: vLLM quantizes a bf16/fp16 checkpoint while loading: ``fp8`` (W8A8 on compute
  capability 8.9+, weight-only W8A16 through Marlin on Ampere 8.0), ``bitsandbytes`` (4-bit NF4
  only: 8-bit bitsandbytes needs a pre-quantized checkpoint) and ``experts_int8`` (MoE experts);
- **pre-quantized**: the checkpoint itself holds quantized weights (AWQ, GPTQ, compressed-tensors,
  GGUF, ModelOpt, MXFP4): pointing one of those methods at the bf16 original fails at load time, so
  such a pool must name its own checkpoint.

``int8`` therefore has no in-flight path: it needs a checkpoint (GPTQ int8, compressed-tensors
W8A8/W8A16). ``int4`` without a checkpoint loads the original through bitsandbytes 4-bit.
"""

from __future__ import annotations

from dataclasses import dataclass

from toposerve.api.errors import SpecError
from toposerve.api.gpus import GPUType

IN_FLIGHT = frozenset({"fp8", "bitsandbytes", "experts_int8"})
PREQUANTIZED = frozenset(
    {
        "awq", "awq_marlin", "gptq", "gptq_marlin", "gptq_marlin_24", "gptq_bitblas", "compressed-tensors",
        "gguf", "modelopt", "modelopt_fp4", "mxfp4", "fp_quant", "quark", "torchao", "auto-round",
        "bitblas", "marlin", "moe_wna16",
    }
)  # fmt: skip
# Lowest CUDA compute capability vLLM's kernels for a method run on (its quantization hardware
# table); methods not listed are assumed to run wherever vLLM does (7.0).
MIN_COMPUTE_CAPABILITY: dict[str, float] = {
    "fp8": 8.0,  # native W8A8 from 8.9 (Ada, Hopper); Ampere gets weight-only FP8 through Marlin
    "awq": 7.5,
    "awq_marlin": 8.0,
    "gptq_marlin": 8.0,
    "gptq_marlin_24": 8.0,
    "marlin": 8.0,
    "compressed-tensors": 7.5,
    "mxfp4": 8.0,
    "modelopt": 8.9,
    "modelopt_fp4": 10.0,
    "experts_int8": 8.0,
}


@dataclass(frozen=True)
class Weights:
    """What a pool loads: the checkpoint (None: model.name) and the --quantization flag, if any."""

    checkpoint: str | None
    quantization: str | None


def choose(
    dtype: str,
    explicit: str | None,
    checkpoint: str | None,
    model_is_original: bool,
    path: str,
) -> Weights:
    """The weights of one pool; raises SpecError naming ``path`` (the pool's or model's field path)
    for combinations vLLM cannot load.

    ``model_is_original``: model.name is a catalog model, i.e. the bf16 original, not a quantized build.
    """
    method = explicit.strip().lower() if explicit else None
    if method in PREQUANTIZED and checkpoint is None and model_is_original:
        raise SpecError(
            f"{path}.quantization",
            f"{method} loads pre-quantized weights, but the model is the bf16 original; set "
            f"{path}.checkpoint to a {method} build of it (or use an in-flight method: fp8, bitsandbytes)",
        )
    if method is None:
        if checkpoint is not None:
            return Weights(checkpoint, None)  # vLLM reads the method from the checkpoint's config
        if dtype == "int8":
            raise SpecError(
                f"{path}.dtype",
                "int8 needs a pre-quantized checkpoint (vLLM's in-flight bitsandbytes is 4-bit only); set "
                f"{path}.checkpoint to a GPTQ-int8 or compressed-tensors W8A8/W8A16 build, or use int4 or fp8",
            )
        method = {"fp8": "fp8", "int4": "bitsandbytes"}.get(dtype)
    if method == "bitsandbytes" and checkpoint is None and dtype not in ("int4", "bf16", "fp16"):
        raise SpecError(
            f"{path}.quantization", "in-flight bitsandbytes quantizes to 4 bits only (dtype int4)"
        )
    return Weights(checkpoint, method)


def unsupported(method: str | None, gpu: GPUType) -> str | None:
    """Why ``gpu`` cannot run ``method`` (None when it can)."""
    if method is None:
        return None
    need = MIN_COMPUTE_CAPABILITY.get(method)
    if need is not None and gpu.compute_capability < need:
        return (
            f"vLLM's {method} kernels need compute capability {need:g}+, {gpu.name} has "
            f"{gpu.compute_capability:g}"
        )
    return None
