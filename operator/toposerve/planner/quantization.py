"""Which vLLM quantization a pool runs, and on which GPU generations it can (pure).

The method names are vLLM 0.33.0's (``hack/vllm/facts-0.33.0.json``, dumped from the installed
vLLM by ``hack/vllm/check_args.py``; tests/vllm checks this table against it). Two kinds exist:

- **in-flight**: vLLM quantizes a bf16/fp16 checkpoint while loading: ``fp8`` (W8A8 on compute
  capability 8.9+, weight-only through Marlin on Ampere), the ``fp8_per_*`` variants,
  ``int8_per_channel_weight_only``, ``mxfp8``, ``nvfp4_per_token`` (Blackwell), ``experts_int8``
  (MoE experts). vLLM 0.33.0 has no bitsandbytes any more, hence no in-flight 4-bit method
  before Blackwell;
- **pre-quantized**: the checkpoint itself holds quantized weights (AWQ, GPTQ, compressed-tensors,
  ModelOpt, MXFP4, ...): pointing one of those at the bf16 original fails at load time, so such a
  pool must name its own checkpoint.

Defaults by dtype: fp8 -> ``fp8``; int8 -> ``int8_per_channel_weight_only``; int4 needs a
checkpoint (an AWQ or GPTQ build; vLLM reads the method from its config).
"""

from __future__ import annotations

from dataclasses import dataclass

from toposerve.api.errors import SpecError
from toposerve.api.gpus import GPUType

# vLLM 0.33.0's --quantization choices (its QUANTIZATION_METHODS), pinned with the image.
VLLM_METHODS = (
    "awq", "auto_awq", "fp8", "fbgemm_fp8", "fp_quant", "modelopt", "modelopt_fp4", "modelopt_mxfp8",
    "modelopt_mixed", "auto_gptq", "gptq", "gptq_marlin", "awq_marlin", "humming", "compressed-tensors",
    "experts_int8", "quark", "moe_wna16", "torchao", "inc", "mxfp4", "gpt_oss_mxfp4", "deepseek_v4_fp8",
    "online", "fp8_per_tensor", "fp8_per_block", "fp8_per_channel", "int8_per_channel_weight_only",
    "nvfp4_per_token", "mxfp8",
)  # fmt: skip
IN_FLIGHT = frozenset(
    {
        "fp8", "online", "fp8_per_tensor", "fp8_per_block", "fp8_per_channel",
        "int8_per_channel_weight_only", "nvfp4_per_token", "mxfp8", "experts_int8", "torchao",
    }
)  # fmt: skip
PREQUANTIZED = frozenset(VLLM_METHODS) - IN_FLIGHT
DEFAULT_FOR_DTYPE = {"fp8": "fp8", "int8": "int8_per_channel_weight_only"}
# Lowest CUDA compute capability vLLM's kernels for a method run on (its quantization hardware
# table); methods not listed are assumed to run wherever vLLM does (7.0).
MIN_COMPUTE_CAPABILITY: dict[str, float] = {
    "fp8": 8.0,  # native W8A8 from 8.9 (Ada, Hopper); Ampere gets weight-only FP8 through Marlin
    "fp8_per_tensor": 8.9,
    "fp8_per_block": 8.9,
    "fp8_per_channel": 8.9,
    "awq": 7.5,
    "awq_marlin": 8.0,
    "gptq_marlin": 8.0,
    "compressed-tensors": 7.5,
    "mxfp4": 8.0,
    "gpt_oss_mxfp4": 8.0,
    "modelopt": 8.9,
    "modelopt_fp4": 10.0,
    "modelopt_mxfp8": 10.0,
    "nvfp4_per_token": 10.0,
    "mxfp8": 10.0,
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
    if method is not None and method not in VLLM_METHODS:
        raise SpecError(
            f"{path}.quantization",
            f"{method!r} is not a quantization method of the pinned vLLM; known: {', '.join(VLLM_METHODS)}",
        )
    if method in PREQUANTIZED and checkpoint is None and model_is_original:
        raise SpecError(
            f"{path}.quantization",
            f"{method} loads pre-quantized weights, but the model is the bf16 original; set "
            f"{path}.checkpoint to a {method} build of it (or an in-flight method: fp8, int8_per_channel_weight_only)",
        )
    if method is None:
        if checkpoint is not None:
            return Weights(checkpoint, None)  # vLLM reads the method from the checkpoint's config
        if dtype == "int4":
            raise SpecError(
                f"{path}.dtype",
                "int4 needs a pre-quantized checkpoint (the pinned vLLM has no in-flight 4-bit method before "
                f"Blackwell): set {path}.checkpoint to an AWQ or GPTQ int4 build of the model",
            )
        method = DEFAULT_FOR_DTYPE.get(dtype)
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
