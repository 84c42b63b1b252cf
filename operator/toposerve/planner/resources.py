"""What a serving pod requests besides GPUs, sized for the machines that carry its GPU type (pure).

A GPU pod's CPU and memory requests must fit the GPU's share of the smallest common machine with
that GPU, after the node's system reservations: a 1-GPU L4 machine (GKE g2-standard-4, EKS
g6.xlarge) has 4 vCPU and 16 GB, of which about 3.9 CPU and 13 GiB are allocatable. Fixed
per-GPU requests (4 CPU, 16 GiB) leave such pods Pending forever.

Allocatable is estimated with GKE's published reservation formula, the most conservative of the
big providers (GKE docs "Standard cluster architecture: node allocatable resources", 2026):
memory 25% of the first 4 GiB, 20% of the next 4, 10% of the next 8, 6% of the next 112, 2% above
128 GiB, plus a 100 MiB eviction threshold; CPU 6% of the first core, 1% of the next, 0.5% of
the next 2, 0.25% above 4. A fraction (``hostShare``, default 0.8) of that is requested, leaving
room for DaemonSets (device plugin, GFD, log and metrics agents), capped per GPU by the operator
config. Requests come from the catalog, not the live nodes, so a new node never restarts serving
pods; the capacity view checks them against real allocatable and reports what does not fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from toposerve.api.gpus import GPUType

_MEM_TIERS = ((4.0, 0.25), (4.0, 0.20), (8.0, 0.10), (112.0, 0.06), (math.inf, 0.02))
_CPU_TIERS = ((1.0, 0.06), (1.0, 0.01), (2.0, 0.005), (math.inf, 0.0025))
EVICTION_GIB = 100 / 1024


def _reserved(total: float, tiers: tuple[tuple[float, float], ...]) -> float:
    left, out = total, 0.0
    for size, rate in tiers:
        take = min(left, size)
        out += take * rate
        left -= take
        if left <= 0:
            break
    return out


def allocatable(cpu: float, memory_gib: float) -> tuple[float, float]:
    """Estimated allocatable (cores, GiB) of a machine with ``cpu`` vCPUs and ``memory_gib``."""
    return cpu - _reserved(cpu, _CPU_TIERS), memory_gib - _reserved(memory_gib, _MEM_TIERS) - EVICTION_GIB


def cpu_quantity(cores: float) -> str:
    """Cores as a Kubernetes quantity: whole cores plain, others in millicores (3.1 -> 3100m)."""
    millis = round(cores * 1000)
    return str(millis // 1000) if millis % 1000 == 0 else f"{millis}m"


@dataclass(frozen=True)
class PodResources:
    cpu: float  # cores, rounded down to 100m
    memory_gib: int

    @property
    def cpu_quantity(self) -> str:
        return cpu_quantity(self.cpu)

    @property
    def memory_quantity(self) -> str:
        return f"{self.memory_gib}Gi"


def serving_pod(
    gpu: GPUType, gpus_per_pod: int, host_share: float, cap_cpu: float, cap_mem_gib: float
) -> PodResources:
    """CPU and memory requests of a pod using ``gpus_per_pod`` GPUs of type ``gpu``."""
    cpu, mem = allocatable(gpu.host_cpu_per_gpu, gpu.host_memory_gib_per_gpu)
    per_cpu = min(cap_cpu, cpu * host_share)
    per_mem = min(cap_mem_gib, mem * host_share)
    total_cpu = math.floor(per_cpu * gpus_per_pod * 10) / 10
    return PodResources(cpu=max(0.1, total_cpu), memory_gib=max(1, math.floor(per_mem * gpus_per_pod)))
