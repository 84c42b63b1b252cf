"""The short window's significance test in the router-demand rule (issue 25, round 2): a short
window within Poisson noise of the long rate may not lead; a real rise still does."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from toposerve.autoscale.decision import ROUTER_ARRIVALS, Inputs
from toposerve.autoscale.queueing import (
    SHORT_WINDOW_S,
    SHORT_WINDOW_Z,
    Demand,
    demand_replicas,
    short_window_significant,
)

from .test_queueing import cfg, demand, ready, run


def test_defaults_are_the_routers_15_s_window_and_3_sigma() -> None:
    assert SHORT_WINDOW_S == 15.0 and SHORT_WINDOW_Z == 3.0
    assert demand(1.0).short_window_s == 15.0


def test_noise_in_the_short_window_does_not_lead() -> None:
    # long 3.6 req/s: 54 expected in 15 s (sigma 7.3); 3.6 x 1.2 = 64.8 arrivals is 1.5 sigma
    noisy = demand(3.6, short=3.6 * 1.2)
    assert not short_window_significant(noisy)
    p = demand_replicas(noisy, target_kv=0.5)
    base = demand_replicas(demand(3.6), target_kv=0.5)
    assert p is not None and base is not None
    assert p.window != "short" and p.replicas == base.replicas
    assert "within 3 sigma of the long rate, not used" in p.explanation
    # the same window without the filter leads (what round 1 did)
    off = demand_replicas(noisy, target_kv=0.5, z=None)
    assert off is not None and off.window == "short" and off.replicas > base.replicas


def test_a_real_rise_still_leads() -> None:
    # a 1.6x step at 3.6 req/s: 86.4 against 54 in 15 s, 4.4 sigma
    step = demand(3.6, short=3.6 * 1.6)
    assert short_window_significant(step)
    p = demand_replicas(step, target_kv=0.5)
    assert p is not None and p.window == "short"
    assert p.load == pytest.approx(3.6 * 1.6 * 10 * 1100 / 5000)


def test_the_test_scales_with_the_window_length() -> None:
    # the same rates over a 5 s window are 3 x fewer arrivals: the 1.6x step is 2.5 sigma there
    step5 = demand(3.6, short=3.6 * 1.6, short_window_s=5.0)
    assert not short_window_significant(step5)
    assert short_window_significant(step5, z=2.0)


def test_idle_floor_of_one_expected_arrival() -> None:
    # nothing in the long window's rate (mu = 0): 4 arrivals are above 3 x sqrt(1)
    assert short_window_significant(demand(0.0, short=4 / 15))
    assert not short_window_significant(demand(0.0, short=3 / 15))


def test_decide_does_not_scale_up_on_a_noisy_short_window() -> None:
    # KV and the long window say 3 replicas at target; the short window is 2.5 sigma above (4 without
    # the filter)
    c = cfg()
    noisy = demand(1.0, short=1.0 + 2.5 * math.sqrt(15) / 15)
    base = run(c, Inputs(now=10_000, current=3, replicas=ready(3, 0.5), demand=demand(1.0)))
    d = run(c, Inputs(now=10_000, current=3, replicas=ready(3, 0.5), demand=noisy))
    assert d.desired == base.desired == 3
    step = run(c, Inputs(now=10_000, current=3, replicas=ready(3, 0.5), demand=demand(1.0, short=3.0)))
    assert step.desired == 7 and step.signal == ROUTER_ARRIVALS


@pytest.mark.parametrize("z", [math.nan, math.inf, -1.0])
def test_bad_z_gives_no_proposal(z: float) -> None:
    assert demand_replicas(demand(2.0), target_kv=0.5, z=z) is None


def test_zero_window_gives_no_proposal() -> None:
    assert demand_replicas(demand(2.0, short_window_s=0.0), target_kv=0.5) is None


# ---- properties --------------------------------------------------------------------------------

rates = st.floats(0.0, 200.0)


@settings(max_examples=300, deadline=None)
@given(rates, rates, st.floats(0.5, 120.0), st.floats(0.0, 5.0), st.floats(0.05, 1.0), st.floats(0.0, 3.0))
def test_filter_never_asks_for_more_than_no_filter(
    long: float, short: float, window: float, z: float, target: float, beta: float
) -> None:
    d = demand(long, short=short, short_window_s=window)
    on, off = demand_replicas(d, target, beta, z=z), demand_replicas(d, target, beta, z=None)
    assert on is not None and off is not None
    assert on.replicas <= off.replicas and on.load <= off.load


@settings(max_examples=300, deadline=None)
@given(rates, st.floats(0.0, 1.0), st.floats(0.5, 120.0), st.floats(0.0, 5.0), st.floats(0.05, 1.0))
def test_within_noise_the_proposal_is_the_long_windows(
    long: float, frac: float, window: float, z: float, target: float
) -> None:
    """A short window no more than z sigma above the long rate proposes exactly what a short
    window equal to the long one would."""
    mu = long * window
    n = mu + frac * z * math.sqrt(max(mu, 1.0))
    d = demand(long, short=n / window, short_window_s=window)
    flat = demand(long, short_window_s=window)
    on, ref = demand_replicas(d, target, z=z), demand_replicas(flat, target, z=z)
    assert on is not None and ref is not None
    if not short_window_significant(d, z):
        assert on.replicas == ref.replicas and on.load == pytest.approx(ref.load)


@settings(max_examples=300, deadline=None)
@given(rates, st.floats(0.0, 200.0), st.floats(0.5, 120.0), st.floats(0.0, 5.0), st.floats(0.05, 1.0))
def test_a_significant_rise_leads_as_without_the_filter(
    long: float, extra: float, window: float, z: float, target: float
) -> None:
    d = demand(long, short=long + extra, short_window_s=window)
    if short_window_significant(d, z):
        on, off = demand_replicas(d, target, z=z), demand_replicas(d, target, z=None)
        assert on is not None and off is not None and on == off


def test_demand_field_default_matches_router_figures() -> None:
    """The product builds Demand without short_window_s (controller/autoscaler.py): the default is
    the 15 s figure router_figures.py reads as "short"."""
    from toposerve.autoscale import router_figures

    assert "15s" in {w for (_, w) in router_figures._SUMMED if w}
    assert Demand(kv_tokens_per_replica=1.0, arrivals_short=0, arrivals_long=0).short_window_s == 15.0
