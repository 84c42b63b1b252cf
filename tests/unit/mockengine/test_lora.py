"""LoRA adapters in the mock engine, checked against what vLLM 0.33.0's source does.

Expected messages, status codes and types are the ones read in vLLM 0.33.0
(entrypoints/openai/models/serving.py, entrypoints/serve/engine/serving.py, exceptions.py,
lora/peft_helper.py, v1/engine/core.py, v1/metrics/loggers.py). Servers run with
``time_scale=0`` unless a request must be in flight; load latency is checked in simulated time.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from toposerve.mockengine.lora import (
    Adapter,
    AdapterLoadError,
    LoRAConfig,
    LoRAModule,
    LoRASlots,
    parse_lora_module,
    read_adapter,
    resolve_source,
)
from toposerve.mockengine.protocol import sanitize_message
from toposerve.mockengine.scheduler import Scheduler, SchedulerConfig
from toposerve.mockengine.server import EngineConfig, MockServer
from toposerve.mockengine.timing import TimingModel
from toposerve.mockengine.tokenizer import MockTokenizer, TextGenerator

MODEL = "meta-llama/Llama-3.1-8B-Instruct"


def make_adapter(root: Path, name: str, r: int = 16, **extra: Any) -> str:
    d = root / name
    d.mkdir(parents=True)
    (d / "adapter_config.json").write_text(
        json.dumps({"r": r, "lora_alpha": 2 * r, "target_modules": ["q_proj"], **extra})
    )
    (d / "adapter_model.safetensors").write_bytes(b"")
    return str(d)


# -- pure: sources ---------------------------------------------------------------------------------


def test_read_adapter_accepts_a_peft_dir_and_returns_its_rank(tmp_path: Path) -> None:
    assert read_adapter("a", make_adapter(tmp_path, "a", r=8), None, 16) == 8


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {"r": 64, "lora_alpha": 16, "target_modules": ["q_proj"]},
            "LoRA rank 64 is greater than max_lora_rank 16.",
        ),
        ({"lora_alpha": 16, "target_modules": ["q_proj"]}, "Missing required configuration fields: {'r'}"),
        (
            {"r": 0, "lora_alpha": 16, "target_modules": "all"},
            "LoRA rank `r` must be a positive integer, got 0.",
        ),
        (
            {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], "use_dora": True, "bias": "all"},
            "vLLM does not yet support DoRA. Adapter bias is not supported.",
        ),
        (
            {"r": 8, "lora_alpha": 16, "target_modules": ["q"], "rank_pattern": {"k": 32}},
            "LoRA rank 32 is greater than max_lora_rank 16.",
        ),
    ],
)
def test_read_adapter_errors_are_peft_helpers(tmp_path: Path, config: dict[str, Any], message: str) -> None:
    d = tmp_path / "x"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps(config))
    (d / "adapter_model.bin").write_bytes(b"")
    with pytest.raises(AdapterLoadError) as e:
        read_adapter("x", str(d), None, 16)
    assert (e.value.message, e.value.not_found) == (message, False)


def test_read_adapter_not_found_and_no_tensors(tmp_path: Path) -> None:
    with pytest.raises(AdapterLoadError) as e:
        read_adapter("x", str(tmp_path / "nope"), None, 16)
    assert e.value.not_found
    assert e.value.message == f"Loading lora x failed: No adapter found for {tmp_path / 'nope'}"
    d = tmp_path / "empty"
    d.mkdir()
    (d / "adapter_config.json").write_text('{"r": 8, "lora_alpha": 8, "target_modules": ["q"]}')
    with pytest.raises(AdapterLoadError) as e:
        read_adapter("x", str(d), None, 16)
    assert e.value.message == f"{d} doesn't contain tensors" and not e.value.not_found


def test_hub_ids_resolve_only_under_the_hub_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    hub = tmp_path / "hub"
    make_adapter(hub / "acme", "sql-lora")
    assert resolve_source("acme/sql-lora", str(hub)) == str(hub / "acme" / "sql-lora")
    assert read_adapter("s", "acme/sql-lora", str(hub), 16) == 16
    # no hub: vLLM's failed download hands the id back unchanged, then nothing is there
    assert resolve_source("acme/sql-lora", None) == "acme/sql-lora"
    with pytest.raises(AdapterLoadError) as e:
        read_adapter("s", "acme/sql-lora", None, 16)
    assert (
        e.value.not_found and e.value.message == "Loading lora s failed: No adapter found for acme/sql-lora"
    )
    with pytest.raises(AdapterLoadError):
        read_adapter("s", "acme/missing", str(hub), 16)
    # absolute paths are taken as they are, existing or not; relative existing ones made absolute
    assert resolve_source("/abs/x", str(hub)) == "/abs/x"
    assert resolve_source("hub/acme", None) == os.path.abspath("hub/acme")


def test_parse_lora_modules_as_vllms_parser_action() -> None:
    assert parse_lora_module("sql=/a/b") == LoRAModule("sql", "/a/b")
    assert parse_lora_module('{"name": "s", "path": "/p", "base_model_name": "m"}') == LoRAModule(
        "s", "/p", "m"
    )
    with pytest.raises(ValueError, match="Invalid JSON format for --lora-modules"):
        parse_lora_module("a=b,c")
    with pytest.raises(ValueError, match="Invalid fields for --lora-modules"):
        parse_lora_module('{"name": "s"}')


def test_config_defaults_and_validation() -> None:
    assert LoRAConfig(max_loras=3).cpu_slots == 3  # max_cpu_loras defaults to max_loras
    assert LoRAConfig(max_loras=3, max_cpu_loras=0).cpu_slots == 3  # arg_utils passes only > 0
    with pytest.raises(ValueError, match=r"max_cpu_loras \(1\) must be >= max_loras \(2\)\."):
        LoRAConfig(max_loras=2, max_cpu_loras=1).validate()


def test_sanitize_message_hides_paths_as_vllm_does() -> None:
    assert sanitize_message("No adapter found for /tmp/a/b") == "No adapter found for <path>"
    assert sanitize_message("x /data/models/a.json y") == "x <path> y"
    assert sanitize_message("The model `meta-llama/Llama-3.1-8B` does not exist.") == (
        "The model `meta-llama/Llama-3.1-8B` does not exist."
    )


# -- pure: slots -------------------------------------------------------------------------------------


def ad(i: int, rank: int = 16) -> Adapter:
    return Adapter(i, f"a{i}", f"/p/{i}", rank)


def ids(d: Any) -> list[int]:
    return list(d)


def test_lru_between_gpu_slots_and_cpu_cache() -> None:
    s = LoRASlots(max_loras=2, max_cpu_loras=3, load_s=1.0, swap_s=0.01)
    assert s.add(ad(1)) == pytest.approx(1.01)  # read from disk, then swapped in
    s.add(ad(2))
    s.add(ad(3))  # GPU full: a1 leaves its GPU slot, stays in CPU
    assert (ids(s.gpu), ids(s.cpu)) == ([2, 3], [1, 2, 3])
    assert s.prepare_batch([ad(1)]) == pytest.approx(0.01)  # in CPU: only the swap-in
    assert (ids(s.gpu), ids(s.cpu)) == ([3, 1], [2, 3, 1])
    assert s.prepare_batch([ad(1), ad(3)]) == 0.0  # both on GPU: free, order touched
    assert ids(s.gpu) == [1, 3]
    s.add(ad(4))  # CPU full: least recently used (a2) goes, from everywhere
    assert (ids(s.gpu), ids(s.cpu)) == ([3, 4], [1, 3, 4])
    assert s.prepare_batch([ad(2, rank=8)]) == pytest.approx(0.5 + 0.005)  # disk again; rank 8: half
    assert s.add(ad(4), load_inplace=True) == pytest.approx(1.01)  # in place: dropped, read, swapped in again
    assert (s.stats.loads, s.stats.cpu_evictions) == (6, 2)
    with pytest.raises(
        RuntimeError,
        match=r"Number of requested LoRAs \(3\) is greater than the number of GPU LoRA slots \(2\)\.",
    ):
        s.prepare_batch([ad(1), ad(2), ad(3)])


@settings(max_examples=150, deadline=None)
@given(
    max_loras=st.integers(1, 4),
    extra_cpu=st.integers(0, 3),
    ops=st.lists(st.tuples(st.booleans(), st.lists(st.integers(1, 8), min_size=1, max_size=4)), max_size=40),
)
def test_slots_never_exceed_limits_and_cost_what_they_did(
    max_loras: int, extra_cpu: int, ops: list[tuple[bool, list[int]]]
) -> None:
    s = LoRASlots(max_loras, max_loras + extra_cpu, load_s=1.0, swap_s=0.001)
    for is_load, wanted in ops:
        before = (s.stats.loads, s.stats.swap_ins)
        if is_load:
            cost = s.add(ad(wanted[0]))
            assert ids(s.gpu)[-1] == wanted[0]
        else:
            batch = [ad(i) for i in wanted][:max_loras]
            batch = [a for a in batch if a.int_id in {b.int_id for b in batch}]
            distinct = {a.int_id for a in batch}
            if len(distinct) > max_loras:
                continue
            cost = s.prepare_batch(batch)
            assert distinct <= set(s.gpu)  # the batch's adapters are all on the GPU
        loads, swaps = s.stats.loads - before[0], s.stats.swap_ins - before[1]
        assert cost == pytest.approx(loads * 1.0 + swaps * 0.001)
        assert len(s.gpu) <= max_loras and len(s.cpu) <= max_loras + extra_cpu
        assert set(s.gpu) <= set(s.cpu)


@settings(max_examples=60, deadline=None)
@given(
    max_loras=st.integers(1, 3),
    reqs=st.lists(st.tuples(st.integers(0, 5), st.integers(1, 6)), min_size=1, max_size=25),
)
def test_scheduler_never_runs_more_distinct_adapters_than_max_loras(
    max_loras: int, reqs: list[tuple[int, int]]
) -> None:
    """v1/core/sched/scheduler.py: a waiting request naming a new adapter while max_loras are in the
    running batch is skipped (keeps its place) and later ones are still tried; all finish."""
    sched = Scheduler(
        SchedulerConfig(num_gpu_blocks=512, max_loras=max_loras, max_num_batched_tokens=256),
        TimingModel(),
        MockTokenizer(),
    )
    sched.lora_slots = LoRASlots(max_loras, max_loras, load_s=0.5, swap_s=0.01)
    gen = TextGenerator(0)
    adapters = {i: ad(i) for i in range(1, 6)}
    all_reqs = []
    for n, (lora, out) in enumerate(reqs):
        r = sched.make_request(f"r{n}", [n + 1, 7, 8, 9], out, gen)
        r.lora = adapters.get(lora)  # 0: the base model
        sched.add(r, 0.0)
        all_reqs.append(r)
    now = 0.0
    for _ in range(2000):
        if not sched.has_work:
            break
        stats = sched.step(now)
        now = stats.end
        running = {r.lora.int_id for r in sched.running if r.lora is not None}
        assert len(running) <= max_loras
        assert stats.lora_s >= 0 and stats.duration >= stats.lora_s
    assert all(r.finished for r in all_reqs)


def test_a_skipped_request_keeps_its_place_and_base_requests_pass_it() -> None:
    sched = Scheduler(SchedulerConfig(num_gpu_blocks=512, max_loras=1), TimingModel(), MockTokenizer())
    sched.lora_slots = LoRASlots(1, 2, load_s=0.5, swap_s=0.01)
    gen = TextGenerator(0)
    a, b = sched.make_request("a", [1, 2], 3, gen), sched.make_request("b", [3, 4], 3, gen)
    base = sched.make_request("base", [5, 6], 3, gen)
    a.lora, b.lora = ad(1), ad(2)
    for r in (a, b, base):
        sched.add(r, 0.0)
    stats = sched.step(0.0)
    assert [r.req_id for r in sched.running] == ["a", "base"]
    assert [r.req_id for r in sched.waiting] == ["b"]
    assert stats.lora_s == pytest.approx(0.5 + 0.01)  # a1 read from disk and swapped in, inside the step
    while not a.finished:
        stats = sched.step(stats.end)
    stats = sched.step(stats.end)
    assert b in sched.running
    assert stats.lora_s == pytest.approx(0.5 + 0.01)


# -- HTTP ----------------------------------------------------------------------------------------------


@asynccontextmanager
async def serve(**kw: Any) -> AsyncIterator[tuple[MockServer, aiohttp.ClientSession]]:
    kw.setdefault("model", MODEL)
    kw.setdefault("time_scale", 0.0)
    kw.setdefault("num_gpu_blocks", 1024)
    kw.setdefault("admin", True)
    kw.setdefault("allow_runtime_lora_updating", True)
    kw.setdefault("lora", LoRAConfig(enabled=True))
    server = await MockServer(EngineConfig(**kw)).start()
    try:
        async with aiohttp.ClientSession() as s:
            yield server, s
    finally:
        await server.stop()


async def call(s: aiohttp.ClientSession, url: str, body: Any) -> tuple[int, Any]:
    async with s.post(url, json=body) as r:
        text = await r.text()
        return r.status, json.loads(text) if text.startswith("{") else text


def err(message: str, type_: str, code: int, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


async def state(s: aiohttp.ClientSession, base: str) -> dict[str, Any]:
    async with s.get(base + "/admin/state") as r:
        body: dict[str, Any] = await r.json()
        return body


async def test_load_endpoints_exist_only_with_the_env_var(monkeypatch: pytest.MonkeyPatch) -> None:
    for value, present in (("True ", True), ("1", True), ("yes", False), ("0", False)):
        monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", value)
        async with serve(allow_runtime_lora_updating=None) as (srv, s):
            for route in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
                status, _ = await call(s, srv.url + route, {})  # present: 400, a body without lora_name
                assert status == (400 if present else 404), (value, route)


async def test_load_serve_list_unload_as_vllm(tmp_path: Path) -> None:
    path = make_adapter(tmp_path, "sql")
    async with serve() as (srv, s):
        u = srv.url
        status, body = await call(s, u + "/v1/load_lora_adapter", {"lora_name": "sql", "lora_path": path})
        assert (status, body) == (200, "Success: LoRA adapter 'sql' added successfully.")
        async with s.get(u + "/v1/models") as r:
            cards = (await r.json())["data"]
        assert [list(c) for c in cards] == [
            ["id", "object", "created", "owned_by", "root", "parent", "max_model_len", "permission"]
        ] * 2
        assert [(c["id"], c["root"], c["parent"], c["max_model_len"]) for c in cards] == [
            (MODEL, MODEL, None, 8192),
            ("sql", path, MODEL, None),
        ]
        assert cards[1]["permission"][0]["object"] == "model_permission"
        status, body = await call(
            s, u + "/v1/completions", {"model": "sql", "prompt": "hi there", "max_tokens": 3}
        )
        assert status == 200 and body["model"] == "sql" and body["usage"]["completion_tokens"] == 3
        status, body = await call(
            s,
            u + "/v1/chat/completions",
            {"model": "sql", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2},
        )
        assert status == 200 and body["model"] == "sql"
        # loaded again: 400 unless in place
        status, body = await call(s, u + "/v1/load_lora_adapter", {"lora_name": "sql", "lora_path": path})
        assert (status, body) == (
            400,
            err(
                "The lora adapter 'sql' has already been loaded. If you want to load the adapter in place, "
                "set 'load_inplace' to True.",
                "InvalidUserInput",
                400,
            ),
        )
        status, _ = await call(
            s, u + "/v1/load_lora_adapter", {"lora_name": "sql", "lora_path": path, "load_inplace": True}
        )
        assert status == 200
        st_ = await state(s, u)
        assert [a["id"] for a in st_["lora"]["served"]] == [1]  # in place keeps the id
        status, body = await call(s, u + "/v1/unload_lora_adapter", {"lora_name": "sql", "lora_int_id": 7})
        assert (status, body) == (200, "Success: LoRA adapter 'sql' removed successfully.")
        status, body = await call(s, u + "/v1/unload_lora_adapter", {"lora_name": "sql"})
        assert (status, body) == (404, err("The lora adapter 'sql' cannot be found.", "NotFoundError", 404))
        # unload only forgets the name: the engine keeps the adapter in its slot (vLLM 0.33.0)
        st_ = await state(s, u)
        assert st_["lora"]["served"] == [] and [a["name"] for a in st_["lora"]["gpu"]] == ["sql"]
        status, body = await call(s, u + "/v1/completions", {"model": "sql", "prompt": "x", "max_tokens": 1})
        assert (status, body) == (
            404,
            err(f"The model `sql` does not exist. Valid aliases: {MODEL}.", "NotFoundError", 404, "model"),
        )


async def test_load_errors_as_vllm(tmp_path: Path) -> None:
    big = make_adapter(tmp_path, "big", r=64)
    async with serve(served_model_names=["base", "alias"]) as (srv, s):
        u = srv.url + "/v1/load_lora_adapter"
        cases: list[tuple[dict[str, Any], int, dict[str, Any]]] = [
            ({"lora_name": "", "lora_path": "/x"}, 400, err("Both 'lora_name' and 'lora_path' must be provided.", "InvalidUserInput", 400)),
            ({"lora_name": "alias", "lora_path": "/x"}, 400, err("The lora adapter 'alias' conflicts with a served base model.", "InvalidUserInput", 400)),
            (
                {"lora_name": "n", "lora_path": str(tmp_path / "nope")},
                404,
                err("Loading lora n failed: No adapter found for <path>", "NotFoundError", 404),
            ),
            ({"lora_name": "n", "lora_path": "acme/on-the-hub"}, 404, err("Loading lora n failed: No adapter found for acme/on-the-hub", "NotFoundError", 404)),
            (
                {"lora_name": "big", "lora_path": big},
                500,
                err("Call to add_lora method failed: LoRA rank 64 is greater than max_lora_rank 16.", "InternalServerError", 500),
            ),
        ]  # fmt: skip
        for body, status, expected in cases:
            assert await call(s, u, body) == (status, expected), body
        status, body = await call(s, u, {"lora_path": "/x"})
        assert status == 400 and body["error"]["type"] == "Bad Request"
        assert body["error"]["param"] == "body.lora_name" and body["error"]["message"].startswith(
            "1 validation error:"
        )
        async with s.post(
            u, data=b'{"lora_name": "a", "lora_path": "/x"}', headers={"Content-Type": "text/plain"}
        ) as r:
            assert r.status == 400
        status, body = await call(s, srv.url + "/v1/completions", {"model": "nope", "prompt": "x"})
        assert (status, body) == (
            404,
            err(
                "The model `nope` does not exist. Valid aliases: base, alias.", "NotFoundError", 404, "model"
            ),
        )
        async with s.get(srv.url + "/v1/models") as r:
            assert [c["id"] for c in (await r.json())["data"]] == ["base", "alias"]  # nothing half-loaded


async def test_without_enable_lora_a_load_is_the_engines_500(tmp_path: Path) -> None:
    path = make_adapter(tmp_path, "a")
    for tp, message in (
        (1, "Call to add_lora method failed: LoRA is not enabled. Use --enable-lora to enable LoRA."),
        (
            2,
            "Call to add_lora method failed: Worker failed with error 'LoRA is not enabled. Use --enable-lora to "
            "enable LoRA.', please check the stack trace above for the root cause",
        ),
    ):
        async with serve(lora=LoRAConfig(), tensor_parallel_size=tp) as (srv, s):
            status, body = await call(
                s, srv.url + "/v1/load_lora_adapter", {"lora_name": "a", "lora_path": path}
            )
            assert (status, body) == (500, err(message, "InternalServerError", 500))
            async with s.get(srv.url + "/metrics") as r:
                assert "vllm:lora_requests_info" not in await r.text()


async def test_load_takes_simulated_time_and_requests_for_it_wait(tmp_path: Path) -> None:
    path = make_adapter(tmp_path, "a", r=32)
    cfg = LoRAConfig(enabled=True, max_lora_rank=32, load_s=2.0, swap_s=0.5)
    async with serve(lora=cfg) as (srv, s):
        before = (await state(s, srv.url))["sim_time"]
        assert (await call(s, srv.url + "/v1/load_lora_adapter", {"lora_name": "a", "lora_path": path}))[
            0
        ] == 200
        after = (await state(s, srv.url))["sim_time"]
        assert after - before == pytest.approx((2.0 + 0.5) * 32 / 16)  # rank 32: twice the rank-16 times
    # in real time (scaled): a request naming the adapter while it loads waits for it, not a 404
    async with serve(lora=LoRAConfig(enabled=True, load_s=0.5), time_scale=1.0) as (srv, s):
        load = asyncio.create_task(
            call(
                s,
                srv.url + "/v1/load_lora_adapter",
                {"lora_name": "b", "lora_path": make_adapter(tmp_path, "b")},
            )
        )
        engine = srv.engine
        assert engine is not None
        for _ in range(1000):
            if engine.lora_locks["b"].locked():
                break
            await asyncio.sleep(0.001)
        assert engine.lora_locks["b"].locked()
        status, body = await call(
            s, srv.url + "/v1/completions", {"model": "b", "prompt": "x", "max_tokens": 1}
        )
        assert status == 200 and body["model"] == "b"
        assert (await load)[0] == 200


async def test_max_loras_swaps_and_evicts_lru_across_requests(tmp_path: Path) -> None:
    paths = {n: make_adapter(tmp_path, n) for n in ("a", "b", "c")}
    cfg = LoRAConfig(enabled=True, max_loras=1, max_cpu_loras=2, load_s=1.0, swap_s=0.01)
    async with serve(lora=cfg) as (srv, s):
        for n, p in paths.items():
            assert (await call(s, srv.url + "/v1/load_lora_adapter", {"lora_name": n, "lora_path": p}))[
                0
            ] == 200
        lora = (await state(s, srv.url))["lora"]
        assert ([a["name"] for a in lora["gpu"]], [a["name"] for a in lora["cpu"]]) == (["c"], ["b", "c"])
        assert lora["cpu_evictions"] == 1  # a left the CPU cache when c came
        t0 = (await state(s, srv.url))["sim_time"]
        assert (await call(s, srv.url + "/v1/completions", {"model": "b", "prompt": "x", "max_tokens": 1}))[
            0
        ] == 200
        lora = (await state(s, srv.url))["lora"]
        assert [a["name"] for a in lora["gpu"]] == ["b"] and lora["swap_ins"] == 4 and lora["loads"] == 3
        t1 = (await state(s, srv.url))["sim_time"]
        assert 0.01 < t1 - t0 < 1.0  # a swap-in, no disk read
        assert (await call(s, srv.url + "/v1/completions", {"model": "a", "prompt": "x", "max_tokens": 1}))[
            0
        ] == 200
        lora = (await state(s, srv.url))["lora"]
        assert lora["loads"] == 4 and [a["name"] for a in lora["cpu"]] == ["b", "a"]  # evicted: read again
        assert (await state(s, srv.url))["sim_time"] - t1 > 1.0


async def test_static_lora_modules_and_their_errors(tmp_path: Path) -> None:
    mods = (
        LoRAModule("sql", make_adapter(tmp_path, "sql")),
        LoRAModule("chat", make_adapter(tmp_path, "chat"), "alias"),
    )
    async with serve(
        served_model_names=["base", "alias"],
        allow_runtime_lora_updating=False,
        lora=LoRAConfig(enabled=True, modules=mods),
    ) as (srv, s):
        async with s.get(srv.url + "/v1/models") as r:
            cards = (await r.json())["data"]
        assert [(c["id"], c["parent"]) for c in cards] == [
            ("base", None),
            ("alias", None),
            ("sql", "base"),
            ("chat", "alias"),
        ]
        status, body = await call(
            s, srv.url + "/v1/completions", {"model": "chat", "prompt": "x", "max_tokens": 1}
        )
        assert status == 200 and body["model"] == "chat"
        assert (await call(s, srv.url + "/v1/load_lora_adapter", {"lora_name": "z", "lora_path": "/x"}))[
            0
        ] == 404
    bad = (LoRAModule("x", str(tmp_path / "nope")),)
    with pytest.raises(ValueError, match="Loading lora x failed: No adapter found for <path>"):
        await MockServer(EngineConfig(lora=LoRAConfig(enabled=True, modules=bad))).start()


def lora_series(text: str) -> dict[tuple[str, str, str], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            if smp.name == "vllm:lora_requests_info":
                lb = smp.labels
                out[(lb["max_lora"], lb["waiting_lora_adapters"], lb["running_lora_adapters"])] = smp.value
    return out


async def test_lora_requests_info_metric_as_vllm_emits_it(tmp_path: Path) -> None:
    cfg = LoRAConfig(enabled=True, max_loras=2, modules=(LoRAModule("sql", make_adapter(tmp_path, "sql")),))
    async with serve(lora=cfg, time_scale=0.05) as (srv, s):
        async with s.get(srv.url + "/metrics") as r:
            text = await r.text()
        assert "# TYPE vllm:lora_requests_info gauge" in text and lora_series(text) == {}  # no step yet
        assert (await call(s, srv.url + "/v1/completions", {"model": "sql", "prompt": "x", "max_tokens": 4}))[
            0
        ] == 200
        async with s.get(srv.url + "/metrics") as r:
            text = await r.text()
        series = lora_series(text)
        # both labels list every adapter with a request in flight (stats.py fills both dicts)
        assert set(series) == {("2", "sql", "sql"), ("2", "", "")}
        assert series[("2", "", "")] >= series[("2", "sql", "sql")] > 1.6e9  # wall-clock timestamps
        line = next(
            ln for ln in text.splitlines() if ln.startswith("vllm:lora_requests_info{") and "sql" in ln
        )
        assert line.startswith(
            # prometheus_client 0.26 (vLLM 0.33.0's too) writes labels sorted by name
            'vllm:lora_requests_info{max_lora="2",running_lora_adapters="sql",waiting_lora_adapters="sql"} '
        )
        assert "model_name" not in line


async def test_adapter_requests_do_not_share_the_base_models_prefix_cache(tmp_path: Path) -> None:
    prompt = " ".join(f"w{i}" for i in range(80))
    cfg = LoRAConfig(enabled=True, modules=(LoRAModule("sql", make_adapter(tmp_path, "sql")),))
    async with serve(lora=cfg) as (srv, s):
        u = srv.url + "/v1/completions"

        async def cached(model: str) -> int:
            status, body = await call(s, u, {"model": model, "prompt": prompt, "max_tokens": 1})
            assert status == 200
            return int(body["usage"]["prompt_tokens_details"]["cached_tokens"])

        assert await cached(MODEL) == 0
        assert await cached("sql") == 0  # v1/core/kv_cache_utils.py: LoRA name and path in the hash
        assert await cached("sql") > 0
        assert await cached(MODEL) > 0


def test_cli_lora_flags() -> None:
    from toposerve.cli import build_parser
    from toposerve.mockengine.cli import config_from_args

    argv = ["mock-engine", "--enable-lora", "--max-loras", "4", "--max-lora-rank", "64", "--max-cpu-loras", "8",
            "--lora-modules", "sql=/a", '{"name": "c", "path": "/b", "base_model_name": "m"}',
            "--lora-load-seconds", "1.5", "--lora-swap-seconds", "0.01", "--lora-hub-dir", "/hub"]  # fmt: skip
    cfg = config_from_args(build_parser().parse_args(argv))
    assert isinstance(cfg, EngineConfig)
    assert cfg.lora == LoRAConfig(
        enabled=True,
        max_loras=4,
        max_lora_rank=64,
        max_cpu_loras=8,
        modules=(LoRAModule("sql", "/a"), LoRAModule("c", "/b", "m")),
        load_s=1.5,
        swap_s=0.01,
        hub_dir="/hub",
    )
    d = config_from_args(build_parser().parse_args(["mock-engine"]))
    assert isinstance(d, EngineConfig) and d.lora == LoRAConfig()
    with pytest.raises(SystemExit):
        build_parser().parse_args(["mock-engine", "--max-lora-rank", "12"])
