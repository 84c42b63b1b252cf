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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from toposerve.api import llm_catalog
from toposerve.api.config import OperatorConfig
from toposerve.api.errors import SpecError
from toposerve.api.gpus import GPUCatalog, GPUType
from toposerve.api.nodelabels import GFD_CLIQUE
from toposerve.api.spec import DTYPE_BYTES, Architecture, LLMDeploymentSpec, ParallelismSpec, PoolSpec
from toposerve.planner import poolorder, quantization, resources
from toposerve.planner.cost import gpu_hourly_price
from toposerve.planner.inventory import Inventory, PodShape, provisioned_topology, topology_key_for
from toposerve.planner.memory import GIB, Fit, Layout, ModelMemory, evaluate
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
    checkpoint: str | None = None  # the weights loaded, when not model.name
    weights_gib: float = Field(default=0.0, alias="weightsGiB")  # the whole checkpoint (download size)
    cpu_per_pod: float = 0.0
    memory_gib_per_pod: int = Field(default=0, alias="memoryGiBPerPod")
    ephemeral_gib_per_pod: int = Field(default=0, alias="ephemeralGiBPerPod")  # weights + scratch
    topology_key: str | None = None  # multi-node replicas: the label whose domain holds a replica
    # Better domains a replica is only steered to (preferred pod affinity), best first: the pool has
    # no node now and the nodes a provisioner creates may lack these labels (planner/inventory.py).
    preferred_topology_keys: list[str] = Field(default_factory=list)
    topology_reason: str | None = None
    nvlink_across_nodes: bool = Field(
        default=False, alias="nvlinkAcrossNodes"
    )  # TP spans nodes of one domain
    spot: bool = False
    spot_note: str | None = None  # spot was asked for but the operator does not allow it for this tier
    on_demand_baseline: int = 0  # replicas (per GPU type) kept on on-demand nodes while spot is on
    on_demand_cover: int = 0  # more on-demand replicas covering spot ones under a notice (spotcover.py)
    replicas: int = 0  # pods the workload runs: serving replicas plus warm standby
    serving_replicas: int = 0  # of those, the pool's share of spec.replicas (in rotation)
    cost_per_hour_per_replica: float = 0.0
    on_demand_cost_per_hour_per_replica: float = 0.0  # the baseline's replicas (spot pools)
    cost_per_hour: float = 0.0
    decode_step_ms: float = 0.0  # estimated decode step of one replica (planner/poolorder.py)
    order: int | None = None  # place in the growth order (poolOrder tier); None: weight split or no fit
    room: int | None = None  # replicas the inventory can hold now (when the controller knows)
    max_replicas: int | None = None  # pools[].maxReplicas
    alternatives: list[Rejected] = Field(default_factory=list)
    vllm_args: list[str] = Field(default_factory=list)


class DeploymentPlan(_Out):
    """The plans of all pools of one LLMDeployment, plus the engine decision."""

    name: str
    model: str
    gated: bool = False  # the hub asks for a token before serving the weights
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
    nvlink_domain: int = 0,
) -> tuple[_Choice | None, str]:
    """The first fitting layout in search order, or None and why the last try failed."""
    dp = _fixed(par.data) or 1
    ep = _fixed(par.expert)
    tp_fixed = _fixed(par.tensor)
    if tp_fixed is None and ep is not None and ep > 1:
        tp_fixed = ep // dp
    # TP stays inside one NVLink domain: the node, or a multi-node domain (GB200 NVL72: 72 GPUs over
    # 18 nodes), where TP may span nodes; beyond the domain only pipeline stages cross the network.
    domain = max(gpn, nvlink_domain)
    tps = (
        [tp_fixed]
        if tp_fixed is not None
        else [t for t in (2**i for i in range(8)) if t <= domain and _legal_tp(arch, t)]
    )
    if not tps:
        return None, f"no legal tensor parallel size within {domain} GPUs of one NVLink domain"
    if tps[-1] > domain:
        where = "one node" if domain == gpn else "one NVLink domain"
        return (
            None,
            f"tensor parallel {tps[-1]} exceeds the {domain} GPUs of {where} (TP stays inside NVLink)",
        )
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


_VLLM_DTYPE = {"bf16": "bfloat16", "fp16": "float16"}
# Where an OCI model image (model.cache.type image) is mounted; vLLM loads the weights from there.
IMAGE_WEIGHTS_DIR = "/models/weights"


