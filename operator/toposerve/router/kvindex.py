"""Routing on the engines' real KV-cache events (docs/router.md, "Routing on KV-cache events").

For every backend the router routes to, a task subscribes (ZeroMQ SUB, pyzmq asyncio) to the
engine's KV-event publisher (vLLM's ``--kv-events-config``), applies its batches to a per-engine
``kvevents.index.EngineIndex`` and catches up through the replay socket (DEALER: send the start
number, read until END_SEQ) after a gap, a reconnect, an engine restart or the router's own start.

Staleness: an engine's index is only trusted while it is *fresh*; it is stale (and routing uses the
approximate prefix index for that engine) while

* its event socket is not connected (never yet, or the engine went away: ZeroMQ's heartbeat finds
  a peer that vanished without closing its connection), or it has not caught up since;
* or events stopped: a request that the index says must store new blocks on that engine got its
  first token (prefill done, so vLLM has cached its full blocks and published that step's batch)
  and no batch came within ``silence_s`` (the publisher is off, or its batches are lost).
  An idle engine publishes nothing, so silence alone means nothing: only silence where events
  were due.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from toposerve.kvevents import hashing
from toposerve.kvevents.index import DEFAULT_MAX_BLOCKS, EngineIndex, Live, key
from toposerve.kvevents.wire import END_SEQ, seq_of
from toposerve.router.endpoints import BackendSpec

log = logging.getLogger("toposerve.router.kvindex")
REPLAY_SLICE = 200  # replayed batches applied between two yields to the event loop


@dataclass(frozen=True)
class KVEventsOptions:
    """The router's side of KV-event routing (flags ``--kv-events*``)."""

    enabled: bool = False
    port: int = 5557  # vLLM's default endpoint tcp://*:5557, on each backend's host
    replay_port: int = 5558  # 0: the engines serve no replay
    topic: str = ""  # vLLM's default: every topic
    block_size: int = 0  # 0: each engine's block_size from vllm:cache_config_info
    hash_seed: str | None = None  # PYTHONHASHSEED when the engines set it (vLLM's NONE_HASH seed)
    max_blocks: int = DEFAULT_MAX_BLOCKS  # per engine
    silence_s: float = 5.0  # no batch this long after one was due: stale
    pending_s: float = 10.0  # a routed prompt's blocks count as on their way for this long (0: off)
    tokenize_timeout_s: float = 0.5
    replay_timeout_s: float = 2.0


def endpoints_for(spec: BackendSpec, opts: KVEventsOptions) -> tuple[str, str | None]:
    """(PUB endpoint, replay endpoint) of a backend: its ``kv-events=`` / ``kv-replay=`` tags, else
    the convention ports on the backend's host (a pod IP under discovery)."""
    host = urlsplit(spec.url).hostname or "127.0.0.1"
    host = f"[{host}]" if ":" in host else host
    pub = spec.kv_events or f"tcp://{host}:{opts.port}"
    replay = spec.kv_replay or (f"tcp://{host}:{opts.replay_port}" if opts.replay_port else None)
    return pub, replay


class EngineFeed:
    """One engine's subscription: the socket task, its index and whether to trust it."""

    def __init__(
        self, ctx: zmq.asyncio.Context, endpoint: str, replay: str | None, opts: KVEventsOptions
    ) -> None:
        self.ctx = ctx
        self.endpoint = endpoint
        self.replay_endpoint = replay
        self.opts = opts
        self.index = EngineIndex(opts.max_blocks)
        self.connected = False
        self.synced = False  # caught up since the last (re)connection
        self.due_since: float | None = None  # a batch is due since then (see the module doc)
        self.resyncs: dict[str, int] = {"gap": 0, "restart": 0, "reconnect": 0, "rebuild": 0}
        self.batches = 0
        self._task: asyncio.Task[None] | None = None

    def stale(self, now: float) -> bool:
        if not (self.connected and self.synced):
            return True
        return self.due_since is not None and now - self.due_since > self.opts.silence_s

    def expect(self, now: float) -> None:
        """A batch is due from this engine (a request that stores new blocks got its first token)."""
        if self.due_since is None:
            self.due_since = now

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"kv-events {self.endpoint}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    # -- the socket task -------------------------------------------------------------------------
    async def _run(self) -> None:
        sub = self.ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.RCVHWM, 100_000)
        # a peer that vanished without closing its connection (a node gone) is found in ~3 s
        sub.setsockopt(zmq.HEARTBEAT_IVL, 1000)
        sub.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3000)
        sub.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        sub.setsockopt(zmq.SUBSCRIBE, self.opts.topic.encode())
        mon = sub.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        sub.connect(self.endpoint)
        poller = zmq.asyncio.Poller()
        poller.register(sub, zmq.POLLIN)
        poller.register(mon, zmq.POLLIN)
        try:
            while True:
                ready = dict(await poller.poll())
                if mon in ready:
                    event = parse_monitor_message(await mon.recv_multipart())["event"]
                    if event == zmq.EVENT_CONNECTED:
                        self.connected = True
                        self.resyncs["reconnect"] += self.index.applied >= 0
                        await self._resync()
                    elif event == zmq.EVENT_DISCONNECTED:
                        self.connected = self.synced = False
                if sub in ready:
                    while True:
                        try:
                            frames = await sub.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        await self._on_live(frames)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("KV event subscriber for %s failed", self.endpoint)
            self.connected = self.synced = False
        finally:
            with contextlib.suppress(zmq.ZMQError):
                sub.disable_monitor()
            mon.close(linger=0)
            sub.close(linger=0)

    async def _on_live(self, frames: list[bytes]) -> None:
        if len(frames) != 3:
            log.warning("KV event from %s: %d frames, expected 3", self.endpoint, len(frames))
            return
        _, raw_seq, payload = frames
        seq = seq_of(raw_seq)
        verdict = self.index.live(seq)
        if verdict is Live.RESTART:
            log.info("KV events of %s restarted at %d: index cleared", self.endpoint, seq)
            self.resyncs["restart"] += 1
            live_last = self.index.live_last
            self.index.clear()
            self.index.live_last = live_last
            await self._resync()
        elif verdict is Live.GAP:
            self.resyncs["gap"] += 1
            await self._resync()
        if seq > self.index.applied:  # the next one, or past what the replay could give
            self._apply(seq, payload)

    def _apply(self, seq: int, payload: bytes) -> None:
        try:
            self.index.apply(seq, payload)
        except ValueError as e:
            log.warning("KV event batch %d from %s undecodable: %s", seq, self.endpoint, e)
            return
        self.batches += 1
        self.due_since = None

    async def _resync(self) -> None:
        """Catch up through the replay socket; without one, go on from the live stream."""
        if self.replay_endpoint is not None:
            batches = await self._replay(self.index.replay_start())
            if batches is None:
                self.synced = False
                return
            new = self.index.continuation(batches)
            if new is None:
                self.resyncs["rebuild"] += 1
                batches = await self._replay(0)
                if batches is None:
                    self.synced = False
                    return
                self.index.clear()  # and the live number: what comes next is from this publisher
                new = batches
            await self._apply_in_slices(new)
            self.batches += len(batches)
            if batches:
                self.due_since = None
        self.synced = True

    async def _apply_in_slices(self, batches: Sequence[tuple[int, bytes]]) -> None:
        """Apply a replay answer (up to the engine's whole buffer: 10,000 steps by default) a slice
        at a time, yielding between slices, so a router catching up on several engines at start
        keeps answering requests and probes (measured: one unsliced rebuild of four engines held
        the event loop for seconds under load, bench/router/kvevents.py)."""
        for i in range(0, len(batches), REPLAY_SLICE):
            self.index.apply_new(batches[i : i + REPLAY_SLICE])
            await asyncio.sleep(0)

    async def _replay(self, start: int) -> list[tuple[int, bytes]] | None:
        """The publisher's buffered batches from ``start`` (None: no whole answer in time; a DEALER
        with no peer would wait for one forever, hence the deadline around the whole exchange)."""
        dealer = self.ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(str(self.replay_endpoint))
        out: list[tuple[int, bytes]] = []

        async def exchange() -> None:
            await dealer.send_multipart((b"", start.to_bytes(8, "big")))
            while True:
                frames = await dealer.recv_multipart()
                if len(frames) != 4:
                    continue
                _, _, raw_seq, payload = frames
                if raw_seq == END_SEQ:
                    return
                out.append((seq_of(raw_seq), payload))

        try:
            await asyncio.wait_for(exchange(), self.opts.replay_timeout_s)
            return out
        except TimeoutError:
            log.warning(
                "KV event replay from %s: no end within %gs", self.replay_endpoint, self.opts.replay_timeout_s
            )
            return None
        finally:
            dealer.close(linger=0)


