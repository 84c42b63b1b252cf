"""The router stages URL and pinned-revision adapters through the pod's stager before loading them
(lora.py), against real mock engines, a real stager (adapterstage) and real file/Hub servers on
loopback. Engines and stager share 127.0.0.1 here, as an engine and its sidecar share a pod IP."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from tests.unit.adapterstage.loopback import adapter_files, fake_hub, file_server, tar_bytes
from tests.unit.router.test_router_lora import MODEL, complete, engine, held

from toposerve.adapterstage.server import Stager, make_app
from toposerve.adapterstage.sources import staged_path
from toposerve.router import lora as lr
from toposerve.router.endpoints import BackendSpec
from toposerve.router.proxy import Router, RouterConfig, serve


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for v in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(v, raising=False)


@pytest.fixture
def archives() -> Iterator[str]:
    good = tar_bytes(adapter_files())
    with file_server({"sql.tgz": good, "cut.tgz": good[:40]}) as (url, _):
        yield url


@contextlib.asynccontextmanager
async def stager(root: Path) -> AsyncIterator[int]:
    runner = web.AppRunner(make_app(Stager(root)))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def router_for(
    urls: list[str], adapters: dict[str, str], port: int, root: Path
) -> AsyncIterator[tuple[Router, str]]:
    opts = lr.Options(slots=2, refresh_s=0.05, stage_port=port, stage_root=str(root))
    router = Router(
        [BackendSpec(u) for u in urls],
        RouterConfig(expose_backend=True, probe_interval_s=0.05, adapters=opts),
    )
    router.set_adapters(adapters)
    runner: web.AppRunner = await serve(router, "127.0.0.1", 0, probe=False)
    try:
        yield router, f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def test_url_adapter_is_staged_then_loaded_and_a_broken_one_reports_its_source(
    archives: str, tmp_path: Path
) -> None:
    root = tmp_path / "stage"
    good, cut = f"{archives}/sql.tgz", f"{archives}/cut.tgz"
    a = await engine()
    try:
        async with (
            stager(root) as port,
            router_for([a.url], {"sql": good, "broken": cut}, port, root) as (router, base),
            aiohttp.ClientSession() as s,
        ):
            _, doc = await complete(s, base, "sql")
            assert doc["model"] == "sql" and held(a) == {"sql"}
            assert a.engine is not None
            assert router.lora.engines[a.url].registered["sql"] == staged_path(str(root), good)
            # the broken one: its request fails with the stager's message, the report names it
            _, err = await complete(s, base, "broken", status=422)
            assert cut in err["error"]["message"] and "truncated or corrupt" in err["error"]["message"]
            report = router.lora.report()
            assert report["sql"] == {"replicas": 1, "lastError": None}
            last = report["broken"]["lastError"]
            assert last is not None and last.startswith("422 staging " + cut) and "truncated" in last
            # base model and the good adapter keep serving
            await complete(s, base, MODEL)
            await complete(s, base, "sql")
            assert held(a) == {"sql"}
    finally:
        await a.stop()


async def test_hf_revision_adapter_is_staged_at_its_revision(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    pytest.importorskip("huggingface_hub")
    import huggingface_hub.constants as c

    root = tmp_path / "stage"
    with fake_hub({"acme/sql-lora": {"main": adapter_files(8), "v2": adapter_files(16)}}) as (url, seen):
        monkeypatch.setattr(c, "ENDPOINT", url)
        monkeypatch.setattr(
            c, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}"
        )
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
        a = await engine()
        try:
            async with (
                stager(root) as port,
                router_for([a.url], {"sql": "hf://acme/sql-lora@v2"}, port, root) as (_router, base),
                aiohttp.ClientSession() as s,
            ):
                await complete(s, base, "sql")
                assert held(a) == {"sql"}
                assert a.engine is not None
                assert a.engine.loras["sql"][0].rank == 16  # the v2 files, not main's
                assert any(x["path"].endswith("/revision/v2") for x in seen)
        finally:
            await a.stop()


async def test_no_stager_in_the_pod_is_a_clear_load_error(archives: str, tmp_path: Path) -> None:
    a = await engine()
    good = f"{archives}/sql.tgz"
    try:
        async with (
            router_for([a.url], {"sql": good}, 9, tmp_path) as (router, base),
            aiohttp.ClientSession() as s,
        ):
            await complete(s, base, "sql", status=502)
            last = router.lora.report()["sql"]["lastError"]
            assert last is not None and f"staging {good} failed (stager http://127.0.0.1:9)" in last
            await complete(s, base, MODEL)
    finally:
        await a.stop()