def vllm_args(
    spec: LLMDeploymentSpec,
    source: str,
    served: str,
    layout: Layout,
    ctx: int,
    dtype: str,
    kv: str,
    quant: str | None,
    ep: bool,
) -> list[str]:
    """The vLLM ``serve`` arguments that realise a plan (flag names of the pinned vLLM, checked by
    tests/vllm against its own parser). Multi-node flags differ per pod and are added by the renderer."""
    args = [
        source,
        "--served-model-name", served,
        "--tensor-parallel-size", str(layout.tp),
        "--pipeline-parallel-size", str(layout.pp),
        "--max-model-len", str(ctx),
        "--gpu-memory-utilization", f"{spec.serving.gpu_memory_utilization:g}",
        # A quantized checkpoint declares its own dtype; forcing bf16 on it is wrong.
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
    return args + list(spec.serving.extra_args)


def _pools(spec: LLMDeploymentSpec) -> list[PoolSpec]:
    if spec.pools:
        return list(spec.pools)
    return [PoolSpec(name="default", gpu_types=list(spec.placement.gpu_types) or ["auto"])]


def _pool_path(spec: LLMDeploymentSpec, index: int) -> str:
    return f"spec.pools[{index}]" if spec.pools else "spec.placement"


def ephemeral_gib(spec: LLMDeploymentSpec, weights_gib: float) -> int:
    """Ephemeral storage a serving pod requests: the weights' emptyDir (model.cache ephemeral: the
    checkpoint plus 10% and 20 GiB) and 20 GiB of scratch (logs, compile caches) in every case."""
    if spec.model.cache.type != "ephemeral":
        return 20
    return cache_gib(spec, weights_gib) + 20


def cache_gib(spec: LLMDeploymentSpec, weights_gib: float) -> int:
    return spec.model.cache.size_gi_b or math.ceil(weights_gib * 1.1 + 20)


def _weights_path(spec: LLMDeploymentSpec, pool: PoolSpec, index: int) -> str:
    """The field path users fix for a pool's weights: the pool's when it overrides them."""
    if spec.pools and (pool.quantization or pool.checkpoint or pool.dtype):
        return f"spec.pools[{index}]"
    return "spec.model"


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
    """Plan one pool: the first GPU type in its order on which a layout fits.

    Eligibility comes from the catalog and policy. The inventory rules a type out only where the
    cluster cannot grow (``gpuNodeProvisioning: static`` and no node of the type) or where its
    machines can never hold a pod (too few GPUs, CPU or memory per node, no domain big enough for
    a multi-node replica); free capacity right now only drives fallback, in the controller.
    """
    dtype = pool.dtype or spec.model.dtype
    kv = pool.kv_cache_dtype or spec.model.kv_cache_dtype
    weights = quantization.choose(
        dtype,
        pool.quantization or spec.model.quantization,
        pool.checkpoint or spec.model.checkpoint,
        model_is_original=llm_catalog.lookup(spec.model.name) is not None,
        path=_weights_path(spec, pool, index),
    )
    quant = weights.quantization
    spot = spec.placement.spot.enabled if pool.spot is None else pool.spot
    spot_note = None
    if spot and spec.placement.tier not in config.spot_tiers:
        spot, spot_note = (
            False,
            (
                f"spot requested but the operator allows spot only for tiers {', '.join(config.spot_tiers) or '(none)'}"
                f"; tier {spec.placement.tier} runs on on-demand nodes"
            ),
        )
    baseline = spec.placement.spot.on_demand_baseline if spot else 0
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
    static = config.gpu_node_provisioning == "static"
    live = need_gpus and inventory is not None
    rejected: list[Rejected] = []
    for name in order:
        gpu = catalog.get(name)
        if (why_not := quantization.unsupported(quant, gpu)) is not None:
            rejected.append(Rejected(gpu_type=name, reason=why_not))
            continue
        nodes_now = inventory.nodes_of(name, spot) if live and inventory is not None else []
        if live and static and not nodes_now:
            where = "" if spot else " (on-demand; spot not allowed)"
            rejected.append(Rejected(gpu_type=name, reason=f"no {name} nodes in the cluster{where}"))
            continue
        inv_gpn = inventory.gpus_per_node(name) if inventory is not None else None
        gpn = spec.placement.gpus_per_node or inv_gpn or config.default_gpus_per_node
        # A multi-node NVLink domain counts only where the nodes say which domain they are in.
        domain = gpu.nvlink_domain_gpus
        if nodes_now and not any(GFD_CLIQUE in n.labels for n in nodes_now):
            domain = 0
        clique_note = ""
        # A pool at zero: TP may span nodes only where every node the provisioner creates says its
        # NVLink domain (a clique label it is sure to carry); else pipeline stages cross the nodes.
        if (
            domain
            and live
            and inventory is not None
            and not inventory.nodes_of(name)
            and GFD_CLIQUE not in provisioned_topology(inventory, config.label_schemes)[1]
        ):
            domain = 0
            clique_note = (
                f"; tensor parallelism stays inside a node: a new {name} node need not carry {GFD_CLIQUE} "
                "(its NVLink domain)"
            )
        choice, why = _search(m, arch, par, gpu, gpn, ctx, spec, config, domain)
        if choice is None:
            rejected.append(Rejected(gpu_type=name, reason=why))
            continue
        layout, fit = choice.layout, choice.fit
        per_pod = layout.gpus // choice.nodes
        res = resources.serving_pod(
            gpu, per_pod, config.host_share, config.cpu_per_gpu, config.memory_per_gpu_gib
        )
        nvlink_span = choice.nodes > 1 and layout.tp > per_pod
        topo_key: str | None = None
        topo_reason: str | None = None
        topo_preferred: list[str] = []
        if choice.nodes > 1:
            # TP across nodes needs the NVLink domain itself; PP stages tolerate a rack or a zone.
            if nvlink_span:
                candidates = [GFD_CLIQUE]
            elif spec.placement.topology_key:
                candidates = [spec.placement.topology_key]
            else:
                candidates = list(config.label_schemes.topology)
            fallback = GFD_CLIQUE if nvlink_span else spec.placement.fallback_topology_key
            topo = topology_key_for(
                inventory if live else None,
                name,
                choice.nodes,
                candidates,
                fallback,
                config.label_schemes,
                multi_node_nvlink=gpu.nvlink_domain_gpus > per_pod,
                on_demand=not static,
            )
            topo_key, topo_reason, topo_preferred = topo.key, topo.reason + clique_note, list(topo.preferred)
        weights_gib = round(arch.parameters * 1e9 * DTYPE_BYTES[dtype] / GIB, 1)
        ephemeral = ephemeral_gib(spec, weights_gib)
        if nodes_now:
            shape = PodShape(per_pod, res.cpu, res.memory_gib * GIB, ephemeral * GIB)
            hosts = [n for n in nodes_now if n.gpu_count >= per_pod]
            sized = [
                n for n in hosts if n.allocatable_cpu >= res.cpu and n.allocatable_memory >= shape.memory
            ]
            fitting = [n for n in sized if n.allocatable_ephemeral >= shape.ephemeral]
            if sized and not fitting:
                disk = max(n.allocatable_ephemeral for n in sized) / GIB
                rejected.append(Rejected(
                    gpu_type=name,
                    reason=f"the weights need {ephemeral}Gi of ephemeral storage (model.cache type ephemeral) but "
                    f"{name} nodes allocate at most {disk:.0f}Gi: set spec.model.cache to a pvc, a host-path on "
                    "local NVMe or a model image",
                ))  # fmt: skip
                continue
            if not fitting:
                if hosts:
                    big = max(hosts, key=lambda n: (n.allocatable_cpu, n.allocatable_memory))
                    reason = (
                        f"a pod requests {res.cpu_quantity} CPU and {res.memory_quantity} memory; the largest "
                        f"{name} node allocates {big.allocatable_cpu:g} CPU and "
                        f"{big.allocatable_memory / GIB:.1f} GiB (set hostCPUPerGPU/hostMemoryGiBPerGPU for "
                        f"{name} in the operator's extraGpuTypes to match your machines)"
                    )
                else:
                    reason = f"a pod needs {per_pod} GPUs; {name} nodes have at most {inv_gpn or 0}"
                rejected.append(Rejected(gpu_type=name, reason=reason))
                continue
            if choice.nodes > 1 and static:
                if topo_key is None:
                    rejected.append(Rejected(gpu_type=name, reason=topo_reason or "no topology domain"))
                    continue
                groups = (
                    {
                        k: [n for n in v if n in fitting]
                        for k, v in inventory.domains(name, topo_key, spot).items()
                    }
                    if inventory
                    else {}
                )
                best = max((len(v) for v in groups.values()), default=0)
                if best < choice.nodes:
                    rejected.append(Rejected(
                        gpu_type=name,
                        reason=f"needs {choice.nodes} nodes with {per_pod} GPUs in one {topo_key} domain; "
                        f"the largest has {best}",
                    ))  # fmt: skip
                    continue
        ep_auto = par.expert == "auto" and arch.experts > 0 and layout.tp * layout.dp > 1
        ep_on = ep_auto or (isinstance(par.expert, int) and par.expert > 1)
        price = gpu_hourly_price(name, spot, config, catalog, spec.cost)
        per_replica = round(price * layout.gpus, 4)
        od_per_replica = round(gpu_hourly_price(name, False, config, catalog, spec.cost) * layout.gpus, 4)
        free = fit.free_bytes_per_gpu
        served = spec.model.served_name or spec.model.name
        source = weights.checkpoint or spec.model.name
        if spec.model.cache.type == "image":
            source = IMAGE_WEIGHTS_DIR
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
            gpus_per_pod=per_pod,
            weights_gib_per_gpu=round(fit.weights_bytes_per_gpu / GIB, 2),
            kv_cache_gib_per_gpu=round(free / GIB, 2),
            kv_cache_tokens_per_replica=fit.kv_capacity_tokens,
            max_context_length=ctx,
            dtype=dtype,
            kv_cache_dtype=kv,
            quantization=quant,
            checkpoint=weights.checkpoint,
            weights_gib=weights_gib,
            ephemeral_gib_per_pod=ephemeral,
            cpu_per_pod=res.cpu,
            memory_gib_per_pod=res.memory_gib,
            topology_key=topo_key,
            preferred_topology_keys=topo_preferred,
            topology_reason=topo_reason,
            nvlink_across_nodes=nvlink_span,
            spot=spot,
            spot_note=spot_note,
            on_demand_baseline=baseline,
            cost_per_hour_per_replica=per_replica,
            on_demand_cost_per_hour_per_replica=od_per_replica,
            alternatives=rejected,
            vllm_args=vllm_args(spec, source, served, layout, ctx, dtype, kv, quant, ep_on),
        )
    summary = "; ".join(f"{r.gpu_type}: {r.reason}" for r in rejected) or "no GPU types to try"
    return PoolPlan(
        name=pool.name, gpu_type=None, fits=False, candidates=order, max_context_length=ctx, dtype=dtype,
        kv_cache_dtype=kv, quantization=quant, spot=spot, spot_note=spot_note, alternatives=rejected,
        reason=f"no acceptable GPU type fits: {summary}",
    )  # fmt: skip


