"""Streaming load from the openai SDK for the cluster tests that claim "no request lost".

A request counts as served only when its stream ends the way a client wants it to: no exception,
and a finish_reason of "stop" or "length" with text. vLLM 0.33.0 answers a request it aborts on
SIGTERM (--shutdown-timeout 0) or rejects while draining with a *successful* HTTP stream whose
finish_reason is "abort" (v1/engine/core.py), so counting exceptions alone would miss exactly the
failures a rollout causes.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field


@dataclass
class Load:
    """Streaming chat completions until stopped, each one's outcome recorded."""

    url: str
    model: str
    max_tokens: int = 64
    stop: threading.Event = field(default_factory=threading.Event)
    ok: int = 0
    failed_before_stream: list[str] = field(default_factory=list)
    failed_mid_stream: list[str] = field(default_factory=list)
    cut: list[str] = field(default_factory=list)  # the stream ended, but not as a client wants
    lock: threading.Lock = field(default_factory=threading.Lock)
    threads: list[threading.Thread] = field(default_factory=list)
    # Spread the clients over these base URLs (client i uses the i-th, round robin) instead of url.
    urls: list[str] = field(default_factory=list)

    @property
    def failures(self) -> list[str]:
        with self.lock:
            return [*self.failed_before_stream, *self.failed_mid_stream, *self.cut]

    def worker(self, i: int) -> None:
        import openai

        base = self.urls[i % len(self.urls)] if self.urls else self.url
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=60)
        n = 0
        while not self.stop.is_set():
            n += 1
            started = False
            text, finish = [], None
            try:
                stream = client.chat.completions.create(
                    model=self.model,
                    messages=[{"role": "user", "content": f"client {i} request {n}"}],
                    max_tokens=self.max_tokens,
                    stream=True,
                )
                for chunk in stream:
                    started = True
                    for c in chunk.choices:
                        text.append(c.delta.content or "")
                        finish = c.finish_reason or finish
                with self.lock:
                    if finish in ("stop", "length") and "".join(text):
                        self.ok += 1
                    else:
                        self.cut.append(
                            f"client {i} request {n}: finish_reason={finish!r}, {len(text)} chunks"
                        )
            except Exception as e:  # recorded, and judged by the test
                with self.lock:
                    # The cause too: the SDK's APIConnectionError hides which connection broke how.
                    cause = f" <- {e.__cause__!r}" if e.__cause__ else ""
                    where = "mid-stream" if started else "before the stream"
                    (self.failed_mid_stream if started else self.failed_before_stream).append(
                        f"{_now()} client {i} request {n} {where}: {e!r}{cause}"
                    )

    def run(self, clients: int) -> Load:
        """Start ``clients`` workers. They are daemon threads, and ``close`` (or leaving the ``with``
        block) stops them: a test that fails half-way must neither hang the interpreter's exit on
        a worker that never stops (CI's timeout) nor leave its load running into the next test."""
        for i in range(clients):
            t = threading.Thread(target=self.worker, args=(i,), name=f"load-{i}", daemon=True)
            t.start()
            self.threads.append(t)
        return self

    def close(self, timeout: float = 70.0) -> None:
        """Stop the workers; each finishes the request it is in (bounded by the client's timeout)."""
        self.stop.set()
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> Load:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _now() -> str:
    """Wall time with milliseconds, to line a failure up with the pods' logs."""
    t = time.time()
    return time.strftime("%H:%M:%S", time.localtime(t)) + f".{int(t * 1000) % 1000:03d}"
