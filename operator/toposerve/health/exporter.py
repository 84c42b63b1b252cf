"""Per-GPU Prometheus metrics with DCGM-exporter names, so existing dashboards and alerts work.

Names and units follow NVIDIA dcgm-exporter's default counters (etc/default-counters.csv):
DCGM_FI_DEV_GPU_TEMP (C), DCGM_FI_DEV_FB_USED / _FB_FREE (MiB), DCGM_FI_DEV_GPU_UTIL and
DCGM_FI_DEV_MEM_COPY_UTIL (%), DCGM_FI_DEV_POWER_USAGE (W), DCGM_FI_DEV_ECC_{SBE,DBE}_{VOL,AGG}_TOTAL,
DCGM_FI_DEV_RETIRED_{SBE,DBE}, DCGM_FI_DEV_{CORRECTABLE,UNCORRECTABLE}_REMAPPED_ROWS,
DCGM_FI_DEV_ROW_REMAP_FAILURE, DCGM_FI_DEV_XID_ERRORS (the last XID), DCGM_FI_DEV_CLOCK_THROTTLE_REASONS;
labels ``gpu``, ``UUID``, ``device`` (nvidia<N>), ``modelName``, ``Hostname``. A value NVML did
not give (NOT_SUPPORTED, GPU lost) is absent, not 0. toposerve's own verdict is
``toposerve_gpu_healthy`` per GPU, ``toposerve_node_gpu_healthy`` (debounced) and
``toposerve_nvml_errors`` per query and NVML return code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from threading import Lock

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from toposerve.health.verdict import GPUReading, GPUVerdict, HealthState, NodeReading

MIB = 1024 * 1024
_LABELS = ["gpu", "UUID", "device", "modelName", "Hostname"]

# (metric name, help, value of a reading or None)
_FIELDS: tuple[tuple[str, str, Callable[[GPUReading], float | None]], ...] = (
    ("DCGM_FI_DEV_GPU_TEMP", "GPU temperature (in C).", lambda g: g.temperature_c),
    ("DCGM_FI_DEV_FB_USED", "Framebuffer memory used (in MiB).",
     lambda g: g.memory_used_bytes // MIB if g.memory_used_bytes is not None else None),
    ("DCGM_FI_DEV_FB_FREE", "Framebuffer memory free (in MiB).",
     lambda g: (g.memory_total_bytes - g.memory_used_bytes) // MIB
     if g.memory_total_bytes is not None and g.memory_used_bytes is not None else None),
    ("DCGM_FI_DEV_GPU_UTIL", "GPU utilization (in %).", lambda g: g.utilization_gpu),
    ("DCGM_FI_DEV_MEM_COPY_UTIL", "Memory utilization (in %).", lambda g: g.utilization_memory),
    ("DCGM_FI_DEV_POWER_USAGE", "Power draw (in W).", lambda g: g.power_mw / 1000 if g.power_mw is not None else None),
    ("DCGM_FI_DEV_ECC_SBE_VOL_TOTAL", "Total number of single-bit volatile ECC errors.",
     lambda g: g.ecc_volatile_corrected),
    ("DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", "Total number of double-bit volatile ECC errors.",
     lambda g: g.ecc_volatile_uncorrected),
    ("DCGM_FI_DEV_ECC_SBE_AGG_TOTAL", "Total number of single-bit persistent ECC errors.",
     lambda g: g.ecc_aggregate_corrected),
    ("DCGM_FI_DEV_ECC_DBE_AGG_TOTAL", "Total number of double-bit persistent ECC errors.",
     lambda g: g.ecc_aggregate_uncorrected),
    ("DCGM_FI_DEV_RETIRED_SBE", "Total number of retired pages due to single-bit errors.",
     lambda g: g.retired_pages_sbe),
    ("DCGM_FI_DEV_RETIRED_DBE", "Total number of retired pages due to double-bit errors.",
     lambda g: g.retired_pages_dbe),
    ("DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS", "Number of remapped rows for correctable errors.",
     lambda g: g.remapped_rows_correctable),
    ("DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS", "Number of remapped rows for uncorrectable errors.",
     lambda g: g.remapped_rows_uncorrectable),
    ("DCGM_FI_DEV_ROW_REMAP_FAILURE", "Whether remapping of rows has failed.",
     lambda g: int(g.remap_failure) if g.remap_failure is not None else None),
    ("DCGM_FI_DEV_CLOCK_THROTTLE_REASONS", "Current clock throttle reasons (bitmask).",
     lambda g: g.clock_event_reasons),
)  # fmt: skip


class GPUCollector(Collector):
    """Serves the latest sample; ``update`` swaps it in (one lock, no stale label sets to prune)."""

    def __init__(self, hostname: str) -> None:
        self.hostname = hostname
        self._lock = Lock()
        self._reading = NodeReading()
        self._verdicts: tuple[GPUVerdict, ...] = ()
        self._state = HealthState()
        self._last_xid: dict[int, int] = {}

    def update(self, reading: NodeReading, verdicts: tuple[GPUVerdict, ...], state: HealthState) -> None:
        with self._lock:
            self._reading, self._verdicts, self._state = reading, verdicts, state
            for g in reading.gpus:
                if g.xids:
                    self._last_xid[g.index] = g.xids[-1]

    def _labels(self, g: GPUReading) -> list[str]:
        return [str(g.index), g.uuid or "", f"nvidia{g.index}", g.name or "", self.hostname]

    def collect(self) -> Iterator[GaugeMetricFamily]:
        with self._lock:
            reading, verdicts, state, last_xid = (
                self._reading,
                self._verdicts,
                self._state,
                dict(self._last_xid),
            )
        for name, help_text, get in _FIELDS:
            fam = GaugeMetricFamily(name, help_text, labels=_LABELS)
            for g in reading.gpus:
                value = get(g)
                if value is not None:
                    fam.add_metric(self._labels(g), float(value))
            yield fam
        xid = GaugeMetricFamily(
            "DCGM_FI_DEV_XID_ERRORS", "Value of the last XID error encountered.", labels=_LABELS
        )
        for g in reading.gpus:
            xid.add_metric(self._labels(g), float(last_xid.get(g.index, 0)))
        yield xid
        healthy = GaugeMetricFamily(
            "toposerve_gpu_healthy", "1 when the GPU is within every limit.", labels=_LABELS
        )
        by_index = {g.index: g for g in reading.gpus}
        for v in verdicts:
            healthy.add_metric(self._labels(by_index[v.index]), 1.0 if v.healthy else 0.0)
        yield healthy
        node = GaugeMetricFamily(
            "toposerve_node_gpu_healthy",
            "1 while the node's debounced GPU verdict is healthy.",
            labels=["Hostname"],
        )
        node.add_metric([self.hostname], 1.0 if state.healthy else 0.0)
        yield node
        errs = GaugeMetricFamily(
            "toposerve_nvml_errors", "NVML queries that failed in the last sample, by return code.",
            labels=["gpu", "query", "code"],
        )  # fmt: skip
        if reading.init_error is not None:
            errs.add_metric(["", "init", str(reading.init_error)], 1.0)
        for g in reading.gpus:
            for query, code in sorted(g.errors.items()):
                errs.add_metric([str(g.index), query, str(code)], 1.0)
        yield errs
