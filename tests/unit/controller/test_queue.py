"""The work queue coalesces events, never runs one key twice at once, and honours delays."""

from __future__ import annotations

import asyncio

from toposerve.controller.queue import WorkQueue


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


async def test_events_for_one_key_coalesce() -> None:
    q = WorkQueue()
    for _ in range(5):
        q.add(("ns", "a"))
    q.add(("ns", "b"))
    assert len(q) == 2
    got = {await q.get(), await q.get()}
    assert got == {("ns", "a"), ("ns", "b")}


async def test_a_key_in_progress_is_not_handed_out_again_but_reruns_after() -> None:
    q = WorkQueue()
    q.add("a")
    assert await q.get() == "a"
    q.add("a")  # an event arrives while "a" is being reconciled
    waiter = asyncio.create_task(q.get())
    await asyncio.sleep(0.01)
    assert not waiter.done()
    q.done("a")
    assert await asyncio.wait_for(waiter, 1) == "a"


async def test_delayed_keys_wait_for_their_time() -> None:
    clock = Clock()
    q = WorkQueue(clock)
    q.add("later", delay=10)
    q.add("now")
    assert await q.get() == "now"
    waiter = asyncio.create_task(q.get())
    await asyncio.sleep(0.01)
    assert not waiter.done()
    clock.t = 11
    q.add("other", delay=100)  # any wake-up re-evaluates due times
    assert await asyncio.wait_for(waiter, 1) == "later"
