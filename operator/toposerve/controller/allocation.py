"""Capacity-aware GPU fallback: how a pool's replicas are split over its acceptable GPU types.

Pure and level-triggered. The current split is read back from the world (each per-type workload's
``spec.replicas``), so an operator restart resumes exactly where it was. Each reconcile:

1. brings the total to the desired count: additions go to the most preferred type with free
   capacity for a replica (else the most preferred type: the scheduler decides, and step 2 moves
   what stays unschedulable), removals come from the least preferred;
2. moves replicas whose pods have stayed unschedulable longer than the patience window to the
   next type in the order (only the unplaced ones: running replicas stay where they are);
3. moves back gradually: when a more preferred type has room for a whole replica and nothing of
   the pool is pending, one replica moves from the least preferred type per reconcile.

Each move is reported as a ``Move`` so the shell can emit a Kubernetes Event.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class TypeState:
    """What the world says about one GPU type of a pool."""

    replicas: int = 0  # spec.replicas of the workload on this type (the current split)
    stuck: int = 0  # pods unschedulable for longer than the patience window
    pending: int = 0  # pods not yet scheduled (any age)
    capacity: int = 0  # more replicas that would fit in free GPUs now


@dataclass(frozen=True)
class Move:
    source: str
    target: str
    replicas: int
    reason: str  # "NoCapacity" (new replicas), "Unschedulable" (stuck ones) or "CapacityReturned"


@dataclass(frozen=True)
class Allocation:
    replicas: dict[str, int]
    moves: list[Move] = field(default_factory=list)


def allocate(
    order: Sequence[str], total: int, world: Mapping[str, TypeState], allow_return: bool = True
) -> Allocation:
    """The split of ``total`` replicas over ``order`` (most preferred first) given the world.

    ``allow_return=False`` holds replicas where they are (the shell uses it as a cool-down after a
    fallback, so a constraint the capacity view cannot see does not make a pool flap).
    """
    if not order:
        return Allocation({})
    state = {t: world.get(t, TypeState()) for t in order}
    alloc = {t: max(0, state[t].replicas) for t in order}
    moves: list[Move] = []
    # 1. converge the sum on the desired total.
    diff = total - sum(alloc.values())
    if diff > 0:
        with_room = [t for t in order if state[t].capacity > 0 and state[t].stuck == 0]
        target = with_room[0] if with_room else order[0]
        alloc[target] += diff
        if target != order[0]:
            moves.append(Move(order[0], target, diff, "NoCapacity"))
    elif diff < 0:
        for t in reversed(order):
            take = min(alloc[t], -diff)
            alloc[t] -= take
            diff += take
            if diff == 0:
                break
    # 2. fall back: unplaced replicas move one step down the order.
    for i, t in enumerate(order[:-1]):
        stuck = min(state[t].stuck, alloc[t])
        if stuck > 0:
            nxt = order[i + 1]
            alloc[t] -= stuck
            alloc[nxt] += stuck
            moves.append(Move(t, nxt, stuck, "Unschedulable"))
    if any(m.reason == "Unschedulable" for m in moves):
        return Allocation(alloc, moves)
    # 3. move back, one replica per reconcile, once the pool is settled.
    if not allow_return or any(s.pending for s in state.values()):
        return Allocation(alloc, moves)
    for i, preferred in enumerate(order):
        lower = [t for t in order[i + 1 :] if alloc[t] > 0]
        if not lower:
            break
        if state[preferred].capacity > 0:
            source = lower[-1]
            alloc[source] -= 1
            alloc[preferred] += 1
            moves.append(Move(source, preferred, 1, "CapacityReturned"))
            break
    return Allocation(alloc, moves)
