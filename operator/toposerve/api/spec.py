"""The LLMDeployment spec: the single source of truth for the API.

These pydantic models validate manifests in the CLI and the operator, and ``toposerve crd``
generates the CustomResourceDefinition from them (descriptions, defaults, enums, bounds and the
CEL rules attached here as ``x-kubernetes-validations``), so ``kubectl explain`` and the API
server teach and enforce exactly what the code accepts. Field names are camelCase on the wire.
Rules the API server cannot know (the model catalog, the GPU catalog, what fits in memory) are
checked by the planner and reported in status instead.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from toposerve.api.errors import FieldValueError

Dtype = Literal["bf16", "fp16", "fp8", "int8", "int4"]
KVCacheDtype = Literal["bf16", "fp16", "fp8"]
Engine = Literal["auto", "vllm", "mock"]
Tier = Literal["latency-critical", "throughput", "long-context", "batch"]
Strategy = Literal[
    "auto", "round-robin", "least-request", "token-aware", "prefix-aware", "session", "gpu-weighted"
]

# Bytes per element, the only property of a dtype the memory model needs.
DTYPE_BYTES: dict[str, float] = {"bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int8": 1.0, "int4": 0.5}

GPU_TYPE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]{0,18}[a-z0-9])?$"
# A name clients put in the OpenAI "model" field (aliases, LoRA adapters): no spaces, no "=" (the
# router's --adapter NAME=SOURCE splits on the first "="), no leading or trailing punctuation.
MODEL_NAME_PATTERN = r"^[A-Za-z0-9]([A-Za-z0-9._:/-]{0,126}[A-Za-z0-9])?$"
MODEL_NAME_MAX = 128
ModelName = Annotated[str, Field(pattern=MODEL_NAME_PATTERN, max_length=MODEL_NAME_MAX)]


def _positive_or_auto(v: int | str) -> int | str:
    if isinstance(v, int) and v < 1:
        raise ValueError("must be a positive integer or 'auto'")
    return v


# An integer or the string "auto": int-or-string in the CRD, with a CEL rule for the value.
IntOrAuto = Annotated[
    int | Literal["auto"],
    AfterValidator(_positive_or_auto),
    WithJsonSchema(
        {
            "x-kubernetes-int-or-string": True,
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "x-kubernetes-validations": [
                {
                    "rule": "type(self) == int ? self >= 1 : self == 'auto'",
                    "message": "must be a positive integer or 'auto'",
                }
            ],
        }
    ),
]

GPUTypeName = Annotated[str, Field(pattern=GPU_TYPE_PATTERN, max_length=63)]


class _Model(BaseModel):
    """Base: camelCase on the wire, unknown fields rejected, no silent type coercion."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", strict=True, frozen=True
    )


class Architecture(_Model):
    """What the memory model needs to know about a model; built in for well-known models."""

    parameters: float = Field(
        gt=0, le=100000, description="Total parameter count in billions (e.g. 70.6 for Llama-3.1-70B)."
    )
    layers: int = Field(ge=1, le=1000, description="Number of transformer layers (num_hidden_layers).")
    attention_heads: int = Field(ge=1, le=1024, description="Query attention heads (num_attention_heads).")
    kv_heads: int = Field(ge=1, le=1024, description="Key/value heads (num_key_value_heads; GQA/MQA).")
    head_dim: int = Field(ge=1, le=4096, description="Dimension of one attention head.")
    experts: int = Field(
        default=0, ge=0, le=4096, description="Routed experts of a mixture-of-experts model; 0 for dense."
    )
    max_position_embeddings: int | None = Field(
        default=None, ge=1, description="Native context length; the default for model.maxContextLength."
    )

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "self.kvHeads <= self.attentionHeads",
                    "message": "kvHeads must not exceed attentionHeads",
                    "fieldPath": ".kvHeads",
                }
            ]
        }
    )

    @model_validator(mode="after")
    def _kv_le_heads(self) -> Architecture:
        if self.kv_heads > self.attention_heads:
            raise FieldValueError("kvHeads", "kvHeads must not exceed attentionHeads")
        return self


CacheType = Literal["ephemeral", "pvc", "host-path", "image"]


PREFETCH_MESSAGE = (
    "prefetch needs type host-path (node-local weights to put on every node; a pvc is shared, so the first "
    "replica's download serves all, and an ephemeral or image cache keeps nothing on the node)"
)


class ModelCacheSpec(_Model):
    """Where model weights live on the node, so a restart does not download them again."""

    type: CacheType = Field(
        default="ephemeral",
        description="ephemeral: an emptyDir sized from the weights (downloaded at every pod start); pvc: an "
        "existing PersistentVolumeClaim mounted by every replica (ReadWriteMany, or ReadOnlyMany "
        "pre-populated); host-path: a node-local directory (e.g. local NVMe) kept across pods (not allowed "
        "under PodSecurity restricted); image: an OCI image holding the weights (Kubernetes image volumes).",
    )
    claim_name: str | None = Field(
        default=None, max_length=253, description="PersistentVolumeClaim name (type pvc)."
    )
    host_path: str | None = Field(
        default=None, max_length=4096, description="Directory on the node (type host-path)."
    )
    image: str | None = Field(
        default=None,
        max_length=512,
        description="OCI image reference with the weights at its root (type image).",
    )
    size_gi_b: int | None = Field(
        alias="sizeGiB",
        default=None,
        ge=1,
        le=100000,
        description="Space for the weights in GiB; default: the checkpoint's size plus 10% and 20 GiB.",
    )
    prefetch: bool = Field(
        default=False,
        description="type host-path only: a DaemonSet per pool puts the weights (and the engine image) on "
        "every node the pool's replicas may land on, before any replica needs them: a new replica there "
        "only loads (docs/real-clusters.md, 'Warm nodes').",
    )

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {"rule": "!has(self.type) || self.type != 'pvc' || has(self.claimName)", "message": "type pvc needs claimName",
                 "fieldPath": ".claimName"},
                {"rule": "!has(self.type) || self.type != 'host-path' || has(self.hostPath)",
                 "message": "type host-path needs hostPath", "fieldPath": ".hostPath"},
                {"rule": "!has(self.type) || self.type != 'image' || has(self.image)", "message": "type image needs image",
                 "fieldPath": ".image"},
                {"rule": "!has(self.prefetch) || !self.prefetch || (has(self.type) && self.type == 'host-path')",
                 "message": PREFETCH_MESSAGE, "fieldPath": ".prefetch"},
            ]
        }
    )  # fmt: skip

    @model_validator(mode="after")
    def _source_given(self) -> ModelCacheSpec:
        need = {"pvc": ("claimName", self.claim_name), "host-path": ("hostPath", self.host_path),
                "image": ("image", self.image)}.get(self.type)  # fmt: skip
        if need and not need[1]:
            raise FieldValueError(need[0], f"type {self.type} needs {need[0]}")
        if self.prefetch and self.type != "host-path":
            raise FieldValueError("prefetch", PREFETCH_MESSAGE)
        return self


