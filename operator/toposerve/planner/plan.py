"""From an LLMDeployment spec to one plan per GPU pool (pure: no I/O, no clock).

For each pool the planner walks the pool's GPU types in order (the fallback order) and takes the
first type on which some layout fits the memory model (see ``memory``); the types it passed over
are listed under ``alternatives`` with the reason. Explicit parallelism values are checked, never
changed. ``auto`` searches, smallest first:

1. one node: TP = 1, 2, 4, ... (powers of two dividing the attention heads, up to GPUs per node);
2. long-context tier only: TP = the largest legal size, then context parallel 2, 4, ... (CP shards
   the KV cache of one sequence, so it helps when the context, not the weights, is too big);
3. TP = the largest legal size, then pipeline stages 2, 3, ... (usually whole nodes per stage).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from toposerve.api import llm_catalog
from toposerve.api.config import OperatorConfig
from toposerve.api.errors import SpecError
from toposerve.api.gpus import GPUCatalog, GPUType
from toposerve.api.spec import DTYPE_BYTES, Architecture, LLMDeploymentSpec, ParallelismSpec, PoolSpec
from toposerve.planner.inventory import Inventory
from toposerve.planner.memory import GIB, Fit, Layout, ModelMemory, evaluate
from toposerve.planner.replicas import distribute
from toposerve.planner.tiers import tier_order


class _Out(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, frozen=True)


class Rejected(_Out):
    """A GPU type the planner passed over, and why."""

    gpu_type: str
    reason: str


class PoolPlan(_Out):
    """The plan of one pool: where it runs, how each replica is parallelised, what it costs."""

    name: str
    gpu_type: str | None
    fits: bool
    reason: str | None = None
    candidates: list[str] = Field(default_factory=list)
    tensor_parallel: int = 0
    pipeline_parallel: int = 0
    context_parallel: int = 0
    expert_parallel: int = 1
    data_parallel: int = 1
    gpus_per_replica: int = 0
    nodes_per_replica: int = 0
    gpus_per_pod: int = 0
    weights_gib_per_gpu: float = Field(default=0.0, alias="weightsGiBPerGPU")
    kv_cache_gib_per_gpu: float = Field(default=0.0, alias="kvCacheGiBPerGPU")
    kv_cache_tokens_per_replica: int = 0
    max_context_length: int = 0
    dtype: str = "bf16"
    kv_cache_dtype: str = "bf16"
    quantization: str | None = None
    spot: bool = False
    replicas: int = 0
    cost_per_hour_per_replica: float = 0.0
    cost_per_hour: float = 0.0
    alternatives: list[Rejected] = Field(default_factory=list)
    vllm_args: list[str] = Field(default_factory=list)


class DeploymentPlan(_Out):
    """The plans of all pools of one LLMDeployment, plus the engine decision."""

    name: str
    model: str
    served_name: str
    engine: str
    engine_reason: str
    pools: list[PoolPlan]

    @property
    def fits(self) -> bool:
        return any(p.fits for p in self.pools)

    @property
    def cost_per_hour(self) -> float:
        return round(sum(p.cost_per_hour for p in self.pools), 4)


@dataclass(frozen=True)
class _Choice:
    layout: Layout
    fit: Fit
    nodes: int


def resolve_architecture(spec: LLMDeploymentSpec) -> Architecture:
    if spec.model.architecture is not None:
        return spec.model.architecture
    arch = llm_catalog.lookup(spec.model.name)
    if arch is None:
        raise SpecError(
            "spec.model.architecture",
            f"required for model {spec.model.name!r}, which is not in the built-in catalog "
            f"(known: {', '.join(llm_catalog.known_models())})",
        )
    return arch


def context_length(spec: LLMDeploymentSpec, arch: Architecture, config: OperatorConfig) -> int:
    native = arch.max_position_embeddings
    ctx = spec.model.max_context_length or native or config.default_context_length
    if native is not None and ctx > native:
        raise SpecError(
            "spec.model.maxContextLength",
            f"{ctx} exceeds the model's native context length {native}",
        )
    return ctx


def _legal_tp(arch: Architecture, tp: int) -> bool:
    kv_ok = arch.kv_heads % tp == 0 or tp % arch.kv_heads == 0
    return arch.attention_heads % tp == 0 and kv_ok


def _fixed(value: int | str) -> int | None:
    return value if isinstance(value, int) else None


def _check_explicit(arch: Architecture, par: ParallelismSpec, path: str) -> None:
    tp = _fixed(par.tensor)
    if tp is not None and not _legal_tp(arch, tp):
        raise SpecError(
            f"{path}.tensor",
            f"{tp} does not divide the model's {arch.attention_heads} attention heads "
            f"(and {arch.kv_heads} KV heads)",
        )
    pp = _fixed(par.pipeline)
    if pp is not None and pp > arch.layers:
        raise SpecError(f"{path}.pipeline", f"{pp} stages exceed the model's {arch.layers} layers")
    ep = _fixed(par.expert)
    if ep is not None and ep > 1:
        if arch.experts == 0:
            raise SpecError(
                f"{path}.expert", "expert parallelism needs a mixture-of-experts model; this one is dense"
            )
        dp = _fixed(par.data) or 1
        if tp is not None and ep != tp * dp:
            raise SpecError(
                f"{path}.expert",
                f"vLLM's expert parallel size equals tensor x data = {tp * dp}, not {ep}",
            )
        if ep % dp:
            raise SpecError(f"{path}.expert", f"{ep} is not a multiple of data parallel size {dp}")


def _search(
    m: ModelMemory,
    arch: Architecture,
    par: ParallelismSpec,
    gpu: GPUType,
    gpn: int,
    ctx: int,
    spec: LLMDeploymentSpec,
    config: OperatorConfig,
) -> tuple[_Choice | None, str]:
    """The first fitting layout in search order, or None and why the last try failed."""
    dp = _fixed(par.data) or 1
    ep = _fixed(par.expert)
    tp_fixed = _fixed(par.tensor)
    if tp_fixed is None and ep is not None and ep > 1:
        tp_fixed = ep // dp
    tps = (
        [tp_fixed]
        if tp_fixed is not None
        else [t for t in (2**i for i in range(8)) if t <= gpn and _legal_tp(arch, t)]
    )
    if not tps:
        return None, f"no legal tensor parallel size within {gpn} GPUs per node"
    if tps[-1] > gpn:
        return None, f"tensor parallel {tps[-1]} exceeds the {gpn} GPUs of one node (TP stays inside NVLink)"
    pp_fixed, cp_fixed = _fixed(par.pipeline), _fixed(par.context)
    max_pp = min(config.max_pipeline_parallel, arch.layers)
    long_ctx = spec.placement.tier == "long-context"
    tries: list[Layout] = []
    # 1. one node, growing TP
    tries += [Layout(tp=t, pp=pp_fixed or 1, cp=cp_fixed or 1, dp=dp) for t in tps]
    top = tps[-1]
    # 2. long context: context parallel before pipeline stages
    if cp_fixed is None and long_ctx:
        tries += [
            Layout(tp=top, pp=pp_fixed or 1, cp=c, dp=dp) for c in range(2, config.max_context_parallel + 1)
        ]
    # 3. pipeline stages at the largest TP
    if pp_fixed is None:
        tries += [Layout(tp=top, pp=p, cp=cp_fixed or 1, dp=dp) for p in range(2, max_pp + 1)]
    last = "no layout tried"
    min_seqs = spec.serving.min_concurrent_sequences
    for layout in tries:
        gpus = layout.gpus
        nodes = math.ceil(gpus / gpn)
        if gpus % nodes:
            last = f"{gpus} GPUs per replica do not split evenly over {nodes} nodes of {gpn}"
            continue
        fit = evaluate(
            m,
            layout,
            gpu.memory_mib,
            spec.serving.gpu_memory_utilization,
            spec.serving.runtime_reserve_gib,
            ctx,
            min_seqs,
        )
        if fit.fits:
            return _Choice(layout, fit, nodes), ""
        last = f"TP {layout.tp} x PP {layout.pp}" + (f" x CP {layout.cp}" if layout.cp > 1 else "")
        last += f": {fit.shortfall()}"
    return None, last


def _quantization(dtype: str, explicit: str | None) -> str | None:
    if explicit:
        return explicit
    return {"fp8": "fp8", "int8": "bitsandbytes", "int4": "bitsandbytes"}.get(dtype)


_VLLM_DTYPE = {"bf16": "bfloat16", "fp16": "float16"}


def vllm_args(
    spec: LLMDeploymentSpec,
    served: str,
    layout: Layout,
    nodes: int,
    ctx: int,
    dtype: str,
    kv: str,
    quant: str | None,
    ep: bool,
) -> list[str]:
    """The vLLM ``serve`` arguments that realise a plan (current flag names)."""
    args = [
        spec.model.name,
        "--served-model-name", served,
        "--tensor-parallel-size", str(layout.tp),
        "--pipeline-parallel-size", str(layout.pp),
        "--max-model-len", str(ctx),
        "--gpu-memory-utilization", f"{spec.serving.gpu_memory_utilization:g}",
        "--dtype", _VLLM_DTYPE.get(dtype, "auto"),
    ]  # fmt: skip
    if kv == "fp8":
        args += ["--kv-cache-dtype", "fp8"]
    if quant:
        args += ["--quantization", quant]
    if layout.dp > 1:
        args += ["--data-parallel-size", str(layout.dp)]
    if ep:
        args += ["--enable-expert-parallel"]
    if layout.cp > 1:
        args += ["--prefill-context-parallel-size", str(layout.cp)]
    if nodes > 1:
        args += ["--distributed-executor-backend", "ray"]
    return args + list(spec.serving.extra_args)


def _price(
    gpu: str, spot: bool, spec: LLMDeploymentSpec, config: OperatorConfig, catalog: GPUCatalog
) -> float:
    if spot:
        table, fallback = (
            (spec.cost.spot_hourly_per_gpu, config.spot_hourly_per_gpu),
            catalog.get(gpu).spot_hourly_price,
        )
    else:
        table, fallback = (spec.cost.hourly_per_gpu, config.hourly_per_gpu), catalog.get(gpu).hourly_price
    for t in table:
        if gpu in t:
            return float(t[gpu])
    return fallback


def _pools(spec: LLMDeploymentSpec) -> list[PoolSpec]:
    if spec.pools:
        return list(spec.pools)
    return [PoolSpec(name="default", gpu_types=list(spec.placement.gpu_types) or ["auto"])]


def _pool_path(spec: LLMDeploymentSpec, index: int) -> str:
    return f"spec.pools[{index}]" if spec.pools else "spec.placement"


def plan_pool(
    spec: LLMDeploymentSpec,
    pool: PoolSpec,
    index: int,
    arch: Architecture,
    ctx: int,
    config: OperatorConfig,
    catalog: GPUCatalog,
    inventory: Inventory | None,
    need_gpus: bool,
) -> PoolPlan:
    """Plan one pool: the first GPU type in its order on which a layout fits."""
    dtype = pool.dtype or spec.model.dtype
    kv = pool.kv_cache_dtype or spec.model.kv_cache_dtype
    quant = _quantization(dtype, pool.quantization or spec.model.quantization)
    spot = spec.placement.spot if pool.spot is None else pool.spot
    par = pool.parallelism or spec.parallelism
    par_path = f"spec.pools[{index}].parallelism" if pool.parallelism else "spec.parallelism"
    _check_explicit(arch, par, par_path)
    m = ModelMemory(
        parameters_b=arch.parameters, layers=arch.layers, kv_heads=arch.kv_heads, head_dim=arch.head_dim,
        weight_bytes=DTYPE_BYTES[dtype], kv_bytes=DTYPE_BYTES[kv],
    )  # fmt: skip
    path = _pool_path(spec, index)
    if pool.gpu_types == ["auto"]:

        def single(g: GPUType) -> bool:
            return evaluate(
                m, Layout(), g.memory_mib, spec.serving.gpu_memory_utilization,
                spec.serving.runtime_reserve_gib, ctx, spec.serving.min_concurrent_sequences,
            ).fits  # fmt: skip

        order = tier_order(spec.placement.tier, catalog, arch.parameters, single, spot)
    else:
        order = list(pool.gpu_types)
        for i, name in enumerate(order):
            if name not in catalog:
                raise SpecError(
                    f"{path}.gpuTypes[{i}]", f"unknown GPU type {name!r}; known: {', '.join(catalog.names())}"
                )
    rejected: list[Rejected] = []
    for name in order:
        gpu = catalog.get(name)
        if need_gpus and inventory is not None and not inventory.nodes_of(name, spot):
            where = "" if spot else " (on-demand; spot not allowed)"
            rejected.append(Rejected(gpu_type=name, reason=f"no {name} nodes in the cluster{where}"))
            continue
        inv_gpn = inventory.gpus_per_node(name) if inventory is not None else None
        gpn = spec.placement.gpus_per_node or inv_gpn or config.default_gpus_per_node
        choice, why = _search(m, arch, par, gpu, gpn, ctx, spec, config)
        if choice is None:
            rejected.append(Rejected(gpu_type=name, reason=why))
            continue
        if need_gpus and inventory is not None and choice.nodes > 1:
            per_pod = choice.layout.gpus // choice.nodes
            big = [n for n in inventory.nodes_of(name, spot) if n.allocatable_gpus >= per_pod]
            if len(big) < choice.nodes:
                rejected.append(Rejected(
                    gpu_type=name,
                    reason=f"needs {choice.nodes} nodes with {per_pod} GPUs; the cluster has {len(big)}",
                ))  # fmt: skip
                continue
        layout, fit = choice.layout, choice.fit
        ep_auto = par.expert == "auto" and arch.experts > 0 and layout.tp * layout.dp > 1
        ep_on = ep_auto or (isinstance(par.expert, int) and par.expert > 1)
        price = _price(name, spot, spec, config, catalog)
        per_replica = round(price * layout.gpus, 4)
        free = fit.free_bytes_per_gpu
        served = spec.model.served_name or spec.model.name
        return PoolPlan(
            name=pool.name,
            gpu_type=name,
            fits=True,
            candidates=order,
            tensor_parallel=layout.tp,
            pipeline_parallel=layout.pp,
            context_parallel=layout.cp,
            expert_parallel=layout.tp * layout.dp if ep_on else 1,
            data_parallel=layout.dp,
            gpus_per_replica=layout.gpus,
            nodes_per_replica=choice.nodes,
            gpus_per_pod=layout.gpus // choice.nodes,
            weights_gib_per_gpu=round(fit.weights_bytes_per_gpu / GIB, 2),
            kv_cache_gib_per_gpu=round(free / GIB, 2),
            kv_cache_tokens_per_replica=fit.kv_capacity_tokens,
            max_context_length=ctx,
            dtype=dtype,
            kv_cache_dtype=kv,
            quantization=quant,
            spot=spot,
            cost_per_hour_per_replica=per_replica,
            alternatives=rejected,
            vllm_args=vllm_args(spec, served, layout, choice.nodes, ctx, dtype, kv, quant, ep_on),
        )
    summary = "; ".join(f"{r.gpu_type}: {r.reason}" for r in rejected) or "no GPU types to try"
    return PoolPlan(
        name=pool.name, gpu_type=None, fits=False, candidates=order, max_context_length=ctx, dtype=dtype,
        kv_cache_dtype=kv, quantization=quant, spot=spot, alternatives=rejected,
        reason=f"no acceptable GPU type fits: {summary}",
    )  # fmt: skip


def resolve_engine(
    spec: LLMDeploymentSpec, inventory: Inventory | None, auto: str = "detect"
) -> tuple[str, str]:
    """(engine, why): ``auto`` means vLLM on GPU clusters and the mock engine on clusters without GPUs."""
    if spec.engine != "auto":
        return spec.engine, f"spec.engine is {spec.engine}"
    if auto != "detect":
        return auto, f"engine auto: the operator config sets autoEngine to {auto}"
    if inventory is None:
        return "vllm", "engine auto without a node inventory: assuming a GPU cluster"
    if inventory.has_gpus:
        return "vllm", "engine auto: the cluster has GPU nodes"
    return "mock", "engine auto: the cluster has no GPU nodes, serving the CPU mock engine"


def plan_deployment(
    name: str,
    spec: LLMDeploymentSpec,
    config: OperatorConfig | None = None,
    inventory: Inventory | None = None,
    pool_overrides: dict[str, Sequence[str]] | None = None,
) -> DeploymentPlan:
    """Plan every pool of one LLMDeployment.

    ``pool_overrides`` maps a pool name to the GPU type order to use instead of the spec's (the
    controller passes the remaining fallback order after a type proved unschedulable).
    Raises ``SpecError`` for specs that cannot be served as written.
    """
    config = config or OperatorConfig()
    catalog = config.catalog()
    arch = resolve_architecture(spec)
    ctx = context_length(spec, arch, config)
    engine, why = resolve_engine(spec, inventory, config.auto_engine)
    need_gpus = engine == "vllm"
    plans: list[PoolPlan] = []
    for i, pool in enumerate(_pools(spec)):
        if pool_overrides and pool.name in pool_overrides:
            pool = pool.model_copy(update={"gpu_types": list(pool_overrides[pool.name])})
        plans.append(plan_pool(spec, pool, i, arch, ctx, config, catalog, inventory, need_gpus))
    weights = [
        (p.name, next(s.weight for s in _pools(spec) if s.name == p.name) if p.fits else 0) for p in plans
    ]
    shares = distribute(spec.replicas, weights)
    plans = [
        p.model_copy(
            update={
                "replicas": shares[p.name],
                "cost_per_hour": round(p.cost_per_hour_per_replica * shares[p.name], 4),
            }
        )
        for p in plans
    ]
    return DeploymentPlan(
        name=name,
        model=spec.model.name,
        served_name=spec.model.served_name or spec.model.name,
        engine=engine,
        engine_reason=why,
        pools=plans,
    )
