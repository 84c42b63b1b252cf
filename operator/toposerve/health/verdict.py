"""GPU health decisions (pure): what one NVML reading means, and when a node's verdict may change.

A reading is plain data: every NVML query's value, or the NVML error it returned instead. Errors
are data, never exceptions: ``NOT_SUPPORTED`` (a GeForce without ECC, a GPU without row
remapping) means "this check does not apply"; ``GPU_IS_LOST`` means the GPU fell off the bus and
is unhealthy; a node where NVML cannot start (``DRIVER_NOT_LOADED``, library missing, RM version
mismatch) cannot serve GPUs at all and is unhealthy; any other error leaves that value unknown.

Limits (defaults from the source lesson: temperature < 85 C, ECC below a threshold, memory use <
98%) carry a recovery band, and the node verdict changes only after ``unhealthy_after``
consecutive bad samples or ``healthy_after`` consecutive good ones: a sensor flapping around a
limit cannot make the taint come and go (the band, and the counts, both have to be crossed).

Critical XIDs are events, not state: one seen keeps its GPU unhealthy for ``xid_hold_samples``
samples. The set comes from NVIDIA's "XID Errors" catalogue (docs.nvidia.com/deploy/xid-errors):
48 double-bit ECC, 63/64 row remapping, 74 NVLink, 79 fallen off the bus, 92 high single-bit ECC
rate, 94/95 contained/uncontained ECC, 119/120 GSP RPC timeout / GSP error.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

# NVML return codes (nvml.h nvmlReturn_t) the verdict distinguishes.
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_RESET_REQUIRED = 16
NVML_ERROR_LIB_RM_VERSION_MISMATCH = 18

# nvmlClocksEventReasons bits that mean the GPU protects itself (nvml.h): HW slowdown, SW/HW
# thermal slowdown, HW power brake. Power capping and idle are normal operation.
THROTTLE_HW_SLOWDOWN = 0x08
THROTTLE_SW_THERMAL = 0x20
THROTTLE_HW_THERMAL = 0x40
THROTTLE_HW_POWER_BRAKE = 0x80
HARMFUL_THROTTLE = THROTTLE_HW_SLOWDOWN | THROTTLE_SW_THERMAL | THROTTLE_HW_THERMAL | THROTTLE_HW_POWER_BRAKE

DEFAULT_CRITICAL_XIDS = (48, 63, 64, 74, 79, 92, 94, 95, 119, 120)


class Thresholds(BaseModel):
    """When a GPU counts as unhealthy, and how the verdict is debounced."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)

    max_temperature_c: int = Field(default=85, ge=1, description="Unhealthy at or above this (C).")
    temperature_recovery_c: int = Field(
        default=5, ge=0, description="Healthy again only below max - this (hysteresis band)."
    )
    max_memory_used_fraction: float = Field(
        default=0.98, gt=0, le=1, description="Unhealthy at or above this share of framebuffer used."
    )
    memory_recovery_fraction: float = Field(default=0.02, ge=0, lt=1, description="Band below the limit.")
    max_volatile_uncorrected_ecc: int = Field(
        default=0,
        ge=0,
        description="Unhealthy above this many uncorrected ECC errors since the driver loaded.",
    )
    max_volatile_corrected_ecc: int = Field(
        default=10000,
        ge=0,
        description="Unhealthy above this many corrected ECC errors since the driver loaded.",
    )
    max_retired_pages: int = Field(
        default=60,
        ge=0,
        description="Unhealthy above this many retired pages (pre-Ampere; NVIDIA RMA guidance).",
    )
    critical_xids: tuple[int, ...] = Field(
        default=DEFAULT_CRITICAL_XIDS, description="XIDs that mark a GPU bad."
    )
    xid_hold_samples: int = Field(
        default=30, ge=1, description="Samples a critical XID keeps its GPU unhealthy."
    )
    harmful_throttle_mask: int = Field(
        default=HARMFUL_THROTTLE, ge=0, description="Clock event reason bits that count as unhealthy."
    )
    unhealthy_after: int = Field(
        default=2, ge=1, description="Consecutive bad samples before the node turns unhealthy."
    )
    healthy_after: int = Field(default=5, ge=1, description="Consecutive good samples before it recovers.")


@dataclass(frozen=True)
class GPUReading:
    """One GPU as NVML reported it in one sample; ``errors``: query -> NVML return code."""

    index: int
    uuid: str | None = None
    name: str | None = None
    temperature_c: int | None = None
    memory_total_bytes: int | None = None
    memory_used_bytes: int | None = None
    utilization_gpu: int | None = None
    utilization_memory: int | None = None
    ecc_volatile_corrected: int | None = None
    ecc_volatile_uncorrected: int | None = None
    ecc_aggregate_corrected: int | None = None
    ecc_aggregate_uncorrected: int | None = None
    retired_pages_sbe: int | None = None
    retired_pages_dbe: int | None = None
    remapped_rows_correctable: int | None = None
    remapped_rows_uncorrectable: int | None = None
    remap_pending: bool | None = None
    remap_failure: bool | None = None
    clock_event_reasons: int | None = None
    power_mw: int | None = None
    xids: tuple[int, ...] = ()  # critical-error events delivered since the previous sample
    errors: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class NodeReading:
    """One sample of a node: its GPUs, or why NVML could not be read at all."""

    gpus: tuple[GPUReading, ...] = ()
    init_error: int | None = None  # nvmlInit's return code when it failed
    init_error_text: str = ""


@dataclass(frozen=True)
class GPUVerdict:
    index: int
    uuid: str | None
    healthy: bool
    reasons: tuple[str, ...] = ()


