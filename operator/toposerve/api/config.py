"""Operator-wide configuration: GPU catalog extensions, price overrides and planning defaults.

Loaded from a YAML file (the Helm chart mounts it from a ConfigMap); every field has a default so
an empty file is a valid config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from toposerve import __version__
from toposerve.api.gpus import DEFAULT_CATALOG, GPUCatalog, GPUType
from toposerve.api.nodelabels import LabelSchemes
from toposerve.api.spec import FailureMode, Tier


class DrainTiming(BaseModel):
    """How long an evacuated pod may keep serving, and how long its in-flight requests may take."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    drain_after_seconds: float = Field(
        ge=0,
        description="Stop sending it new requests at the latest this long after its replacement was "
        "started, Ready or not (sooner once the replacement is Ready).",
    )
    drain_timeout_seconds: float = Field(
        ge=0,
        description="Delete it at the latest this long after draining began, requests in flight or not "
        "(sooner once its engine reports none).",
    )


class EvacuationConfig(BaseModel):
    """Moving serving pods off nodes with unhealthy GPUs or a termination notice (docs/health.md)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    gpu_unhealthy: DrainTiming = Field(
        default_factory=lambda: DrainTiming(drain_after_seconds=600, drain_timeout_seconds=120),
        description="GPUHealthy=False: no notice to race, so wait up to 10 minutes for a replacement.",
    )
    interruption: DrainTiming = Field(
        default_factory=lambda: DrainTiming(drain_after_seconds=60, drain_timeout_seconds=45),
        description="A termination notice (interruption taints): 60 + 45 s fits AWS's 2-minute spot "
        "notice; GKE gives 30 s (set e.g. 0 and 25).",
    )
    node_drain: DrainTiming = Field(
        default_factory=lambda: DrainTiming(drain_after_seconds=1800, drain_timeout_seconds=300),
        description="A cordoned node (kubectl drain) under a Surge deployment: wait up to 30 minutes for the "
        "replacement (a model load) while the budget holds the drain, then drain anyway.",
    )
    on_demand_cover: bool = Field(
        default=True,
        description="Spot pools: each replica under a termination notice also gets an on-demand replica of "
        "the same pool and GPU type at once, kept until the spot side is ready again (docs/spot.md).",
    )
    min_drain_seconds: float = Field(
        default=5,
        ge=0,
        description="A drained pod goes no sooner than this after draining began, so requests the "
        "router dispatched before it noticed have arrived.",
    )


class InferencePoolDefaults(BaseModel):
    """Cluster-wide Gateway API Inference Extension settings (docs/gateway-api.md); each
    LLMDeployment's spec.routing.inferencePool overrides them."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    enabled: bool = Field(
        default=False,
        description="Render an InferencePool for every LLMDeployment that has an endpoint picker (routing "
        "mode dedicated or gateway; mode none ones are skipped) unless its spec says enabled: false.",
    )
    failure_mode: FailureMode = Field(
        default="FailClose",
        description="endpointPickerRef.failureMode where the spec sets none (GIE's own default).",
    )


