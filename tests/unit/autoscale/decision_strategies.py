"""Hypothesis strategies for the autoscaling decision's inputs, shared by its property tests
(test_decision.py, test_headroom.py), each with its own bounds."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from hypothesis import strategies as st

from toposerve.autoscale.decision import Config, Policy, Replica, Rules

# a replica's KV usage or queue: absent, a fraction, or the NaN a broken exporter sends
metric = st.one_of(st.none(), st.floats(0.0, 1.0), st.just(math.nan))


def rules(windows: Sequence[float], periods: Sequence[float], max_policies: int) -> st.SearchStrategy[Rules]:
    """HPA behavior rules: a stabilization window, 1..max_policies Pods/Percent policies, selectPolicy."""
    policy = st.builds(
        Policy, st.sampled_from(["Pods", "Percent"]), st.integers(1, 200), st.sampled_from(list(periods))
    )
    return st.builds(
        Rules,
        st.sampled_from(list(windows)),
        st.lists(policy, min_size=1, max_size=max_policies).map(tuple),
        st.sampled_from(["Max", "Min", "Disabled"]),
    )


def configs(
    cfg: Callable[..., Config], max_min: int, max_span: int, rule: st.SearchStrategy[Rules]
) -> st.SearchStrategy[Config]:
    """`cfg(...)` (the test file's base config) with random bounds, KV target, tolerance and rules."""
    return st.builds(
        lambda lo, span, t, tol, up, down: cfg(
            min_replicas=lo, max_replicas=lo + span, target_kv=t, tolerance=tol, up=up, down=down
        ),
        st.integers(0, max_min),
        st.integers(1, max_span),
        st.floats(0.05, 1.0),
        st.sampled_from([0.0, 0.1, 0.3]),
        rule,
        rule,
    )


def replicas(max_age: float) -> st.SearchStrategy[Replica]:
    """A ready or starting replica of any age up to `max_age`, with any KV usage and queue."""
    return st.builds(Replica, st.just("r"), st.booleans(), st.floats(0, max_age), metric, metric)