ALIAS_IS_SERVED_NAME = "aliases must not repeat the served name (servedName, else name)"


class ModelSpec(_Model):
    """Which model to serve and at what precision and context length."""

    name: str = Field(
        min_length=1,
        max_length=253,
        description="Hugging Face model id, e.g. meta-llama/Llama-3.1-70B-Instruct. Well-known ids have "
        "built-in architectures; others need model.architecture.",
    )
    dtype: Dtype = Field(
        default="bf16",
        description="Weight precision. fp8 uses vLLM's fp8 quantization; int8/int4 need quantized weights "
        "(see model.quantization).",
    )
    kv_cache_dtype: KVCacheDtype = Field(default="bf16", description="KV cache precision.")
    quantization: str | None = Field(
        default=None,
        max_length=63,
        description="vLLM --quantization method (awq, gptq, fp8, compressed-tensors, bitsandbytes, mxfp4, ...). "
        "Default: fp8 for dtype fp8, bitsandbytes (in-flight) for int8/int4, none otherwise.",
    )
    max_context_length: int | None = Field(
        default=None,
        ge=1,
        le=10_485_760,
        description="Longest sequence (prompt + output) in tokens a replica must hold; vLLM --max-model-len. "
        "Default: the model's native context length.",
    )
    served_name: str | None = Field(
        default=None,
        max_length=253,
        description="Name clients use in the OpenAI 'model' field; default: model.name.",
    )
    aliases: list[ModelName] = Field(
        default_factory=list,
        max_length=16,
        description="More names clients may use for the same model, served after the primary one "
        "(vLLM --served-model-name takes several; the first, servedName, labels the metrics).",
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )
    architecture: Architecture | None = Field(
        default=None,
        description="Explicit architecture; required for models missing from the built-in catalog.",
    )
    checkpoint: str | None = Field(
        default=None,
        min_length=1,
        max_length=253,
        description="The weights vLLM loads (Hugging Face id or path) when they differ from model.name, e.g. "
        "an AWQ/GPTQ/FP8 build; model.name still identifies the architecture. Pools may override it.",
    )
    cache: ModelCacheSpec = Field(
        default_factory=ModelCacheSpec,
        description="Where the weights are kept on the node (default: an emptyDir sized from the weights).",
        json_schema_extra={"default": {}},
    )

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "!has(self.aliases) || "
                    "!((has(self.servedName) ? self.servedName : self.name) in self.aliases)",
                    "message": ALIAS_IS_SERVED_NAME,
                    "fieldPath": ".aliases",
                }
            ]
        }
    )

    @property
    def primary_served_name(self) -> str:
        """The name vLLM serves first (and labels its metrics with): servedName, else name."""
        return self.served_name or self.name

    @property
    def served_names(self) -> list[str]:
        """Every name the base model answers to: the primary one, then the aliases."""
        return [self.primary_served_name, *self.aliases]

    @model_validator(mode="after")
    def _aliases_distinct(self) -> ModelSpec:
        if self.primary_served_name in self.aliases:
            raise FieldValueError("aliases", ALIAS_IS_SERVED_NAME)
        if len(self.aliases) != len(set(self.aliases)):  # the API server: x-kubernetes-list-type set
            raise FieldValueError("aliases", "aliases must be unique")
        return self


# LoRA serving (docs/lora.md). Bounds from vLLM 0.33.0: config/lora.py's MaxLoRARanks and LoRAConfig
# (max_loras >= 1, default 1; max_cpu_loras >= max_loras, default max_loras; rank default 16).
LoraRank = Literal[1, 8, 16, 32, 64, 128, 256, 320, 512]
MAX_CPU_LORAS_MESSAGE = (
    "maxCpuLoras must be >= maxLoras (vLLM keeps every adapter of a batch in CPU memory too)"
)
# Where the engine pods mount the model cache (model.cache); adapters on the cache resolve under it.
MODEL_CACHE_MOUNT = "/models"
MAX_ADAPTERS = 1000


class LoraSpec(_Model):
    """LoRA adapter serving: present (even as ``lora: {}``) turns it on (vLLM --enable-lora)."""

    max_loras: int = Field(
        default=1,
        ge=1,
        le=256,
        description="Adapters one batch may use at once, each with a GPU slot (vLLM --max-loras; default 1).",
    )
    max_lora_rank: LoraRank = Field(
        default=16,
        description="Largest adapter rank a replica accepts (vLLM --max-lora-rank: 1, 8, 16, 32, 64, 128, "
        "256, 320 or 512; default 16). GPU memory for the slots is sized from it; a higher-rank adapter "
        "fails to load.",
    )
    max_cpu_loras: int | None = Field(
        default=None,
        ge=1,
        le=4096,
        description="Adapters a replica keeps loaded in CPU memory, >= maxLoras (vLLM --max-cpu-loras; "
        "default: maxLoras). Adapters beyond it are evicted least recently used and reloaded on demand.",
    )
    staging_secret: str | None = Field(
        default=None,
        max_length=253,
        pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        description="Secret whose keys become the adapter stager's environment, for adapters it downloads "
        "(docs/lora.md, 'Staging'): AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION, "
        "AWS_ENDPOINT_URL_S3 for s3:// sources; HF_ENDPOINT for hf:// ones (HF_TOKEN comes from "
        "serving.hfTokenSecret); STAGE_CA_BUNDLE (PEM) to trust a private CA for https:// ones.",
    )

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "!has(self.maxCpuLoras) || self.maxCpuLoras >= (has(self.maxLoras) ? self.maxLoras : 1)",
                    "message": MAX_CPU_LORAS_MESSAGE,
                    "fieldPath": ".maxCpuLoras",
                }
            ]
        }
    )

    @model_validator(mode="after")
    def _cpu_holds_the_batch(self) -> LoraSpec:
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise FieldValueError("maxCpuLoras", MAX_CPU_LORAS_MESSAGE)
        return self

    @property
    def effective_max_cpu_loras(self) -> int:
        """vLLM's own default: maxLoras."""
        return self.max_loras if self.max_cpu_loras is None else self.max_cpu_loras


# hf://org/repo or org/repo | https://... or s3://... | cache://relative/path or /models/path
ADAPTER_SOURCE_PATTERN = (
    r"^((hf://)?[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*"
    r"|(https|s3)://[^\s]+"
    r"|cache://[A-Za-z0-9._-][A-Za-z0-9._/-]*"
    rf"|{MODEL_CACHE_MOUNT}/[A-Za-z0-9._-][A-Za-z0-9._/-]*)$"
)
ADAPTER_SOURCE_MESSAGE = (
    f"must be hf://org/repo or org/repo (Hugging Face), an https:// or s3:// URL, or on the model cache: "
    f"cache://relative/path or {MODEL_CACHE_MOUNT}/path"
)
ADAPTER_DOTDOT_MESSAGE = "a source on the model cache must not contain '..'"
ADAPTER_REVISION_MESSAGE = "revision is for Hugging Face sources (hf://org/repo or org/repo) only"
AdapterSourceKind = Literal["hf", "url", "cache"]


