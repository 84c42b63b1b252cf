"""Budgets shared across two real gateway instances on loopback (peer_sync.py over HTTP,
budget_share.py deciding), before a real mock engine: a tenant's budget holds across both,
/health and /metrics say which mode is in force, a silent peer means budget / replicas, and
the replicas are learnt from the gateway Service's EndpointSlices."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from tests.unit.router.test_gateway import LLAMA, engine, engine_slice, gateway, healthy, llmd, until
from tests.unit.router.test_gateway_tenants import metrics

from toposerve.router import budget_share as bs
from toposerve.router import tenants as tn
from toposerve.router.gateway import Gateway
from toposerve.router.peer_sync import PeerSync, slice_addresses

KEY = "sk-shared-0123456789abcdef"
TPM = 1000  # tokens per minute, across the replicas
POLICY = {
    "tenants": {
        "team-a": {"budgets": {"tokensPerMinute": TPM}, "keySha256": [tn.hash_key(KEY).hex()]},
    }
}


@contextlib.asynccontextmanager
async def two_gateways(interval: float = 0.1) -> AsyncIterator[list[tuple[Gateway, str, PeerSync]]]:
    llama = await engine(LLAMA)
    out: list[tuple[Gateway, str, PeerSync]] = []
    try:
        async with gateway() as (g1, b1), gateway() as (g2, b2):
            for gw, base in ((g1, b1), (g2, b2)):
                gw.tenants.admission.require_key = True
                gw.tenants.admission.set_table(tn.build_table(tn.parse_policies(POLICY, "p").values()))
                shared = bs.SharedBudgets(ttl_s=3 * interval, interval_s=interval)
                gw.tenants.admission.shared = shared
                sync = PeerSync(shared, 0, registry=gw.gw_registry)
                gw.tenants.sharing = sync
                await sync.start("127.0.0.1")
                gw.deployments_listed([llmd("llama", LLAMA)])
                gw.slices_listed([engine_slice("l", "llama", [llama])])
                out.append((gw, base, sync))
            (_, _, s1), (_, _, s2) = out
            s1.set_static([f"127.0.0.1:{s2.bound_port}"])
            s2.set_static([f"127.0.0.1:{s1.bound_port}"])
            await until(lambda: healthy(g1, LLAMA) and healthy(g2, LLAMA), "both gateways route")
            await until(lambda: all(s.status()["mode"] == bs.SHARED for _, _, s in out), "both shared")
            yield out
            for _, _, s in out:
                await s.stop()
    finally:
        await llama.stop()


async def post(s: aiohttp.ClientSession, base: str, max_tokens: int = 40) -> tuple[int, int, str]:
    """(status, tokens the engine used, error message)."""
    body = {"model": LLAMA, "prompt": "hello there", "max_tokens": max_tokens}
    async with s.post(base + "/v1/completions", json=body, headers={"x-api-key": KEY}) as r:
        doc: Any = await r.json()
    if r.status == 200:
        return 200, doc["usage"]["total_tokens"], ""
    return r.status, 0, doc["error"]["message"]


async def test_a_budget_holds_across_two_gateways() -> None:
    """A fixed number of requests spread over both replicas: the tokens admitted stay within
    one budget (plus a minute's refill over the run and one request per replica per exchange,
    budget_share.py), where without sharing each replica alone would admit a whole budget."""
    async with two_gateways() as gws, aiohttp.ClientSession() as s:
        (_, b1, _), (_, b2, _) = gws
        codes, used, refused = [], 0, []
        for i in range(60):
            code, tokens, msg = await post(s, (b1, b2)[i % 2])
            codes.append(code)
            used += tokens
            if code == 429:
                refused.append(msg)
        admitted = codes.count(200)
        assert set(codes) == {200, 429}, codes
        per_request = used / admitted
        # one budget, its refill over a short run, and the documented slack: one request per
        # replica per exchange (the run lasts a few dozen exchanges of 0.1 s)
        assert used <= TPM * 1.2 + 2 * per_request, (used, admitted, codes)
        assert used < 2 * TPM * 0.8  # clearly less than the two whole budgets of unshared replicas
        assert any("across the 2 gateway replicas" in m for m in refused), refused
        # each replica admitted some: the budget was shared, not taken by one
        m1, m2 = await metrics(b1), await metrics(b2)
        ok = (
            "toposerve_tenant_requests_total",
            frozenset({("tenant", "team-a"), ("model", LLAMA), ("code", "200")}),
        )
        assert m1[ok] > 0 and m2[ok] > 0
        assert m1[("toposerve_gateway_budget_sharing", frozenset({("mode", "shared")}))] == 1.0
        assert m1[("toposerve_gateway_budget_peers", frozenset({("state", "live")}))] == 1.0
        async with s.get(b1 + "/health") as r:
            assert (await r.json())["budgets"] == {"mode": "shared", "replicas": 2, "livePeers": 1}


async def test_a_silent_peer_means_budget_over_replicas() -> None:
    """The peer stops answering (its exchange server gone, still listed): after its report
    expires the replica is `degraded` and keeps to half the budget."""
    async with two_gateways() as gws, aiohttp.ClientSession() as s:
        (_, b1, s1), (_, _, s2) = gws
        await s2.stop()
        await until(lambda: s1.status()["mode"] == bs.DEGRADED, "replica 1 degraded")
        used = 0
        for _ in range(40):
            _, tokens, _ = await post(s, b1)
            used += tokens
        assert used <= TPM / 2 * 1.2 + 60, used  # half the budget (+ refill, + one request)
        async with s.get(b1 + "/health") as r:
            assert (await r.json())["budgets"]["mode"] == "degraded"
        m = await metrics(b1)
        assert m[("toposerve_gateway_budget_sharing", frozenset({("mode", "degraded")}))] == 1.0


def test_peers_from_the_services_endpointslices() -> None:
    """Serving endpoints of the Service's slices, with the peer port, itself left out."""
    sync = PeerSync(bs.SharedBudgets(), 8082, self_ip="10.0.0.1")
    sl: dict[str, Any] = {
        "metadata": {"name": "gw-abc", "namespace": "ts"},
        "endpoints": [
            {"addresses": ["10.0.0.1"], "conditions": {"ready": True}},
            {"addresses": ["10.0.0.2"], "conditions": {"ready": False, "serving": True}},  # terminating
            {"addresses": ["10.0.0.3"], "conditions": {"ready": False, "serving": False}},
            {"addresses": ["fd00::4"]},
        ],
    }
    assert slice_addresses(sl) == {"10.0.0.1", "10.0.0.2", "fd00::4"}
    sync.slices_listed([sl])
    assert sync.shared.known == {"10.0.0.2:8082", "[fd00::4]:8082"}
    sync.slice_event("DELETED", sl)
    assert sync.shared.known == frozenset()


def test_peer_flags() -> None:
    import argparse

    from toposerve.router import gateway_cli

    p = argparse.ArgumentParser()
    gateway_cli.add_arguments(p)
    ok = p.parse_args(["--peer-port=8082", "--peer-service=gw", "--tenants-namespace=ns"])
    assert gateway_cli.check_peer_args(ok) == ""
    assert gateway_cli.check_peer_args(p.parse_args([])) == ""  # off by default
    assert "differ" in gateway_cli.check_peer_args(p.parse_args(["--peer-port=8080"]))
    assert "need --peer-port" in gateway_cli.check_peer_args(p.parse_args(["--peers=a:1"]))
    assert "--tenants-namespace" in gateway_cli.check_peer_args(
        p.parse_args(["--peer-port=8082", "--peer-service=gw", "--tenants-namespace="])
    )
    assert "more than 0" in gateway_cli.check_peer_args(
        p.parse_args(["--peer-port=8082", "--peer-interval=0"])
    )
