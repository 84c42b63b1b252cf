"""The Endpoint Picker over real gRPC on loopback: a client playing Envoy's side of ext_proc
with the real protos (epp_client.py) against `toposerve router`'s picker in front of real mock
engines. Each protocol case of GIE's proposal 004 (v1.6.2) is one test; load and prefix state
are read off the router itself. No assertion depends on timing."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from prometheus_client import generate_latest
from tests.unit.router.epp_client import Stream, chat, health, response_body, response_headers
from tests.unit.router.test_gateway import engine_slice, llmd

from toposerve.mockengine.server import EngineConfig, MockServer
from toposerve.router import strategies as st
from toposerve.router import tenants as tn
from toposerve.router.endpoints import BackendSpec
from toposerve.router.epp import protocol as pr
from toposerve.router.epp.server import EndpointPicker
from toposerve.router.gateway import Gateway
from toposerve.router.proxy import Router, RouterConfig
from toposerve.router.tenant_watch import TenantSource


@dataclass
class Picker:
    router: Router
    epp: EndpointPicker
    channel: grpc.aio.Channel
    health_channel: grpc.aio.Channel
    engines: list[MockServer]

    def ep(self, i: int) -> str:
        return f"127.0.0.1:{self.engines[i].port}"

    def url(self, i: int) -> str:
        return self.engines[i].url

    def in_flight(self, i: int) -> int:
        return self.router.ledger.in_flight(self.url(i))

    def stream(self) -> Stream:
        return Stream(self.channel)

    def decisions(self, outcome: str) -> float:
        v = self.epp.metrics.decisions.labels(outcome)._value.get()
        return float(v)


async def until(pred: Callable[[], bool], what: str, tries: int = 500) -> None:
    for _ in range(tries):
        if pred():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"never: {what}")


@contextlib.asynccontextmanager
async def picker(n: int = 2, router: Router | None = None, **cfg: Any) -> AsyncIterator[Picker]:
    engines = [await MockServer(EngineConfig(model="m", time_scale=0.0)).start() for _ in range(n)]
    r = router or Router([BackendSpec(e.url) for e in engines], RouterConfig(probe_interval_s=0.05, **cfg))
    await r.start()
    epp = EndpointPicker(r)
    await epp.start("127.0.0.1", 0, 0, period_s=0.02)
    ch = grpc.aio.insecure_channel(f"127.0.0.1:{epp.ports[0]}")
    hch = grpc.aio.insecure_channel(f"127.0.0.1:{epp.ports[1]}")
    try:
        yield Picker(r, epp, ch, hch, engines)
    finally:
        await ch.close()
        await hch.close()
        await epp.stop(0)
        await r.stop()
        for e in engines:
            await e.shutdown(0)


async def test_headers_then_body_answer_the_pick_in_header_and_metadata_then_echo_the_body() -> None:
    async with picker() as p:
        s = p.stream()
        body = chat(text="a question")
        a = await s.request(body)
        assert a.kind == "route"
        assert a.header == a.metadata  # the protocol: never two different values
        assert sorted(a.endpoints) == sorted([p.ep(0), p.ep(1)])  # primary, then the fallback
        assert a.body == body and a.eos
        primary = a.endpoints[0]
        i = [p.ep(0), p.ep(1)].index(primary)
        assert p.in_flight(i) == 1  # the load is held while the response streams
        await s.respond(primary)
        await until(lambda: p.in_flight(i) == 0, "response end releases the load")
        await s.close()
        assert p.decisions("routed") == 1
        text = generate_latest(p.router.metrics.registry).decode()  # the router's own /metrics
        assert 'toposerve_router_epp_decisions_total{outcome="routed"} 1.0' in text
        assert "toposerve_router_epp_decision_seconds_count 1.0" in text
        assert 'toposerve_router_decisions_total{reason="auto_load",strategy="auto"} 1.0' in text


async def test_a_body_streamed_in_chunks_is_picked_once_whole_and_echoed_in_order() -> None:
    async with picker() as p:
        s = p.stream()
        body = chat(text="x" * 150_000)  # more than two of Envoy's 62,000-byte pieces
        a = await s.request(body, chunks=7)
        assert a.kind == "route" and a.body == body and a.eos
        pieces = [m.request_body.response.body_mutation.streamed_response.body for m in a.messages[1:]]
        assert len(pieces) >= 3 and all(len(x) <= pr.BODY_CHUNK for x in pieces)
        await s.respond(a.endpoints[0])
        await s.close()


async def test_a_bodiless_request_is_picked_at_its_headers() -> None:
    async with picker() as p:
        s = p.stream()
        a = await s.request(None)
        assert a.kind == "route" and a.header == a.metadata and len(a.messages) == 1
        await s.respond(a.endpoints[0])
        await s.close()


async def test_the_subset_hint_restricts_every_endpoint_returned() -> None:
    async with picker(n=3) as p:
        for _ in range(6):
            s = p.stream()
            a = await s.request(chat(text="same prompt"), subset=[p.ep(1)])
            assert a.kind == "route" and a.endpoints == [p.ep(1)]  # no fallback outside it
            await s.respond(a.endpoints[0])
            await s.close()
        s = p.stream()  # a comma-separated string (header-to-metadata filters write that)
        a = await s.request(chat(), subset=f"{p.ep(0)},{p.ep(2)}")
        assert a.kind == "route" and sorted(a.endpoints) == sorted([p.ep(0), p.ep(2)])
        await s.respond(a.endpoints[0])
        await s.close()


async def test_no_eligible_endpoint_is_an_immediate_503() -> None:
    async with picker() as p:
        s = p.stream()
        a = await s.request(chat(), subset=["10.9.9.9:8000"])
        assert a.kind == "immediate" and a.status == 503
        assert json.loads(a.body)["error"]["code"] == 503
        s = p.stream()
        a = await s.request(chat(), subset=[])  # a present, empty subset: nothing, not everything
        assert a.kind == "immediate" and a.status == 503
        assert p.decisions("503") == 2
    async with picker(n=0) as p:  # no endpoint at all
        a = await p.stream().request(chat())
        assert a.kind == "immediate" and a.status == 503 and a.headers.get("retry-after") == "1"


async def test_a_shed_request_is_an_immediate_429() -> None:
    # one request saturates the one engine; the next is shed at once (no queueing)
    async with picker(n=1, routing=st.Config(max_in_flight=1), queue_timeout_s=0.0) as p:
        held = p.stream()
        a = await held.request(chat())
        assert a.kind == "route"
        b = await p.stream().request(chat())
        assert b.kind == "immediate" and b.status == 429 and b.headers.get("retry-after") == "1"
        assert "saturated" in json.loads(b.body)["error"]["message"]
        assert p.decisions("429") == 1
        await held.respond(a.endpoints[0])
        await until(lambda: p.in_flight(0) == 0, "released")
        c = p.stream()
        assert (await c.request(chat())).kind == "route"  # room again
        await c.respond(p.ep(0))
        await c.close()


async def test_endpoint_served_moves_the_load_and_the_prefix_to_the_endpoint_that_served() -> None:
    async with picker(strategy="prefix-aware") as p:
        prompt = "a long shared system prompt " * 40
        s = p.stream()
        a = await s.request(chat(text=prompt))
        primary, fallback = a.endpoints
        ip, ifb = [p.ep(0), p.ep(1)].index(primary), [p.ep(0), p.ep(1)].index(fallback)
        assert (p.in_flight(ip), p.in_flight(ifb)) == (1, 0)
        pending = p.router.ledger.pending(p.url(ip))
        assert pending > 0
        await s.send(response_headers(fallback))  # Envoy retried on the fallback, which served it
        await s.read(1)
        assert (p.in_flight(ip), p.in_flight(ifb)) == (0, 1)
        assert (p.router.ledger.pending(p.url(ip)), p.router.ledger.pending(p.url(ifb))) == (0, pending)
        await s.send(response_body(b"", True))
        await s.read(1)
        await until(lambda: p.in_flight(ifb) == 0, "released at the response end")
        await s.close()
        s = p.stream()  # the same prompt again: its prefix now lives where it was served
        b = await s.request(chat(text=prompt))
        assert b.endpoints[0] == fallback
        await s.respond(fallback)
        await s.close()


async def test_a_broken_stream_releases_its_load() -> None:
    async with picker(n=1) as p:
        s = p.stream()
        a = await s.request(chat())
        assert a.kind == "route" and p.in_flight(0) == 1
        s.cancel()  # Envoy (or its client) went away mid-response
        await until(lambda: p.in_flight(0) == 0, "a broken stream releases its load")
        assert p.router.active == 0


async def test_bad_json_is_a_400() -> None:
    async with picker(n=1) as p:
        a = await p.stream().request(b"{not json")
        assert a.kind == "immediate" and a.status == 400


async def test_health_liveness_readiness_and_the_ext_proc_service_on_both_ports() -> None:
    engines = [await MockServer(EngineConfig(model="m", time_scale=0.0)).start()]
    router = Router([], RouterConfig(probe_interval_s=0.05), discovering=True)
    async with picker(n=0, router=router) as p:
        for ch in (p.channel, p.health_channel):
            assert await health(ch, pr.LIVENESS) == "SERVING"
            assert await health(ch, pr.READINESS) == "NOT_SERVING"  # discovery has not answered
            assert await health(ch, pr.EXT_PROC_SERVICE) == "NOT_SERVING"
            assert await health(ch, "no-such-service") == "NOT_FOUND"
        router.reconcile({engines[0].url: (BackendSpec(engines[0].url), False)})
        for name in (pr.READINESS, pr.EXT_PROC_SERVICE, pr.LWEPP_HEALTH, ""):
            for ch in (p.channel, p.health_channel):
                for _ in range(500):
                    if await health(ch, name) == "SERVING":
                        break
                    await asyncio.sleep(0.02)
                assert await health(ch, name) == "SERVING", name
        router.begin_drain()
        for _ in range(500):
            if await health(p.health_channel, pr.READINESS) == "NOT_SERVING":
                break
            await asyncio.sleep(0.02)
        assert await health(p.health_channel, pr.READINESS) == "NOT_SERVING"
        assert await health(p.health_channel, pr.LIVENESS) == "SERVING"
    await engines[0].shutdown(0)


async def test_the_gateway_picks_the_member_router_by_the_body_model() -> None:
    llama = [await MockServer(EngineConfig(model="llama", time_scale=0.0)).start()]
    qwen = [await MockServer(EngineConfig(model="qwen", time_scale=0.0)).start()]
    gw = Gateway(RouterConfig(probe_interval_s=0.05))
    gw.deployments_listed([llmd("llama", "llama"), llmd("qwen", "qwen")])
    gw.slices_listed([engine_slice("l-0", "llama", llama), engine_slice("q-0", "qwen", qwen)])
    async with picker(n=0, router=gw) as p:
        for model, eng in (("llama", llama[0]), ("qwen", qwen[0])):
            s = p.stream()
            a = await s.request(chat(model=model))
            assert a.kind == "route" and a.endpoints == [f"127.0.0.1:{eng.port}"], model
            assert gw.active == 1  # the gateway's drain waits for picked requests too
            await s.respond(a.endpoints[0])
            await s.close()
        await until(lambda: gw.active == 0, "released")
        a = await p.stream().request(chat(model="lama"))
        assert a.kind == "immediate" and a.status == 404 and "llama" in json.loads(a.body)["error"]["message"]
        a = await p.stream().request(b"{}")
        assert a.kind == "immediate" and a.status == 400
    for e in (*llama, *qwen):
        await e.shutdown(0)


async def test_the_gateways_picker_admits_tenants_on_the_key_the_data_plane_passes() -> None:
    """Tenants (docs/tenants.md) through the picker: no key 401, a model the tenant may not use
    403, a spent budget 429 with Retry-After, all as ImmediateResponses; an admitted request holds
    its tenant's concurrency until the stream ends."""
    llama = [await MockServer(EngineConfig(model="llama", time_scale=0.0)).start()]
    qwen = [await MockServer(EngineConfig(model="qwen", time_scale=0.0)).start()]
    gw = Gateway(RouterConfig(probe_interval_s=0.05))
    gw.tenants.admission.require_key = True
    policy = {"tenants": {"a": {"models": ["llama"], "budgets": {"requestsPerSecond": 0.001}},
                          "b": {"models": ["*"], "budgets": {"concurrentRequests": 1}}}}  # fmt: skip
    source = TenantSource(tn.parse_policies(policy, "policy"), gw.tenants.admission.set_table)
    keys = {"a": "sk-epp-a-0123456789", "b": "sk-epp-b-0123456789"}
    source.secrets_listed([
        {"metadata": {"name": f"{t}-keys", "namespace": "x", "labels": {"toposerve.io/tenant": t}},
         "data": {"api-keys": base64.b64encode(k.encode()).decode()}}
        for t, k in keys.items()
    ])  # fmt: skip
    gw.deployments_listed([llmd("llama", "llama"), llmd("qwen", "qwen")])
    gw.slices_listed([engine_slice("l-0", "llama", llama), engine_slice("q-0", "qwen", qwen)])

    def auth(tenant: str) -> dict[str, str]:
        return {"authorization": f"Bearer {keys[tenant]}"}

    async with picker(n=0, router=gw) as p:
        a = await p.stream().request(chat(model="llama"))
        assert a.kind == "immediate" and a.status == 401
        a = await p.stream().request(chat(model="qwen"), headers=auth("a"))
        assert a.kind == "immediate" and a.status == 403 and "qwen" in json.loads(a.body)["error"]["message"]
        ok = p.stream()
        a = await ok.request(chat(model="llama"), headers=auth("a"))
        assert a.kind == "route", a
        await ok.respond(a.endpoints[0])
        await ok.close()
        a = await p.stream().request(chat(model="llama"), headers=auth("a"))  # one request per 1,000 s
        assert a.kind == "immediate" and a.status == 429 and int(a.headers["retry-after"]) >= 1
        held = p.stream()
        a = await held.request(chat(model="qwen"), headers={"x-api-key": keys["b"]})
        assert a.kind == "route"
        assert gw.tenants.admission.in_flight("b") == 1
        a = await p.stream().request(chat(model="qwen"), headers={"x-api-key": keys["b"]})
        assert a.kind == "immediate" and a.status == 429  # concurrentRequests 1
        await held.respond(f"127.0.0.1:{qwen[0].port}")
        await held.close()
        await until(lambda: gw.tenants.admission.in_flight("b") == 0, "the stream's end released the slot")
    for e in (*llama, *qwen):
        await e.shutdown(0)


