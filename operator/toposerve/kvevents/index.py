"""One engine's prefix cache as its KV-cache events say, and the sequence rules that keep it true
(pure: no sockets, no clocks; the router's subscriber, ``router/kvindex.py``, is the I/O shell).

Why a set of hashes is enough: vLLM chains every block's hash to its parent's
(``kvevents/hashing.py``), so "block i of this prompt is cached" already implies its whole prefix
matches; the longest cached prefix is a scan from the front that stops at the first miss.

Keys are the low 64 bits of each hash (``hashing.as_int``), whichever form the engine publishes
(bytes by default, that int with ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES``): one path for both, and
an int key costs about half a 32-byte ``bytes`` (``BYTES_PER_BLOCK``). A false match needs two of
an engine's blocks to share 64 bits of SHA-256.

Sequence rules (one publisher numbers its batches 0, 1, 2, ... and its PUB socket may drop some
under its high-water mark, but never reorders them):

* on the live stream a number at or below the last one seen live means a *new* publisher (the
  engine restarted): ``live`` says RESTART and the caller clears the index and replays from 0;
* a number above the next expected one is a GAP: the caller replays from the last applied one;
* a replay answer proves it comes from the same publisher when its first batch is the very batch
  last applied (same number, same payload digest: every payload carries its own timestamp);
  otherwise (a restarted engine that has already published past the old number, or a buffer that
  no longer reaches back) ``catch_up`` refuses it and the caller rebuilds from 0.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterable, Sequence
from enum import Enum
from typing import Any

from toposerve.kvevents import hashing, wire

DEFAULT_MAX_BLOCKS = 1 << 18  # 262,144 blocks (4M tokens at block size 16): ~33 MiB at most
# Measured on CPython 3.11 (tests/unit/router/test_kv_index.py pins it): an int of 64 bits
# (36 B) plus a dict slot (~3 x 8 B, the table kept at most 2/3 full) ~ 90 B per cached block.
BYTES_PER_BLOCK = 128


class Live(Enum):
    APPLY = "apply"  # the next batch: apply it
    DUPLICATE = "duplicate"  # already applied (replayed before the live copy arrived): skip
    GAP = "gap"  # batches were missed: replay from the last applied one, then apply
    RESTART = "restart"  # a new publisher: clear, replay from 0


def key(block_hash: Any) -> int:
    """The index key of a published (bytes or int) or computed (bytes) block hash."""
    if isinstance(block_hash, bytes):
        return hashing.as_int(block_hash)
    return int(block_hash) & ((1 << 64) - 1)


def digest(payload: bytes) -> bytes:
    return hashlib.blake2b(payload, digest_size=16).digest()


class EngineIndex:
    """Cached block keys of one engine, bounded to ``max_blocks`` (oldest stored dropped first:
    a true index never exceeds the engine's ``num_gpu_blocks``, so the bound only stops a
    misbehaving publisher from growing the router without limit)."""

    def __init__(self, max_blocks: int = DEFAULT_MAX_BLOCKS) -> None:
        self.max_blocks = max(1, max_blocks)
        self._blocks: dict[int, None] = {}  # insertion-ordered: the front is the oldest stored
        self.applied = -1  # the last batch applied (-1: none)
        self.applied_digest = b""
        self.live_last = -1  # the last number seen on the live stream
        self.overflowed = 0  # blocks dropped at max_blocks
        self.events = 0  # events applied
        # Blocks of prompts routed here whose BlockStored has not come yet: key -> until when it
        # counts (see ``note_routed``).
        self._pending: dict[int, float] = {}

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, block_hash: object) -> bool:
        return key(block_hash) in self._blocks

    def keys(self) -> set[int]:
        return set(self._blocks)

    def memory_bytes(self) -> int:
        """What the index holds now, measured (the dict plus its keys)."""
        return sys.getsizeof(self._blocks) + sum(sys.getsizeof(k) for k in self._blocks)

    def clear(self) -> None:
        """Forget the cache (AllBlocksCleared, or a new publisher) and the sequence."""
        self._blocks.clear()
        self._pending.clear()
        self.applied, self.applied_digest, self.live_last = -1, b"", -1

    # -- events ------------------------------------------------------------------------------
    def apply_events(self, events: Iterable[Any]) -> None:
        blocks = self._blocks
        for ev in events:
            self.events += 1
            if isinstance(ev, wire.BlockStored):
                for h in ev.block_hashes:
                    k = key(h)
                    blocks.pop(k, None)  # re-stored: now the newest
                    blocks[k] = None
                    self._pending.pop(k, None)
                while len(blocks) > self.max_blocks:
                    del blocks[next(iter(blocks))]
                    self.overflowed += 1
            elif isinstance(ev, wire.BlockRemoved):
                for h in ev.block_hashes:
                    blocks.pop(key(h), None)
                    self._pending.pop(key(h), None)
            elif isinstance(ev, wire.AllBlocksCleared):
                blocks.clear()
                self._pending.clear()

    def apply(self, seq: int, payload: bytes) -> None:
        """Apply one batch (raises ValueError on a payload that is not one; nothing changes then)."""
        batch = wire.decode(payload)
        self.apply_events(batch.events)
        self.applied, self.applied_digest = seq, digest(payload)

    # -- sequence ----------------------------------------------------------------------------
    def live(self, seq: int) -> Live:
        """Classify a batch number arriving on the live stream (and remember it)."""
        restarted = self.live_last >= 0 and seq <= self.live_last
        self.live_last = seq
        if restarted:
            return Live.RESTART
        if seq <= self.applied:
            return Live.DUPLICATE
        if seq == self.applied + 1:
            return Live.APPLY
        return Live.GAP

    def replay_start(self) -> int:
        """Where to ask a replay from: the last applied batch (to prove continuity), else 0."""
        return max(self.applied, 0)

    def continuation(self, batches: Sequence[tuple[int, bytes]]) -> Sequence[tuple[int, bytes]] | None:
        """What of a replay answer asked from ``replay_start()`` is new to this index, or None when
        the answer does not continue it (it must start with the last applied batch, same payload)."""
        if self.applied < 0:
            return batches
        if not batches or batches[0][0] != self.applied or digest(batches[0][1]) != self.applied_digest:
            return None
        return batches[1:]

    def apply_new(self, batches: Sequence[tuple[int, bytes]]) -> None:
        """Apply the batches past the last applied one, in order (a replay answer, or part of one)."""
        for seq, payload in batches:
            if seq > self.applied:
                self.apply(seq, payload)

    def catch_up(self, batches: Sequence[tuple[int, bytes]]) -> bool:
        """Apply a replay answer asked from ``replay_start()``. False (nothing applied) when it
        does not continue this index: the caller clears and replays from 0 (``rebuild``)."""
        new = self.continuation(batches)
        if new is None:
            return False
        self.apply_new(new)
        return True

    def rebuild(self, batches: Sequence[tuple[int, bytes]]) -> None:
        """Start over from a replay from 0 (a buffer that no longer starts at 0 leaves the index
        short of the oldest blocks: it under-counts, it never claims a block the engine lacks)."""
        self.clear()  # and the live number: what comes next is from the publisher that answered
        for seq, payload in batches:
            self.apply(seq, payload)

    # -- queries -----------------------------------------------------------------------------
    def longest_prefix(self, keys: Sequence[int]) -> int:
        """Leading blocks of a prompt (its chained hash keys) this engine caches."""
        blocks = self._blocks
        for i, k in enumerate(keys):
            if k not in blocks:
                return i
        return len(keys)

    def note_routed(self, keys: Sequence[int], now: float, hold_s: float) -> None:
        """A prompt with these blocks was just sent here: count its blocks the engine does not hold
        yet as on their way for ``hold_s`` (until the BlockStored that prefill brings, or an
        eviction, settles them). Events only report a prefix once its prefill is done, so without
        this a burst of one tenant's requests would all see "cached nowhere" and be spread over
        every engine, each prefilling the same prefix and evicting the others' (measured on
        bench/router/grid.py's cache-pressure cells)."""
        if hold_s <= 0:
            return
        until = now + hold_s
        pending, blocks = self._pending, self._blocks
        for k in keys:
            if k not in blocks:
                pending.pop(k, None)  # the newest last, so the oldest go first at the bound
                pending[k] = until
        if len(pending) > self.max_blocks:
            for k in [k for k, t in pending.items() if t <= now]:
                del pending[k]
            while len(pending) > self.max_blocks:
                del pending[next(iter(pending))]

    def longest_routed_prefix(self, keys: Sequence[int], now: float) -> int:
        """Leading blocks this engine caches or will have cached once the prompts routed here in
        the last moments are prefilled (``note_routed``): what routing scores by."""
        blocks, pending = self._blocks, self._pending
        for i, k in enumerate(keys):
            if k not in blocks and pending.get(k, 0.0) <= now:
                return i
        return len(keys)

    def pending_count(self, now: float) -> int:
        return sum(1 for t in self._pending.values() if t > now)
