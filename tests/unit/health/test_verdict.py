"""Health decisions: limits with recovery bands, NVML errors as data, XID holds, and debouncing so a
flapping sensor cannot make the verdict (and the taint) come and go."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from toposerve.health.verdict import (
    NVML_ERROR_DRIVER_NOT_LOADED,
    NVML_ERROR_GPU_IS_LOST,
    NVML_ERROR_NOT_SUPPORTED,
    GPUReading,
    HealthState,
    NodeReading,
    Thresholds,
    evaluate_gpu,
    step,
    summary,
)

GIB = 1024**3
T = Thresholds()
OK = GPUReading(
    index=0, uuid="GPU-0", name="NVIDIA H100 80GB HBM3", temperature_c=60, memory_total_bytes=80 * GIB,
    memory_used_bytes=72 * GIB, ecc_volatile_corrected=0, ecc_volatile_uncorrected=0, retired_pages_sbe=0,
    retired_pages_dbe=0, remap_pending=False, remap_failure=False, clock_event_reasons=0, power_mw=350000,
)  # fmt: skip


def bad(**kw: object) -> list[str]:
    return list(evaluate_gpu(replace(OK, **kw), T).reasons)  # type: ignore[arg-type]


def test_defaults_are_the_seed_lessons_limits() -> None:
    assert (T.max_temperature_c, T.max_memory_used_fraction, T.max_volatile_uncorrected_ecc) == (85, 0.98, 0)
    assert evaluate_gpu(OK, T).healthy


def test_temperature_limit_and_recovery_band() -> None:
    assert bad(temperature_c=84) == []
    assert bad(temperature_c=85) == ["temperature 85 C >= 85 C"]
    hot_before = replace(OK, temperature_c=82)
    assert evaluate_gpu(hot_before, T, recovering=True).reasons == ("temperature 82 C >= 80 C",)
    assert evaluate_gpu(replace(OK, temperature_c=79), T, recovering=True).healthy


def test_memory_ecc_pages_remap_and_throttle() -> None:
    assert bad(memory_used_bytes=int(80 * GIB * 0.979)) == []
    assert bad(memory_used_bytes=int(80 * GIB * 0.985))[0].startswith("memory 98.5% used")
    assert bad(ecc_volatile_uncorrected=1) == ["1 uncorrected ECC errors (> 0)"]
    assert bad(ecc_volatile_corrected=10001) == ["10001 corrected ECC errors (> 10000)"]
    assert bad(ecc_volatile_corrected=10000) == []
    assert bad(retired_pages_sbe=40, retired_pages_dbe=21) == ["61 retired pages (> 60)"]
    assert bad(remap_failure=True) == ["row remapping failed"]
    assert bad(remap_pending=True) == ["row remapping pending (GPU reset required)"]
    assert bad(clock_event_reasons=0x04 | 0x01) == []  # power cap, idle: normal operation
    assert bad(clock_event_reasons=0x40 | 0x04) == ["clocks throttled for protection (reasons 0x40)"]


def test_nvml_errors_are_data() -> None:
    unsupported = GPUReading(index=0, errors=dict.fromkeys(["temperature", "ecc.volatile.uncorrected", "power"],
                                                           NVML_ERROR_NOT_SUPPORTED))  # fmt: skip
    assert evaluate_gpu(unsupported, T).healthy  # a check that does not apply is not a failure
    lost = GPUReading(index=1, errors={"temperature": NVML_ERROR_GPU_IS_LOST})
    assert evaluate_gpu(lost, T).reasons == ("GPU is lost (fell off the bus)",)
    reading = NodeReading(init_error=NVML_ERROR_DRIVER_NOT_LOADED, init_error_text="Driver Not Loaded")
    s = step(HealthState(), reading, T)
    assert s.state.reasons == ("NVML unavailable: Driver Not Loaded",)


def node(*gpus: GPUReading) -> NodeReading:
    return NodeReading(gpus=tuple(gpus))


def run(samples: list[NodeReading], t: Thresholds = T) -> list[bool]:
    state, out = HealthState(), []
    for r in samples:
        state = step(state, r, t).state
        out.append(state.healthy)
    return out


HOT, COOL, WARM = (replace(OK, temperature_c=c) for c in (90, 60, 82))


def test_unhealthy_after_consecutive_bad_samples_and_back_after_good_ones() -> None:
    seq = [node(HOT)] * 2 + [node(COOL)] * 5
    assert run(seq) == [True, False, False, False, False, False, True]


def test_a_flapping_sensor_never_flips_the_verdict() -> None:
    # 86/84 alternating: never two bad samples in a row, so never unhealthy.
    flap = [node(replace(OK, temperature_c=86 if i % 2 == 0 else 84)) for i in range(20)]
    assert all(run(flap))
    # Once unhealthy, 84 C is inside the recovery band (>= 80): it stays unhealthy.
    seq = [node(HOT)] * 2 + [node(replace(OK, temperature_c=84 if i % 2 else 86)) for i in range(20)]
    assert run(seq)[1:] == [False] * 21


def test_a_critical_xid_holds_its_gpu_for_the_hold_window() -> None:
    t = Thresholds(xid_hold_samples=3, unhealthy_after=1, healthy_after=1)
    xid = replace(OK, xids=(79,))
    assert run([node(xid), node(OK), node(OK), node(OK)], t) == [False, False, False, True]
    assert run([node(replace(OK, xids=(31,)))], t) == [True]  # XID 31 (app MMU fault) is not the GPU's fault
    s = step(HealthState(), node(xid), t)
    assert s.verdicts[0].reasons == ("XID 79",) and s.changed


def test_summary_reasons() -> None:
    assert summary(HealthState(), 8) == ("GPUsHealthy", "all 8 GPUs within limits")
    sick = step(step(HealthState(), node(HOT), T).state, node(HOT), T).state
    assert summary(sick, 1) == ("GPUsUnhealthy", "GPU 0: temperature 90 C >= 85 C")
    assert summary(step(sick, node(COOL), T).state, 1)[0] == "GPUsRecovering"


@settings(max_examples=300, deadline=None)
@given(st.lists(st.booleans(), max_size=60), st.integers(1, 4), st.integers(1, 6))
def test_every_flip_follows_a_full_streak(bads: list[bool], down: int, up: int) -> None:
    """Property: the verdict turns unhealthy only after `down` bad samples in a row and healthy only
    after `up` good ones, whatever the sequence; so flips are at most samples / min(down, up)."""
    t = Thresholds(unhealthy_after=down, healthy_after=up, temperature_recovery_c=0)
    verdicts = run([node(HOT if b else COOL) for b in bads], t)
    prev = True
    for i, v in enumerate(verdicts):
        if v != prev:
            need, want_bad = (down, True) if not v else (up, False)
            assert i + 1 >= need and all(b == want_bad for b in bads[i + 1 - need : i + 1])
        prev = v