def planned_cost(p: PoolPlan, replicas: int) -> float:
    """USD per hour of ``replicas``: the on-demand baseline at on-demand prices, the rest at the
    pool's price (spot when allowed)."""
    od = min(p.on_demand_baseline, replicas)
    return round(
        p.on_demand_cost_per_hour_per_replica * od + p.cost_per_hour_per_replica * (replicas - od), 4
    )


def resolve_engine(
    spec: LLMDeploymentSpec,
    inventory: Inventory | None,
    config: OperatorConfig | None = None,
    recorded: str | None = None,
) -> tuple[str, str]:
    """(engine, why). ``auto`` resolves once per LLMDeployment: ``recorded`` (status.engine from an
    earlier reconcile) wins, so GPU pools scaled to zero or a restarting device plugin never turn
    a vLLM deployment into the mock; only an explicit spec.engine switches it."""
    config = config or OperatorConfig()
    if spec.engine != "auto":
        return spec.engine, f"spec.engine is {spec.engine}"
    if recorded in ("vllm", "mock"):
        return recorded, f"engine auto resolved to {recorded} earlier (kept; set spec.engine to switch)"
    if config.auto_engine != "detect":
        return config.auto_engine, f"engine auto: the operator config sets autoEngine to {config.auto_engine}"
    if inventory is None:
        return "vllm", "engine auto without a node inventory: assuming a GPU cluster"
    if inventory.has_gpus:
        return "vllm", "engine auto: the cluster has GPU nodes"
    if config.gpu_node_provisioning == "on-demand":
        return "vllm", "engine auto: the cluster provisions GPU nodes on demand (gpuNodeProvisioning)"
    return "mock", "engine auto: the cluster has no GPU nodes, serving the CPU mock engine"


