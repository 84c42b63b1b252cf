"""GPU fallback allocation: unplaced replicas move down the order, capacity brings them back."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from toposerve.controller.allocation import TypeState, allocate

ORDER = ["H100", "A100-80GB", "A100-40GB"]


def test_fresh_pool_starts_on_the_preferred_type() -> None:
    a = allocate(ORDER, 3, {})
    assert a.replicas == {"H100": 3, "A100-80GB": 0, "A100-40GB": 0} and not a.moves


def test_new_replicas_go_where_there_is_room() -> None:
    world = {"H100": TypeState(replicas=2, capacity=0), "A100-80GB": TypeState(capacity=4)}
    a = allocate(ORDER, 4, world)
    assert a.replicas == {"H100": 2, "A100-80GB": 2, "A100-40GB": 0}
    assert [(m.source, m.target, m.replicas, m.reason) for m in a.moves] == [
        ("H100", "A100-80GB", 2, "NoCapacity")
    ]


def test_without_capacity_anywhere_new_replicas_try_the_preferred_type() -> None:
    a = allocate(ORDER, 2, {"H100": TypeState(capacity=0), "A100-80GB": TypeState(capacity=0)})
    assert a.replicas["H100"] == 2 and not a.moves


def test_only_stuck_replicas_fall_back_one_step() -> None:
    world = {"H100": TypeState(replicas=3, stuck=2, pending=2)}
    a = allocate(ORDER, 3, world)
    assert a.replicas == {"H100": 1, "A100-80GB": 2, "A100-40GB": 0}
    assert [(m.source, m.target, m.replicas, m.reason) for m in a.moves] == [
        ("H100", "A100-80GB", 2, "Unschedulable")
    ]


def test_pending_but_not_yet_stuck_replicas_wait() -> None:
    world = {"H100": TypeState(replicas=3, stuck=0, pending=2)}
    a = allocate(ORDER, 3, world)
    assert a.replicas["H100"] == 3 and not a.moves


def test_the_last_type_keeps_its_stuck_replicas() -> None:
    world = {"A100-40GB": TypeState(replicas=2, stuck=2, pending=2)}
    assert allocate(ORDER, 2, world).replicas["A100-40GB"] == 2


def test_capacity_returning_moves_back_one_replica_at_a_time() -> None:
    world = {"H100": TypeState(replicas=1, capacity=5), "A100-80GB": TypeState(replicas=2)}
    a = allocate(ORDER, 3, world)
    assert a.replicas == {"H100": 2, "A100-80GB": 1, "A100-40GB": 0}
    assert [(m.source, m.target, m.reason) for m in a.moves] == [("A100-80GB", "H100", "CapacityReturned")]


def test_no_move_back_while_anything_is_pending() -> None:
    world = {"H100": TypeState(replicas=1, capacity=5), "A100-80GB": TypeState(replicas=2, pending=1)}
    assert not allocate(ORDER, 3, world).moves


def test_move_back_takes_from_the_least_preferred_type_first() -> None:
    world = {
        "H100": TypeState(replicas=0, capacity=1),
        "A100-80GB": TypeState(replicas=1),
        "A100-40GB": TypeState(replicas=1),
    }
    a = allocate(ORDER, 2, world)
    assert a.replicas == {"H100": 1, "A100-80GB": 1, "A100-40GB": 0}


def test_scale_down_removes_least_preferred_first() -> None:
    world = {"H100": TypeState(replicas=2), "A100-80GB": TypeState(replicas=2)}
    assert allocate(ORDER, 3, world).replicas == {"H100": 2, "A100-80GB": 1, "A100-40GB": 0}


def test_types_outside_the_order_are_dropped() -> None:
    world = {"B200": TypeState(replicas=5)}
    assert allocate(ORDER, 2, world).replicas == {"H100": 2, "A100-80GB": 0, "A100-40GB": 0}


states = st.builds(
    TypeState,
    replicas=st.integers(0, 10),
    stuck=st.integers(0, 10),
    pending=st.integers(0, 10),
    capacity=st.integers(0, 10),
)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 30), st.dictionaries(st.sampled_from(ORDER), states))
def test_allocation_always_sums_to_the_desired_total(total: int, world: dict[str, TypeState]) -> None:
    a = allocate(ORDER, total, world)
    assert sum(a.replicas.values()) == total
    assert all(v >= 0 for v in a.replicas.values())
    assert set(a.replicas) == set(ORDER)
    back = [m for m in a.moves if m.reason == "CapacityReturned"]
    assert len(back) <= 1 and all(m.replicas == 1 for m in back)


def test_cool_down_holds_replicas_on_the_fallback_type() -> None:
    world = {"H100": TypeState(replicas=0, capacity=5), "A100-80GB": TypeState(replicas=2)}
    held = allocate(ORDER, 2, world, allow_return=False)
    assert held.replicas == {"H100": 0, "A100-80GB": 2, "A100-40GB": 0} and not held.moves