class AdapterSpec(_Model):
    """One LoRA adapter, served under its own OpenAI model name."""

    name: ModelName = Field(
        description="The OpenAI model name clients use for this adapter (letters, digits, '.', '_', ':', "
        "'/', '-'; at most 128). Unique, and different from the served name and the aliases.",
    )
    source: str = Field(
        max_length=512,
        json_schema_extra={"pattern": ADAPTER_SOURCE_PATTERN},  # checked below, with a readable message
        description="Where the adapter's files are: a Hugging Face repo (hf://org/repo or org/repo), an "
        "https:// or s3:// URL, or a directory on the model cache (cache://relative/path, or an absolute "
        f"path under {MODEL_CACHE_MOUNT}, where the engine pods mount model.cache).",
    )
    revision: str | None = Field(
        default=None,
        max_length=255,
        pattern=r"^[A-Za-z0-9._/-]+$",
        description="Hugging Face revision (branch, tag or commit) of an hf source; default: the main branch.",
    )

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "!(self.source.startsWith('cache://') || self.source.startsWith('/')) || "
                    "!self.source.contains('..')",
                    "message": ADAPTER_DOTDOT_MESSAGE,
                    "fieldPath": ".source",
                },
                {
                    "rule": "!has(self.revision) || !(self.source.startsWith('https://') || "
                    "self.source.startsWith('s3://') || self.source.startsWith('cache://') || "
                    "self.source.startsWith('/'))",
                    "message": ADAPTER_REVISION_MESSAGE,
                    "fieldPath": ".revision",
                },
            ]
        }
    )

    @field_validator("source")
    @classmethod
    def _source_form(cls, v: str) -> str:
        if not re.match(ADAPTER_SOURCE_PATTERN, v):
            raise ValueError(ADAPTER_SOURCE_MESSAGE)
        return v

    @model_validator(mode="after")
    def _source_shape(self) -> AdapterSpec:
        if self.source_kind == "cache" and ".." in self.source:
            raise FieldValueError("source", ADAPTER_DOTDOT_MESSAGE)
        if self.revision is not None and self.source_kind != "hf":
            raise FieldValueError("revision", ADAPTER_REVISION_MESSAGE)
        return self

    @property
    def source_kind(self) -> AdapterSourceKind:
        if self.source.startswith(("https://", "s3://")):
            return "url"
        if self.source.startswith(("cache://", "/")):
            return "cache"
        return "hf"

    @property
    def engine_source(self) -> str:
        """The source as the router passes it on (``--adapter NAME=SOURCE``, docs/lora.md):

        - ``/models/...``: a directory in the engine pod (a cache source under the model cache mount);
        - ``org/repo``: a Hugging Face repo id (vLLM's /v1/load_lora_adapter downloads it itself);
        - with a scheme (``https://``, ``s3://``, ``hf://org/repo@revision``): files vLLM 0.33.0
          cannot fetch itself (no URLs, no revision pinning): the router has the engine pod's
          adapter stager put them on the model cache first (toposerve/adapterstage, docs/lora.md).
        """
        if self.source_kind == "cache":
            if self.source.startswith("cache://"):
                return f"{MODEL_CACHE_MOUNT}/{self.source.removeprefix('cache://').lstrip('/')}"
            return self.source
        if self.source_kind == "url":
            return self.source
        repo = self.source.removeprefix("hf://")
        return f"hf://{repo}@{self.revision}" if self.revision else repo


class ParallelismSpec(_Model):
    """Parallelism per replica. 'auto' lets the planner choose the smallest layout that fits."""

    tensor: IntOrAuto = Field(
        default="auto",
        description="Tensor parallel size (GPUs sharing every layer, inside one NVLink domain).",
    )
    pipeline: IntOrAuto = Field(default="auto", description="Pipeline parallel size (stages of layers).")
    context: IntOrAuto = Field(
        default="auto",
        description="Prefill context parallel size (sequence sharded across GPU groups); 'auto' uses it only "
        "for the long-context tier when it avoids pipeline stages.",
    )
    expert: IntOrAuto = Field(
        default="auto",
        description="Expert parallelism for mixture-of-experts models; vLLM's EP size equals tensor x data, "
        "so an explicit value must match. 'auto' enables it for MoE models on more than one GPU.",
    )
    data: IntOrAuto = Field(
        default="auto",
        description="Data parallel ranks inside one replica (vLLM --data-parallel-size); auto = 1.",
    )


class Toleration(_Model):
    """A Kubernetes toleration, passed through to the pods."""

    key: str | None = Field(default=None, max_length=316, description="Taint key; empty matches all keys.")
    operator: Literal["Exists", "Equal"] = Field(default="Equal", description="Exists or Equal.")
    value: str | None = Field(default=None, max_length=63, description="Taint value for Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect; empty matches all effects."
    )
    toleration_seconds: int | None = Field(default=None, description="For NoExecute: how long to stay bound.")


class SpotSpec(_Model):
    """Spot / preemptible capacity: whether replicas may use it and how many must not."""

    enabled: bool = Field(
        default=False,
        description="Allow spot/preemptible nodes (recognised by the operator's labelSchemes.spot: Karpenter "
        "karpenter.sh/capacity-type, GKE cloud.google.com/gke-spot and gke-provisioning, EKS "
        "eks.amazonaws.com/capacityType, AKS kubernetes.azure.com/scalesetpriority). The operator config's "
        "spotTiers may limit spot to some tiers.",
    )
    on_demand_baseline: int = Field(
        default=0,
        ge=0,
        le=1000,
        description="Replicas of each pool (on each GPU type it runs on) kept on on-demand nodes while spot "
        "is enabled, so a spot interruption never takes the whole pool; the rest may run on spot.",
    )

    @model_validator(mode="before")
    @classmethod
    def _not_a_boolean(cls, value: Any) -> Any:
        """``spot: true`` was the field's shape before 2026-12; say what to write now."""
        if isinstance(value, bool):
            raise ValueError(
                f"spot is an object since v1alpha1 of 2026-12: write spot: {{enabled: {str(value).lower()}}} "
                "(and optionally onDemandBaseline: N)"
            )
        return value


