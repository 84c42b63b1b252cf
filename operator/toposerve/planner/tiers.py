"""The placement tier matrix: which GPU types a tier tries, in which order, when the user lists none.

From the seed lesson's placement matrix: latency-critical work goes to the newest generation with
A100-80GB as overflow; throughput work prefers A100-80GB (then newer GPUs if available, A100-40GB
if quantized); long-context needs the most memory; batch takes the cheapest price per unit of
decode throughput. Small models (<= 15B parameters) in the throughput and batch tiers prefer the
smallest GPU that holds a whole replica.
"""

from __future__ import annotations

from collections.abc import Callable

from toposerve.api.gpus import GPUCatalog, GPUType

TIER_ORDER: dict[str, tuple[str, ...]] = {
    "latency-critical": ("B200", "H200", "H100", "A100-80GB"),
    "throughput": ("A100-80GB", "H100", "H200", "B200", "A100-40GB", "L40S"),
    "long-context": ("B200", "H200", "H100", "A100-80GB"),
}
SMALL_MODEL_B = 15.0


def _newest_first(g: GPUType) -> tuple[int, int]:
    return (-g.generation, -g.memory_mib)


def tier_order(
    tier: str,
    catalog: GPUCatalog,
    parameters_b: float,
    fits_single_gpu: Callable[[GPUType], bool],
    spot: bool = False,
) -> list[str]:
    """GPU type names in the order ``tier`` tries them."""
    # Rack-scale NVLink systems (GB200 NVL72) are used when listed, never chosen by a tier.
    gpus = [g for g in catalog.gpus() if not g.nvlink_domain_gpus]
    if tier == "batch":

        def per_throughput(g: GPUType) -> float:
            return (g.spot_hourly_price if spot else g.hourly_price) / g.throughput_weight

        order = [g.name for g in sorted(gpus, key=per_throughput)]
    else:
        base = [n for n in TIER_ORDER[tier] if n in catalog]
        extra = [g.name for g in sorted(gpus, key=_newest_first) if g.name not in TIER_ORDER[tier]]
        # Extended (operator-configured) types join the tier by generation; built-ins outside the
        # tier's list stay out, as the matrix says ("---"). GB200 racks are a deliberate purchase
        # (a whole NVL72 domain), so they are used when listed, never picked by a tier.
        builtin = {"GB200", "B200", "H200", "H100", "A100-80GB", "A100-40GB", "L40S", "L4"}
        order = base + [n for n in extra if n not in builtin]
    if tier in ("throughput", "batch") and parameters_b <= SMALL_MODEL_B:
        single = sorted((g for g in gpus if fits_single_gpu(g)), key=lambda g: (g.memory_mib, -g.generation))
        first = [g.name for g in single]
        order = first + [n for n in order if n not in first]
    return order
