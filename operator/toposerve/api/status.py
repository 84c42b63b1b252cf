"""The LLMDeployment status, written only by the operator.

Kubernetes API conventions: conditions (type, status, CamelCase reason, message,
observedGeneration) instead of a phase string; ``replicas`` and ``selector`` back the scale
subresource; a few flattened strings (``gpuTypes``, ``parallelism``) exist for printer columns.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel


class _Status(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class Condition(_Status):
    """A standard Kubernetes condition (metav1.Condition)."""

    type: str = Field(
        max_length=316,
        description="Ready, Progressing, Degraded, Schedulable or ScalingActive (builtin autoscaling).",
    )
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(max_length=1024, description="CamelCase reason for the last transition.")
    message: str = Field(default="", max_length=32768, description="Human-readable details.")
    last_transition_time: str = Field(description="When status last changed (RFC 3339).")
    observed_generation: int | None = Field(
        default=None, ge=0, description="Generation this was computed for."
    )


class Placement(_Status):
    """Replicas of a pool on one GPU type (more than one while GPU fallback is active)."""

    gpu_type: str = Field(description="GPU type.")
    replicas: int = Field(default=0, description="Desired replicas on this GPU type.")
    ready_replicas: int = Field(default=0, description="Ready replicas on this GPU type.")


class ObservedCost(_Status):
    """What the GPUs held now cost and what they produce (pods bound to nodes, engines' counters)."""

    gpus: int = Field(default=0, description="GPUs held by serving pods bound to nodes.")
    spot_gpus: int = Field(default=0, description="Of those, GPUs on spot nodes (priced at spot).")
    cost_per_hour: float = Field(default=0.0, description="USD per hour for the GPUs held.")
    output_tokens_per_second: float | None = Field(
        default=None,
        description="Observed output tokens/s (rate of vllm:generation_tokens_total); absent without a "
        "throughput source (operator config prometheusUrl).",
    )
    cost_per_million_output_tokens: float | None = Field(
        default=None, description="costPerHour / (outputTokensPerSecond x 3600) x 1e6; absent at 0 tokens/s."
    )


class CostRank(_Status):
    """What poolOrder cost ranked the pool by (planner/poolorder.py, docs/autoscaling.md)."""

    cost_per_million_tokens: float | None = Field(
        default=None,
        description="USD per million output tokens of one more replica: marginalCostPerHour over "
        "tokensPerSecondPerReplica, held while new figures stay within 10 % (no reordering on noise); "
        "absent when the throughput is unknown.",
    )
    source: Literal["observed", "estimated"] = Field(
        default="estimated",
        description="observed: the pool's engines' output tokens/s in the minutes they had requests "
        "waiting (Prometheus); estimated: 32 sequences per estimated decode step.",
    )
    meets_slo: bool = Field(
        alias="meetsSLO",
        default=True,
        description="The pool's own TTFT quantile is within spec.autoscaling.ttftSLO, or there is no SLO "
        "or no reading; false: it grows only after every pool that meets it.",
    )
    marginal_cost_per_hour: float | None = Field(
        default=None,
        description="USD per hour of one more replica: spot when the pool runs spot above its on-demand "
        "baseline and spot capacity is free, on-demand otherwise.",
    )
    tokens_per_second_per_replica: float | None = Field(
        default=None, description="The output tokens/s of one replica the figure divides by."
    )
    ttft_seconds: float | None = Field(
        default=None, description="The pool's observed TTFT quantile over the metrics window, when read."
    )


class PoolStatus(_Status):
    """What one pool was planned to and how far it got."""

    name: str = Field(description="Pool name.")
    gpu_type: str | None = Field(default=None, description="GPU type the pool is placed on now.")
    fits: bool = Field(default=True, description="Whether any acceptable GPU type fits the model.")
    tensor_parallel: int | None = Field(default=None, description="TP size.")
    pipeline_parallel: int | None = Field(
        default=None, description="PP size (nodes per replica when >1 node)."
    )
    context_parallel: int | None = Field(default=None, description="Prefill context parallel size.")
    gpus_per_replica: int | None = Field(default=None, description="GPUs one replica uses.")
    nodes_per_replica: int | None = Field(default=None, description="Nodes one replica spans.")
    replicas: int = Field(default=0, description="Desired replicas of this pool.")
    ready_replicas: int = Field(default=0, description="Ready replicas of this pool.")
    pending_reason: str | None = Field(default=None, description="Why replicas are not placed, if any.")
    topology_key: str | None = Field(
        default=None, description="Multi-node replicas: the node label whose domain holds each replica."
    )
    topology_reason: str | None = Field(default=None, description="Why that topology key (or none).")
    fabric: str | None = Field(
        default=None,
        description="Multi-node replicas: the interconnect their pods use between nodes: efa, "
        "gke-gpudirect-rdma, infiniband, roce, imex (multi-node NVLink), or tcp when the nodes offer "
        "none (multi-node traffic then goes over the pod network).",
    )
    fabric_reason: str | None = Field(default=None, description="Why that fabric: what the nodes offer.")
    disruption: str | None = Field(
        default=None,
        description="What a rollout and a node drain do to this pool (spec.disruption.strategy, replicas "
        "and nodes per replica), including whether they take it down.",
    )
    cost_per_hour: float | None = Field(default=None, description="USD per hour for the desired replicas.")
    order: int | None = Field(
        default=None,
        description="Place in the growth order (poolOrder tier or cost; 1 grows first, the last shrinks "
        "first); absent with poolOrder weight or when the pool does not fit.",
    )
    room: int | None = Field(
        default=None,
        description="Replicas the cluster's free capacity lets this pool hold now (placed plus placeable); "
        "absent when unbounded (no GPUs, or gpuNodeProvisioning on-demand).",
    )
    max_replicas: int | None = Field(default=None, description="pools[].maxReplicas, when set.")
    on_demand_cover: int | None = Field(
        default=None,
        description="On-demand replicas running, beyond the baseline, to cover spot replicas under a "
        "termination notice until the spot side is ready again (docs/spot.md); absent when none.",
    )
    decode_step_ms: float | None = Field(
        alias="decodeStepMs",
        default=None,
        description="Estimated decode step of one replica (weights per GPU x pipeline stages / memory "
        "bandwidth): the speed the tier order ranks by.",
    )
    cost_rank: CostRank | None = Field(
        default=None, description="poolOrder cost: the figure and SLO verdict the pool was ranked by."
    )
    placements: list[Placement] = Field(
        default_factory=list, description="Replicas per GPU type, preferred first (fallback splits a pool)."
    )
    observed_cost: ObservedCost | None = Field(
        default=None, description="Cost and throughput of this pool's pods now (see docs/cost.md)."
    )
    kv_cache_tokens_per_replica: int | None = Field(
        alias="kvCacheTokensPerReplica",
        default=None,
        description="KV-cache capacity of one replica on the preferred GPU type, in tokens (the plan's): "
        "what the builtin autoscaler's demand rule sizes resident tokens against.",
    )
    startup: StartupStatus | None = Field(
        default=None,
        description="Measured start-up of this pool's replicas; the builtin autoscaler plans with its p90.",
    )


class StartupRecord(_Status):
    """One engine pod's start-up, from the times the scheduler and the kubelet wrote on it."""

    pod: str = Field(description="Pod name.")
    total_seconds: float = Field(description="Created to Ready.")
    scheduling_seconds: float | None = Field(default=None, description="Created to scheduled.")
    pulling_seconds: float | None = Field(
        default=None, description="Scheduled to the engine container running (image pull, sandbox)."
    )
    loading_seconds: float | None = Field(
        default=None, description="Container running to Ready (weights, compile, graphs, first /health)."
    )


class StartupStatus(_Status):
    """Measured start-up of this pool's replicas (autoscale/startup.py)."""

    samples: int = Field(description="Start-ups measured (the last 20 are kept).")
    p50_seconds: float = Field(description="Median created-to-Ready time.")
    p90_seconds: float = Field(description="90th percentile created-to-Ready time.")
    scheduling_p50_seconds: float | None = Field(default=None, description="Median created-to-scheduled.")
    pulling_p50_seconds: float | None = Field(default=None, description="Median scheduled-to-running.")
    loading_p50_seconds: float | None = Field(default=None, description="Median running-to-Ready.")
    recent: list[StartupRecord] = Field(
        default_factory=list, description="The measured start-ups, oldest first."
    )


class AutoscalingInputs(_Status):
    """What the last decision saw (means over replicas with fresh metrics)."""

    kv_cache_utilization: float | None = Field(
        alias="kvCacheUtilization", default=None, description="Mean vllm:kv_cache_usage_perc (0..1)."
    )
    waiting_requests: float | None = Field(default=None, description="Mean vllm:num_requests_waiting.")
    running_requests: float | None = Field(default=None, description="Mean vllm:num_requests_running.")
    ready_replicas: int = Field(default=0, description="Ready serving replicas.")
    starting_replicas: int = Field(
        default=0, description="Replicas still starting within startupGraceSeconds (capacity on the way)."
    )
    stuck_replicas: int = Field(
        default=0, description="Replicas not ready past startupGraceSeconds (ignored)."
    )
    missing_metrics: int = Field(default=0, description="Ready replicas without fresh metrics.")
    held_requests: int = Field(default=0, description="Requests the router holds at zero replicas.")
    ttft_seconds: float | None = Field(
        default=None,
        description="The TTFT quantile of ttftSLO over the metrics window (vllm:time_to_first_token_seconds); "
        "absent when no request started in the window or the data is missing.",
    )
    ttft_slo_seconds: float | None = Field(
        alias="ttftSLOSeconds",
        default=None,
        description="The SLO it was compared with (spec.autoscaling.ttftSLO).",
    )
    ttft_missing: bool | None = Field(
        default=None, description="An SLO is set and no fresh TTFT came: no scale-down."
    )
    kv_load_replicas: float | None = Field(
        alias="kvLoadReplicas",
        default=None,
        description="With burstHeadroom: the KV load in replicas at target (sum of fresh KV usage / target).",
    )
    burst_headroom_replicas: float | None = Field(
        default=None,
        description="With burstHeadroom: the replicas added on top of kvLoadReplicas (burstHeadroom x "
        "sqrt(kvLoadReplicas)).",
    )
    demand_replicas: int | None = Field(
        default=None, description="With leadingSignal: what the routers' demand asked for (router arrivals)."
    )
    demand_load_replicas: float | None = Field(
        default=None,
        description="With leadingSignal: that demand in replicas at the KV target, before headroom.",
    )
    demand_window: str | None = Field(
        default=None, description="With leadingSignal: which estimate was largest: short, long or in-flight."
    )
    demand_explanation: str | None = Field(
        default=None, description="With leadingSignal: the arithmetic, in words (arrivals, tokens, speed)."
    )


class Sample(_Status):
    """A timestamped count: a recommendation, or replicas added/removed."""

    time: float = Field(description="Unix time, seconds.")
    replicas: int = Field(description="Replica count or change.")


class AutoscalingStatus(_Status):
    """The autoscaler's last decision and the history its windows need (survives restarts)."""

    mode: str = Field(description="builtin, hpa, keda or off.")
    source: str | None = Field(
        default=None,
        description="Where metrics came from: prometheus (URL), scrape (the pods' /metrics) or none.",
    )
    metrics_available: bool = Field(default=False, description="Every serving replica had fresh metrics.")
    current_replicas: int = Field(default=0, description="spec.replicas the decision started from.")
    desired_replicas: int = Field(default=0, description="What the decision asked for.")
    proposal: int | None = Field(default=None, description="What the metrics alone asked for.")
    reason: str = Field(default="", description="CamelCase reason of the last decision.")
    message: str = Field(default="", description="The last decision in words.")
    floor: int = Field(default=0, description="The floor in force: max(minReplicas, schedules, forecast).")
    floor_source: str = Field(default="minReplicas", description="minReplicas, schedule/<name> or forecast.")
    forecast: int | None = Field(default=None, description="Forecast floor one start-up time ahead, if any.")
    signal: str | None = Field(
        default=None,
        description="The metric whose proposal decided: kv-cache, waiting requests, TTFT pNN, router arrivals "
        "or held requests (empty when no metric did: a floor, a limit, missing metrics).",
    )
    startup_seconds: float | None = Field(
        default=None,
        description="The start-up time the decision planned with (capacity on the way, forecast lead).",
    )
    startup_source: str | None = Field(
        default=None, description="Where that figure came from: startupGraceSeconds or measured (which pool)."
    )
    inputs: AutoscalingInputs = Field(default_factory=AutoscalingInputs, description="What was observed.")
    last_decision_time: str | None = Field(default=None, description="When it decided (RFC 3339).")
    last_scale_time: str | None = Field(default=None, description="When it last changed spec.replicas.")
    recommendations: list[Sample] = Field(
        default_factory=list, description="Recommendations inside the stabilization windows."
    )
    scale_ups: list[Sample] = Field(default_factory=list, description="Replicas added inside policy periods.")
    scale_downs: list[Sample] = Field(
        default_factory=list, description="Replicas removed inside policy periods."
    )


# Status fields written by someone other than reconcile's compute_status (which leaves them alone).
WRITTEN_ELSEWHERE = frozenset({"kopf", "autoscaling", "gateway"})


class AdapterStatus(_Status):
    """One LoRA adapter as the gateway sees it (docs/lora.md, "Status")."""

    name: str = Field(description="The adapter's name (spec.adapters[].name).")
    replicas: int = Field(default=0, description="Replicas it is loaded on now.")
    last_error: str | None = Field(
        default=None,
        description="The last failed load (status and vLLM's message); cleared by a successful load.",
    )


class GatewayStatus(_Status):
    """Whether the chart's gateway routes this deployment (docs/gateway.md), from its /health."""

    routed: bool = Field(description="The gateway routes the served name to this deployment.")
    models: list[str] = Field(
        default_factory=list,
        description="The names (served name, aliases, adapters) the gateway routes here.",
    )
    ready_replicas: int | None = Field(default=None, description="Ready replicas the gateway reaches.")
    reason: str | None = Field(default=None, description="Why not routed, or which names are not.")
    adapters: list[AdapterStatus] = Field(
        default_factory=list, description="Each LoRA adapter: replicas holding it, last load error."
    )


class LLMDeploymentStatus(_Status):
    """Observed state of an LLMDeployment."""

    observed_generation: int | None = Field(default=None, description="Generation last reconciled.")
    conditions: list[Condition] = Field(
        default_factory=list,
        description="Ready, Progressing, Degraded, Schedulable.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    replicas: int = Field(default=0, description="Total desired replicas (scale subresource).")
    ready_replicas: int = Field(default=0, description="Ready replicas over all pools.")
    selector: str | None = Field(
        default=None, description="Label selector of the serving pods (scale subresource)."
    )
    engine: str | None = Field(default=None, description="Engine in use: vllm or mock.")
    engine_reason: str | None = Field(
        default=None, description="Why this engine (engine auto decides by the cluster's GPU nodes)."
    )
    endpoint: str | None = Field(
        default=None, description="URL of the serving Service (the router when enabled)."
    )
    gpu_types: str | None = Field(default=None, description="GPU types in use, e.g. 'H100,A100-40GB'.")
    parallelism: str | None = Field(default=None, description="TP/PP of the first pool, e.g. '4/1'.")
    pools: list[PoolStatus] = Field(default_factory=list, description="Per-pool plan and progress.")
    pool_order: str | None = Field(
        default=None,
        description="How spec.replicas spreads over pools: tier, cost or weight (autoscaling.poolOrder).",
    )
    cost_per_hour: float | None = Field(default=None, description="USD per hour for all desired replicas.")
    observed_cost: ObservedCost | None = Field(
        default=None, description="Cost and throughput of all serving pods now (see docs/cost.md)."
    )
    autoscaling: AutoscalingStatus | None = Field(
        default=None, description="The autoscaler's last decision (written by the autoscaler only)."
    )
    gateway: GatewayStatus | None = Field(
        default=None, description="Whether the chart's gateway routes this deployment (docs/gateway.md)."
    )
    kopf: dict[str, Any] | None = Field(
        default=None,
        description="Operator framework bookkeeping.",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )
