"""A ZeroMQ publisher of KV-event batches with the behaviour of vLLM 0.33.0's ``ZmqEventPublisher``
(``vllm/distributed/kv_events.py``), for the mock engine: a PUB socket sends every batch as
``(topic, seq, payload)`` (seq from 0, 8 bytes big-endian), the last ``buffer_steps`` payloads are
kept for the ROUTER replay socket, which answers ``(start_seq)`` with the buffered batches from
there and the end marker; a background thread does the sending, fed by a bounded queue, so the
engine's step loop never blocks on a slow subscriber (PUB drops past its high-water mark).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any

import zmq

from toposerve.kvevents.wire import END_SEQ, KVEventBatch, encode, seq_bytes

log = logging.getLogger("toposerve.kvevents")


@dataclass(frozen=True)
class KVEventsConfig:
    """vLLM's ``--kv-events-config`` (``vllm/config/kv_events.py``), the fields the mock uses."""

    enable_kv_cache_events: bool = False
    publisher: str | None = None  # zmq when enabled, else null (vLLM's __post_init__)
    endpoint: str = "tcp://*:5557"
    replay_endpoint: str | None = None
    buffer_steps: int = 10_000
    hwm: int = 100_000
    max_queue_size: int = 100_000
    topic: str = ""

    @property
    def publishes(self) -> bool:
        kind = self.publisher or ("zmq" if self.enable_kv_cache_events else "null")
        return self.enable_kv_cache_events and kind == "zmq"

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> KVEventsConfig:
        unknown = set(raw) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"--kv-events-config: unknown field(s) {', '.join(sorted(unknown))}")
        if raw.get("publisher") not in (None, "null", "zmq"):
            raise ValueError(f"--kv-events-config: publisher must be null or zmq, not {raw['publisher']!r}")
        return cls(**raw)


class ZmqPublisher:
    def __init__(self, config: KVEventsConfig, data_parallel_rank: int = 0) -> None:
        self.config = config
        self._rank = data_parallel_rank
        self._queue: queue.Queue[KVEventBatch | None] = queue.Queue(maxsize=config.max_queue_size)
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=config.buffer_steps)
        self._topic = config.topic.encode("utf-8")
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.set_hwm(config.hwm)
        self._pub.bind(config.endpoint)
        self._replay: zmq.Socket[bytes] | None = None
        if config.replay_endpoint:
            self._replay = self._ctx.socket(zmq.ROUTER)
            self._replay.setsockopt(zmq.SNDHWM, 2 * (config.buffer_steps + 1))
            self._replay.bind(config.replay_endpoint)
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="kv-events", daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return str(self._pub.getsockopt_string(zmq.LAST_ENDPOINT))

    @property
    def replay_endpoint(self) -> str | None:
        return None if self._replay is None else str(self._replay.getsockopt_string(zmq.LAST_ENDPOINT))

    def publish(self, batch: KVEventBatch) -> None:
        if batch.data_parallel_rank is None:
            batch.data_parallel_rank = self._rank
        try:
            self._queue.put_nowait(batch)
        except queue.Full:  # vLLM blocks here; the mock drops rather than stall its loop, and says so
            log.warning("KV event queue full (%d): batch dropped", self.config.max_queue_size)

    def close(self) -> None:
        self._running = False
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)
        self._thread.join(timeout=2.0)
        self._pub.close(linger=0)
        if self._replay is not None:
            self._replay.close(linger=0)

    def _loop(self) -> None:
        seq = 0
        while self._running or not self._queue.empty():
            if self._replay is not None and self._replay.poll(0):
                try:
                    self._serve_replay()
                except zmq.ZMQError as e:
                    log.warning("KV event replay failed: %s", e)
            try:
                batch = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            if batch is None:
                break
            payload = encode(batch)
            self._pub.send_multipart((self._topic, seq_bytes(seq), payload))
            self._buffer.append((seq, payload))
            seq += 1

    def _serve_replay(self) -> None:
        assert self._replay is not None
        frame = self._replay.recv_multipart()
        if len(frame) != 3:
            log.warning("invalid KV event replay request (%d frames)", len(frame))
            return
        client, _, start = frame
        first = int.from_bytes(start, "big")
        for seq, payload in list(self._buffer):
            if seq >= first:
                self._replay.send_multipart((client, b"", self._topic, seq_bytes(seq), payload))
        self._replay.send_multipart((client, b"", b"", END_SEQ, b""))
