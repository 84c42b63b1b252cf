"""The continuous-batching scheduler: a pure, clock-driven model of vLLM v1's engine loop.

Each call to :meth:`Scheduler.step` is one engine iteration at simulated time ``now``:

1. running requests first, in admission order: each gets the tokens it still needs (the rest
   of its prompt, else one decode token) within the per-step token budget (chunked prefill);
   if its KV blocks cannot grow, the most recently admitted running request is preempted
   (blocks freed, recomputed later), exactly the policy that makes vLLM's
   ``num_preemptions_total`` climb under memory pressure;
2. then waiting requests, FCFS, while there are sequence slots, budget and free blocks; their
   cached prefix (see :mod:`.kvcache`) is taken from the cache instead of being prefilled;
3. the step lasts ``TimingModel.step_time`` of what was scheduled; a request whose computed
   tokens reach its length samples one new token at the end of the step.

No I/O and no wall clock: the server shell sleeps ``duration * time_scale`` and delivers the
tokens; tests drive it directly with a fake ``now``.
"""

from __future__ import annotations

import os
import random
from collections import deque
from dataclasses import dataclass, field
from enum import Enum

from toposerve.kvevents.hashing import none_hash, salt_extra_key
from toposerve.mockengine.kvcache import BlockManager, chain_hash
from toposerve.mockengine.lora import Adapter, LoRASlots
from toposerve.mockengine.timing import TimingModel
from toposerve.mockengine.tokenizer import MockTokenizer, TextGenerator


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"
    ABORTED = "aborted"


