"""The mock engine's start-up phases (mockengine/startup.py): vLLM 0.33.0's order, what the
weights and compile caches save, the caches it leaves behind, and a port that listens but answers
nothing until the engine is up (vLLM's run_server binds before building the engine)."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from toposerve.mockengine import server as server_mod
from toposerve.mockengine.cli import add_arguments, config_from_args
from toposerve.mockengine.server import EngineConfig, MockServer
from toposerve.mockengine.startup import Caches, StartupModel, compile_dir, hub_dir, plan, run

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
REAL = StartupModel(
    weights_gib=15.0, download_gib_per_s=0.5, load_gib_per_s=2.5, compile_s=40.0, compile_cached_s=4.0,
    graph_capture_s=12.0,
)  # fmt: skip


def names(phases: list[Any]) -> list[str]:
    return [p.name for p in phases]


def test_a_cold_start_goes_through_every_phase_in_vllms_order() -> None:
    cold = plan(REAL, weights_cached=False, compile_cached=False)
    assert names(cold) == ["download", "load", "compile", "graphs"]
    assert [p.seconds for p in cold] == [30.0, 6.0, 40.0, 12.0]
    assert cold[1].message == "Loading weights took 6.00 seconds"  # default_loader.py's line
    assert cold[2].message == "torch.compile took 40.00 s in total"  # compilation/monitor.py's line
    assert cold[3].message == "Graph capturing finished in 12 secs"


def test_the_caches_skip_the_download_and_replace_compiling_by_loading_the_graphs() -> None:
    warm = plan(REAL, weights_cached=True, compile_cached=True)
    assert names(warm) == ["load", "compile-cached", "graphs"]
    assert "from the cache" in warm[1].message and sum(p.seconds for p in warm) == 22.0
    assert names(plan(REAL, weights_cached=True, compile_cached=False)) == ["load", "compile", "graphs"]
    # nothing modelled: the mock's old instant start
    assert plan(StartupModel(), False, False) == [] and not StartupModel().modelled


@given(
    st.floats(0, 200), st.floats(0, 5), st.floats(0, 5), st.floats(0, 600), st.floats(0, 60), st.floats(0, 120),
    st.booleans(), st.booleans(),
)  # fmt: skip
def test_a_cache_never_makes_a_start_longer_than_a_cold_one(
    gib: float, dl: float, ld: float, comp: float, cached: float, graphs: float, w: bool, c: bool
) -> None:
    m = StartupModel(gib, dl, ld, comp, min(cached, comp), graphs)
    cold = sum(p.seconds for p in plan(m, False, False))
    assert sum(p.seconds for p in plan(m, w, c)) <= cold + 1e-9
    assert all(p.seconds > 0 for p in plan(m, w, c))


def test_run_sleeps_scaled_time_and_leaves_the_caches_for_the_next_start(tmp_path: Path) -> None:
    caches = Caches(hub_dir(tmp_path / "hf", MODEL), compile_dir(tmp_path / "vllm", "factors"))
    assert (
        caches.weights == tmp_path / "hf/hub/models--meta-llama--Llama-3.1-8B-Instruct"
    )  # huggingface_hub's layout
    assert caches.compiled.parent.parent.parent == tmp_path / "vllm/torch_compile_cache"
    slept: list[float] = []
    first = asyncio.run(run(REAL, caches, 0.01, sleep=slept.append))
    assert names(first) == ["download", "load", "compile", "graphs"]
    assert slept == pytest.approx([0.3, 0.06, 0.4, 0.12])
    assert caches.weights_cached() and caches.compile_cached()
    second = asyncio.run(run(REAL, caches, 0.01, sleep=slept.append))
    assert names(second) == ["load", "compile-cached", "graphs"]
    # another configuration (say another TP) has no compiled graphs yet, the weights are shared
    other = Caches(caches.weights, compile_dir(tmp_path / "vllm", "other factors"))
    assert names(asyncio.run(run(REAL, other, 0.0, sleep=slept.append))) == ["load", "compile", "graphs"]


def test_the_cli_reads_the_phases_and_the_caches_follow_vllms_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        ["--model", MODEL, "--startup-weights-gib", "15", "--download-gib-per-s", "0.5", "--load-gib-per-s", "2.5",
         "--compile-seconds", "40", "--compile-cached-seconds", "4", "--graph-capture-seconds", "12"]
    )  # fmt: skip
    cfg = config_from_args(args)
    assert isinstance(cfg, EngineConfig) and cfg.startup == REAL
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("VLLM_CACHE_ROOT", str(tmp_path / "vllm"))
    caches = cfg.startup_caches()
    assert caches.weights.is_relative_to(tmp_path / "hf") and caches.compiled.is_relative_to(
        tmp_path / "vllm"
    )
    # the compiled graphs depend on the configuration, the weights do not
    tp2 = EngineConfig(model=MODEL, tensor_parallel_size=2).startup_caches()
    assert tp2.weights == caches.weights and tp2.compiled != caches.compiled


async def test_the_port_listens_but_answers_nothing_until_the_engine_is_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = asyncio.Event()
    seen: list[str] = []

    async def gated(model: StartupModel, caches: Caches, scale: float, sleep: Any = None) -> Any:
        async def wait(_: float) -> None:
            await gate.wait()

        phases = await run(model, caches, scale, sleep=wait)
        seen.extend(names(phases))
        return phases

    monkeypatch.setattr(server_mod, "startup_run", gated)
    cfg = EngineConfig(
        model=MODEL, time_scale=0.0, num_gpu_blocks=64, hf_home=tmp_path / "hf", cache_root=tmp_path / "vllm",
        startup=StartupModel(weights_gib=1.0, download_gib_per_s=1.0, compile_s=1.0),
    )  # fmt: skip
    server = MockServer(cfg)
    starting = asyncio.create_task(server.start())
    for _ in range(1000):
        if server.starting or starting.done():
            break
        await asyncio.sleep(0.01)
    assert server.starting and not starting.done()
    # the port is bound: a client connects (the kernel's backlog) and sends its probe...
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    await writer.drain()
    # ...and gets nothing while the engine starts
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(reader.read(1), timeout=0.3)
    assert not starting.done()
    gate.set()
    await starting
    try:
        answer = await asyncio.wait_for(reader.read(), timeout=10)
        assert answer.startswith(b"HTTP/1.1 200"), answer[:80]
        assert seen == ["download", "compile"]
    finally:
        writer.close()
        await server.stop()
    # the same caches: the next start skips both
    seen.clear()
    gate.set()
    again = await MockServer(cfg).start()
    await again.stop()
    assert seen == []
