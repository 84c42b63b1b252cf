"""The router's LoRA adapter handling (proxy.py + lora.py) against real mock engines with LoRA
(toposerve.mockengine: --enable-lora, /v1/load_lora_adapter, /v1/unload_lora_adapter,
/v1/models with parent, vllm:lora_requests_info). No assertion depends on timing: "eventually"
loops poll a condition a bounded number of times."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from toposerve.mockengine.lora import LoRAConfig
from toposerve.mockengine.server import EngineConfig, MockServer
from toposerve.router import adapters as ad
from toposerve.router import lora as lr
from toposerve.router.endpoints import BackendSpec
from toposerve.router.proxy import Router, RouterConfig, serve

MODEL = "mock-model"


async def until(pred: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        assert loop.time() < deadline, f"not within {timeout}s: {what}"
        await asyncio.sleep(0.02)


def adapter_dir(root: Path, name: str) -> str:
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "adapter_config.json").write_text(
        json.dumps({"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]})
    )
    (d / "adapter_model.safetensors").write_bytes(b"\0" * 16)
    return str(d)


def engine_cfg(max_loras: int = 1, max_cpu_loras: int = 2, time_scale: float = 0.0) -> EngineConfig:
    return EngineConfig(
        model=MODEL,
        time_scale=time_scale,
        max_model_len=2048,
        lora=LoRAConfig(
            enabled=True, max_loras=max_loras, max_cpu_loras=max_cpu_loras, load_s=0.001, swap_s=0.0
        ),
        allow_runtime_lora_updating=True,
    )


async def engine(**kw: Any) -> MockServer:
    return await MockServer(engine_cfg(**kw)).start()


def held(srv: MockServer) -> set[str]:
    assert srv.engine is not None
    return set(srv.engine.loras)


@contextlib.asynccontextmanager
async def router_for(
    engines: list[MockServer],
    adapters: dict[str, str],
    probe: bool = False,
    slots: int = 2,
    **cfg: Any,
) -> AsyncIterator[tuple[Router, str]]:
    opts = lr.Options(slots=slots, refresh_s=0.05, placement=cfg.pop("placement", ad.Config()))
    rc = RouterConfig(expose_backend=True, probe_interval_s=0.05, adapters=opts, **cfg)
    router = Router([BackendSpec(e.url) for e in engines], rc)
    router.set_adapters(adapters)
    runner: web.AppRunner = await serve(router, "127.0.0.1", 0, probe=probe)
    try:
        yield router, f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def complete(
    s: aiohttp.ClientSession, base: str, model: str, status: int = 200, **extra: Any
) -> tuple[str, dict[str, Any]]:
    body = {"model": model, "prompt": "hello there", "max_tokens": 2, **extra}
    async with s.post(base + "/v1/completions", json=body) as r:
        doc = await r.json()
        assert r.status == status, doc
        return r.headers.get("x-toposerve-backend", ""), doc


def sample(router: Router, name: str, **labels: str) -> float:
    return router.metrics.registry.get_sample_value(name, labels) or 0.0


def loads(router: Router, reason: str = lr.L_REQUEST) -> float:
    return sum(
        sample(router, "toposerve_router_lora_loads_total", backend=u, reason=reason) for u in router.backends
    )


async def test_cold_request_loads_once_then_hits_and_base_model_is_unaffected(tmp_path: Path) -> None:
    a, b = await engine(), await engine()
    spec = {"sql": adapter_dir(tmp_path, "sql")}
    try:
        async with router_for([a, b], spec) as (router, base), aiohttp.ClientSession() as s:
            first, doc = await complete(s, base, "sql")
            assert doc["model"] == "sql"
            holder = a if first == a.url else b
            assert held(holder) == {"sql"} and held(b if holder is a else a) == set()
            for _ in range(4):
                assert (await complete(s, base, "sql"))[0] == first  # routed to the holder
            assert loads(router) == 1
            assert sample(router, "toposerve_router_lora_requests_total", outcome="load") == 1
            assert sample(router, "toposerve_router_lora_requests_total", outcome="hit") == 4
            assert sample(router, "toposerve_router_lora_load_seconds_count") == 1
            # the base model goes anywhere, as before
            seen = {(await complete(s, base, MODEL))[0] for _ in range(6)}
            assert seen == {a.url, b.url}
            # /v1/models: the base model and the spec's adapters (with parent)
            async with s.get(base + "/v1/models") as r:
                cards = {c["id"]: c for c in (await r.json())["data"]}
            assert cards["sql"]["parent"] == MODEL and cards["sql"]["root"] == spec["sql"]
            assert cards[MODEL].get("parent") is None
    finally:
        await a.stop()
        await b.stop()


async def test_concurrent_requests_wait_for_the_same_load(tmp_path: Path) -> None:
    a = await engine()
    spec = {"sql": adapter_dir(tmp_path, "sql")}
    try:
        async with router_for([a], spec) as (router, base), aiohttp.ClientSession() as s:
            got = await asyncio.gather(*(complete(s, base, "sql") for _ in range(8)))
            assert {u for u, _ in got} == {a.url}
            assert loads(router) == 1
            assert sample(router, "toposerve_router_lora_load_failures_total", backend=a.url, kind="400") == 0
    finally:
        await a.stop()


async def test_least_recently_used_adapter_is_evicted_never_one_in_use(tmp_path: Path) -> None:
    a = await engine(max_loras=1, max_cpu_loras=1, time_scale=20.0)
    spec = {n: adapter_dir(tmp_path, n) for n in ("x", "y", "z")}
    try:
        async with (
            router_for([a], spec, slots=1, queue_timeout_s=0.3) as (router, base),
            aiohttp.ClientSession() as s,
        ):
            await complete(s, base, "x")
            assert held(a) == {"x"}
            await complete(s, base, "y")  # one slot: x (least recently used, idle) goes
            assert held(a) == {"y"}
            assert sample(router, "toposerve_router_lora_evictions_total", backend=a.url) == 1
            assert sample(router, "toposerve_router_lora_unloads_total", backend=a.url, reason="evicted") == 1
            # y busy: z cannot take its slot; refused after the queue timeout, y untouched
            body = {"model": "y", "prompt": "long one", "max_tokens": 40, "stream": True}
            async with s.post(base + "/v1/completions", json=body) as stream:
                assert stream.status == 200
                await stream.content.readline()
                e = router.lora.engines[a.url]
                await until(lambda: e.in_use.get("y") == 1, "y in flight")
                _, doc = await complete(s, base, "z", status=503)
                assert "no adapter slot" in doc["error"]["message"]
                assert held(a) == {"y"}
                rest = await stream.read()
            assert rest.rstrip().endswith(b"data: [DONE]")
            await complete(s, base, "z")  # y idle again: evicted for z
            assert held(a) == {"z"}
    finally:
        await a.stop()


async def test_a_broken_adapter_never_evicts_a_working_one_and_is_not_reloaded_per_request(
    tmp_path: Path,
) -> None:
    """Seen on the local cluster: a request for an adapter whose source is missing evicted the
    working adapters of both replicas before its load failed. Now the load comes first and the
    eviction only after it succeeded; and for a while the failure is answered again without a load."""
    a = await engine(max_loras=1, max_cpu_loras=1)
    spec = {"x": adapter_dir(tmp_path, "x"), "ghost": str(tmp_path / "nowhere")}
    try:
        async with router_for([a], spec, slots=1) as (router, base), aiohttp.ClientSession() as s:
            await complete(s, base, "x")
            assert held(a) == {"x"}
            for _ in range(3):
                _, doc = await complete(s, base, "ghost", status=404)
                assert "No adapter found" in doc["error"]["message"]
            assert held(a) == {"x"}  # never evicted for an adapter that does not load
            assert sample(router, "toposerve_router_lora_evictions_total", backend=a.url) == 0
            fails = sample(router, "toposerve_router_lora_load_failures_total", backend=a.url, kind="404")
            assert fails == 1  # tried once; the next two got the same answer without a load
            await complete(s, base, "x")  # still a hit, no load
            assert loads(router) == 1
    finally:
        await a.stop()


async def test_removed_adapter_finishes_its_requests_then_is_unloaded(tmp_path: Path) -> None:
    a = await engine(time_scale=20.0)
    spec = {n: adapter_dir(tmp_path, n) for n in ("x", "y")}
    try:
        async with router_for([a], spec, probe=True) as (router, base), aiohttp.ClientSession() as s:
            await complete(s, base, "x")
            await complete(s, base, "y")
            body = {"model": "x", "prompt": "long one", "max_tokens": 40, "stream": True}
            async with s.post(base + "/v1/completions", json=body) as stream:
                assert stream.status == 200
                await stream.content.readline()
                await until(lambda: router.lora.engines[a.url].in_use.get("x") == 1, "x in flight")
                router.set_adapters({"y": spec["y"]})  # x removed from the spec
                _, doc = await complete(s, base, "x", status=404)  # new requests: as vLLM answers
                assert doc["error"]["message"] == "The model `x` does not exist."
                assert doc["error"]["param"] == "model"
                assert "x" in held(a)  # still serving the stream
                rest = await stream.read()
            assert rest.rstrip().endswith(b"data: [DONE]")  # never cut
            await until(lambda: held(a) == {"y"}, "x unloaded once idle")
            assert sample(router, "toposerve_router_lora_unloads_total", backend=a.url, reason="removed") == 1
            await complete(s, base, "y")
            # added back: served again
            router.set_adapters(spec)
            await complete(s, base, "x")
    finally:
        await a.stop()


async def test_restarted_engine_gets_its_adapters_back(tmp_path: Path) -> None:
    a = await engine()
    spec = {n: adapter_dir(tmp_path, n) for n in ("x", "y")}
    port = a.port
    try:
        async with router_for([a], spec) as (router, base), aiohttp.ClientSession() as s:
            await complete(s, base, "x")
            await complete(s, base, "y")
            assert held(a) == {"x", "y"}
            await a.stop()
            a = await MockServer(engine_cfg(), port=port).start()  # same URL, nothing registered
            assert held(a) == set()
            # a request meets the engine's 404 before any probe noticed: loaded again, served
            url, _ = await complete(s, base, "x")
            assert url == a.url and "x" in held(a)
            # the probe notices y is gone and registers it again
            await router.probe_all()
            await until(lambda: held(a) == {"x", "y"}, "y reloaded")
            assert loads(router, lr.L_RELOAD) >= 1  # y (and x, when the upkeep saw the 404 first)
    finally:
        await a.stop()


async def test_failed_load_tries_another_replica_then_answers_the_engines_error(tmp_path: Path) -> None:
    a, b = await engine(), await engine()
    spec = {"broken": str(tmp_path / "nowhere"), "ok": adapter_dir(tmp_path, "ok")}
    try:
        async with router_for([a, b], spec) as (router, base), aiohttp.ClientSession() as s:
            _, doc = await complete(s, base, "broken", status=404)
            assert "broken" in doc["error"]["message"] and "No adapter found" in doc["error"]["message"]
            fails = [
                sample(router, "toposerve_router_lora_load_failures_total", backend=u, kind="404")
                for u in (a.url, b.url)
            ]
            assert fails == [1, 1]
            assert sample(router, "toposerve_router_lora_requests_total", outcome="failed") == 1
            await complete(s, base, "ok")  # the others are unaffected
            # /health reports each adapter: where it is loaded, its last load error (status.gateway)
            async with s.get(base + "/health") as r:
                report = (await r.json())["adapters"]
            assert report["ok"] == {"replicas": 1, "lastError": None}
            assert report["broken"]["replicas"] == 0 and "No adapter found" in report["broken"]["lastError"]
    finally:
        await a.stop()
        await b.stop()


async def test_two_routers_share_the_engines_load_is_idempotent(tmp_path: Path) -> None:
    a = await engine()
    spec = {"x": adapter_dir(tmp_path, "x")}
    try:
        async with (
            router_for([a], spec) as (r1, base1),
            router_for([a], spec) as (r2, base2),
            aiohttp.ClientSession() as s,
        ):
            await complete(s, base1, "x")
            await complete(s, base2, "x")  # vLLM answers "already loaded": success
            assert held(a) == {"x"}
            assert loads(r1) == 1 and loads(r2) == 1
            assert sample(r2, "toposerve_router_lora_load_failures_total", backend=a.url, kind="400") == 0
    finally:
        await a.stop()


async def test_a_hot_adapter_spreads_to_another_replica(tmp_path: Path) -> None:
    engines = [await engine(time_scale=20.0) for _ in range(3)]
    spec = {"x": adapter_dir(tmp_path, "x")}
    hot = ad.Config(spread_factor=1.25, spread_min=1)
    try:
        async with router_for(engines, spec, placement=hot) as (router, base), aiohttp.ClientSession() as s:
            await complete(s, base, "x")
            body = {"model": "x", "prompt": "long one", "max_tokens": 40, "stream": True}
            streams = [await s.post(base + "/v1/completions", json=body) for _ in range(3)]
            try:
                for r in streams:
                    assert r.status == 200
                    await r.content.readline()
                await until(lambda: sum(1 for e in engines if "x" in held(e)) >= 2, "x on a second replica")
                assert loads(router, lr.L_SPREAD) >= 1
            finally:
                for r in streams:
                    r.close()
            backends = {(await complete(s, base, "x"))[0] for _ in range(6)}
            assert len(backends) >= 2  # both holders serve it
    finally:
        for e in engines:
            await e.stop()


def test_adapter_flags_parse_and_reach_the_config() -> None:
    import argparse

    from toposerve.router import cli

    assert lr.parse_adapter_flags(["a=/p/a", "b = /p/b", "a=/p/a2"]) == {"a": "/p/a2", "b": "/p/b"}
    for bad in ("a", "=x", "a="):
        with pytest.raises(ValueError):
            lr.parse_adapter_flags([bad])
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    args = p.parse_args(["--backends", "http://e:8000", "--adapter", "a=/p/a", "--adapter-slots", "4"])
    assert args.adapters == ["a=/p/a"]
    cfg = cli.config_from_args(args)
    assert cfg.adapters.slots == 4 and cfg.adapters.refresh_s == 5.0