@dataclass(eq=False)
class Request:
    """One sequence. ``target_len`` and ``finish_reason`` are fixed at admission (deterministic)."""

    req_id: str
    prompt_ids: list[int]
    target_len: int
    stop_reason: str  # finish_reason once target_len tokens are out: "length" or "stop"
    rng: random.Random
    arrival_time: float = 0.0
    output_ids: list[int] = field(default_factory=list)
    output_pieces: list[str] = field(default_factory=list)
    status: Status = Status.WAITING
    num_computed: int = 0
    num_cached_tokens: int = -1  # prompt tokens served from the prefix cache at first admission
    blocks: list[int] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)
    num_published: int = 0  # leading blocks whose hashes are in the prefix cache
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finish_time: float | None = None
    finish_reason: str | None = None
    num_preemptions: int = 0
    lora: Adapter | None = None  # the adapter it names (model = adapter name), else the base
    cache_salt: str | None = None  # the request's cache_salt: part of the first block's hash

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token_at(self, i: int) -> int:
        n = len(self.prompt_ids)
        return self.prompt_ids[i] if i < n else self.output_ids[i - n]

    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def tokens(self, start: int, stop: int) -> list[int]:
        """ids[start:stop] of prompt + output, without copying the whole sequence."""
        n = len(self.prompt_ids)
        if stop <= n:
            return self.prompt_ids[start:stop]
        if start >= n:
            return self.output_ids[start - n : stop - n]
        return self.prompt_ids[start:] + self.output_ids[: stop - n]

    def extend_hashes(self, block_size: int, root: bytes) -> None:
        """Hash newly completed full blocks only: O(block) per block, not O(sequence) per token."""
        extra = self.lora.hash_extra if self.lora is not None else None
        for i in range(len(self.hashes), self.num_tokens // block_size):
            block = self.tokens(i * block_size, (i + 1) * block_size)
            # vLLM 0.33.0 generate_block_hash_extra_keys: lora keys, then the salt on block 0 only
            keys = (*(extra or ()), salt_extra_key(self.cache_salt)) if i == 0 and self.cache_salt else extra
            self.hashes.append(chain_hash(self.hashes[-1] if self.hashes else None, block, root, keys))

    @property
    def finished(self) -> bool:
        return self.status in (Status.FINISHED, Status.ABORTED)


@dataclass
class StepStats:
    """What one step did, in the units vLLM's metrics use (seconds are simulated)."""

    start: float = 0.0
    duration: float = 0.0
    prefill_tokens: int = 0
    decode_seqs: int = 0
    updated: list[Request] = field(default_factory=list)  # got a token or finished
    generation_tokens: int = 0
    prompt_tokens: int = 0  # prompt lengths of requests that produced their first token
    preemptions: int = 0
    prefix_queries: int = 0  # tokens looked up in the prefix cache
    prefix_hits: int = 0  # of which found
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    queue_time: list[float] = field(default_factory=list)
    e2e: list[float] = field(default_factory=list)
    finished: list[Request] = field(default_factory=list)
    lora_s: float = 0.0  # of duration: adapters read from disk or swapped into GPU slots

    @property
    def end(self) -> float:
        return self.start + self.duration


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    num_gpu_blocks: int = 4096
    block_size: int = 16
    max_model_len: int = 8192
    enable_prefix_caching: bool = True
    kv_events: bool = False  # collect vLLM-shaped KV-cache events (--kv-events-config)
    max_loras: int = 0  # --max-loras with --enable-lora; 0: LoRA off


class Scheduler:
    """Waiting queue, running batch, block manager and timing model; see the module docstring."""

    def __init__(self, config: SchedulerConfig, timing: TimingModel, tokenizer: MockTokenizer) -> None:
        self.config = config
        self.timing = timing
        self.tokenizer = tokenizer
        self.blocks = BlockManager(
            config.num_gpu_blocks, config.block_size, config.enable_prefix_caching, config.kv_events
        )
        # vLLM's NONE_HASH: PYTHONHASHSEED when the pod sets it, else vLLM's fixed default seed.
        self.root = none_hash(os.environ.get("PYTHONHASHSEED"))
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.slowdown = 1.0  # thermal-throttling fault: multiplies step time
        self.lora_slots: LoRASlots | None = None  # set by the engine with --enable-lora
        self._by_id: dict[str, Request] = {}

    # -- intake --------------------------------------------------------------------------------
    def make_request(
        self,
        req_id: str,
        prompt_ids: list[int],
        max_tokens: int | None,
        generator: TextGenerator,
        seed: int | None = None,
        default_range: tuple[int, int] = (16, 256),
    ) -> Request:
        """Build a request; without max_tokens the 'model' stops by itself at a seeded length."""
        rng = generator.rng_for(prompt_ids, seed)
        room = self.config.max_model_len - len(prompt_ids)
        if max_tokens is None:
            target, reason = min(generator.natural_length(rng, *default_range), room), "stop"
            if target == room:
                reason = "length"
        else:
            target, reason = max_tokens, "length"
        return Request(req_id, prompt_ids, max(target, 1), reason, rng)

    def add(self, req: Request, now: float) -> None:
        req.arrival_time = now
        req.status = Status.WAITING
        self.waiting.append(req)
        self._by_id[req.req_id] = req

    def abort(self, req_id: str, now: float) -> Request | None:
        req = self._by_id.pop(req_id, None)
        if req is None or req.finished:
            return None
        if req in self.waiting:
            self.waiting.remove(req)
        if req in self.running:
            self.running.remove(req)
        self.blocks.free(req.blocks)
        req.blocks = []
        req.status = Status.ABORTED
        req.finish_reason = "abort"
        req.finish_time = now
        return req

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- the iteration -------------------------------------------------------------------------
    def step(self, now: float) -> StepStats:
        stats = StepStats(start=now)
        budget = self.config.max_num_batched_tokens
        scheduled: list[tuple[Request, int]] = []
        context = 0
        preempted = False

        for req in list(self.running):
            if req.status is not Status.RUNNING:  # preempted earlier in this loop
                continue
            n = min(req.num_tokens - req.num_computed, budget)
            if n <= 0:
                continue
            while not self.blocks.allocate(req.blocks, (), req.num_computed + n):
                victim = self.running[-1]
                self._preempt(victim)
                stats.preemptions += 1
                preempted = True
                if victim is req:
                    n = 0
                    break
            if n == 0:
                continue
            scheduled.append((req, n))
            budget -= n

        # vLLM 0.33.0 v1/core/sched/scheduler.py: the adapters of every running request (scheduled
        # this step or not) count; a waiting request naming another adapter while max_loras are
        # in use is skipped (it keeps its place in the queue) and the ones behind it are tried.
        loras = {r.lora.int_id for r in self.running if r.lora is not None}
        skipped: list[Request] = []
        while self.waiting and not preempted and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            if req.lora is not None and len(loras) >= self.config.max_loras and req.lora.int_id not in loras:
                skipped.append(self.waiting.popleft())
                continue
            req.extend_hashes(self.config.block_size, self.root)
            hit = self.blocks.computed_blocks(req.hashes, req.num_tokens)
            cached = len(hit) * self.config.block_size
            n = min(req.num_tokens - cached, budget)
            if not self.blocks.allocate(req.blocks, hit, cached + n):
                break
            self.waiting.popleft()
            stats.prefix_queries += req.num_tokens
            stats.prefix_hits += cached
            req.num_computed = cached
            req.num_published = len(hit)
            req.status = Status.RUNNING
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = min(cached, len(req.prompt_ids))
            if req.first_scheduled_time is None:
                req.first_scheduled_time = now
                stats.queue_time.append(now - req.arrival_time)
            self.running.append(req)
            scheduled.append((req, n))
            budget -= n
            if req.lora is not None:
                loras.add(req.lora.int_id)
        self.waiting.extendleft(reversed(skipped))

        for req, n in scheduled:
            if req.num_tokens - req.num_computed == 1 and req.output_ids and n == 1:
                stats.decode_seqs += 1
            else:
                stats.prefill_tokens += n
            context += req.num_computed
        stats.duration = (
            self.timing.step_time(stats.prefill_tokens, stats.decode_seqs, context) * self.slowdown
        )
        if self.lora_slots is not None and scheduled:
            # the step's model runner reads evicted adapters from disk and swaps CPU-only ones
            # into GPU slots before the forward pass (lora/worker_manager.py _apply_adapters)
            stats.lora_s = self.lora_slots.prepare_batch([r.lora for r, _ in scheduled if r.lora is not None])
            stats.duration += stats.lora_s
        end = stats.end

        for req, n in scheduled:
            req.num_computed += n
            full = req.num_computed // self.config.block_size
            if full > req.num_published:  # publish blocks as soon as they are full and computed
                req.extend_hashes(self.config.block_size, self.root)
                start = req.num_published
                bs = self.config.block_size
                self.blocks.cache_blocks(
                    req.blocks[start:full],
                    req.hashes[start:full],
                    req.hashes[start - 1] if start else None,
                    req.tokens(start * bs, full * bs) if self.blocks.kv_events else (),
                    (req.lora.int_id, req.lora.name) if req.lora is not None else None,
                    req.cache_salt,
                )
                req.num_published = full
            if req.num_computed < req.num_tokens:
                continue  # still prefilling (chunked)
            self._sample(req, end, stats)
            if len(req.output_ids) >= req.target_len:
                self._finish(req, req.stop_reason, end, stats)
        return stats

    # -- helpers -------------------------------------------------------------------------------
    def _sample(self, req: Request, t: float, stats: StepStats) -> None:
        piece = TextGenerator.next_piece(req.rng, len(req.output_ids))
        req.output_ids.append(self.tokenizer.piece_id(piece))
        req.output_pieces.append(piece)
        stats.generation_tokens += 1
        if req.first_token_time is None:
            req.first_token_time = t
            stats.ttft.append(t - req.arrival_time)
            stats.prompt_tokens += len(req.prompt_ids)
        elif req.last_token_time is not None:
            stats.itl.append(t - req.last_token_time)
        req.last_token_time = t
        stats.updated.append(req)

    def _finish(self, req: Request, reason: str, t: float, stats: StepStats) -> None:
        self.running.remove(req)
        self.blocks.free(req.blocks)
        req.blocks = []
        req.status = Status.FINISHED
        req.finish_reason = reason
        req.finish_time = t
        self._by_id.pop(req.req_id, None)
        stats.e2e.append(t - req.arrival_time)
        stats.finished.append(req)

    def _preempt(self, req: Request) -> None:
        """Recompute-style preemption: drop the blocks, keep the tokens, go back to the front."""
        self.running.remove(req)
        self.blocks.free(req.blocks)
        req.blocks = []
        req.num_computed = 0
        req.num_published = 0
        req.status = Status.WAITING
        req.num_preemptions += 1
        self.waiting.appendleft(req)
