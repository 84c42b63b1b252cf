"""Paged KV-cache blocks with vLLM-style automatic prefix caching.

Why it matters: prefix-aware routing only pays off if the engine behind it reuses a cached
prefix, and KV-cache-based autoscaling only works if usage rises and falls like vLLM's. So the
mock keeps the same bookkeeping as vLLM v1's block pool:

* a prompt is hashed per *full* block, each hash chained to its parent's, so a block hit means
  the whole prefix up to it matches;
* blocks whose reference count drops to zero go to a free queue but keep their hash, so a later
  request can revive them; allocation evicts from the front of that queue (least recently
  freed first), and a sequence's tail blocks are freed first so they are evicted first;
* usage counts only referenced blocks (cached-but-free blocks are reclaimable), like
  ``vllm:kv_cache_usage_perc``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from toposerve.kvevents import hashing
from toposerve.kvevents.wire import MEDIUM_GPU, AllBlocksCleared, BlockRemoved, BlockStored

BlockHash = bytes


def chain_hash(
    parent: BlockHash | None, tokens: Sequence[int], root: BlockHash, extra_keys: Any = None
) -> BlockHash:
    """Hash of one full block given its parent's (None: the first block), as vLLM 0.33.0 hashes it
    (kvevents/hashing.py: SHA-256 of the pickled (parent, tokens, extra_keys), the first parent
    being ``root``, vLLM's NONE_HASH): the router can name the mock's blocks as it names vLLM's.
    ``extra_keys`` is None for a plain text request, ``(("lora", name, path),)`` for a LoRA one
    (v1/core/kv_cache_utils.py generate_block_hash_extra_keys)."""
    return hashing.hash_block(parent, tokens, root, extra_keys)


def _event_keys(lora: tuple[int, str] | None, salt: str | None) -> tuple[str, ...] | None:
    keys = ((lora[1],) if lora else ()) + ((salt,) if salt else ())
    return keys or None


def block_hashes(
    tokens: Sequence[int], block_size: int, known: Sequence[BlockHash] = (), seed: str | None = None
) -> list[BlockHash]:
    """Chained hashes of every full block of ``tokens``; reuses the ``known`` leading hashes."""
    return hashing.block_hashes(tokens, block_size, known, seed)


@dataclass
class _Block:
    ref_count: int = 0
    hash: BlockHash | None = None


class BlockManager:
    """The block pool: allocation, reference counts, the prefix-cache map and its LRU free queue."""

    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True, kv_events: bool = False
    ) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._blocks = [_Block() for _ in range(num_blocks)]
        # ref_count == 0 blocks in eviction order (front is evicted first).
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[BlockHash, int] = {}  # block hash -> block id
        # KV-cache events (vLLM's --kv-events-config): what this pool stored, evicted or cleared
        # since the last take_events(), in vLLM 0.33.0's shapes (v1/core/block_pool.py).
        self.kv_events = kv_events
        self._events: list[Any] = []

    # -- queries -------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by live sequences (0..1)."""
        return self.num_used / self.num_blocks

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def computed_blocks(self, hashes: Sequence[BlockHash], num_tokens: int) -> list[int]:
        """Block ids of the longest cached prefix, leaving at least one token to compute.

        vLLM must run the model on at least the last prompt token to produce logits, so a fully
        cached, block-aligned prompt still recomputes its last block.
        """
        if not self.enable_prefix_caching:
            return []
        limit = (num_tokens - 1) // self.block_size
        hit: list[int] = []
        for h in hashes[:limit]:
            bid = self._cached.get(h)
            if bid is None:
                break
            hit.append(bid)
        return hit

    # -- mutations -----------------------------------------------------------------------------
    def allocate(self, owned: list[int], hit: Sequence[int], num_tokens: int) -> bool:
        """Grow ``owned`` (in place) to cover ``num_tokens``, first taking the ``hit`` blocks.

        All or nothing: returns False and changes nothing when there are not enough free blocks.
        """
        need = self.blocks_for(num_tokens) - len(owned) - len(hit)
        revived = sum(1 for b in hit if self._blocks[b].ref_count == 0)
        if max(need, 0) + revived > len(self._free):
            return False
        for b in hit:
            blk = self._blocks[b]
            if blk.ref_count == 0:
                del self._free[b]
            blk.ref_count += 1
            owned.append(b)
        for _ in range(max(need, 0)):
            b = self._pop_free()
            self._blocks[b].ref_count = 1
            owned.append(b)
        return True

    def cache_blocks(
        self,
        owned: Sequence[int],
        hashes: Sequence[BlockHash],
        parent: BlockHash | None = None,
        tokens: Sequence[int] = (),
        lora: tuple[int, str] | None = None,
        salt: str | None = None,
    ) -> None:
        """Publish the hashes of full blocks so later requests can hit them. ``parent``: the hash
        of the block before ``owned[0]`` (None at the start of the sequence); ``tokens``: the
        token ids of these blocks, for the KV event (vLLM's ``BlockPool.cache_full_blocks``
        emits one BlockStored for the newly cached blocks of a request, with their token ids);
        ``salt``: the request's cache_salt, in the event's keys of the sequence's first block."""
        if not self.enable_prefix_caching:
            return
        new: list[tuple[int, BlockHash]] = []
        for i, (bid, h) in enumerate(zip(owned, hashes, strict=False)):
            blk = self._blocks[bid]
            if blk.hash is not None:
                continue
            blk.hash = h
            if self._cached.setdefault(h, bid) == bid:
                new.append((i, h))
        if self.kv_events and new:
            first, last = new[0][0], new[-1][0]
            self._events.append(
                BlockStored(
                    block_hashes=[h for _, h in new],
                    parent_block_hash=hashes[first - 1] if first > 0 else parent,
                    token_ids=list(tokens[first * self.block_size : (last + 1) * self.block_size]),
                    block_size=self.block_size,
                    lora_id=lora[0] if lora else None,
                    medium=MEDIUM_GPU,
                    lora_name=lora[1] if lora else None,
                    # v1/core/kv_cache_utils.py to_event_extra_keys: None per block for a plain
                    # text request, the bare adapter name per block for a LoRA one
                    # (the untagged pre-0.31 shapes: the adapter's name, the salt on block 0)
                    extra_keys=[
                        _event_keys(lora, salt if parent is None and i == 0 else None) for i, _ in new
                    ],
                    group_idx=0,
                )
            )

    def take_events(self) -> list[Any]:
        """The events since the last call (one engine step's worth), oldest first."""
        events, self._events = self._events, []
        return events

    def free(self, owned: Sequence[int]) -> None:
        """Drop a sequence's references; tail blocks go first so they are evicted first."""
        for b in reversed(owned):
            blk = self._blocks[b]
            blk.ref_count -= 1
            if blk.ref_count == 0:
                self._free[b] = None
                if blk.hash is None:  # nothing worth keeping: reuse it before cached blocks
                    self._free.move_to_end(b, last=False)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block; like vLLM's ``BlockPool.reset_prefix_cache``, refused (False)
        while any block is in use, else AllBlocksCleared."""
        if self.num_used:
            return False
        for b in self._cached.values():
            self._blocks[b].hash = None
        self._cached.clear()
        if self.kv_events:
            self._events.append(AllBlocksCleared())
        return True

    def _pop_free(self) -> int:
        b, _ = self._free.popitem(last=False)
        blk = self._blocks[b]
        if blk.hash is not None:
            if self._cached.get(blk.hash) == b:
                del self._cached[blk.hash]
                if self.kv_events:  # evicted: the router must stop counting on it
                    self._events.append(BlockRemoved(block_hashes=[blk.hash], medium=MEDIUM_GPU, group_idx=0))
            blk.hash = None
        return b