class PlacementSpec(_Model):
    """Where replicas may run: acceptable GPU types in fallback order, tier, spot, node constraints."""

    gpu_types: list[GPUTypeName] = Field(
        default_factory=list,
        max_length=16,
        description="Acceptable GPU types in order of preference (= fallback order), e.g. [H100, A100-80GB]. "
        "Empty: the tier chooses the order.",
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )
    tier: Tier = Field(
        default="latency-critical",
        description="Workload tier: latency-critical prefers the newest GPUs with older ones as overflow; "
        "throughput prefers A100-80GB; long-context needs the most memory; batch the cheapest per token.",
    )
    spot: SpotSpec = Field(
        default_factory=SpotSpec,
        description="Spot capacity: enabled, onDemandBaseline.",
        json_schema_extra={"default": {}},
    )
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Extra node labels every serving pod requires."
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, max_length=32, description="Extra tolerations for serving pods."
    )
    topology_key: str | None = Field(
        default=None,
        max_length=316,
        description="Node label whose value names an NVLink/rack domain; all nodes of a multi-node replica "
        "share one domain. Default: the first label the GPU type's nodes carry of nvidia.com/gpu.clique, "
        "the operator's rack/block labels (e.g. cloud.google.com/gce-topology-block), then "
        "fallbackTopologyKey. Status shows the choice.",
    )
    fallback_topology_key: str = Field(
        default="topology.kubernetes.io/zone",
        max_length=316,
        description="Topology key used when the GPU type's nodes carry neither topologyKey nor a rack label.",
    )
    gpus_per_node: int | None = Field(
        default=None,
        ge=1,
        le=72,
        description="GPUs per node for planning; default: from the cluster's nvidia.com/gpu.count labels, else 8.",
    )


class PoolSpec(_Model):
    """One concurrent pool of replicas on its own GPU types, e.g. H100 bf16 beside A100-40GB int4."""

    name: str = Field(pattern=DNS_LABEL_PATTERN, max_length=20, description="Pool name (DNS label, <= 20).")
    gpu_types: list[GPUTypeName] = Field(
        min_length=1,
        max_length=16,
        description="Acceptable GPU types for this pool, in fallback order.",
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )
    dtype: Dtype | None = Field(default=None, description="Override of model.dtype for this pool.")
    kv_cache_dtype: KVCacheDtype | None = Field(default=None, description="Override of model.kvCacheDtype.")
    quantization: str | None = Field(
        default=None, max_length=63, description="Override of model.quantization."
    )
    checkpoint: str | None = Field(
        default=None,
        min_length=1,
        max_length=253,
        description="Override of model.checkpoint: this pool's weights, e.g. an AWQ build for small GPUs.",
    )
    parallelism: ParallelismSpec | None = Field(default=None, description="Override of spec.parallelism.")
    weight: int = Field(
        default=1,
        ge=0,
        le=1000,
        description="Share of spec.replicas this pool receives when pools split by weight "
        "(autoscaling.poolOrder weight, the default without autoscaling).",
    )
    max_replicas: int | None = Field(
        default=None,
        ge=0,
        le=1000,
        description="Most replicas (warm standby included) this pool runs, whatever spec.replicas says; "
        "default: no bound.",
    )
    spot: bool | None = Field(default=None, description="Override of placement.spot.enabled for this pool.")


class ScalingPolicy(_Model):
    """One HPA-style scaling policy: at most `value` pods or percent per `periodSeconds`."""

    type: Literal["Pods", "Percent"] = Field(description="Pods or Percent.")
    value: int = Field(ge=1, le=1000, description="Pods or percent allowed per period.")
    period_seconds: int = Field(ge=1, le=1800, description="Length of the period.")


def _pods(value: int, period: int) -> ScalingPolicy:
    return ScalingPolicy(type="Pods", value=value, period_seconds=period)


class ScalingRules(_Model):
    """Scale-up or scale-down behaviour, as in the HorizontalPodAutoscaler behavior API."""

    stabilization_window_seconds: int = Field(
        default=0, ge=0, le=3600, description="Look-back window; the most conservative recommendation wins."
    )
    policies: list[ScalingPolicy] = Field(
        default_factory=list,
        max_length=8,
        description="Rate limits. Empty: Kubernetes' HPA defaults (up: 100% or 4 pods per 15 s, whichever "
        "is more; down: 100% per 15 s).",
    )
    select_policy: Literal["Max", "Min", "Disabled"] = Field(
        default="Max", description="Which policy applies when several do; Disabled forbids this direction."
    )


def _default_scale_up() -> ScalingRules:
    """The HPA's own scale-up default: at once, by max(4 pods, 100 %) per 15 s. Model loads take
    minutes, so waiting a window first only adds to them; starting replicas count as capacity on the
    way, so the next passes do not pile more on while they load."""
    return ScalingRules(
        stabilization_window_seconds=0,
        policies=[_pods(4, 15), ScalingPolicy(type="Percent", value=100, period_seconds=15)],
    )


def _default_scale_down() -> ScalingRules:
    return ScalingRules(stabilization_window_seconds=300, policies=[_pods(1, 300)])


Weekday = Literal["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]
WEEKDAYS: tuple[Weekday, ...] = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
HHMM_PATTERN = r"^([01][0-9]|2[0-3]):[0-5][0-9]$"


def _time_zone(v: str) -> str:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError  # stdlib; imported here to keep import time low

    try:
        ZoneInfo(v)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {v!r} (use an IANA name such as Europe/Paris or UTC)") from None
    return v


class ScheduleWindow(_Model):
    """A recurring window that raises the floor, e.g. weekdays 08:45-18:00 keep 4 replicas."""

    name: str = Field(pattern=DNS_LABEL_PATTERN, max_length=20, description="Window name (DNS label).")
    days: list[Weekday] = Field(
        default_factory=lambda: list(WEEKDAYS),
        min_length=1,
        max_length=7,
        description="Days the window starts on (Mon..Sun); default: every day.",
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )
    start: str = Field(pattern=HHMM_PATTERN, description="Start time HH:MM (24 h) in timeZone.")
    end: str = Field(
        pattern=HHMM_PATTERN,
        description="End time HH:MM (exclusive); earlier than start means the window ends the next day.",
    )
    time_zone: Annotated[str, AfterValidator(_time_zone)] = Field(
        default="UTC", max_length=64, description="IANA time zone of start and end (daylight saving applies)."
    )
    min_replicas: int = Field(ge=0, le=1000, description="Floor while the window is open.")

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "self.start != self.end",
                    "message": "start and end must differ",
                    "fieldPath": ".end",
                }
            ]
        }
    )

    @model_validator(mode="after")
    def _not_empty(self) -> ScheduleWindow:
        if self.start == self.end:
            raise FieldValueError("end", "start and end must differ")
        return self


class ForecastSpec(_Model):
    """Predictive pre-warm: raise the floor to what the same time of day (or week) needed before."""

    enabled: bool = Field(default=False, description="Forecast from Prometheus history (builtin mode).")
    period: Literal["daily", "weekly"] = Field(
        default="daily", description="Compare with the same time of day (daily) or of the weekday (weekly)."
    )
    lookback: int = Field(
        default=7, ge=1, le=60, description="How many past days (daily) or weeks (weekly) to look at."
    )
    lead_seconds: int | None = Field(
        default=None,
        ge=0,
        le=86400,
        description="How far ahead to forecast (the centre of each slice); default: startupGraceSeconds, "
        "one start-up time ahead.",
    )
    window_seconds: int = Field(
        default=900,
        ge=60,
        le=7200,
        description="Width of each past slice that is averaged; the slice is centred leadSeconds ahead.",
    )
    quantile: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description="Which quantile of the past slices across days sets the floor: 0.5 (the median) "
        "ignores a one-off spike; 1 takes the busiest day (more headroom, follows outliers).",
    )


