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


def test_retry_backoff_doubles_per_key_and_is_capped() -> None:
    q = WorkQueue(Clock(), base_delay=1.0, max_delay=8.0)
    assert [q.add_rate_limited("a") for _ in range(6)] == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert q.failures("a") == 6
    assert q.add_rate_limited("b") == 1.0  # another key's failures are its own


def test_success_forgets_the_failures() -> None:
    q = WorkQueue(Clock())
    q.add_rate_limited("a")
    q.add_rate_limited("a")
    q.forget("a")
    assert q.failures("a") == 0
    assert q.add_rate_limited("a") == q.base_delay


async def test_a_failed_key_is_handed_out_only_after_its_backoff() -> None:
    clock = Clock()
    q = WorkQueue(clock, base_delay=1.0)
    q.add("a")
    assert await q.get() == "a"
    q.done("a")
    q.add_rate_limited("a")  # first failure: due after 1 s
    clock.t = 1.0
    assert await q.get() == "a"
    q.done("a")
    delay = q.add_rate_limited("a")  # second failure, whichever worker saw it: 2 s
    assert delay == 2.0
    waiter = asyncio.create_task(q.get())
    await asyncio.sleep(0.01)
    assert not waiter.done()
    clock.t += 1.5
    q.add("other", delay=100)  # wake the waiter: still not due
    await asyncio.sleep(0.01)
    assert not waiter.done()
    clock.t += 1.0
    q.add("other", delay=100)
    assert await asyncio.wait_for(waiter, 1) == "a"
