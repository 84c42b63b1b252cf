"""The gateway (router/gateway.py) on loopback, in front of real mock engines: one endpoint for
several LLMDeployments, fed the LLMDeployment and EndpointSlice objects its watches would hand it,
driven by the openai SDK."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from toposerve.mockengine.server import EngineConfig, MockServer
from toposerve.router.gateway import Gateway
from toposerve.router.proxy import RouterConfig, serve

LLAMA = "meta-llama/Llama-3.1-8B-Instruct"
QWEN = "Qwen/Qwen2.5-7B-Instruct"


def llmd(
    name: str, model: str, ns: str = "team-a", aliases: list[str] | None = None, **spec: Any
) -> dict[str, Any]:
    m: dict[str, Any] = {"name": model, **({"aliases": aliases} if aliases else {})}
    return {
        "metadata": {"name": name, "namespace": ns, "creationTimestamp": "2026-12-01T00:00:00Z"},
        "spec": {"model": m, **spec},
    }


def engine_slice(name: str, dep: str, engines: list[MockServer], ns: str = "team-a") -> dict[str, Any]:
    """An EndpointSlice as the API serves it for an engine Service (labels copied from it)."""
    assert len({e.port for e in engines}) <= 1, "one slice has one port"
    return {
        "metadata": {
            "name": name,
            "namespace": ns,
            "labels": {"toposerve.io/deployment": dep, "app.kubernetes.io/component": "engine"},
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": engines[0].port if engines else 8000}],
        "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": True}} for _ in engines],
    }


async def engine(*names: str, time_scale: float = 0.0) -> MockServer:
    cfg = EngineConfig(model=names[0], served_model_names=list(names), time_scale=time_scale)
    return await MockServer(cfg).start()


async def until(pred: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.02)):
        if pred():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"not within {timeout}s: {what}")


@contextlib.asynccontextmanager
async def gateway(cfg: RouterConfig | None = None, reap_s: float = 1.0) -> AsyncIterator[tuple[Gateway, str]]:
    gw = Gateway(cfg or RouterConfig(expose_backend=True, probe_interval_s=0.05), reap_period_s=reap_s)
    runner = await serve(gw, "127.0.0.1", 0)
    try:
        yield gw, f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def healthy(gw: Gateway, model: str) -> bool:
    return gw.routable().get(model, 0) > 0


async def test_one_endpoint_routes_each_model_and_alias_to_its_own_deployment() -> None:
    llama, qwen = await engine(LLAMA, "llama"), await engine(QWEN)
    try:
        async with gateway() as (gw, base):
            async with aiohttp.ClientSession() as s, s.get(base + "/health") as r:
                assert r.status == 503  # nothing heard from the watches yet: not ready
            gw.deployments_listed([llmd("llama", LLAMA, aliases=["llama"]), llmd("qwen", QWEN)])
            gw.slices_listed(
                [engine_slice("llama-x", "llama", [llama]), engine_slice("qwen-x", "qwen", [qwen])]
            )
            await until(lambda: healthy(gw, LLAMA) and healthy(gw, QWEN), "both deployments healthy")
            client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="none", max_retries=0)
            for model, srv in ((LLAMA, llama), ("llama", llama), (QWEN, qwen)):
                raw = await client.chat.completions.with_raw_response.create(
                    model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=3
                )
                assert raw.headers["x-toposerve-backend"] == srv.url
                assert raw.parse().model == model
            stream = await client.completions.create(model=QWEN, prompt="count", max_tokens=4, stream=True)
            assert len([c async for c in stream]) >= 4
            listed = {m.id for m in (await client.models.list()).data}
            assert listed == {LLAMA, "llama", QWEN}
            async with aiohttp.ClientSession() as s, s.get(base + "/health") as r:
                assert r.status == 200
                assert (await r.json())["models"] == {LLAMA: 1, "llama": 1, QWEN: 1}
    finally:
        await llama.stop()
        await qwen.stop()


async def test_unknown_model_is_a_404_naming_the_closest_and_a_missing_model_a_400() -> None:
    async with gateway() as (gw, base):
        gw.deployments_listed([llmd("llama", LLAMA)])
        gw.slices_listed([])
        client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.NotFoundError) as e:
            await client.completions.create(
                model="meta-llama/Llama-3.1-8b-instruct", prompt="x", max_tokens=1
            )
        assert e.value.status_code == 404
        assert f"`{LLAMA}`" in str(e.value) and "does not exist" in str(e.value)
        async with aiohttp.ClientSession() as s, s.post(base + "/v1/completions", json={"prompt": "x"}) as r:
            assert r.status == 400
            assert "`model`" in (await r.json())["error"]["message"]


async def test_a_model_at_zero_replicas_is_held_until_a_replica_appears() -> None:
    srv = await engine(LLAMA)
    try:
        async with gateway(RouterConfig(hold_at_zero_s=30, probe_interval_s=0.05)) as (gw, base):
            gw.deployments_listed([llmd("llama", LLAMA, routing={"mode": "gateway"})])
            gw.slices_listed([])
            client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="none", max_retries=0)
            req = asyncio.create_task(client.completions.create(model=LLAMA, prompt="x", max_tokens=2))
            member = gw.members["team-a/llama"]
            await until(lambda: member.held == 1, "the request is held")
            gw.slice_event("ADDED", engine_slice("llama-x", "llama", [srv]))
            assert (await asyncio.wait_for(req, 20)).choices
            assert member.held == 0
    finally:
        await srv.stop()


async def test_removing_a_deployment_finishes_its_streams_and_then_answers_404() -> None:
    srv = await engine(LLAMA, time_scale=1.0)  # 64 tokens: most of a second of streaming
    try:
        async with gateway(reap_s=0.01) as (gw, base):  # a removed member is stopped once idle: at once
            obj = llmd("llama", LLAMA)
            gw.deployments_listed([obj])
            gw.slices_listed([engine_slice("llama-x", "llama", [srv])])
            await until(lambda: healthy(gw, LLAMA), "healthy")
            client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="none", max_retries=0)
            stream = await client.completions.create(model=LLAMA, prompt="x", max_tokens=64, stream=True)
            it = stream.__aiter__()
            await it.__anext__()  # the stream is under way
            gw.deployment_event("DELETED", obj)
            await asyncio.sleep(0.1)  # ten reaper rounds; the stream has most of a second to go
            assert "team-a/llama" in gw._retired  # kept while its request is in flight
            rest = [c async for c in it]
            assert rest and rest[-1].choices[0].finish_reason == "length"  # ran to its end
            with pytest.raises(openai.NotFoundError):
                await client.completions.create(model=LLAMA, prompt="x", max_tokens=1)
            await until(lambda: not gw._retired, "the removed member router is stopped once idle")
    finally:
        await srv.stop()


async def test_a_mode_none_deployment_is_not_routed_and_a_mode_change_takes_effect() -> None:
    srv = await engine(LLAMA)
    try:
        async with gateway() as (gw, _base):
            gw.deployments_listed([llmd("llama", LLAMA, routing={"mode": "none"})])
            gw.slices_listed([engine_slice("llama-x", "llama", [srv])])
            assert gw.table.routes == {}
            gw.deployment_event("MODIFIED", llmd("llama", LLAMA, routing={"mode": "gateway"}))
            await until(lambda: healthy(gw, LLAMA), "routed after the change")
    finally:
        await srv.stop()


async def test_metrics_count_per_model_and_label_member_series_by_deployment() -> None:
    llama, qwen = await engine(LLAMA), await engine(QWEN)
    try:
        async with gateway() as (gw, base):
            gw.deployments_listed([llmd("llama", LLAMA), llmd("qwen", QWEN, ns="team-b")])
            gw.slices_listed(
                [engine_slice("a", "llama", [llama]), engine_slice("b", "qwen", [qwen], ns="team-b")]
            )
            await until(lambda: healthy(gw, LLAMA) and healthy(gw, QWEN), "healthy")
            client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="none", max_retries=0)
            for m in (LLAMA, LLAMA, QWEN):
                await client.completions.create(model=m, prompt="x", max_tokens=1)
            with contextlib.suppress(openai.NotFoundError):
                await client.completions.create(model="<script>", prompt="x", max_tokens=1)
            async with aiohttp.ClientSession() as s, s.get(base + "/metrics") as r:
                text = await r.text()
            fams = {f.name: f for f in text_string_to_metric_families(text)}  # parses: no duplicate family
            reqs = {
                (x.labels["model"], x.labels["code"]): x.value
                for x in fams["toposerve_gateway_requests"].samples
                if x.name.endswith("_total")
            }
            assert reqs == {(LLAMA, "200"): 2, (QWEN, "200"): 1, ("unknown", "404"): 1}
            ttft = {x.labels["model"]: x.value for x in fams["toposerve_gateway_ttft_seconds"].samples
                    if x.name.endswith("_count")}  # fmt: skip
            assert ttft == {LLAMA: 2, QWEN: 1}
            tokens = {(x.labels["model"], x.labels["kind"]): x.value
                      for x in fams["toposerve_gateway_tokens"].samples if x.name.endswith("_total")}  # fmt: skip
            assert (
                tokens[(LLAMA, "completion")] == 2 and tokens[(QWEN, "completion")] == 1
            )  # max_tokens 1 each
            assert tokens[(LLAMA, "prompt")] > 0 and tokens[(QWEN, "prompt")] > 0
            member = {
                (x.labels["llmdeployment_namespace"], x.labels["llmdeployment"])
                for x in fams["toposerve_router_requests"].samples
                if x.name.endswith("_total")
            }
            assert member == {("team-a", "llama"), ("team-b", "qwen")}
            assert "127.0.0.1" not in text  # backend addresses stay off the client port
    finally:
        await llama.stop()
        await qwen.stop()


def test_static_config_builds_the_objects_the_watches_would_deliver(tmp_path: Any) -> None:
    """`toposerve gateway --static-config` (benchmarks, local runs): the same table and backends."""
    import yaml

    from toposerve.router.gateway_cli import static_config

    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump({
        "deployments": [llmd("llama", LLAMA, aliases=["l"])],
        "backends": {"team-a/llama": ["http://127.0.0.1:8001", "http://127.0.0.1:8002"]},
    }))  # fmt: skip
    objs, slices = static_config(str(path))
    gw = Gateway()
    gw.deployments_listed(objs)
    gw.slices_listed(slices)
    assert sorted(gw.members["team-a/llama"].backends) == ["http://127.0.0.1:8001", "http://127.0.0.1:8002"]
    assert gw.table.resolve("l") is not None and not gw.discovering


async def test_member_routers_keep_as_many_adapters_per_engine_as_a_dedicated_router() -> None:
    """A member gets spec.lora's maxCpuLoras as its adapter slots, as the dedicated router's
    --adapter-slots (render/objects.py): without it, it would fall back to the engine's max_lora
    and evict adapters the engines still keep."""
    async with gateway() as (gw, _):
        gw.deployments_listed([
            llmd("llama", LLAMA, lora={"maxLoras": 2, "maxCpuLoras": 16}),
            llmd("small", QWEN, lora={"maxLoras": 4}),
            llmd("plain", "other/model"),
        ])  # fmt: skip
        slots = {k.split("/")[1]: m.cfg.adapters.slots for k, m in gw.members.items()}
        assert slots == {"llama": 16, "small": 4, "plain": gw.template.adapters.slots}
        # a spec change reaches the running member's adapter manager
        gw.deployments_listed([llmd("llama", LLAMA, lora={"maxLoras": 2, "maxCpuLoras": 8})])
        member = gw.members["team-a/llama"]
        assert member.cfg.adapters.slots == member.lora.opts.slots == 8


async def test_a_member_routes_on_kv_events_exactly_when_its_deployment_renders_them() -> None:
    """spec.routing.kvEvents makes the engines publish (render); the gateway's member for that
    deployment subscribes (catching up by replay) and indexes what the engine caches, a member of
    a deployment without it does not, and a spec change turns it on or off in the running member."""
    from toposerve.kvevents.index import key
    from toposerve.kvevents.publisher import KVEventsConfig
    from toposerve.router.kvindex import KVEventsOptions

    pub_cfg = KVEventsConfig(
        enable_kv_cache_events=True, endpoint="tcp://127.0.0.1:*", replay_endpoint="tcp://127.0.0.1:*"
    )
    srv = await MockServer(EngineConfig(model=LLAMA, time_scale=0.0, kv_events=pub_cfg)).start()
    pub = srv.engine.kv_publisher
    assert pub is not None and pub.replay_endpoint
    # under discovery a backend is a pod IP: the member finds the engine's sockets on the
    # convention ports, here the test engine's
    opts = KVEventsOptions(
        port=int(pub.endpoint.rsplit(":", 1)[1]), replay_port=int(pub.replay_endpoint.rsplit(":", 1)[1])
    )
    cfg = RouterConfig(expose_backend=True, probe_interval_s=0.05, kv_events=opts)
    try:
        async with gateway(cfg) as (gw, base):
            gw.deployments_listed([llmd("llama", LLAMA, routing={"kvEvents": True}), llmd("qwen", QWEN)])
            gw.slices_listed([engine_slice("llama-x", "llama", [srv])])
            await until(lambda: healthy(gw, LLAMA), "llama healthy")
            member = gw.members["team-a/llama"]
            assert gw.members["team-a/qwen"].kvindex is None
            client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="none", max_retries=0)
            await client.completions.create(model=LLAMA, prompt="one two three " * 40, max_tokens=2)
            cached = {key(h) for h in srv.engine.scheduler.blocks._cached}

            def indexed() -> set[int]:
                kv = member.kvindex
                return kv.feeds[srv.url].index.keys() if kv is not None and srv.url in kv.feeds else set()

            await until(
                lambda: cached != set() and indexed() == cached, "the member indexes the engine's blocks"
            )
            gw.deployments_listed([llmd("llama", LLAMA), llmd("qwen", QWEN)])  # kvEvents removed
            await until(lambda: gw.members["team-a/llama"].kvindex is None, "subscriptions closed")
            gw.deployments_listed([llmd("llama", LLAMA, routing={"kvEvents": True}), llmd("qwen", QWEN)])
            await until(lambda: indexed() == cached, "on again: caught up by replay")
    finally:
        await srv.stop()