class TTFTSLO(_Model):
    """A time-to-first-token objective: the quantile of vllm:time_to_first_token_seconds to keep under."""

    seconds: float = Field(gt=0, le=3600, description="The TTFT the quantile must stay under, in seconds.")
    quantile: float = Field(
        default=0.95, gt=0, lt=1, description="Which quantile of the TTFT histogram (0.95: p95)."
    )


TTFT_HPA_MESSAGE = (
    "ttftSLO needs mode builtin or keda: an HPA would read it as an External metric, which needs a "
    "metrics adapter that serves a histogram quantile"
)

AutoscalingMode = Literal["builtin", "hpa", "keda", "off"]
STANDBY_PERCENT_MESSAGE = "warmStandbyPercent needs mode builtin (an HPA or KEDA cannot promote a standby)"
BURST_HEADROOM_MESSAGE = (
    "burstHeadroom needs mode builtin: in hpa and keda modes the HorizontalPodAutoscaler computes "
    "the replicas as ceil(load / target) and cannot add beta x sqrt(load)"
)


@dataclass(frozen=True)
class CrossFieldRule:
    """One cross-field rule, checked twice from one definition: by the API server (the CEL rule in
    the generated CRD) and by the CLI and the operator (``violated``), with the same message and
    the same field, so ``kubectl apply`` and ``toposerve plan`` name the same path."""

    field: str  # camelCase, relative to the object the rule is on
    message: str
    cel: str
    violated: Callable[[Any], bool]

    def validation(self) -> dict[str, Any]:
        return {"rule": self.cel, "message": self.message, "fieldPath": f".{self.field}"}


_HPA_KEDA = "!has(self.mode) || !(self.mode in ['hpa', 'keda'])"
AUTOSCALING_RULES: tuple[CrossFieldRule, ...] = (
    CrossFieldRule(
        "minReplicas", "minReplicas must be <= maxReplicas",
        "!has(self.minReplicas) || !has(self.maxReplicas) || self.minReplicas <= self.maxReplicas",
        lambda a: a.min_replicas > a.max_replicas,
    ),
    CrossFieldRule(
        "mode", "mode builtin, hpa or keda needs enabled: true",
        "!has(self.mode) || self.mode == 'off' || (has(self.enabled) && self.enabled)",
        lambda a: a.mode not in (None, "off") and not a.enabled,
    ),
    CrossFieldRule(
        "schedules", "a schedule's minReplicas must be <= maxReplicas",
        "!has(self.schedules) || !has(self.maxReplicas) || self.schedules.all(s, s.minReplicas <= self.maxReplicas)",
        lambda a: any(s.min_replicas > a.max_replicas for s in a.schedules),
    ),
    CrossFieldRule(
        "schedules", "schedules need mode builtin or keda (an HPA has no schedules)",
        "!has(self.mode) || self.mode != 'hpa' || !has(self.schedules) || size(self.schedules) == 0",
        lambda a: a.mode == "hpa" and bool(a.schedules),
    ),
    CrossFieldRule(
        "forecast", "forecast needs mode builtin",
        f"{_HPA_KEDA} || !has(self.forecast) || !has(self.forecast.enabled) || !self.forecast.enabled",
        lambda a: a.mode in ("hpa", "keda") and a.forecast.enabled,
    ),
    CrossFieldRule(
        "minReplicas", "mode hpa needs minReplicas >= 1 (an HPA does not scale to zero; keda does)",
        "!has(self.mode) || self.mode != 'hpa' || !has(self.minReplicas) || self.minReplicas >= 1",
        lambda a: a.mode == "hpa" and a.min_replicas < 1,
    ),
    CrossFieldRule(
        "ttftSLO", TTFT_HPA_MESSAGE,
        "!has(self.mode) || self.mode != 'hpa' || !has(self.ttftSLO)",
        lambda a: a.mode == "hpa" and a.ttft_slo is not None,
    ),
    CrossFieldRule(
        "warmStandby", "warmStandby needs mode builtin (an HPA or KEDA cannot promote a standby)",
        f"{_HPA_KEDA} || !has(self.warmStandby) || self.warmStandby == 0",
        lambda a: a.mode in ("hpa", "keda") and bool(a.warm_standby),
    ),
    CrossFieldRule(
        "warmStandbyPercent", STANDBY_PERCENT_MESSAGE,
        f"{_HPA_KEDA} || !has(self.warmStandbyPercent) || self.warmStandbyPercent == 0",
        lambda a: a.mode in ("hpa", "keda") and bool(a.warm_standby_percent),
    ),
    CrossFieldRule(
        "leadingSignal", "leadingSignal needs mode builtin (only the operator's loop reads the routers)",
        f"{_HPA_KEDA} || !has(self.leadingSignal) || !self.leadingSignal",
        lambda a: a.mode in ("hpa", "keda") and a.leading_signal,
    ),
    CrossFieldRule(
        "burstHeadroom", BURST_HEADROOM_MESSAGE,
        f"{_HPA_KEDA} || !has(self.burstHeadroom) || self.burstHeadroom == 0.0",
        lambda a: a.mode in ("hpa", "keda") and bool(a.burst_headroom),
    ),
)  # fmt: skip