class OperatorConfig(BaseModel):
    """Cluster-level defaults that LLMDeployment specs may override."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    extra_gpu_types: list[GPUType] = Field(default_factory=list, description="Added to the built-in catalog.")
    hourly_per_gpu: dict[str, float] = Field(
        default_factory=dict, alias="hourlyPerGPU", description="Cluster prices, USD per GPU-hour."
    )
    spot_hourly_per_gpu: dict[str, float] = Field(
        default_factory=dict,
        alias="spotHourlyPerGPU",
        description="Cluster spot prices, USD per GPU-hour. Unset types use the GPU catalog's list prices "
        "(api/gpus.py; docs/cost.md).",
    )
    prometheus_url: str | None = Field(
        default=None,
        description="Prometheus that scrapes the engines (e.g. http://prometheus.monitoring:9090); the "
        "operator reads observed output tokens/s from it for status.observedCost, the builtin autoscaler "
        "its KV-cache and queue metrics (unset: the pods' /metrics), and keda mode's ScaledObject queries "
        "it (unset: keda mode is refused). Unset: no throughput.",
    )
    prometheus_timeout_seconds: float = Field(
        default=5.0,
        gt=0,
        le=60,
        description="Deadline of one read from Prometheus (all the queries of one deployment's decision "
        "together), without retries: a slow Prometheus makes that deployment hold this pass, not the others "
        "(the builtin autoscaler reads deployments concurrently).",
    )
    throughput_window: str = Field(
        default="5m",
        pattern=r"^[0-9]+[smh]$",
        description="PromQL range of rate(vllm:generation_tokens_total[...]) for observed throughput.",
    )
    auto_engine: Literal["detect", "vllm", "mock"] = Field(
        default="detect",
        description="What engine 'auto' means: detect (vLLM when the cluster has GPU nodes or provisions "
        "them on demand, else the mock engine), or always vllm / always mock (e.g. a simulated GPU fleet "
        "for demos and CI). Resolved once per LLMDeployment and recorded in status.",
    )
    gpu_node_provisioning: Literal["static", "on-demand"] = Field(
        default="static",
        description="on-demand: GPU node pools scale from zero (Karpenter, Cluster Autoscaler), so a GPU "
        "type with no node now stays in the plan and its Pending pods ask for a node; static: only types "
        "the cluster has nodes of are planned.",
    )
    spot_tiers: list[Tier] = Field(
        default_factory=lambda: list(get_args(Tier)),
        description="Tiers whose deployments may run on spot when they enable placement.spot (e.g. "
        "[throughput, batch] keeps latency-critical traffic on on-demand nodes cluster-wide).",
    )
    label_schemes: LabelSchemes = Field(
        default_factory=LabelSchemes,
        description="How nodes name their GPU model, spot capacity and topology (GFD, GKE, Karpenter, AKS).",
    )
    default_gpus_per_node: int = Field(default=8, ge=1, description="When neither spec nor inventory says.")
    max_pipeline_parallel: int = Field(
        default=8, ge=1, description="Largest PP (nodes per replica) 'auto' tries."
    )
    max_context_parallel: int = Field(
        default=4, ge=1, description="Largest CP 'auto' tries for long context."
    )
    default_context_length: int = Field(default=8192, ge=1, description="When neither spec nor catalog says.")
    vllm_image: str = Field(
        # Pinned 2026-12-01 to the current release; tests/vllm parses every rendered command line with
        # this version's own argument parser (hack/vllm).
        default="vllm/vllm-openai:v0.33.0",
        description="Engine image for engine vllm.",
    )
    toposerve_image: str = Field(
        default=f"ghcr.io/toposerve/toposerve:{__version__}",
        description="The project image (mock engine, router).",
    )
    cpu_per_gpu: float = Field(
        default=8.0,
        gt=0,
        description="Most CPU cores a serving pod requests per GPU (less on small machines).",
    )
    memory_per_gpu_gib: float = Field(
        alias="memoryPerGPUGiB",
        default=64.0,
        gt=0,
        description="Most memory (GiB) a serving pod requests per GPU (less on small machines).",
    )
    host_share: float = Field(
        default=0.8,
        gt=0,
        le=1,
        description="Fraction of a machine's allocatable CPU/memory share per GPU a serving pod may "
        "request; the rest is left to DaemonSets (device plugin, GFD, logging, node agents).",
    )
    router_node_placement: Literal["prefer-cpu", "require-cpu", "any"] = Field(
        default="prefer-cpu",
        description="Keep routers off GPU nodes: prefer (default) or require nodes without GPU labels.",
    )
    model_load_gbps: float = Field(
        alias="modelLoadGBps",
        default=0.5,
        gt=0,
        description="Assumed GB/s for downloading/reading weights, sizes the start-up probe.",
    )
    engine_shutdown_timeout_seconds: int = Field(
        default=120,
        ge=0,
        le=3600,
        description="Default of spec.serving.shutdownTimeoutSeconds: how long an engine finishes in-flight "
        "requests after SIGTERM (vLLM --shutdown-timeout). 120 s covers a few thousand output tokens.",
    )
    pre_stop_seconds: int = Field(
        default=10,
        ge=0,
        le=120,
        description="Engines and routers pause this long in preStop before SIGTERM, so EndpointSlice "
        "consumers (the router, kube-proxy, gateways) stop sending them new requests first.",
    )
    runtime_class_name: str | None = Field(
        default=None,
        description="RuntimeClass of engine pods unless the spec names one (e.g. nvidia); unset: the "
        "node's default runtime.",
    )
    evacuation: EvacuationConfig = Field(
        default_factory=EvacuationConfig,
        description="Deadlines for replacing pods on nodes whose GPUs turned unhealthy or that got a "
        "termination notice.",
    )
    prometheus_selector: str = Field(
        default='namespace="{namespace}",toposerve_io_deployment="{name}",app_kubernetes_io_component="engine"',
        max_length=1024,
        description="PromQL label matchers of one LLMDeployment's engine series; {namespace} and {name} are "
        "filled in. The default fits the usual kubernetes_sd relabelling (pod labels mapped with labelmap).",
    )
    prometheus_router_selector: str = Field(
        default='namespace="{namespace}",toposerve_io_deployment="{name}",app_kubernetes_io_component="router"',
        max_length=1024,
        description="PromQL label matchers of one LLMDeployment's router series (held requests at zero "
        "replicas, for scale from zero).",
    )
    gateway_selector: str = Field(
        default="app.kubernetes.io/component=gateway,app.kubernetes.io/part-of=toposerve",
        max_length=1024,
        description="Label selector of the gateway pods (the chart's `toposerve gateway`, docs/gateway.md): "
        "the builtin autoscaler reads what they hold and see for each deployment they route (scale from "
        "zero, leading signal).",
    )
    gateway_namespace: str | None = Field(
        default=None,
        max_length=63,
        description="Namespace of the gateway pods; default: every namespace (the selector alone).",
    )
    gateway_service: str = Field(
        default="toposerve-gateway",
        max_length=63,
        pattern=r"^[a-z]([-a-z0-9]*[a-z0-9])?$",
        description="Name of the gateway's Service (the chart's <release>-gateway) in gatewayNamespace: the "
        "endpoint picker of routing mode gateway's InferencePools (port 9002).",
    )
    inference_pool: InferencePoolDefaults = Field(
        default_factory=InferencePoolDefaults,
        description="Gateway API Inference Extension InferencePools (docs/gateway-api.md).",
    )
    hpa_kv_cache_metric: str = Field(
        alias="hpaKVCacheMetric",
        default="vllm_kv_cache_usage_perc",
        max_length=253,
        description="Name under which the cluster's custom metrics adapter serves vllm:kv_cache_usage_perc "
        "as a Pods metric (hpa mode).",
    )
    hpa_waiting_metric: str = Field(
        default="vllm_num_requests_waiting",
        max_length=253,
        description="Name under which the custom metrics adapter serves vllm:num_requests_waiting (hpa mode).",
    )
    prometheus_operator: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="PodMonitors (monitoring.coreos.com/v1) for each LLMDeployment's engine and router "
        "pods: auto renders them when API discovery finds the Prometheus Operator's PodMonitor kind "
        "(looked up at start and again every minute), on always (applying fails without the CRD), off "
        "never (the pods keep their prometheus.io/* annotations either way).",
    )
    monitor_labels: dict[str, str] = Field(
        default_factory=dict,
        description="Extra labels on the PodMonitors, for a Prometheus whose podMonitorSelector wants "
        "them (kube-prometheus-stack: release: <its release name>, unless its "
        "podMonitorSelectorNilUsesHelmValues is false).",
    )
    monitor_interval: str | None = Field(
        default="15s",
        pattern=r"^(0|(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$",
        description="Scrape interval of the PodMonitors (the autoscaler reads these series); null: the "
        "Prometheus's own scrapeInterval.",
    )
    enabled_feature_gates: list[str] = Field(
        default_factory=list,
        description="Kubernetes feature gates this cluster turned on ahead of its version's defaults "
        "(e.g. ImageVolume on 1.33): the operator's minimum-version check (api/kubeversion.py) then "
        "accepts them from the version where the gate exists.",
    )
    mock_cpu: str = Field(default="100m", description="CPU request of a mock-engine pod.")
    mock_memory: str = Field(default="128Mi", description="Memory request of a mock-engine pod.")
    mock_holds_gpus: bool = Field(
        alias="mockHoldsGPUs",
        default=False,
        description="Mock-engine pods request the plan's GPUs on the plan's GPU type, as vLLM would "
        "(one node's worth for a multi-node replica): for a simulated GPU fleet, so placement, "
        "fallback, node health and observed cost act on serving engines. Off: they need no GPUs.",
    )
    mock_startup_scale: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="Mock-engine pods go through vLLM's start-up phases (download unless the weights are on "
        "the model cache, load, torch.compile or its cached graphs, CUDA graphs; docs/mock-engine.md) at this "
        "fraction of the estimated real durations: 0.01 turns a 5-minute start into 3 s. 0: instant.",
    )

    def catalog(self) -> GPUCatalog:
        return DEFAULT_CATALOG.extended(self.extra_gpu_types) if self.extra_gpu_types else DEFAULT_CATALOG

    @classmethod
    def load(cls, path: str | Path | None) -> OperatorConfig:
        if path is None:
            return cls()
        data = yaml.safe_load(Path(path).read_text()) or {}
        return cls.model_validate(data)