def evaluate_gpu(
    r: GPUReading, t: Thresholds, recovering: bool = False, xid_active: int | None = None
) -> GPUVerdict:
    """Problems of one GPU. ``recovering``: the GPU was bad last time, so limits use the recovery
    band; ``xid_active``: a critical XID still within its hold window."""
    reasons: list[str] = []
    lost = [q for q, code in r.errors.items() if code in (NVML_ERROR_GPU_IS_LOST, NVML_ERROR_RESET_REQUIRED)]
    if lost:
        code = r.errors[lost[0]]
        reasons.append(
            "GPU is lost (fell off the bus)" if code == NVML_ERROR_GPU_IS_LOST else "GPU requires reset"
        )
    temp_limit = t.max_temperature_c - (t.temperature_recovery_c if recovering else 0)
    if r.temperature_c is not None and r.temperature_c >= temp_limit:
        reasons.append(f"temperature {r.temperature_c} C >= {temp_limit} C")
    if r.memory_total_bytes and r.memory_used_bytes is not None:
        limit = t.max_memory_used_fraction - (t.memory_recovery_fraction if recovering else 0)
        used = r.memory_used_bytes / r.memory_total_bytes
        if used >= limit:
            reasons.append(f"memory {used:.1%} used >= {limit:.0%}")
    if r.ecc_volatile_uncorrected is not None and r.ecc_volatile_uncorrected > t.max_volatile_uncorrected_ecc:
        reasons.append(
            f"{r.ecc_volatile_uncorrected} uncorrected ECC errors (> {t.max_volatile_uncorrected_ecc})"
        )
    if r.ecc_volatile_corrected is not None and r.ecc_volatile_corrected > t.max_volatile_corrected_ecc:
        reasons.append(f"{r.ecc_volatile_corrected} corrected ECC errors (> {t.max_volatile_corrected_ecc})")
    retired = (r.retired_pages_sbe or 0) + (r.retired_pages_dbe or 0)
    if retired > t.max_retired_pages:
        reasons.append(f"{retired} retired pages (> {t.max_retired_pages})")
    if r.remap_failure:
        reasons.append("row remapping failed")
    if r.remap_pending:
        reasons.append("row remapping pending (GPU reset required)")
    if r.clock_event_reasons is not None and r.clock_event_reasons & t.harmful_throttle_mask:
        reasons.append(
            f"clocks throttled for protection (reasons 0x{r.clock_event_reasons & t.harmful_throttle_mask:x})"
        )
    if xid_active is not None:
        reasons.append(f"XID {xid_active}")
    return GPUVerdict(index=r.index, uuid=r.uuid, healthy=not reasons, reasons=tuple(reasons))


@dataclass(frozen=True)
class HealthState:
    """What the agent remembers between samples (pure value; ``step`` returns the next one)."""

    healthy: bool = True  # the published verdict
    bad_streak: int = 0
    good_streak: int = 0
    gpu_bad: frozenset[int] = frozenset()  # GPUs bad in the last sample (recovery band while unhealthy)
    xid_hold: Mapping[int, tuple[int, int]] = field(default_factory=dict)  # gpu -> (xid, samples left)
    reasons: tuple[str, ...] = ()  # of the last sample


@dataclass(frozen=True)
class Step:
    state: HealthState
    verdicts: tuple[GPUVerdict, ...]
    changed: bool  # the published verdict flipped in this step


def node_problems(reading: NodeReading) -> str | None:
    """Why the node as a whole cannot be read, or None."""
    if reading.init_error is None:
        return None
    return f"NVML unavailable: {reading.init_error_text or f'error {reading.init_error}'}"


def step(state: HealthState, reading: NodeReading, t: Thresholds) -> Step:
    """Fold one sample into the state: per-GPU verdicts, then the debounced node verdict."""
    holds = {g: (x, n - 1) for g, (x, n) in state.xid_hold.items() if n - 1 > 0}
    for g in reading.gpus:
        critical = [x for x in g.xids if x in t.critical_xids]
        if critical:
            holds[g.index] = (critical[-1], t.xid_hold_samples)
    verdicts = tuple(
        evaluate_gpu(
            g,
            t,
            # The band applies on the way out only: an unhealthy node recovers below the band, a
            # healthy one turns unhealthy at the limit itself.
            recovering=not state.healthy and g.index in state.gpu_bad,
            xid_active=holds[g.index][0] if g.index in holds else None,
        )
        for g in reading.gpus
    )
    reasons = [f"GPU {v.index}: {r}" for v in verdicts for r in v.reasons]
    if (why := node_problems(reading)) is not None:
        reasons.insert(0, why)
    bad_now = bool(reasons)
    bad_streak = state.bad_streak + 1 if bad_now else 0
    good_streak = 0 if bad_now else state.good_streak + 1
    healthy = state.healthy
    if healthy and bad_streak >= t.unhealthy_after:
        healthy = False
    elif not healthy and good_streak >= t.healthy_after:
        healthy = True
    new = HealthState(
        healthy=healthy,
        bad_streak=bad_streak,
        good_streak=good_streak,
        gpu_bad=frozenset(v.index for v in verdicts if not v.healthy),
        xid_hold=holds,
        reasons=tuple(reasons),
    )
    return Step(state=new, verdicts=verdicts, changed=healthy != state.healthy)


def summary(state: HealthState, gpus: int) -> tuple[str, str]:
    """(CamelCase reason, message) for the node condition."""
    if state.healthy and not state.reasons:
        return "GPUsHealthy", f"all {gpus} GPUs within limits"
    if state.healthy:
        return "GPUsHealthy", f"not yet persistent ({state.bad_streak} sample(s)): " + "; ".join(
            state.reasons
        )
    if not state.reasons:
        return (
            "GPUsRecovering",
            f"within limits for {state.good_streak} sample(s), waiting to confirm recovery",
        )
    return "GPUsUnhealthy", "; ".join(state.reasons)