@dataclass(frozen=True)
class Scored:
    """Leading engine blocks cached per fresh backend, out of ``blocks``; the stale backends."""

    blocks: int
    matched: dict[str, int]
    stale: tuple[str, ...]


class KVIndex:
    """Every engine's feed, kept in step with the router's backend set."""

    def __init__(self, opts: KVEventsOptions) -> None:
        self.opts = opts
        self.ctx = zmq.asyncio.Context()
        self.feeds: dict[str, EngineFeed] = {}
        self._stopping: set[asyncio.Task[None]] = set()
        # requests scored on the approximation, by why: some candidate stale, no token ids, no block size
        self.fallbacks: dict[str, int] = {"stale": 0, "tokenize": 0, "block_size": 0, "multimodal": 0}

    def sync(self, backends: Mapping[str, BackendSpec]) -> None:
        """Subscribe to new backends, unsubscribe from gone ones (needs a running loop)."""
        for url, spec in backends.items():
            if url not in self.feeds:
                pub, replay = endpoints_for(spec, self.opts)
                feed = self.feeds[url] = EngineFeed(self.ctx, pub, replay, self.opts)
                feed.start()
        for url in [u for u in self.feeds if u not in backends]:
            task = asyncio.get_running_loop().create_task(self.feeds.pop(url).stop())
            self._stopping.add(task)  # a task nobody references may be collected mid-way
            task.add_done_callback(self._stopping.discard)

    async def close(self) -> None:
        feeds, self.feeds = list(self.feeds.values()), {}
        for feed in feeds:
            await feed.stop()
        self.ctx.term()

    def stale(self, url: str, now: float) -> bool:
        feed = self.feeds.get(url)
        return feed is None or feed.stale(now)

    def block_keys(
        self, token_ids: list[int], block_size: int, extra_keys: Any = None, cache_salt: str | None = None
    ) -> list[int]:
        """Index keys of a prompt's full blocks, hashed as the engines hash them (``extra_keys``:
        hashing.lora_extra_keys for a LoRA adapter's request; ``cache_salt``: the request's salt)."""
        hashes = hashing.block_hashes(
            token_ids, block_size, seed=self.opts.hash_seed, extra_keys=extra_keys, cache_salt=cache_salt
        )
        return [key(h) for h in hashes]

    def score(
        self, keys: list[int], block_size: int, block_sizes: Mapping[str, int], backends: Iterable[str]
    ) -> Scored:
        """Longest cached prefix of each fresh backend; an engine known to use another block size
        counts as stale (its blocks are other blocks)."""
        now = time.monotonic()
        matched: dict[str, int] = {}
        stale: list[str] = []
        for url in backends:
            feed = self.feeds.get(url)
            size = self.opts.block_size or block_sizes.get(url, 0) or block_size
            if feed is None or size != block_size or feed.stale(now):
                stale.append(url)
            else:
                matched[url] = feed.index.longest_routed_prefix(keys, now)
        return Scored(len(keys), matched, tuple(stale))

    def routed(self, url: str, keys: list[int]) -> None:
        """A request with these engine blocks was routed to ``url`` (see ``EngineIndex.note_routed``)."""
        feed = self.feeds.get(url)
        if feed is not None and keys:
            feed.index.note_routed(keys, time.monotonic(), self.opts.pending_s)

    def expect(self, url: str, keys: list[int]) -> None:
        """Called at a request's first token on ``url``: a batch is due when its prompt had full
        blocks that the engine's index did not hold (the engine has just stored them)."""
        feed = self.feeds.get(url)
        if feed is not None and keys and feed.index.longest_prefix(keys) < len(keys):
            feed.expect(time.monotonic())


def hashed_apart(path: str, body: Mapping[str, Any]) -> bool:
    """Whether vLLM 0.33.0 hashes the request's blocks with keys the router cannot compute:
    multi-modal parts (``_gen_mm_extra_hash_keys``: each item's content hash) or prompt embeddings
    (``_gen_prompt_embeds_extra_hash_keys``). Such a request is scored on the approximation."""
    if "prompt_embeds" in body:
        return True
    if not path.endswith("/chat/completions"):
        return False
    for m in body.get("messages") or ():
        content = m.get("content") if isinstance(m, Mapping) else None
        if isinstance(content, list) and any(
            isinstance(part, Mapping) and part.get("type", "text") not in ("text", "input_text")
            for part in content
        ):
            return True
    return False
