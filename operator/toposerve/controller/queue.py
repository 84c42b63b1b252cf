"""A small work queue: one entry per object, coalesced, with delayed requeue, per-key retry backoff
and no concurrent work on the same key (the shape of controller-runtime's rate-limited workqueue,
in asyncio).

Watch events only *enqueue* a key; workers reconcile the object's latest state. A burst of events
for one object becomes one reconcile, and two workers never reconcile the same object at once.
Retry backoff lives here, keyed by object, not in a worker: whichever worker picks a failing key up
next, its delay keeps doubling, and one failing object never slows the others down.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Hashable


class WorkQueue:
    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        base_delay: float = 1.0,
        max_delay: float = 60.0,
    ) -> None:
        self._due: dict[Hashable, float] = {}
        self._active: set[Hashable] = set()
        self._dirty: set[Hashable] = set()  # enqueued while active: run again when done
        self._failures: dict[Hashable, int] = {}
        self._changed = asyncio.Event()
        self._clock = clock
        self.base_delay = base_delay
        self.max_delay = max_delay

    def _now(self) -> float:
        return float(self._clock())

    def __len__(self) -> int:
        return len(self._due) + len(self._dirty)

    def add(self, key: Hashable, delay: float = 0.0) -> None:
        due = self._now() + delay
        if key in self._active:
            if delay <= 0:
                self._dirty.add(key)
            else:
                self._due[key] = min(self._due.get(key, due), due)
            return
        self._due[key] = min(self._due.get(key, due), due)
        self._changed.set()

    def add_rate_limited(self, key: Hashable) -> float:
        """Requeue a key whose work failed, after base x 2^(failures so far), capped; the delay."""
        n = self._failures.get(key, 0)
        self._failures[key] = n + 1
        delay = min(self.max_delay, self.base_delay * 2.0 ** min(n, 62))
        self.add(key, delay)
        return delay

    def forget(self, key: Hashable) -> None:
        """The key's work succeeded: its next failure starts from the base delay again."""
        self._failures.pop(key, None)

    def failures(self, key: Hashable) -> int:
        return self._failures.get(key, 0)

    async def get(self) -> Hashable:
        """The next due key that nobody is working on."""
        while True:
            now = self._now()
            ready = [(d, k) for k, d in self._due.items() if d <= now and k not in self._active]
            if ready:
                _, key = min(ready, key=lambda x: x[0])
                del self._due[key]
                self._active.add(key)
                return key
            waits = [d - now for k, d in self._due.items() if k not in self._active]
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout=min(waits) if waits else None)

    def done(self, key: Hashable) -> None:
        self._active.discard(key)
        if key in self._dirty:
            self._dirty.discard(key)
            self._due[key] = min(self._due.get(key, self._now()), self._now())
        self._changed.set()
