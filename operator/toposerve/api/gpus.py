"""The GPU catalog: what the planner, renderer, mock engine and router know about each GPU type.

Names are canonical short names (``H100``). Each entry also lists the values every common label
scheme uses for it (see ``nodelabels``): ``products`` as NVIDIA GPU Feature Discovery writes
``nvidia.com/gpu.product`` (the NVML name with spaces as dashes; SXM and PCIe builds differ),
``gkeAccelerators`` (GKE's ``cloud.google.com/gke-accelerator``), ``karpenterNames`` (Karpenter's
``karpenter.k8s.aws/instance-gpu-name``) and ``instanceTypes`` (EKS managed groups, AKS), so the
same catalog both renders node affinity and reads a real cluster's inventory, whatever the
provider. ``memoryMiB`` is the value GFD writes to ``nvidia.com/gpu.memory``. ``throughputWeight`` is relative decode throughput (A100-80GB = 1.0):
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
    compute_capability: float = Field(
        alias="computeCapability",
        default=8.0,
        description="CUDA compute capability (which kernels vLLM has).",
    )
    products: list[str] = Field(default_factory=list, description="More GFD product values (other builds).")
    gke_accelerators: list[str] = Field(
        alias="gkeAccelerators", default_factory=list, description="cloud.google.com/gke-accelerator values."
    )
    karpenter_names: list[str] = Field(
        alias="karpenterNames",
        default_factory=list,
        description="karpenter.k8s.aws/instance-gpu-name values.",
    )
    instance_types: list[str] = Field(
        alias="instanceTypes", default_factory=list, description="node.kubernetes.io/instance-type values."
    )
    nvlink_domain_gpus: int = Field(
        alias="nvlinkDomainGPUs",
        default=0,
        ge=0,
        description="GPUs in one NVLink domain when it spans nodes (72 for GB200 NVL72); 0: the node.",
    )
    host_cpu_per_gpu: float = Field(
        alias="hostCPUPerGPU",
        default=4.0,
        gt=0,
        description="vCPUs per GPU on the smallest common machine with this GPU (bounds CPU requests).",
    )
    host_memory_gib_per_gpu: float = Field(
        alias="hostMemoryGiBPerGPU",
        default=16.0,
        gt=0,
        description="Memory (GiB) per GPU on the smallest common machine with this GPU.",
    )

    def values_for(self, catalog_field: str) -> list[str]:
        """The values a label scheme uses for this GPU (``catalog_field`` as in ``GPUTypeScheme``)."""
        if catalog_field == "products":
            return [self.product, *self.products]
        return list(
            {
                "gkeAccelerators": self.gke_accelerators,
                "karpenterNames": self.karpenter_names,
                "instanceTypes": self.instance_types,
            }.get(catalog_field, [])
        )

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
        computeCapability=10.0,
        gkeAccelerators=["nvidia-b200"],
        karpenterNames=["b200"],
        instanceTypes=["p6-b200.48xlarge", "a4-highgpu-8g", "Standard_ND128isr_B200_v6"],
        hostCPUPerGPU=24,
        hostMemoryGiBPerGPU=256,
    ),
    _g(
        name="GB200",
        product="NVIDIA-GB200",
        memoryMiB=189471,
        family="blackwell",
        generation=5,
        bandwidthGBps=8000,
        throughputWeight=2.6,
        hourlyPrice=6.50,
        spotHourlyPrice=3.10,
        fp8=True,
        computeCapability=10.0,
        gkeAccelerators=["nvidia-gb200"],
        karpenterNames=["gb200"],
        instanceTypes=["p6e-gb200.36xlarge", "a4x-highgpu-4g", "Standard_ND128isr_NDR_GB200_v6"],
        # One NVL72 rack: 18 compute trays of 4 GPUs share one NVLink domain (GFD: nvidia.com/gpu.clique).
        nvlinkDomainGPUs=72,
        hostCPUPerGPU=35,
        hostMemoryGiBPerGPU=200,
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
        computeCapability=9.0,
        gkeAccelerators=["nvidia-h200-141gb"],
        karpenterNames=["h200"],
        instanceTypes=["p5e.48xlarge", "p5en.48xlarge", "a3-ultragpu-8g", "Standard_ND96isr_H200_v5"],
        hostCPUPerGPU=24,
        hostMemoryGiBPerGPU=256,
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
        computeCapability=9.0,
        gkeAccelerators=["nvidia-h100-80gb", "nvidia-h100-mega-80gb"],
        karpenterNames=["h100"],
        instanceTypes=[
            "p5.48xlarge",
            "p5.4xlarge",
            "a3-highgpu-1g",
            "a3-highgpu-2g",
            "a3-highgpu-4g",
            "a3-highgpu-8g",
            "a3-megagpu-8g",
            "Standard_ND96isr_H100_v5",
        ],
        hostCPUPerGPU=16,
        hostMemoryGiBPerGPU=200,
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
        computeCapability=8.0,
        products=["NVIDIA-A100-80GB-PCIe"],
        gkeAccelerators=["nvidia-a100-80gb"],
        karpenterNames=["a100"],
        instanceTypes=[
            "p4de.24xlarge",
            "a2-ultragpu-1g",
            "a2-ultragpu-2g",
            "a2-ultragpu-4g",
            "a2-ultragpu-8g",
            "Standard_NC24ads_A100_v4",
            "Standard_NC48ads_A100_v4",
            "Standard_NC96ads_A100_v4",
            "Standard_ND96amsr_A100_v4",
        ],
        hostCPUPerGPU=12,
        hostMemoryGiBPerGPU=150,
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
        computeCapability=8.0,
        products=["NVIDIA-A100-PCIE-40GB"],
        gkeAccelerators=["nvidia-tesla-a100"],
        karpenterNames=["a100"],
        instanceTypes=[
            "p4d.24xlarge",
            "a2-highgpu-1g",
            "a2-highgpu-2g",
            "a2-highgpu-4g",
            "a2-highgpu-8g",
            "a2-megagpu-16g",
            "Standard_ND96asr_v4",
        ],
        hostCPUPerGPU=12,
        hostMemoryGiBPerGPU=75,
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
        computeCapability=8.9,
        karpenterNames=["l40s"],
        instanceTypes=[
            "g6e.xlarge",
            "g6e.2xlarge",
            "g6e.4xlarge",
            "g6e.8xlarge",
            "g6e.12xlarge",
            "g6e.16xlarge",
            "g6e.24xlarge",
            "g6e.48xlarge",
        ],
        hostCPUPerGPU=4,
        hostMemoryGiBPerGPU=32,
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
        computeCapability=8.9,
        gkeAccelerators=["nvidia-l4"],
        karpenterNames=["l4"],
        instanceTypes=[
            "g2-standard-4",
            "g2-standard-8",
            "g2-standard-12",
            "g2-standard-16",
            "g2-standard-24",
            "g2-standard-32",
            "g2-standard-48",
            "g2-standard-96",
            "g6.xlarge",
            "g6.2xlarge",
            "g6.4xlarge",
            "g6.8xlarge",
            "g6.12xlarge",
            "g6.16xlarge",
            "g6.24xlarge",
            "g6.48xlarge",
        ],
        hostCPUPerGPU=4,
        hostMemoryGiBPerGPU=16,
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
        return self.by_value("products", product)

    def by_value(self, catalog_field: str, value: str, memory_mib: int | None = None) -> GPUType | None:
        """The entry whose ``catalog_field`` values contain ``value`` (case-insensitive); when several
        builds share a value (Karpenter's ``a100`` is both A100 40 and 80 GB), the one closest to
        ``memory_mib``, or the first when the node does not say."""
        want = value.lower()
        hits = [g for g in self._by_name.values() if want in (v.lower() for v in g.values_for(catalog_field))]
        if len(hits) > 1 and memory_mib:
            return min(hits, key=lambda g: abs(g.memory_mib - memory_mib))
        return hits[0] if hits else None

    def gpus(self) -> list[GPUType]:
        return list(self._by_name.values())


DEFAULT_CATALOG = GPUCatalog()


def throughput_weight(name: str, catalog: GPUCatalog = DEFAULT_CATALOG) -> float:
    """Relative decode speed of a GPU type (1.0 for unknown names, so nothing divides by zero)."""
    return catalog.get(name).throughput_weight if name in catalog else 1.0
