"""Flow control: who goes next when the replicas are saturated (pure; no clocks of its own).

The idea of llm-d's flow control and the Gateway API Inference Extension's priorities
(InferenceObjective.spec.priority, higher served first when resources are scarce;
https://llm-d.ai/docs/api-reference/inferenceobjective and Red Hat OpenShift AI 3.4,
"Managing mixed workloads with priority queuing"): requests wait by priority band, and

- a band is served only while every higher band is empty (strict priority between bands);
- within a band, tenants share by weighted fair queuing on **tokens**, not requests: a request
  costs its estimated tokens, so a tenant sending few long prompts and one sending many short
  ones get equal token shares at equal weight. The discipline is Self-Clocked Fair Queuing
  (Golestani, INFOCOM 1994): a request's finish tag is max(its tenant's last finish tag, the
  band's virtual time) + cost / weight; the smallest finish tag goes first; the band's virtual
  time becomes that tag. A tenant that sends 10x more only queues behind itself;
- the queue is bounded in bytes (request bodies waiting) and in time: past the bytes, a newcomer
  evicts the most recent request of the lowest band below its own (sheddable first), else it is
  refused; a request waiting longer than `max_wait_s` is expired (the caller answers 429 with
  Retry-After).

One `FlowQueue` per deployment (the set of replicas whose saturation it waits on), as GIE runs
flow control per InferencePool. The caller owns time: it passes `now` in.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field


@dataclass
class Item:
    """One waiting request. `band`: 0 is the highest."""

    id: int
    tenant: str
    band: int
    weight: float
    cost: float  # estimated tokens (prompt + max completion), at least 1
    size: int  # bytes held while it waits (its body)
    enqueued: float
    start: float = 0.0  # SCFQ tags, set on push
    finish: float = 0.0
    seq: int = 0


@dataclass
class _Band:
    vtime: float = 0.0
    last: dict[str, float] = field(default_factory=dict)  # tenant -> last finish tag
    heap: list[tuple[float, int, int]] = field(default_factory=list)  # (finish, seq, id)


@dataclass(frozen=True)
class Pushed:
    accepted: bool
    evicted: tuple[Item, ...] = ()  # lower-band requests dropped to make room (answer 429)


class FlowQueue:
    def __init__(self, bands: int = 3, max_bytes: int = 64 * 1024 * 1024, max_wait_s: float = 30.0) -> None:
        if bands < 1:
            raise ValueError("bands must be >= 1")
        self.max_bytes = max_bytes
        self.max_wait_s = max_wait_s
        self._bands = [_Band() for _ in range(bands)]
        self._items: dict[int, Item] = {}
        self._seq = itertools.count()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, item_id: int) -> bool:
        return item_id in self._items

    def items(self) -> Iterator[Item]:
        return iter(self._items.values())

    def waiting(self, band: int) -> int:
        return sum(1 for i in self._items.values() if i.band == band)

    def push(self, item: Item) -> Pushed:
        """Queue `item`, evicting lower-band requests if the bytes bound needs it."""
        if not 0 <= item.band < len(self._bands):
            raise ValueError(f"band {item.band} out of range")
        if item.size > self.max_bytes:
            return Pushed(False)
        evicted: list[Item] = []
        free = self.max_bytes - self.bytes
        for victim in self._victims(item.band):
            if free >= item.size:
                break
            evicted.append(victim)
            free += victim.size
        if free < item.size:
            return Pushed(False)  # nothing below it to make room: the newcomer is refused
        for v in evicted:
            self._remove(v)
        b = self._bands[item.band]
        item.cost = max(1.0, item.cost)
        item.start = max(b.vtime, b.last.get(item.tenant, 0.0))
        item.finish = item.start + item.cost / item.weight
        b.last[item.tenant] = item.finish
        item.seq = next(self._seq)
        heapq.heappush(b.heap, (item.finish, item.seq, item.id))
        self._items[item.id] = item
        self.bytes += item.size
        return Pushed(True, tuple(evicted))

    def _victims(self, band: int) -> list[Item]:
        """Requests that a newcomer of `band` may evict, in order: the lowest band below it
        first (sheddable), the most recent first within a band."""
        lower = [i for i in self._items.values() if i.band > band]
        return sorted(lower, key=lambda i: (-i.band, -i.seq))

    def _remove(self, item: Item) -> None:
        del self._items[item.id]
        self.bytes -= item.size  # its heap entry is skipped lazily
        # A request that left without service must not push its tenant back: with none of its
        # requests left in the band the tenant starts afresh; its last one: the tag goes back.
        b = self._bands[item.band]
        if not any(i.tenant == item.tenant and i.band == item.band for i in self._items.values()):
            b.last.pop(item.tenant, None)
        elif b.last.get(item.tenant) == item.finish:
            b.last[item.tenant] = item.start

    def remove(self, item_id: int) -> Item | None:
        """A request that left (client gone, its own timer): no longer queued."""
        item = self._items.get(item_id)
        if item is not None:
            self._remove(item)
        return item

    def peek(self) -> Item | None:
        for b in self._bands:
            while b.heap:
                _, _, iid = b.heap[0]
                item = self._items.get(iid)
                if item is not None and item.seq == b.heap[0][1]:
                    return item
                heapq.heappop(b.heap)  # removed or evicted
        return None

    def pop(self) -> Item | None:
        """The next request to dispatch: the highest non-empty band, smallest finish tag."""
        item = self.peek()
        if item is None:
            return None
        b = self._bands[item.band]
        heapq.heappop(b.heap)
        del self._items[item.id]
        self.bytes -= item.size
        b.vtime = item.finish
        if not any(i.band == item.band for i in self._items.values()):
            b.last.clear()  # an idle band keeps no history: a tenant gains no credit by waiting
        return item

    def expire(self, now: float) -> list[Item]:
        """Requests that waited past `max_wait_s`: removed, for the caller to answer."""
        out = [i for i in self._items.values() if now - i.enqueued >= self.max_wait_s]
        for i in out:
            self._remove(i)
        return out

    def retry_after_s(self) -> int:
        """A client's wait hint after a refusal: the time bound, at least a second."""
        return max(1, int(self.max_wait_s))
