"""vLLM 0.33.0's KV-cache event messages, field for field (``vllm/distributed/kv_events.py``).

A batch is published as a ZeroMQ multipart message ``(topic, seq, payload)``: ``seq`` an 8-byte
big-endian counter from 0 per publisher, ``payload`` the msgpack encoding (msgspec) of a
``KVEventBatch``: an array ``[ts, events, data_parallel_rank]`` (``array_like``, the rank left
out when None), each event a map tagged ``{"type": "BlockStored", ...}`` with fields at their
default left out (``omit_defaults``). These classes repeat vLLM's names, field order, defaults and
struct options so that the encodings are byte-identical (tests/vllm decodes ours with vLLM's
classes and vLLM's with ours). The replay socket (a ZeroMQ ROUTER) answers a request carrying a
start sequence number (8 bytes, big-endian) with every buffered ``(topic, seq, payload)`` from
there, then the end marker ``(b"", END_SEQ, b"")``.
"""

from __future__ import annotations

from typing import Any

import msgspec

MEDIUM_GPU = "GPU"
END_SEQ = (-1).to_bytes(8, "big", signed=True)

ExternalBlockHash = bytes | int


class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


class KVCacheEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
    """Base class for all KV cache-related events."""


class BlockStored(KVCacheEvent):
    block_hashes: list[ExternalBlockHash]
    parent_block_hash: ExternalBlockHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[tuple[Any, ...] | None] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None
    locality: str | None = None
    ownership: str | None = None
    session_id: str | None = None
    lookahead_token_ids: list[list[int]] | None = None


class BlockRemoved(KVCacheEvent):
    block_hashes: list[ExternalBlockHash]
    medium: str | None
    group_idx: int | None = None
    locality: str | None = None
    ownership: str | None = None


class AllBlocksCleared(KVCacheEvent):
    pass


class KVEventBatch(EventBatch):
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]


_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(KVEventBatch)


def encode(batch: KVEventBatch) -> bytes:
    return _ENCODER.encode(batch)


def decode(payload: bytes) -> KVEventBatch:
    """Raises msgspec.DecodeError (a ValueError) on a payload that is not a KV event batch."""
    return _DECODER.decode(payload)


def seq_bytes(seq: int) -> bytes:
    return seq.to_bytes(8, "big")


def seq_of(raw: bytes) -> int:
    return int.from_bytes(raw, "big", signed=True)
