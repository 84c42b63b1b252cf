"""Read every GPU of this node through NVML with pynvml (the I/O shell of ``health.verdict``).

Every query is wrapped: an ``NVMLError`` becomes an entry in ``GPUReading.errors`` (query name ->
NVML return code), never an exception out of ``sample()``. NVML that cannot start (driver not
loaded, library missing) is retried on the next sample, since drivers load after boot.

pynvml loads ``libnvidia-ml.so.1`` through the dynamic loader (``ctypes.CDLL``), so
``LD_LIBRARY_PATH`` chooses the library: the driver's on a GPU node, the fake one
(hack/nvml/fake_nvml.c) in tests.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Any, TypeVar

import pynvml

from toposerve.health.verdict import GPUReading, NodeReading

log = logging.getLogger("toposerve.health")
T = TypeVar("T")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class NVMLReader:
    """Keeps NVML initialised and an XID event set registered between samples."""

    def __init__(self) -> None:
        self.ready = False
        self.events: Any = None

    def _start(self) -> tuple[int, str] | None:
        """Initialise NVML; (code, text) when it cannot."""
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as e:
            return int(e.value), str(e)
        self.ready = True
        try:
            self.events = pynvml.nvmlEventSetCreate()
            for i in range(pynvml.nvmlDeviceGetCount()):
                handle = pynvml.nvmlDeviceGetHandleByIndex(i)
                try:
                    pynvml.nvmlDeviceRegisterEvents(handle, pynvml.nvmlEventTypeXidCriticalError, self.events)
                except pynvml.NVMLError as e:  # NOT_SUPPORTED on some boards: no XIDs from this GPU
                    log.info("GPU %d: XID events unavailable: %s", i, e)
        except pynvml.NVMLError as e:
            log.warning("XID event set unavailable: %s", e)
        return None

    def close(self) -> None:
        if not self.ready:
            return
        try:
            if self.events is not None:
                pynvml.nvmlEventSetFree(self.events)
            pynvml.nvmlShutdown()
        except pynvml.NVMLError as e:
            log.warning("NVML shutdown: %s", e)
        self.ready, self.events = False, None

    def _drain_xids(self, handles: dict[int, Any]) -> dict[int, list[int]]:
        """XIDs delivered since the last sample, per GPU index (wait with timeout 0 until TIMEOUT)."""
        out: dict[int, list[int]] = {}
        if self.events is None:
            return out
        by_addr = {ctypes_addr(h): i for i, h in handles.items()}
        for _ in range(1000):  # a storm of events is bounded per sample
            try:
                data = pynvml.nvmlEventSetWait(self.events, 0)
            except pynvml.NVMLError as e:
                if e.value != pynvml.NVML_ERROR_TIMEOUT:
                    log.warning("XID event wait: %s", e)
                break
            if data.eventType & pynvml.nvmlEventTypeXidCriticalError:
                out.setdefault(by_addr.get(ctypes_addr(data.device), -1), []).append(int(data.eventData))
        return out

    def sample(self) -> NodeReading:
        if not self.ready and (failed := self._start()) is not None:
            return NodeReading(init_error=failed[0], init_error_text=failed[1])
        try:
            count = pynvml.nvmlDeviceGetCount()
        except pynvml.NVMLError as e:
            return NodeReading(init_error=int(e.value), init_error_text=str(e))
        gpus: list[GPUReading] = []
        handles: dict[int, Any] = {}
        for i in range(count):
            try:
                handles[i] = pynvml.nvmlDeviceGetHandleByIndex(i)
            except pynvml.NVMLError as e:
                gpus.append(GPUReading(index=i, errors={"handle": int(e.value)}))
                continue
            gpus.append(read_gpu(i, handles[i]))
        xids = self._drain_xids(handles)
        gpus = [replace(g, xids=tuple(xids[g.index])) if g.index in xids else g for g in gpus]
        return NodeReading(gpus=tuple(gpus))


def ctypes_addr(handle: Any) -> int:
    """A device handle's identity (the opaque pointer's value) to match events to GPUs."""
    import ctypes

    return int(ctypes.cast(handle, ctypes.c_void_p).value or 0)


def read_gpu(index: int, h: Any) -> GPUReading:
    """Every query of one GPU; failures recorded per query."""
    errors: dict[str, int] = {}

    def q(name: str, fn: Callable[[], T]) -> T | None:
        try:
            return fn()
        except pynvml.NVMLError as e:
            errors[name] = int(e.value)
            return None

    mem = q("memory", lambda: pynvml.nvmlDeviceGetMemoryInfo(h))
    util = q("utilization", lambda: pynvml.nvmlDeviceGetUtilizationRates(h))
    ecc = {
        (counter, kind): q(
            f"ecc.{counter}.{kind}",
            lambda c=c, k=k: pynvml.nvmlDeviceGetTotalEccErrors(h, k, c),  # type: ignore[misc]
        )
        for counter, c in (("volatile", pynvml.NVML_VOLATILE_ECC), ("aggregate", pynvml.NVML_AGGREGATE_ECC))
        for kind, k in (
            ("corrected", pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED),
            ("uncorrected", pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED),
        )
    }
    sbe = q(
        "retiredPages.sbe",
        lambda: pynvml.nvmlDeviceGetRetiredPages(
            h, pynvml.NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS
        ),
    )
    dbe = q(
        "retiredPages.dbe",
        lambda: pynvml.nvmlDeviceGetRetiredPages(h, pynvml.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR),
    )
    remap = q("remappedRows", lambda: pynvml.nvmlDeviceGetRemappedRows(h))
    name = q("name", lambda: pynvml.nvmlDeviceGetName(h))
    uuid = q("uuid", lambda: pynvml.nvmlDeviceGetUUID(h))
    return GPUReading(
        index=index,
        uuid=_text(uuid) if uuid is not None else None,
        name=_text(name) if name is not None else None,
        temperature_c=q(
            "temperature", lambda: pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU)
        ),
        memory_total_bytes=int(mem.total) if mem is not None else None,
        memory_used_bytes=int(mem.used) if mem is not None else None,
        utilization_gpu=int(util.gpu) if util is not None else None,
        utilization_memory=int(util.memory) if util is not None else None,
        ecc_volatile_corrected=ecc["volatile", "corrected"],
        ecc_volatile_uncorrected=ecc["volatile", "uncorrected"],
        ecc_aggregate_corrected=ecc["aggregate", "corrected"],
        ecc_aggregate_uncorrected=ecc["aggregate", "uncorrected"],
        retired_pages_sbe=len(sbe) if sbe is not None else None,
        retired_pages_dbe=len(dbe) if dbe is not None else None,
        remapped_rows_correctable=remap[0] if remap is not None else None,
        remapped_rows_uncorrectable=remap[1] if remap is not None else None,
        remap_pending=bool(remap[2]) if remap is not None else None,
        remap_failure=bool(remap[3]) if remap is not None else None,
        clock_event_reasons=q("clockEventReasons", lambda: pynvml.nvmlDeviceGetCurrentClocksEventReasons(h)),
        power_mw=q("power", lambda: pynvml.nvmlDeviceGetPowerUsage(h)),
        errors=errors,
    )
