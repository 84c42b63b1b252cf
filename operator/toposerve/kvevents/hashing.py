"""Prefix-cache block hashes computed exactly as vLLM 0.33.0 computes them (pure).

A router that scores engines by what they really cache must name blocks the way the engines do.
vLLM 0.33.0, default ``--prefix-caching-hash-algo sha256`` (``vllm/config/cache.py``):

* ``vllm/utils/hashing.py`` ``sha256(x)`` = SHA-256 of ``pickle.dumps(x, HIGHEST_PROTOCOL)``;
* ``vllm/v1/core/kv_cache_utils.py`` ``hash_block_tokens``: a full block's hash is
  ``sha256((parent_hash, tuple(block_token_ids), extra_keys))``, the first block's parent being
  ``NONE_HASH`` = ``sha256(seed)``, where the seed is ``PYTHONHASHSEED`` when set, else the fixed
  ``"vllm-none-hash"`` for the cryptographic algorithms (``resolve_none_hash_seed``), so every
  engine of a deployment names the same prefix the same way;
* only full blocks are hashed; ``extra_keys`` is None for a plain text request (no LoRA, no
  multi-modal input, no ``cache_salt``), ``(("lora", name, path),)`` on every block of a LoRA
  adapter's request (``lora_extra_keys``); a request's ``cache_salt`` adds
  ``("cache_salt", salt)`` to the **first** block's keys only (``generate_block_hash_extra_keys``:
  ``lora + mm + salt + prompt_embeds``, each source-tagged since vLLM 0.31, the salt ``if
  start_token_idx == 0``; ``salt_extra_key``), so a salted prompt's whole chain differs from the
  unsalted one. Multi-modal and prompt-embeds keys are not computed here (they need the
  engine's processed inputs): the router scores such requests on its approximation.

Events carry the hashes as bytes unless ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES`` is set
(``maybe_convert_block_hash``: the low 64 bits, big-endian); ``as_int`` does that conversion.
The test suite checks these functions against vLLM's own (tests/vllm).
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Sequence
from typing import Any

DEFAULT_NONE_HASH_SEED = "vllm-none-hash"


def sha256(value: Any) -> bytes:
    return hashlib.sha256(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)).digest()


def none_hash(seed: str | None = None) -> bytes:
    """The parent of every prefix's first block (``seed``: PYTHONHASHSEED, when the engines set it)."""
    return sha256(DEFAULT_NONE_HASH_SEED if seed is None else seed)


def hash_block(parent: bytes | None, tokens: Sequence[int], root: bytes, extra_keys: Any = None) -> bytes:
    return sha256((parent or root, tuple(tokens), extra_keys))


def block_hashes(
    tokens: Sequence[int],
    block_size: int,
    known: Sequence[bytes] = (),
    seed: str | None = None,
    extra_keys: Any = None,
    cache_salt: str | None = None,
) -> list[bytes]:
    """Chained hashes of every full block of ``tokens``, reusing the ``known`` leading ones.

    ``extra_keys``: the same for every block, as vLLM's LoRA keys are (``lora_extra_keys``);
    ``cache_salt``: the request's salt, added after them on the first block only.
    """
    root = none_hash(seed)
    out = list(known)
    for i in range(len(out), len(tokens) // block_size):
        block = tokens[i * block_size : (i + 1) * block_size]
        keys = extra_keys
        if i == 0 and cache_salt:
            keys = (*(extra_keys or ()), salt_extra_key(cache_salt))
        out.append(hash_block(out[-1] if out else None, block, root, keys))
    return out


def _own(text: str) -> str:
    """``text`` as a string object of its own. The hash pickles the keys, and pickle writes a
    string it has already written as a back-reference, so equal strings hash differently when
    they are one object than when they are two. In an engine the adapter's name (from its load
    request) and a request's cache_salt (from the request's JSON) are always two objects, so the
    router must not let them be one (found by vLLM's own hasher: tests/vllm/test_kv_events.py).
    One-character strings stay shared singletons here as in the engine (CPython caches them)."""
    return "".join(list(text))


def lora_extra_keys(name: str, path: str) -> tuple[tuple[str, str, str], ...]:
    """Every block's extra keys for a request of LoRA adapter ``name`` loaded from ``path``
    (vLLM 0.33.0 ``v1/core/kv_cache_utils.py`` ``_gen_lora_extra_hash_keys``: ``("lora",
    lora_name, lora_path)``, the path as given to /v1/load_lora_adapter), so an adapter's blocks
    are named apart from the base model's."""
    return (("lora", _own(name), _own(path)),)


def salt_extra_key(salt: str) -> tuple[str, str]:
    """The first block's key for a request's ``cache_salt`` (vLLM 0.33.0, source-tagged as the
    LoRA key is, so no salt can collide with an adapter's name)."""
    return ("cache_salt", _own(salt))


def as_int(block_hash: bytes) -> int:
    """What an engine with VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES publishes for ``block_hash``."""
    return int.from_bytes(block_hash, byteorder="big") & ((1 << 64) - 1)