async def test_the_gateways_picker_queues_by_band_while_saturated_and_settles_from_the_response() -> None:
    """With tenants the picker waits in the same flow-control queue as the HTTP path (the
    critical band goes before the sheddable one that came first) instead of refusing, and
    settles tokens per minute from the usage in the response body Envoy streams through."""
    llama = [await MockServer(EngineConfig(model="llama", time_scale=0.0)).start()]
    gw = Gateway(RouterConfig(probe_interval_s=0.05, routing=st.Config(max_in_flight=1)))
    policy = {"tenants": {"b": {"priority": "critical"}, "c": {"priority": "sheddable"},
                          "a": {"budgets": {"tokensPerMinute": 1000}}}}  # fmt: skip
    source = TenantSource(tn.parse_policies(policy, "policy"), gw.tenants.admission.set_table)
    keys = {t: f"sk-epp-{t}-0123456789" for t in "abc"}
    source.secrets_listed([
        {"metadata": {"name": f"{t}-keys", "namespace": "x", "labels": {"toposerve.io/tenant": t}},
         "data": {"api-keys": base64.b64encode(k.encode()).decode()}}
        for t, k in keys.items()
    ])  # fmt: skip
    gw.deployments_listed([llmd("llama", "llama")])
    gw.slices_listed([engine_slice("l-0", "llama", llama)])
    ep = f"127.0.0.1:{llama[0].port}"

    def key(t: str) -> dict[str, str]:
        return {"x-api-key": keys[t]}

    async with picker(n=0, router=gw) as p:
        await until(lambda: gw.routable().get("llama", 0) > 0, "llama routable")
        member = gw.members["x/llama"] if "x/llama" in gw.members else next(iter(gw.members.values()))
        holder = p.stream()
        assert (await holder.request(chat(model="llama"), headers=key("b"))).kind == "route"
        shed, crit = p.stream(), p.stream()
        shed_answer = asyncio.create_task(shed.request(chat(model="llama"), headers=key("c")))
        await until(lambda: member.queued == 1, "the sheddable request waits")
        crit_answer = asyncio.create_task(crit.request(chat(model="llama"), headers=key("b")))
        await until(lambda: member.queued == 2, "the critical one waits too")
        assert not shed_answer.done() and not crit_answer.done()  # waiting, not refused
        await holder.respond(ep)
        await holder.close()
        a = await crit_answer
        assert a.kind == "route" and a.endpoints == [ep]
        assert member.queued == 1 and not shed_answer.done()  # the critical band went first
        await crit.respond(ep)
        await crit.close()
        assert (await shed_answer).kind == "route"
        await shed.respond(ep)
        await shed.close()
        await until(lambda: member.queued == 0 and not gw.tenants.queues, "the queue is empty")

        # usage settled from the response body: 12 tokens used of the ~70 reserved
        s = p.stream()
        assert (await s.request(chat(model="llama", max_tokens=64), headers=key("a"))).kind == "route"
        bucket = gw.tenants.admission._state["a"].tpm
        assert bucket is not None and bucket.level < 1000 - 60
        body = json.dumps({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 7}}).encode()
        await s.respond(ep, body)
        await s.close()
        await until(lambda: gw.tenants.admission.in_flight("a") == 0, "finished")
        assert 1000 - 12 - 1e-6 <= bucket.level <= 1000  # refunded down to the 12 used (refill: up to full)
        assert gw.tenants.tokens.labels("a", "llama", "prompt")._value.get() == 5
        assert gw.tenants.tokens.labels("a", "llama", "completion")._value.get() == 7
        assert gw.tenants.requests.labels("a", "llama", "200")._value.get() == 1
    await llama[0].shutdown(0)
