"""What serving costs: GPU prices, cost per hour and cost per million output tokens (pure).

Two views of the same arithmetic. The *plan* prices the desired replicas (``PoolPlan.cost_per_hour``)
before anything runs. The *observed* view prices what actually holds GPUs now: every serving pod
bound to a node costs its ``nvidia.com/gpu`` limit times the price of its GPU type on that node's
capacity type (a spot node at the spot price, anything else on-demand), and divides by the output
tokens per second the engines report (``rate(vllm:generation_tokens_total[window])``), so
pods still loading weights count as cost and not as throughput: the figure users pay.

Prices come, most specific first, from the LLMDeployment's ``spec.cost``, the operator config's
``hourlyPerGPU`` / ``spotHourlyPerGPU``, then the GPU catalog's indicative list prices.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from toposerve.api.config import OperatorConfig
from toposerve.api.gpus import GPUCatalog
from toposerve.api.spec import CostSpec

SECONDS_PER_HOUR = 3600.0
GPU_RESOURCE = "nvidia.com/gpu"
LABEL_POOL = "toposerve.io/pool"
LABEL_GPU_TYPE = "toposerve.io/gpu-type"
LABEL_COMPONENT = "app.kubernetes.io/component"
SERVING_COMPONENTS = ("engine", "worker")  # a multi-node replica's workers hold GPUs too

PriceFn = Callable[[str, bool], float]


def gpu_hourly_price(
    gpu_type: str,
    spot: bool,
    config: OperatorConfig,
    catalog: GPUCatalog | None = None,
    overrides: CostSpec | None = None,
) -> float:
    """USD per GPU-hour of ``gpu_type``: spec override, then operator config, then the catalog."""
    catalog = catalog or config.catalog()
    if spot:
        tables = (overrides.spot_hourly_per_gpu if overrides else {}, config.spot_hourly_per_gpu)
    else:
        tables = (overrides.hourly_per_gpu if overrides else {}, config.hourly_per_gpu)
    for t in tables:
        if gpu_type in t:
            return float(t[gpu_type])
    if gpu_type not in catalog:
        return 0.0  # a pod labelled with a type the catalog does not know: unpriced, not a crash
    g = catalog.get(gpu_type)
    return g.spot_hourly_price if spot else g.hourly_price


def cost_per_million_tokens(cost_per_hour: float, tokens_per_second: float | None) -> float | None:
    """USD per million tokens at ``tokens_per_second``; None when nothing was produced (no division
    by zero, and no misleading 0 or infinity either)."""
    if tokens_per_second is None or tokens_per_second <= 0:
        return None
    return cost_per_hour / (tokens_per_second * SECONDS_PER_HOUR) * 1_000_000


@dataclass(frozen=True)
class PoolCost:
    """The observed cost of one pool (or of a whole deployment)."""

    name: str
    gpus: int = 0
    spot_gpus: int = 0
    cost_per_hour: float = 0.0
    output_tokens_per_second: float | None = None  # None: no throughput source or no samples

    @property
    def cost_per_million_output_tokens(self) -> float | None:
        return cost_per_million_tokens(self.cost_per_hour, self.output_tokens_per_second)


@dataclass(frozen=True)
class DeploymentCost:
    namespace: str
    name: str
    pools: tuple[PoolCost, ...] = field(default_factory=tuple)

    @property
    def total(self) -> PoolCost:
        tps = [p.output_tokens_per_second for p in self.pools if p.output_tokens_per_second is not None]
        return PoolCost(
            name="total",
            gpus=sum(p.gpus for p in self.pools),
            spot_gpus=sum(p.spot_gpus for p in self.pools),
            cost_per_hour=sum(p.cost_per_hour for p in self.pools),
            output_tokens_per_second=sum(tps) if tps else None,
        )


def pod_gpus(pod: Mapping[str, Any]) -> int:
    """GPUs a pod holds: the sum of its containers' ``nvidia.com/gpu`` limits (extended resources
    must have requests equal to limits, so limits say it; init containers run before, not beside)."""
    total = 0
    for c in (pod.get("spec") or {}).get("containers") or []:
        res = c.get("resources") or {}
        value = (res.get("limits") or {}).get(GPU_RESOURCE, (res.get("requests") or {}).get(GPU_RESOURCE, 0))
        try:
            total += int(str(value))
        except ValueError:
            continue
    return total


def _holds_gpus(pod: Mapping[str, Any]) -> bool:
    """Bound to a node and not finished: the kubelet holds its devices until the pod ends, so a
    terminating pod still costs."""
    phase = (pod.get("status") or {}).get("phase")
    return bool((pod.get("spec") or {}).get("nodeName")) and phase not in ("Succeeded", "Failed")


def observed_cost(
    namespace: str,
    name: str,
    pods: Iterable[Mapping[str, Any]],
    node_spot: Mapping[str, bool],
    price: PriceFn,
    tokens_per_second: Mapping[str, float] | None,
    pools: Iterable[str] = (),
) -> DeploymentCost:
    """Per-pool cost of the serving pods of one deployment.

    ``node_spot``: node name -> whether it is spot capacity; ``tokens_per_second``: engine pod name
    -> output tokens/s (None: no throughput source, so throughput stays unknown rather than 0);
    ``pools``: pool names to report even when none of their pods runs.
    """
    gpus: dict[str, int] = dict.fromkeys(pools, 0)
    spot_gpus: dict[str, int] = dict.fromkeys(pools, 0)
    dollars: dict[str, float] = dict.fromkeys(pools, 0.0)
    tps: dict[str, float] = {}
    for pod in pods:
        meta = pod.get("metadata") or {}
        labels = meta.get("labels") or {}
        if labels.get(LABEL_COMPONENT) not in SERVING_COMPONENTS:
            continue
        pool = str(labels.get(LABEL_POOL, ""))
        gpus.setdefault(pool, 0)
        spot_gpus.setdefault(pool, 0)
        dollars.setdefault(pool, 0.0)
        if tokens_per_second is not None and meta.get("name") in tokens_per_second:
            tps[pool] = tps.get(pool, 0.0) + tokens_per_second[str(meta["name"])]
        if not _holds_gpus(pod):
            continue
        n = pod_gpus(pod)
        spot = node_spot.get(str(pod["spec"]["nodeName"]), False)
        gpus[pool] += n
        spot_gpus[pool] += n if spot else 0
        dollars[pool] += n * price(str(labels.get(LABEL_GPU_TYPE, "")), spot)
    out = tuple(
        PoolCost(
            name=p,
            gpus=gpus[p],
            spot_gpus=spot_gpus[p],
            cost_per_hour=round(dollars[p], 4),
            output_tokens_per_second=tps.get(p, 0.0) if tokens_per_second is not None else None,
        )
        for p in gpus
    )
    return DeploymentCost(namespace=namespace, name=name, pools=out)


def throughput_query(namespace: str, window: str) -> str:
    """PromQL for output tokens/s per engine pod of one namespace. vLLM exports the counter
    ``vllm:generation_tokens_total`` (docs.vllm.ai, "Production Metrics"); Prometheus' kubernetes_sd
    relabelling conventionally adds ``namespace`` and ``pod`` target labels."""
    return f'sum by (pod) (rate(vllm:generation_tokens_total{{namespace="{namespace}"}}[{window}]))'


def rates_by_pod(result: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """Parse an instant-vector query result (``[{"metric": {"pod": ...}, "value": [ts, "1.5"]}]``,
    Prometheus HTTP API) into pod name -> value; series without a pod label or a finite value are
    skipped."""
    out: dict[str, float] = {}
    for s in result:
        pod = (s.get("metric") or {}).get("pod")
        value = s.get("value") or []
        if not pod or len(value) != 2:
            continue
        try:
            v = float(value[1])
        except (TypeError, ValueError):
            continue
        if v == v and v not in (float("inf"), float("-inf")):  # NaN and infinities say nothing
            out[str(pod)] = out.get(str(pod), 0.0) + v
    return out
