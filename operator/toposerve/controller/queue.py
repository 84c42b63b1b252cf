"""A small work queue: one entry per object, coalesced, with delayed requeue and no concurrent work
on the same key (the shape of controller-runtime's workqueue, in asyncio).

Watch events only *enqueue* a key; workers reconcile the object's latest state. A burst of events
for one object becomes one reconcile, and two workers never reconcile the same object at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Hashable


class WorkQueue:
    def __init__(self, clock: object = time.monotonic) -> None:
        self._due: dict[Hashable, float] = {}
        self._active: set[Hashable] = set()
        self._dirty: set[Hashable] = set()  # enqueued while active: run again when done
        self._changed = asyncio.Event()
        self._clock = clock

    def _now(self) -> float:
        return float(self._clock())  # type: ignore[operator]

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
