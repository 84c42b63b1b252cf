"""The agent's real NVML read path against a fake libnvidia-ml.so.1 (hack/nvml/fake_nvml.c), built
here with the machine's cc and loaded by pynvml through LD_LIBRARY_PATH like the driver's: pynvml's
ctypes structures, return codes and event API are exercised as they are on a GPU node. Nothing in
pynvml is patched; each test drives a separate Python process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from toposerve.dev import fakenvml

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def libdir() -> Path:
    if not (os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler: the fake libnvidia-ml.so.1 cannot be built (install cc)")
    return fakenvml.build()


def env(libdir: Path, state: Path) -> dict[str, str]:
    return {**os.environ, "LD_LIBRARY_PATH": str(libdir), fakenvml.STATE_ENV: str(state),
            "PYTHONPATH": str(ROOT / "operator")}  # fmt: skip


def once(libdir: Path, state: Path) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "toposerve.cli", "health-agent", "--once"],
        env=env(libdir, state), capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    return dict(json.loads(out.stdout))


H100 = {"name": "NVIDIA H100 80GB HBM3", "uuid": "GPU-5c6a2b0e-1111-2222-3333-444455556666", "temp": 47,
        "mem.total": 85520809984, "mem.used": 76000000000, "util.gpu": 93, "util.mem": 41, "power_mw": 612345,
        "ecc.vol.corrected": 3, "ecc.agg.corrected": 120, "ecc.agg.uncorrected": 1, "throttle": 0x4}  # fmt: skip


def test_the_library_is_what_pynvml_loads(libdir: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    fakenvml.write_state(state, [H100])
    script = "import ctypes, pynvml; pynvml.nvmlInit(); print(pynvml.nvmlLib._name); pynvml.nvmlShutdown()"
    out = subprocess.run([sys.executable, "-c", script], env=env(libdir, state), capture_output=True, text=True,
                         check=True, timeout=60)  # fmt: skip
    assert out.stdout.strip() == "libnvidia-ml.so.1"
    maps = subprocess.run(
        [sys.executable, "-c", script + "; print(open('/proc/self/maps').read())"],
        env=env(libdir, state), capture_output=True, text=True, check=True, timeout=60,
    ).stdout  # fmt: skip
    assert str(libdir / "libnvidia-ml.so.1") in maps  # the dynamic loader found ours via LD_LIBRARY_PATH


def test_every_value_crosses_the_ctypes_boundary_intact(libdir: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    fakenvml.write_state(state, [H100, {**H100, "uuid": "GPU-b", "retired.sbe": 2, "retired.dbe": 1,
                                        "remap.corr": 5, "remap.unc": 1, "remap.pending": 1}])  # fmt: skip
    data = once(libdir, state)
    g0, g1 = data["gpus"]
    assert (g0["name"], g0["uuid"], g0["temperature_c"]) == (H100["name"], H100["uuid"], 47)
    assert (g0["memory_total_bytes"], g0["memory_used_bytes"]) == (85520809984, 76000000000)
    assert (g0["utilization_gpu"], g0["utilization_memory"], g0["power_mw"]) == (93, 41, 612345)
    assert (g0["ecc_volatile_corrected"], g0["ecc_volatile_uncorrected"]) == (3, 0)
    assert (g0["ecc_aggregate_corrected"], g0["ecc_aggregate_uncorrected"]) == (120, 1)
    assert g0["clock_event_reasons"] == 0x4 and g0["errors"] == {}
    assert (g1["retired_pages_sbe"], g1["retired_pages_dbe"]) == (2, 1)
    assert (g1["remapped_rows_correctable"], g1["remapped_rows_uncorrectable"], g1["remap_pending"]) == (
        5,
        1,
        True,
    )
    assert data["problems"] == ["GPU 1: row remapping pending (GPU reset required)"]


def test_nvml_errors_become_data(libdir: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    fakenvml.write_state(state, [{**H100, "err.ecc": 3, "err.power": 3}, {"lost": 1}])
    data = once(libdir, state)
    g0, g1 = data["gpus"]
    assert g0["errors"] == {"ecc.volatile.corrected": 3, "ecc.volatile.uncorrected": 3, "ecc.aggregate.corrected": 3,
                            "ecc.aggregate.uncorrected": 3, "power": 3}  # fmt: skip
    assert g0["ecc_volatile_uncorrected"] is None and g0["temperature_c"] == 47
    assert set(g1["errors"].values()) == {15}  # NVML_ERROR_GPU_IS_LOST from every query
    assert data["problems"] == ["GPU 1: GPU is lost (fell off the bus)"]
    fakenvml.write_state(state, [H100], driver="not_loaded")
    data = once(libdir, state)
    assert (data["initError"], data["gpus"]) == (9, [])
    assert data["problems"] == ["NVML unavailable: Driver Not Loaded"]


DRIVER = textwrap.dedent("""
    import json, sys
    from toposerve.health.nvml import NVMLReader
    from toposerve.health.verdict import HealthState, Thresholds, step
    reader, state, t = NVMLReader(), HealthState(), Thresholds(unhealthy_after=2, healthy_after=2)
    for line in sys.stdin:  # one sample per line the test sends: no clocks, no sleeps
        reading = reader.sample()
        state = step(state, reading, t).state
        print(json.dumps({"healthy": state.healthy, "reasons": state.reasons,
                          "xids": {g.index: list(g.xids) for g in reading.gpus if g.xids}}), flush=True)
""")


@pytest.fixture
def agent(libdir: Path, tmp_path: Path) -> Iterator[tuple[Path, Any]]:
    state = tmp_path / "state"
    fakenvml.write_state(state, [H100, H100])
    proc = subprocess.Popen([sys.executable, "-c", DRIVER], env=env(libdir, state), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdin and proc.stdout

    def sample() -> dict[str, Any]:
        assert proc.stdin and proc.stdout
        proc.stdin.write("\n")
        proc.stdin.flush()
        return dict(json.loads(proc.stdout.readline()))

    yield state, sample
    proc.stdin.close()
    proc.wait(timeout=30)


def test_xid_events_ecc_burst_and_recovery_through_the_event_api(agent: tuple[Path, Any]) -> None:
    state, sample = agent
    assert sample()["healthy"]
    fakenvml.write_state(state, [H100, {**H100, "xids": [79]}])  # XID 79 on GPU 1, delivered once
    s = sample()
    assert s["xids"] == {"1": [79]} and s["reasons"] == ["GPU 1: XID 79"] and s["healthy"]  # 1 of 2 samples
    s = sample()
    assert s["xids"] == {} and not s["healthy"]  # held, not re-delivered
    # An ECC burst on GPU 0 while GPU 1 is held.
    fakenvml.write_state(state, [{**H100, "ecc.vol.uncorrected": 4}, {**H100, "xids": [79]}])
    assert "GPU 0: 4 uncorrected ECC errors (> 0)" in sample()["reasons"]


def test_temperature_excursion_and_hysteresis_through_the_real_read_path(agent: tuple[Path, Any]) -> None:
    state, sample = agent
    fakenvml.write_state(state, [{**H100, "temp": 92}, H100])
    assert [sample()["healthy"], sample()["healthy"]] == [True, False]
    fakenvml.write_state(state, [{**H100, "temp": 83}, H100])  # below the limit, inside the band
    assert [sample()["healthy"] for _ in range(3)] == [False, False, False]
    fakenvml.write_state(state, [{**H100, "temp": 70}, H100])
    assert [sample()["healthy"], sample()["healthy"]] == [False, True]