class AutoscalingSpec(_Model):
    """KV-cache-pressure autoscaling; it writes spec.replicas only through the scale subresource."""

    enabled: bool = Field(default=False, description="Autoscale spec.replicas (see mode for who does it).")
    mode: AutoscalingMode | None = Field(
        default=None,
        description="Who writes spec.replicas when enabled: builtin (default; the operator's own loop on "
        "Prometheus or the pods' /metrics), hpa (a rendered autoscaling/v2 HorizontalPodAutoscaler, needs a "
        "custom metrics adapter), keda (a rendered KEDA ScaledObject with Prometheus triggers) or off.",
    )
    ttft_slo: TTFTSLO | None = Field(
        alias="ttftSLO",
        default=None,
        description="Also scale on time to first token: desired = ceil(replicas x observed quantile / "
        "seconds), the largest proposal wins (builtin and keda modes).",
    )
    min_replicas: int = Field(default=1, ge=0, le=1000, description="Lower bound.")
    max_replicas: int = Field(default=4, ge=1, le=1000, description="Upper bound.")

    @field_validator("ttft_slo")
    @classmethod
    def _ttft_not_for_hpa(cls, v: TTFTSLO | None, info: ValidationInfo) -> TTFTSLO | None:
        if v is not None and info.data.get("mode") == "hpa":
            raise ValueError(TTFT_HPA_MESSAGE)
        return v

    target_kv_cache_utilization: float = Field(
        alias="targetKVCacheUtilization",
        default=0.70,
        gt=0,
        le=1,
        description="Target mean vllm:kv_cache_usage_perc across ready replicas.",
    )
    target_waiting_requests: float = Field(
        default=4.0,
        gt=0,
        le=10000,
        description="Target mean vllm:num_requests_waiting per ready replica; the larger of the two "
        "metrics' proposals wins (as with several HPA metrics).",
    )
    tolerance: float = Field(
        default=0.1,
        ge=0,
        lt=1,
        description="No change while observed/target is within 1 +- tolerance (the HPA's default 0.1).",
    )
    burst_headroom: float = Field(
        default=0.0,
        ge=0,
        le=10,
        description="Square-root staffing on the KV-cache proposal (builtin mode): replicas = ceil(R + "
        "burstHeadroom x sqrt(R)), R = the KV load in replicas at targetKVCacheUtilization (what the HPA "
        "rule rounds up). Proportionally more headroom for small fleets, less for big ones; 0 (default): "
        "the HPA rule.",
    )

    leading_signal: bool = Field(
        default=False,
        description="Also size from what the routers see (builtin mode, routing enabled): arrivals per "
        "second over 5 s and 60 s, in-flight tokens and the engines' decode speed, turned into replicas by "
        "Little's law in tokens (docs/autoscaling.md, 'Leading signal'); the largest proposal wins, the "
        "HPA behaviour still guards, and decisions come every 5 s instead of every syncPeriodSeconds.",
    )

    @field_validator("burst_headroom")
    @classmethod
    def _headroom_builtin_only(cls, v: float, info: ValidationInfo) -> float:
        if v and info.data.get("mode") in ("hpa", "keda"):
            raise ValueError(BURST_HEADROOM_MESSAGE)
        return v

    scale_up: ScalingRules = Field(
        default_factory=_default_scale_up,
        description="Scale-up behaviour (default: the HPA's, no window, max(4 pods, 100 %)/15 s).",
    )
    scale_down: ScalingRules = Field(
        default_factory=_default_scale_down,
        description="Scale-down behaviour (default: 300 s window, 1 pod/300 s).",
    )
    warm_standby: int = Field(
        default=0,
        ge=0,
        le=100,
        description="Extra loaded replicas kept out of rotation for fast scale-up (builtin mode); with "
        "warmStandbyPercent, the least there are.",
    )
    warm_standby_percent: int = Field(
        default=0,
        ge=0,
        le=100,
        description="Warm standby sized to the load: floor(percent x spec.replicas / 100), at least "
        "warmStandby (25: one standby per 4 serving replicas, none below 4).",
    )
    startup_grace_seconds: int = Field(
        default=600,
        ge=0,
        le=7200,
        description="How long a starting replica is expected to take to load; pending starts count as "
        "capacity so slow start-up does not trigger more scale-up.",
    )
    sync_period_seconds: int = Field(
        default=15, ge=1, le=600, description="How often the builtin loop (and KEDA) evaluates metrics."
    )
    metrics_window_seconds: int = Field(
        default=60,
        ge=2,
        le=3600,
        description="Metrics are averaged over this window (PromQL avg_over_time) before deciding.",
    )
    stale_after_seconds: int = Field(
        default=60,
        ge=1,
        le=3600,
        description="A replica whose newest sample is older than this has no metrics: no scale-down then, "
        "and no scale-up beyond what the fresh replicas justify.",
    )
    schedules: list[ScheduleWindow] = Field(
        default_factory=list,
        max_length=16,
        description="Recurring windows that raise the floor (builtin and keda modes).",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    forecast: ForecastSpec = Field(
        default_factory=ForecastSpec,
        description="Predictive pre-warm from Prometheus history (builtin mode with a Prometheus).",
        json_schema_extra={"default": {}},
    )
    pool_order: Literal["tier", "weight", "cost"] | None = Field(
        default=None,
        description="How spec.replicas spreads over spec.pools: tier (grow the fastest pool with room "
        "first for latency-critical and long-context, the cheapest per token first for throughput and "
        "batch; shrink in reverse), cost (grow the pool whose next replica costs least per output token, "
        "observed where Prometheus says, among the pools meeting ttftSLO; pools over it last, fastest "
        "first; shrink the most expensive per token first, keeping the on-demand baseline) or weight "
        "(split by pools[].weight). Default: tier when autoscaling is enabled, weight otherwise.",
    )

    model_config = ConfigDict(
        json_schema_extra={"x-kubernetes-validations": [r.validation() for r in AUTOSCALING_RULES]}
    )

    @model_validator(mode="after")
    def _consistent(self) -> AutoscalingSpec:
        for rule in AUTOSCALING_RULES:
            if rule.violated(self):
                raise FieldValueError(rule.field, rule.message)
        names = [s.name for s in self.schedules]
        if len(names) != len(set(names)):  # the API server: x-kubernetes-list-map-keys [name]
            raise FieldValueError("schedules", "schedule names must be unique")
        return self

    @property
    def effective_pool_order(self) -> Literal["tier", "weight", "cost"]:
        """tier unless set, or unless autoscaling is off (existing deployments keep their weight split)."""
        if self.pool_order is not None:
            return self.pool_order
        return "tier" if self.effective_mode != "off" else "weight"

    def standby_for(self, replicas: int) -> int:
        """Warm standby pods beside ``replicas`` serving ones: max(warmStandby, floor(percent x
        replicas / 100)). Sized to the load because a sudden rise is a share of the load (a 1.6x
        burst on 8 replicas wants 5 more), while a fixed count costs the same at night as at peak.
        """
        return max(self.warm_standby, max(0, replicas) * self.warm_standby_percent // 100)

    @property
    def effective_mode(self) -> AutoscalingMode:
        """Who writes spec.replicas: off unless enabled; builtin unless a mode says otherwise."""
        if not self.enabled or self.mode == "off":
            return "off"
        return self.mode or "builtin"


RoutingMode = Literal["dedicated", "gateway", "none"]
FailureMode = Literal["FailOpen", "FailClose"]


class InferencePoolSpec(_Model):
    """A Gateway API Inference Extension InferencePool (inference.networking.k8s.io/v1) for this
    deployment, so a cluster's own Gateway (Istio, kgateway, NGINX Gateway Fabric, GKE) routes to its
    engines through toposerve's endpoint picker (docs/gateway-api.md)."""

    enabled: bool | None = Field(
        default=None,
        description="Render an InferencePool named after the LLMDeployment, selecting its serving engine "
        "pods, whose endpoint picker is the deployment's router (mode dedicated) or the cluster's gateway "
        "(mode gateway). Unset: the operator's inferencePool.enabled (off by default). Needs a picker: "
        "refused with mode none. Needs the InferencePool CRD in the cluster.",
    )
    failure_mode: FailureMode | None = Field(
        default=None,
        description="What the Gateway does when the picker does not answer: FailClose (drop the request; "
        "GIE's default) or FailOpen (forward it to an endpoint of its own choosing). Unset: the "
        "operator's inferencePool.failureMode.",
    )


_POOL_ON = "has(self.inferencePool) && has(self.inferencePool.enabled) && self.inferencePool.enabled"
INFERENCE_POOL_NEEDS_PICKER = (
    "inferencePool.enabled needs an endpoint picker, and mode none (or enabled: false) has none: set "
    "mode dedicated (the deployment's router picks) or gateway (the cluster's gateway picks), or remove "
    "inferencePool.enabled"
)
ROUTING_RULES: tuple[CrossFieldRule, ...] = (
    CrossFieldRule(
        "mode", "mode none contradicts enabled: true (enabled is the older switch: set enabled: false "
        "or remove it; objects created before routing.mode carry enabled: true from its old default)",
        "!has(self.mode) || self.mode != 'none' || !has(self.enabled) || !self.enabled",
        lambda r: r.mode == "none" and r.router_enabled is True,
    ),
    CrossFieldRule(
        "mode", "mode dedicated or gateway contradicts enabled: false (enabled: false is mode none: "
        "remove enabled)",
        "!has(self.mode) || self.mode == 'none' || !has(self.enabled) || self.enabled",
        lambda r: r.mode in ("dedicated", "gateway") and r.router_enabled is False,
    ),
    CrossFieldRule(
        "inferencePool.enabled", INFERENCE_POOL_NEEDS_PICKER,
        f"!({_POOL_ON}) || (has(self.mode) ? self.mode != 'none' : (!has(self.enabled) || self.enabled))",
        lambda r: r.inference_pool.enabled is True and r.effective_mode == "none",
    ),
)  # fmt: skip


class RoutingSpec(_Model):
    """How requests reach the replicas: a router per deployment, the cluster's gateway, or neither."""

    mode: RoutingMode | None = Field(
        default=None,
        description="dedicated (default): a router per deployment (<name>-router, Service <name>) in front "
        "of its replicas; gateway: no router of its own, the cluster's shared gateway routes to the engine "
        "Services (labelled and annotated for discovery); none: clients use the engine Service "
        "<name>-engine directly. Default: dedicated, or none with enabled: false.",
    )
    # ``enabled`` on the wire; the attribute of the same name is the effective answer (below).
    router_enabled: bool | None = Field(
        default=None,
        alias="enabled",
        description="The older switch, kept working: enabled: false is mode: none, enabled: true allows "
        "dedicated and gateway. Prefer mode; the two must not contradict.",
    )
    strategy: Strategy = Field(
        default="auto",
        description="auto (prefix affinity + load + KV usage + queue, weighted), round-robin, least-request, "
        "token-aware, prefix-aware, session or gpu-weighted.",
    )
    session_header: str = Field(
        default="x-session-id", max_length=128, description="Header carrying the session id for stickiness."
    )
    session_ttl_seconds: int = Field(
        alias="sessionTTLSeconds",
        default=600,
        ge=1,
        le=86400,
        description="Idle time before a session expires.",
    )
    bounded_load_factor: float = Field(
        default=1.25,
        ge=1.0,
        le=10.0,
        description="A replica gets prefix/session affinity only while its load <= factor x mean load.",
    )
    long_context_threshold: int | None = Field(
        default=None,
        ge=1,
        description="Prompts with more tokens than this go to the pool planned for long context.",
    )
    kv_events: bool = Field(
        default=False,
        description="Route on the engines' real KV-cache events: engines publish them (vLLM "
        "--kv-events-config, ZeroMQ on ports 5557/5558) and the routers score prefix-aware and auto on "
        "what each engine really caches (docs/router.md, 'Routing on KV-cache events'). Off: the routers' "
        "approximate prefix index.",
    )
    gpu_weighting: bool = Field(
        default=True, description="Divide load by the GPU type's throughput weight (H100 ~1.6 x A100)."
    )
    replicas: int = Field(
        default=2, ge=1, le=50, description="Router pods (2 by default, spread over nodes, with a PDB)."
    )
    inference_pool: InferencePoolSpec = Field(
        default_factory=InferencePoolSpec,
        description="Gateway API Inference Extension: an InferencePool for this deployment, picked by "
        "toposerve (docs/gateway-api.md).",
        json_schema_extra={"default": {}},
    )

    model_config = ConfigDict(
        json_schema_extra={"x-kubernetes-validations": [r.validation() for r in ROUTING_RULES]}
    )

    @model_validator(mode="after")
    def _mode_and_enabled_agree(self) -> RoutingSpec:
        for rule in ROUTING_RULES:
            if rule.violated(self):
                raise FieldValueError(rule.field, rule.message)
        return self

    @property
    def effective_mode(self) -> RoutingMode:
        """mode when set, none for enabled: false, else dedicated: the one answer every reader uses."""
        if self.mode is not None:
            return self.mode
        return "none" if self.router_enabled is False else "dedicated"

    @property
    def dedicated_router(self) -> bool:
        """Whether this deployment gets its own router (Deployment, Service <name>, PDB, RBAC)."""
        return self.effective_mode == "dedicated"

    def inference_pool_on(self, cluster_default: bool) -> bool:
        """Whether an InferencePool is rendered: the spec's inferencePool.enabled, else the operator's
        default, and never without a picker (mode none; an explicit enabled: true there is refused)."""
        on = self.inference_pool.enabled
        return self.effective_mode != "none" and (cluster_default if on is None else on)

    @property
    def enabled(self) -> bool:
        """Kept for older readers: whether a per-deployment router is rendered (= dedicated_router)."""
        return self.dedicated_router


class CostSpec(_Model):
    """Prices for the cost report; cluster defaults come from the operator's config."""

    hourly_per_gpu: dict[str, Annotated[float, Field(ge=0)]] = Field(
        alias="hourlyPerGPU",
        default_factory=dict,
        description="USD per GPU-hour by GPU type, e.g. {H100: 2.49}.",
    )
    spot_hourly_per_gpu: dict[str, Annotated[float, Field(ge=0)]] = Field(
        alias="spotHourlyPerGPU", default_factory=dict, description="Spot USD per GPU-hour by GPU type."
    )


class ServingSpec(_Model):
    """Engine runtime knobs that shape memory planning and the pods."""

    gpu_memory_utilization: float = Field(
        default=0.90,
        gt=0,
        le=0.99,
        description="Fraction of GPU memory vLLM may use (--gpu-memory-utilization).",
    )
    runtime_reserve_gib: float = Field(
        alias="runtimeReserveGiB",
        default=2.0,
        ge=0,
        le=64,
        description="GiB per GPU kept for CUDA context, activations and graphs.",
    )
    min_concurrent_sequences: int = Field(
        default=1,
        ge=1,
        le=4096,
        description="A replica must hold this many sequences of maxContextLength in KV cache to fit.",
    )
    image: str | None = Field(default=None, max_length=512, description="Engine image override.")
    extra_args: list[Annotated[str, Field(max_length=1024)]] = Field(
        default_factory=list, max_length=64, description="Extra engine arguments, appended verbatim."
    )
    hf_token_secret: str | None = Field(
        default=None,
        max_length=253,
        description="Secret with key HF_TOKEN; gated models (e.g. meta-llama/*) need it to download weights.",
    )
    shutdown_timeout_seconds: int | None = Field(
        default=None,
        ge=0,
        le=3600,
        description="Seconds an engine lets in-flight requests finish after SIGTERM (vLLM --shutdown-timeout; "
        "0 aborts them, vLLM's own default). Unset: the operator's engineShutdownTimeoutSeconds. The pod's "
        "grace period and the router's drain are sized above it.",
    )
    runtime_class_name: str | None = Field(
        default=None,
        max_length=253,
        pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        description="RuntimeClass of the engine pods (e.g. nvidia where the GPU operator's runtime is not the "
        "node's default). Unset: the operator's runtimeClassName.",
    )

    @field_validator("extra_args")
    @classmethod
    def _no_shutdown_timeout(cls, v: list[str]) -> list[str]:
        # The pod's grace period and the router's drain are sized from it: it has a field.
        if any(a == "--shutdown-timeout" or a.startswith("--shutdown-timeout=") for a in v):
            raise ValueError("--shutdown-timeout: set spec.serving.shutdownTimeoutSeconds instead")
        return v


class DisruptionSpec(_Model):
    """How replicas are replaced on a template change and moved off a drained node."""

    strategy: Literal["Surge", "InPlace"] = Field(
        default="Surge",
        description="Surge: a replacement replica is up before the old one goes (rollouts: maxSurge 1, "
        "maxUnavailable 0; drains: the operator surges a replacement and the budget blocks eviction until it "
        "is Ready), which needs one spare replica's GPUs. InPlace: the old replica goes first (maxSurge 0, "
        "maxUnavailable 1), for clusters with no spare GPUs; every change or node drain then takes a replica "
        "down for its whole start-up, and a one-replica pool is down meanwhile (said in an Event).",
    )


def _nested_default() -> dict[str, Any]:
    return {"default": {}}


ADAPTERS_NEED_LORA = (
    "adapters need spec.lora (e.g. lora: {maxLoras: 4}): vLLM serves adapters only with --enable-lora"
)
ADAPTER_NAME_TAKEN = (
    "an adapter's name must differ from the model's served name (servedName, else name) and aliases"
)
SPEC_RULES: tuple[CrossFieldRule, ...] = (
    CrossFieldRule(
        "adapters", ADAPTERS_NEED_LORA,
        "!has(self.adapters) || size(self.adapters) == 0 || has(self.lora)",
        lambda s: bool(s.adapters) and s.lora is None,
    ),
    CrossFieldRule(
        "adapters", ADAPTER_NAME_TAKEN,
        "!has(self.adapters) || self.adapters.all(a, "
        "a.name != (has(self.model.servedName) ? self.model.servedName : self.model.name) && "
        "(!has(self.model.aliases) || !(a.name in self.model.aliases)))",
        lambda s: any(a.name in s.model.served_names for a in s.adapters),
    ),
)  # fmt: skip


class LLMDeploymentSpec(_Model):
    """Desired state of an LLMDeployment. Written by users (and spec.replicas by one autoscaler)."""

    model: ModelSpec = Field(description="The model to serve.")
    engine: Engine = Field(
        default="auto",
        description="vllm, mock (CPU look-alike for clusters without GPUs) or auto (mock "
        "when the cluster has no GPU nodes).",
    )
    replicas: int = Field(
        default=1, ge=0, le=1000, description="Total replicas over all pools (the scale subresource)."
    )
    parallelism: ParallelismSpec = Field(
        default_factory=ParallelismSpec,
        description="Parallelism per replica.",
        json_schema_extra=_nested_default(),
    )
    pools: list[PoolSpec] = Field(
        default_factory=list,
        max_length=8,
        description="Concurrent pools for heterogeneous fleets; empty: one pool named 'default' from placement.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    placement: PlacementSpec = Field(
        default_factory=PlacementSpec,
        description="Where replicas may run.",
        json_schema_extra=_nested_default(),
    )
    autoscaling: AutoscalingSpec = Field(
        default_factory=AutoscalingSpec,
        description="KV-cache autoscaling.",
        json_schema_extra=_nested_default(),
    )
    routing: RoutingSpec = Field(
        default_factory=RoutingSpec, description="Request routing.", json_schema_extra=_nested_default()
    )
    cost: CostSpec = Field(
        default_factory=CostSpec, description="Price overrides.", json_schema_extra=_nested_default()
    )
    serving: ServingSpec = Field(
        default_factory=ServingSpec, description="Engine runtime knobs.", json_schema_extra=_nested_default()
    )
    disruption: DisruptionSpec = Field(
        default_factory=DisruptionSpec,
        description="Rollouts and node drains: surge (default) or in place.",
        json_schema_extra=_nested_default(),
    )
    lora: LoraSpec | None = Field(
        default=None,
        description="LoRA adapter serving (vLLM --enable-lora); present, even empty ({}), turns it on. "
        "Adapters are loaded at run time (docs/lora.md).",
    )
    adapters: list[AdapterSpec] = Field(
        default_factory=list,
        max_length=MAX_ADAPTERS,
        description="LoRA adapters served beside the base model, each under its own OpenAI model name; "
        "needs lora.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "!has(self.pools) || size(self.pools) == 0 || !has(self.placement) || "
                    "!has(self.placement.gpuTypes) || size(self.placement.gpuTypes) == 0",
                    "message": "set GPU types either in placement.gpuTypes or per pool in pools[].gpuTypes, not both",
                    "fieldPath": ".pools",
                },
                *(r.validation() for r in SPEC_RULES),
            ]
        }
    )

    @property
    def effective_replicas(self) -> int:
        """spec.replicas, within [minReplicas, maxReplicas] while an autoscaler owns it: ``replicas: 9``
        with ``maxReplicas: 4`` runs 4 pods from the start instead of starting 9 (GPUs, model loads)
        until the autoscaler's first decision writes 4 back. spec.replicas itself is left as written:
        the autoscaler (or the HPA / KEDA) is its one writer."""
        a = self.autoscaling
        if a.effective_mode == "off":
            return self.replicas
        return min(max(self.replicas, a.min_replicas), a.max_replicas)

    @model_validator(mode="after")
    def _pools_xor_gpu_types(self) -> LLMDeploymentSpec:
        if self.pools and self.placement.gpu_types:
            raise FieldValueError(
                "pools",
                "set GPU types either in placement.gpuTypes or per pool in pools[].gpuTypes, not both",
            )
        names = [p.name for p in self.pools]
        if len(names) != len(set(names)):
            raise FieldValueError("pools", "pool names must be unique")
        return self

    @model_validator(mode="after")
    def _adapters(self) -> LLMDeploymentSpec:
        for rule in SPEC_RULES:
            if rule.violated(self):
                raise FieldValueError(rule.field, rule.message)
        names = [a.name for a in self.adapters]
        if len(names) != len(set(names)):  # the API server: x-kubernetes-list-map-keys [name]
            raise FieldValueError("adapters", "adapter names must be unique")
        return self

    @property
    def openai_model_names(self) -> list[str]:
        """Every OpenAI model name this deployment answers to: served name, aliases, adapters."""
        return [*self.model.served_names, *(a.name for a in self.adapters)]
