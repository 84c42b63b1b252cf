"""Built-in architectures of well-known models, keyed by Hugging Face id, so users don't type them.

The planner only needs what decides memory: parameter count (weights), layers, KV heads and head
dimension (KV cache per token), attention heads (which tensor-parallel sizes are legal) and the
expert count (whether expert parallelism applies). Numbers come from each model's config.json.
DeepSeek-V3 uses multi-head latent attention: its KV cache is one 576-wide latent per layer and
token, shared by all heads and replicated across TP ranks; it is expressed as kvHeads=1 and
headDim=288, so the generic ``2 x kvHeads x headDim`` gives 576.
"""

from __future__ import annotations

from toposerve.api.spec import Architecture


def _a(
    params_b: float, layers: int, heads: int, kv: int, hd: int, ctx: int, experts: int = 0
) -> Architecture:
    return Architecture(
        parameters=params_b,
        layers=layers,
        attention_heads=heads,
        kv_heads=kv,
        head_dim=hd,
        experts=experts,
        max_position_embeddings=ctx,
    )


MODEL_CATALOG: dict[str, Architecture] = {
    "meta-llama/Llama-3.1-8B-Instruct": _a(8.03, 32, 32, 8, 128, 131072),
    "meta-llama/Llama-3.1-70B-Instruct": _a(70.6, 80, 64, 8, 128, 131072),
    "meta-llama/Llama-3.1-405B-Instruct": _a(405.9, 126, 128, 8, 128, 131072),
    "meta-llama/Llama-3.2-1B-Instruct": _a(1.24, 16, 32, 8, 64, 131072),
    "meta-llama/Llama-3.2-3B-Instruct": _a(3.21, 28, 24, 8, 128, 131072),
    "mistralai/Mixtral-8x7B-Instruct-v0.1": _a(46.7, 32, 32, 8, 128, 32768, experts=8),
    "Qwen/Qwen2.5-0.5B-Instruct": _a(0.49, 24, 14, 2, 64, 32768),
    "Qwen/Qwen2.5-7B-Instruct": _a(7.62, 28, 28, 4, 128, 32768),
    "Qwen/Qwen2.5-72B-Instruct": _a(72.7, 80, 64, 8, 128, 32768),
    "deepseek-ai/DeepSeek-V3": _a(671.0, 61, 128, 1, 288, 163840, experts=256),
    "openai/gpt-oss-20b": _a(20.9, 24, 64, 8, 64, 131072, experts=32),
    "openai/gpt-oss-120b": _a(116.8, 36, 64, 8, 64, 131072, experts=128),
}

_LOWER = {k.lower(): k for k in MODEL_CATALOG}


def lookup(model_id: str) -> Architecture | None:
    """The built-in architecture for a Hugging Face id (case-insensitive), or None."""
    key = _LOWER.get(model_id.lower())
    return MODEL_CATALOG[key] if key else None


# Organisations whose model repositories on the Hugging Face hub are gated (a licence to accept,
# then a token to download), as of 2026-11: Meta's Llama and Mistral's repositories.
GATED_ORGS = ("meta-llama/", "mistralai/")


def gated(model_id: str) -> bool:
    """Whether downloading ``model_id`` from the hub needs an accepted licence and a token."""
    return model_id.lower().startswith(GATED_ORGS)


def known_models() -> list[str]:
    return sorted(MODEL_CATALOG)
