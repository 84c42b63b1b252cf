"""The autoscaler's reading of its routers' /metrics (autoscale/router_figures.py), checked on a
page a real router (router/proxy.py over loopback) served, and on hand-made pages for the rules
of combining router replicas."""

from __future__ import annotations

import aiohttp
import pytest

from tests.unit.router.test_router_proxy import Harness, _post, chat, harness
from toposerve.autoscale.router_figures import RouterFigures, combine, parse_router_page
from toposerve.router.endpoints import BackendSpec

__all__ = ["harness"]


async def test_a_real_routers_page_reads_as_its_demand(harness: Harness) -> None:
    router, url, ups = await harness(2)
    router.reconcile({u.url: (BackendSpec(u.url, gpu_type="H100", pool="h100"), False) for u in ups})
    for _ in range(3):
        assert (await _post(url + "/v1/chat/completions", chat(max_tokens=7)))[0] == 200
    async with aiohttp.ClientSession() as s, s.get(url + "/metrics") as r:
        page = await r.text()
    one = parse_router_page(page)
    assert one is not None
    f = combine([one])
    assert f.routers == 1 and f.arrivals_short > 0 and f.arrivals_long > 0
    # every arrival asked for 7 tokens: the decode rate is 7x the request rate, whatever the span
    assert f.decode_tokens_short == pytest.approx(7 * f.arrivals_short)
    assert f.prompt_tokens_short > 0 and f.in_flight_requests == 0 and f.held == 0
    assert f.ready_replicas == 2  # both backends of pool h100, as this router sees them
    # two routers that saw the same: twice the demand, the same view of the engines
    two = combine([one, one])
    assert two.arrivals_long == pytest.approx(2 * f.arrivals_long) and two.ready_replicas == f.ready_replicas


PAGE = """# TYPE toposerve_router_arrival_requests_per_second gauge
toposerve_router_arrival_requests_per_second{pool="a",window="5s"} 99.0
toposerve_router_arrival_requests_per_second{pool="a",window="15s"} 4.0
toposerve_router_arrival_requests_per_second{pool="a",window="60s"} 2.0
toposerve_router_arrival_requests_per_second{pool="",window="15s"} 1.0
toposerve_router_arrival_requests_per_second{pool="b",window="15s"} NaN
# TYPE toposerve_router_in_flight_tokens gauge
toposerve_router_in_flight_tokens{pool="a"} 1000
toposerve_router_in_flight_tokens{pool="b"} 500
# TYPE toposerve_router_held_requests gauge
toposerve_router_held_requests 2
# TYPE toposerve_router_queued_requests gauge
toposerve_router_queued_requests 3
# TYPE toposerve_router_pool_ready_replicas gauge
toposerve_router_pool_ready_replicas{pool="a"} 3
toposerve_router_pool_ready_replicas{pool="b"} 1
# TYPE toposerve_router_pool_decode_tokens_per_second_per_replica gauge
toposerve_router_pool_decode_tokens_per_second_per_replica{pool="a",window="60s"} 300
toposerve_router_pool_decode_tokens_per_second_per_replica{pool="b",window="60s"} 100
# TYPE toposerve_router_pool_running_requests_per_replica gauge
toposerve_router_pool_running_requests_per_replica{pool="a",window="60s"} 8
"""


def test_demand_is_summed_over_pools_and_routers_service_weighted_by_ready_replicas() -> None:
    f = combine([parse_router_page(PAGE), parse_router_page(PAGE.replace("300", "500")), None])
    assert f.routers == 2
    # the 15 s window is "short" (the 5 s one is for dashboards); NaN left out, pool "" counted
    assert (f.arrivals_short, f.arrivals_long) == (10.0, 4.0)
    assert (f.in_flight_tokens, f.held, f.queued) == (3000.0, 4.0, 6.0)
    # pool a: mean of 300 and 500 = 400 over 3 replicas, pool b 100 over 1
    assert f.decode_tokens_per_replica == pytest.approx((400 * 3 + 100 * 1) / 4)
    assert f.running_per_replica == 8 and f.prompt_tokens_per_replica is None
    assert f.ready_replicas == 4


def test_no_router_or_garbage_is_no_figure() -> None:
    assert combine([]) == RouterFigures() == combine([parse_router_page("<html>502</html>{")])
    assert parse_router_page("") is not None  # an empty page parses: a router with nothing to say


def test_a_gateway_page_counts_only_the_deployments_own_series() -> None:
    """The page of a real Gateway (router/gateway.py) routing two deployments, one holding requests
    at zero replicas: each deployment reads its own figures; a deployment the gateway does not
    route reads as "not answering"; a dedicated router's unlabelled page counts whole."""
    from prometheus_client import generate_latest

    from toposerve.router.gateway import Gateway

    gw = Gateway()
    objs = [
        {"metadata": {"name": n, "namespace": "ns"}, "spec": {"model": {"name": f"org/{n}"}}}
        for n in ("a", "b")
    ]
    gw.deployments_listed(objs)
    gw.members["ns/a"].held = 3
    gw.members["ns/b"].queued = 2
    page = generate_latest(gw.gw_registry).decode()
    a = combine([parse_router_page(page, ("ns", "a"))])
    b = combine([parse_router_page(page, ("ns", "b"))])
    assert (a.routers, a.held, a.queued) == (1, 3, 0)
    assert (b.routers, b.held, b.queued) == (1, 0, 2)
    assert parse_router_page(page, ("ns", "c")) is None
    assert parse_router_page(page, ("other", "a")) is None
    whole = combine([parse_router_page(page)])
    assert (whole.held, whole.queued) == (3, 2)
    dedicated = PAGE
    assert parse_router_page(dedicated, ("ns", "a")) == parse_router_page(dedicated)
