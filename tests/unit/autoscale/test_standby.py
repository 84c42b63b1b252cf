"""Warm standby relabelling: a table, and the level-triggered property (applying it converges)."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from toposerve.autoscale.standby import Pod, Relabel, relabel


def p(name: str, standby: bool = False, ready: bool = True, age: float = 100.0) -> Pod:
    return Pod(name, standby, ready, age)


CASES = [
    ("steady", [p("a"), p("b"), p("s", True)], 2, 1, Relabel()),
    ("scale-up promotes the ready standby", [p("a"), p("s1", True, age=50), p("s2", True, ready=False, age=900)],
     2, 1, Relabel(promote=("s1",))),
    ("oldest ready standby first", [p("a"), p("s1", True, age=10), p("s2", True, age=90)], 2, 1,
     Relabel(promote=("s2",))),
    ("promote as many as missing and present", [p("s1", True), p("s2", True)], 3, 1, Relabel(promote=("s1", "s2"))),
    ("a new pod of the workload becomes the standby", [p("a"), p("b"), p("new", ready=False, age=1)], 2, 1,
     Relabel(demote=("new",))),
    ("surplus ready engines: the youngest goes", [p("a", age=300), p("b", age=20), p("c", age=200)], 2, 1,
     Relabel(demote=("b",))),
    ("no standby wanted: nothing demoted", [p("a"), p("b"), p("c")], 2, 0, Relabel()),
    ("standby full: surplus engines stay (the workload shrinks them)", [p("a"), p("b"), p("s", True)], 1, 1,
     Relabel()),
    ("zero serving: every pod standby up to the target", [p("a"), p("b")], 0, 1, Relabel(demote=("a",))),
]  # fmt: skip


@pytest.mark.parametrize(("name", "pods", "serving", "standby", "want"), CASES, ids=[c[0] for c in CASES])
def test_relabel(name: str, pods: list[Pod], serving: int, standby: int, want: Relabel) -> None:
    assert relabel(pods, serving, standby) == want


pods = st.lists(st.builds(Pod, st.text("abcdefgh", min_size=1, max_size=4), st.booleans(), st.booleans(),
                          st.floats(0, 1000)), max_size=12, unique_by=lambda x: x.name)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(pods, st.integers(0, 10), st.integers(0, 5))
def test_applying_the_relabel_converges_in_one_step(ps: list[Pod], serving: int, standby: int) -> None:
    r = relabel(ps, serving, standby)
    assert not (r.promote and r.demote)
    after = [replace(x, standby=True) if x.name in r.demote else replace(x, standby=False) if x.name in r.promote
             else x for x in ps]  # fmt: skip
    engines = sum(1 for x in after if not x.standby)
    spares = len(after) - engines
    if sum(1 for x in ps if not x.standby) < serving:  # short of engines: every usable spare promoted
        assert engines == min(serving, len(ps))
    else:
        assert engines >= serving
        assert spares == min(len(ps) - serving, max(standby, sum(1 for x in ps if x.standby)))
    assert relabel(after, serving, standby) == Relabel()  # a second pass has nothing to do
