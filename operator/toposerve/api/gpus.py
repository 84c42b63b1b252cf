"""The GPU catalog: what the planner, renderer, mock engine and router know about each GPU type.

Names are canonical short names (``H100``); ``product`` is the value NVIDIA GPU Feature
Discovery writes to the ``nvidia.com/gpu.product`` node label and ``memoryMiB`` the value it
writes to ``nvidia.com/gpu.memory``, so the same catalog both renders node affinity and reads a
real cluster's inventory. ``throughputWeight`` is relative decode throughput (A100-80GB = 1.0):
decode is memory-bandwidth bound, so the weights follow bandwidth, and the router and mock
engine use them to share load and to time steps. Operators extend the catalog through config.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from pydantic import BaseModel, ConfigDict, Field


class GPUType(BaseModel):
    """One GPU model as the cluster sees it."""

    model_config = ConfigDict(populate_by_name=True, frozen=True, extra="forbid")

    name: str = Field(description="Canonical short name, e.g. H100.")
    product: str = Field(description="GFD nvidia.com/gpu.product label value.")
    memory_mib: int = Field(alias="memoryMiB", gt=0, description="GFD nvidia.com/gpu.memory (MiB).")
    family: str = Field(description="GFD nvidia.com/gpu.family label value (architecture).")
    generation: int = Field(description="Higher is newer; orders the latency-critical tier.")
    bandwidth_gbps: float = Field(alias="bandwidthGBps", gt=0, description="HBM/GDDR bandwidth, GB/s.")
    throughput_weight: float = Field(
        alias="throughputWeight", gt=0, description="Relative decode throughput, A100-80GB = 1.0."
    )
    hourly_price: float = Field(alias="hourlyPrice", ge=0, description="Default on-demand USD per GPU-hour.")
    spot_hourly_price: float = Field(
        alias="spotHourlyPrice", ge=0, description="Default spot USD per GPU-hour."
    )
    fp8: bool = Field(default=False, description="Native FP8 tensor cores (Hopper and newer, Ada).")

    @property
    def memory_gib(self) -> float:
        return self.memory_mib / 1024


def _g(**kw: object) -> GPUType:
    return GPUType.model_validate(kw)


# Prices are indicative public-cloud list prices (late 2026), overridable per cluster and per deployment.
BUILTIN_GPUS: tuple[GPUType, ...] = (
    _g(
        name="B200",
        product="NVIDIA-B200",
        memoryMiB=183359,
        family="blackwell",
        generation=5,
        bandwidthGBps=8000,
        throughputWeight=2.5,
        hourlyPrice=5.50,
        spotHourlyPrice=2.60,
        fp8=True,
    ),
    _g(
        name="H200",
        product="NVIDIA-H200",
        memoryMiB=143771,
        family="hopper",
        generation=4,
        bandwidthGBps=4800,
        throughputWeight=1.9,
        hourlyPrice=3.80,
        spotHourlyPrice=1.80,
        fp8=True,
    ),
    _g(
        name="H100",
        product="NVIDIA-H100-80GB-HBM3",
        memoryMiB=81559,
        family="hopper",
        generation=4,
        bandwidthGBps=3350,
        throughputWeight=1.6,
        hourlyPrice=2.50,
        spotHourlyPrice=1.20,
        fp8=True,
    ),
    _g(
        name="A100-80GB",
        product="NVIDIA-A100-SXM4-80GB",
        memoryMiB=81920,
        family="ampere",
        generation=3,
        bandwidthGBps=2039,
        throughputWeight=1.0,
        hourlyPrice=1.60,
        spotHourlyPrice=0.75,
    ),
    _g(
        name="A100-40GB",
        product="NVIDIA-A100-SXM4-40GB",
        memoryMiB=40960,
        family="ampere",
        generation=3,
        bandwidthGBps=1555,
        throughputWeight=0.8,
        hourlyPrice=1.20,
        spotHourlyPrice=0.55,
    ),
    _g(
        name="L40S",
        product="NVIDIA-L40S",
        memoryMiB=46068,
        family="ada-lovelace",
        generation=3,
        bandwidthGBps=864,
        throughputWeight=0.55,
        hourlyPrice=1.00,
        spotHourlyPrice=0.50,
        fp8=True,
    ),
    _g(
        name="L4",
        product="NVIDIA-L4",
        memoryMiB=23034,
        family="ada-lovelace",
        generation=3,
        bandwidthGBps=300,
        throughputWeight=0.2,
        hourlyPrice=0.50,
        spotHourlyPrice=0.25,
        fp8=True,
    ),
)


class GPUCatalog:
    """Lookup by canonical name or GFD product label; extensible with operator-configured types."""

    def __init__(self, gpus: Iterable[GPUType] = BUILTIN_GPUS) -> None:
        self._by_name: dict[str, GPUType] = {}
        for g in gpus:
            self._by_name[g.name] = g

    def extended(self, extra: Iterable[GPUType | Mapping[str, object]]) -> GPUCatalog:
        """A new catalog with ``extra`` added (same name replaces the built-in entry)."""
        items = [g if isinstance(g, GPUType) else GPUType.model_validate(g) for g in extra]
        return GPUCatalog([*self._by_name.values(), *items])

    def names(self) -> list[str]:
        return list(self._by_name)

    def get(self, name: str) -> GPUType:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"unknown GPU type {name!r}; known: {', '.join(self._by_name)}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def by_product(self, product: str) -> GPUType | None:
        """Map a GFD ``nvidia.com/gpu.product`` label back to a catalog entry."""
        for g in self._by_name.values():
            if g.product == product:
                return g
        return None


DEFAULT_CATALOG = GPUCatalog()


def throughput_weight(name: str, catalog: GPUCatalog = DEFAULT_CATALOG) -> float:
    """Relative decode speed of a GPU type (1.0 for unknown names, so nothing divides by zero)."""
    return catalog.get(name).throughput_weight if name in catalog else 1.0
