"""KV-event routing for LoRA adapters' requests: vLLM 0.33.0 hashes an adapter's blocks with
("lora", name, path) on every block (v1/core/kv_cache_utils.py _gen_lora_extra_hash_keys; judged
against vLLM's own Request in tests/vllm/test_kv_events.py), so the router names them the same way
and finds an adapter's cached prefix; without the keys nothing would match. Real mock engines over
loopback, publishing their events."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from tests.unit.router.test_router_kv_events import BLOCK, LOOPBACK, MODEL, index_keys, spec, until
from tests.unit.router.test_router_lora import adapter_dir

from toposerve.kvevents.index import key
from toposerve.mockengine.lora import LoRAConfig
from toposerve.mockengine.server import EngineConfig, MockServer
from toposerve.router import lora as lr
from toposerve.router import strategies as st
from toposerve.router.kvindex import KVEventsOptions
from toposerve.router.proxy import Router, RouterConfig, serve


async def test_an_adapters_cached_prefix_is_found_under_its_own_block_names(tmp_path: Path) -> None:
    cfg = EngineConfig(
        model=MODEL, time_scale=0.0, num_gpu_blocks=256, block_size=BLOCK, max_model_len=1024, kv_events=LOOPBACK,
        lora=LoRAConfig(enabled=True, max_loras=1, max_cpu_loras=2, load_s=0.001, swap_s=0.0),
        allow_runtime_lora_updating=True,
    )  # fmt: skip
    srv = await MockServer(cfg).start()
    path = adapter_dir(tmp_path, "sql")
    rc = RouterConfig(
        strategy=st.AUTO, expose_backend=True, probe_interval_s=0.05,
        kv_events=KVEventsOptions(enabled=True, block_size=BLOCK), adapters=lr.Options(slots=2, refresh_s=0.05),
    )  # fmt: skip
    router = Router([spec(srv)], rc)
    router.set_adapters({"sql": path})
    runner: web.AppRunner = await serve(router, "127.0.0.1", 0)
    assert router.kvindex is not None
    scored: list[Any] = []
    real = router.kvindex.score

    def record(keys: list[int], *a: Any, **kw: Any) -> Any:
        out = real(keys, *a, **kw)
        scored.append((keys, out))
        return out

    router.kvindex.score = record  # type: ignore[method-assign]
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    prompt = "select the rows where " + " ".join(f"col{j}" for j in range(60))
    try:
        async with aiohttp.ClientSession() as s:

            async def complete(model: str) -> None:
                body = {"model": model, "prompt": prompt, "max_tokens": 2}
                async with s.post(base + "/v1/completions", json=body) as r:
                    assert r.status == 200, await r.text()

            await complete("sql")  # loads the adapter, caches its blocks
            cached = {key(h) for h in srv.engine.scheduler.blocks._cached}
            await until(lambda: index_keys(router, srv) == cached != set(), "index caught up")
            n = len(scored)
            await complete("sql")
            await complete(MODEL)
        (again_keys, again), (base_keys, base_scored) = scored[n:]
        assert set(again_keys) <= cached
        assert again.matched[srv.url] == len(again_keys) > 0  # the adapter's whole prompt is cached
        # the base model's blocks of the same text are other blocks, and none of them is cached
        assert not set(base_keys) & set(again_keys) and base_scored.matched.get(srv.url, 0) == 0
    finally:
        await runner.cleanup()
        await srv.stop()