def plan_deployment(
    name: str,
    spec: LLMDeploymentSpec,
    config: OperatorConfig | None = None,
    inventory: Inventory | None = None,
    pool_overrides: dict[str, Sequence[str]] | None = None,
    recorded_engine: str | None = None,
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
    engine, why = resolve_engine(spec, inventory, config, recorded_engine)
    need_gpus = engine == "vllm"
    plans: list[PoolPlan] = []
    for i, pool in enumerate(_pools(spec)):
        if pool_overrides and pool.name in pool_overrides:
            pool = pool.model_copy(update={"gpu_types": list(pool_overrides[pool.name])})
        plans.append(plan_pool(spec, pool, i, arch, ctx, config, catalog, inventory, need_gpus))
    plans = [p.model_copy(update={"decode_step_ms": _step_ms(p, catalog)}) for p in plans]
    planned = DeploymentPlan(
        name=name,
        model=spec.model.name,
        gated=llm_catalog.gated(spec.model.name),
        served_name=spec.model.served_name or spec.model.name,
        engine=engine,
        engine_reason=why,
        pools=plans,
    )
    return assign_replicas(planned, spec, catalog)


def _step_ms(p: PoolPlan, catalog: GPUCatalog) -> float:
    if not p.fits or p.gpu_type is None or p.gpu_type not in catalog:
        return 0.0
    bandwidth = catalog.get(p.gpu_type).bandwidth_gbps
    return round(poolorder.decode_step_ms(p.weights_gib_per_gpu, p.pipeline_parallel, bandwidth), 3)


def assign_replicas(
    plan: DeploymentPlan,
    spec: LLMDeploymentSpec,
    catalog: GPUCatalog,
    current: Mapping[str, int] | None = None,
    room: Mapping[str, int | None] | None = None,
    views: Sequence[poolorder.PoolView] | None = None,
) -> DeploymentPlan:
    """Spread spec.replicas (plus warm standby) over the pools by ``autoscaling.poolOrder``; while an
    autoscaler owns spec.replicas, within its [minReplicas, maxReplicas].

    ``current``: replicas each pool's workloads run now (tier order grows and shrinks from there);
    ``room``: replicas each pool's free capacity can hold now (the controller knows; None: unbounded);
    ``views``: the pools as the order sees them, when the caller knows more than the plan (poolOrder
    cost: observed figures, marginal prices; ``planner/costorder.py``); None: from the plan.
    """
    current, room = current or {}, room or {}
    specs = {s.name: s for s in _pools(spec)}
    views = (
        list(views)
        if views is not None
        else [
            poolorder.PoolView(
                name=p.name,
                fits=p.fits,
                step_ms=p.decode_step_ms,
                generation=catalog.get(p.gpu_type).generation if p.gpu_type and p.gpu_type in catalog else 0,
                cost_per_hour=p.cost_per_hour_per_replica,
                weight=specs[p.name].weight,
                max_replicas=specs[p.name].max_replicas,
                room=room.get(p.name),
                current=current.get(p.name, 0),
            )
            for p in plan.pools
        ]
    )
    # Warm standby (builtin autoscaling): loaded pods beyond spec.replicas, kept out of rotation by the
    # autoscaler (autoscale/standby.py); they run, and cost, like serving ones.
    replicas = spec.effective_replicas  # within the autoscaler's bounds while it owns spec.replicas
    standby = spec.autoscaling.standby_for(replicas) if spec.autoscaling.effective_mode == "builtin" else 0
    how = spec.autoscaling.effective_pool_order
    tier = spec.placement.tier
    totals = poolorder.split(replicas + standby, how, tier, views)
    if how == "weight":
        serving = poolorder.split(replicas, how, tier, views).replicas
    else:  # the serving share fills the same order from scratch within each pool's total
        bounded = [
            replace(v, max_replicas=totals.replicas[v.name], room=None, current=0, on_demand_baseline=0)
            for v in views
        ]
        serving = poolorder.fill(replicas, poolorder.rank(tier, views, how), bounded)
    pools = [
        p.model_copy(
            update={
                "replicas": totals.replicas[p.name],
                "serving_replicas": serving[p.name],
                "cost_per_hour": planned_cost(p, totals.replicas[p.name]),
                "order": totals.place[p.name],
                "room": room.get(p.name),
                "max_replicas": specs[p.name].max_replicas,
            }
        )
        for p in plan.pools
    ]
    return plan.model_copy(update={"pools": pools})
