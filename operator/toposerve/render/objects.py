"""Plan + spec -> Kubernetes objects, from jinja2 templates a platform engineer can read.

Templates (``templates/*.yaml.j2``) hold the shape; this module computes the values (names, labels,
resources, arguments) and parses the rendered YAML back into dicts. Rendering is pure: the same
inputs give the same objects, which is what lets the controller server-side apply them on every
reconcile without churn. StrictUndefined turns a missing value into an error, not an empty field.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import yaml

from toposerve import API_GROUP, API_VERSION
from toposerve.adapterstage.sources import STAGE_PORT, STAGE_PORT_NAME, STAGE_ROOT
from toposerve.api.config import OperatorConfig
from toposerve.api.errors import SpecError
from toposerve.api.spec import MODEL_CACHE_MOUNT, LLMDeploymentSpec
from toposerve.planner.inventory import Inventory
from toposerve.planner.memory import GIB
from toposerve.planner.plan import IMAGE_WEIGHTS_DIR, DeploymentPlan, PoolPlan, cache_gib
from toposerve.planner.resources import cpu_quantity
from toposerve.render.disruption import EVACUATION_MIN_AVAILABLE, disruption
from toposerve.render.fabric import NO_FABRIC, fabric_for
from toposerve.render.multinode import worker_script
from toposerve.render.placement import router_affinity, serving_affinity, serving_tolerations
from toposerve.render.prefetch import mock_prefetch_container, render_prefetch, vllm_prefetch_container

ENGINE_PORT = 8000
ROUTER_PORT = 8080
# The endpoint picker (GIE's ext_proc gRPC, docs/gateway-api.md) and its gRPC health service: the
# ports GIE's own EPP listens on (cmd/epp defaults, v1.6.2), on routers whose deployment has an
# InferencePool (render/inferencepool.py).
EPP_PORT, EPP_HEALTH_PORT = 9002, 9003
LABEL_LONG_CONTEXT = "toposerve.io/long-context"
MAX_NAME = 42  # children are named <name>-<pool> and must stay valid label values / DNS-1035 names
LABEL_DEPLOYMENT = "toposerve.io/deployment"
LABEL_POOL = "toposerve.io/pool"
LABEL_GPU_TYPE = "toposerve.io/gpu-type"
LABEL_ENGINE = "toposerve.io/engine"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_CAPACITY = "toposerve.io/capacity"  # on the on-demand baseline's pods of a spot pool
ANNOTATION_PLAN = "toposerve.io/plan"
# vLLM's KV-cache events (routing.kvEvents): its default PUB port, and the replay port next to it.
KV_EVENTS_PORT, KV_REPLAY_PORT = 5557, 5558
KV_EVENTS_CONFIG = json.dumps(
    {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"tcp://*:{KV_EVENTS_PORT}",
     "replay_endpoint": f"tcp://*:{KV_REPLAY_PORT}"},
    separators=(",", ":"),
)  # fmt: skip
MASTER_PORT = 29500  # torch.distributed rendezvous on the group leader (vLLM --master-port)
MODELS_DIR = MODEL_CACHE_MOUNT  # adapters on the cache (cache://...) resolve under it (api/spec.py)
# On the engine Services (every one, whatever the routing mode), for a gateway's discovery: the
# OpenAI model names served ({"servedName", "aliases", "adapters"}: names only, to stay well under
# the 256 KiB annotation limit with 1000 adapters; sources are in the spec and the router's args).
ANNOTATION_MODELS = "toposerve.io/models"
ANNOTATION_ROUTING_MODE = "toposerve.io/routing-mode"
# vLLM 0.33.0 serves /v1/load_lora_adapter and /v1/unload_lora_adapter only with this set (envs.py).
RUNTIME_LORA_ENV = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"
MAX_HOLD_SECONDS = 300
LABEL_EVACUATING = "toposerve.io/evacuating"  # on a pod the operator is moving (covered by its own budget)
# After the drain: vLLM releases GPU memory and its worker processes exit (seconds, measured by
# nobody: a margin; the mock exits at once).
ENGINE_TEARDOWN_SECONDS = 30
MOCK_TEARDOWN_SECONDS = 5
ROUTER_TEARDOWN_SECONDS = 5
# The router image's user (hack/image, the chart's runAsUser): routers and mock engines meet the
# `restricted` Pod Security Standard.
IMAGE_UID = 65532
SECCOMP_DEFAULT = {"type": "RuntimeDefault"}
RESTRICTED_POD = {
    "runAsNonRoot": True,
    "runAsUser": IMAGE_UID,
    "runAsGroup": IMAGE_UID,
    "seccompProfile": SECCOMP_DEFAULT,
}
RESTRICTED_CONTAINER = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "readOnlyRootFilesystem": True,
}

_ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader(str(Path(__file__).parent / "templates")),
    undefined=jinja2.StrictUndefined,
    keep_trailing_newline=True,
    autoescape=False,
)
# libyaml's safe loader: parsing the rendered templates was 96% of a reconcile's CPU with the
# pure-Python one (18.3 ms -> 2.7 ms per reconcile, measured for docs/benchmarks.md).
_LOADER: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_ENV.policies["json.dumps_kwargs"] = {"sort_keys": False}

# Every value reaches a template through ``tojson``, and YAML parsing those values back (even with
# libyaml, PyYAML builds each node in Python) was two thirds of a reconcile's CPU. So while a
# template renders, ``tojson`` leaves a placeholder scalar in the text and keeps the value; the
# YAML parsed is then only the templates' own structure, and each placeholder is swapped for its
# value (as JSON data: a fresh copy, and JSON's types rather than YAML 1.1's guesses, where
# ``1e-05`` would have come back as a string). Per thread: reconciles render concurrently.
_SLOTS = threading.local()


def _tojson(value: Any) -> str:
    slots: dict[str, str] | None = getattr(_SLOTS, "values", None)
    text = json.dumps(value)
    if slots is None:  # rendered outside _render_text: plain JSON, which is YAML
        return text
    token = f"__toposerve_value_{len(slots)}__"
    slots[token] = text
    return token


_ENV.filters["tojson"] = _tojson


def _render_text(template: str, ctx: Any) -> tuple[str, dict[str, str]]:
    """The rendered text, with a placeholder for every ``tojson`` value, and those values (JSON)."""
    _SLOTS.values = {}
    try:
        return _ENV.get_template(template).render(c=ctx), _SLOTS.values
    finally:
        _SLOTS.values = None


def _fill(node: Any, slots: dict[str, str]) -> Any:
    """``node`` with each placeholder scalar replaced by its value."""
    if isinstance(node, str):
        text = slots.get(node)
        return node if text is None else json.loads(text)
    if isinstance(node, dict):
        return {k: _fill(v, slots) for k, v in node.items()}
    if isinstance(node, list):
        return [_fill(v, slots) for v in node]
    return node


@dataclass
class Owner:
    """The LLMDeployment that owns the children (for garbage collection)."""

    name: str
    uid: str

    def reference(self) -> dict[str, Any]:
        return {
            "apiVersion": f"{API_GROUP}/{API_VERSION}",
            "kind": "LLMDeployment",
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }


@dataclass
class _Ctx:
    """Values one template needs; a dataclass so a typo is an AttributeError, not a silent blank."""

    object_name: str
    namespace: str
    labels: dict[str, str]
    annotations: dict[str, str] = field(default_factory=dict)
    owner_refs: list[dict[str, Any]] = field(default_factory=list)
    selector: dict[str, str] = field(default_factory=dict)
    port: int = ENGINE_PORT
    replicas: int = 0
    gpu_type: str = ""
    gpus_per_pod: int = 0
    nodes: int = 1
    node_selector: dict[str, str] = field(default_factory=dict)
    affinity: dict[str, Any] = field(default_factory=dict)
    worker_affinity: dict[str, Any] = field(default_factory=dict)
    env: list[dict[str, Any]] = field(default_factory=list)
    volumes: list[dict[str, Any]] = field(default_factory=list)
    volume_mounts: list[dict[str, Any]] = field(default_factory=list)
    progress_deadline_seconds: int = 600
    pdb_max_unavailable: int = 1
    tolerations: list[dict[str, Any]] = field(default_factory=list)
    image: str = ""
    command: list[str] = field(default_factory=list)
    worker_command: list[str] = field(default_factory=list)  # when it differs from command
    leader_args: list[str] = field(default_factory=list)
    worker_args: list[str] = field(default_factory=list)
    requests: dict[str, str] = field(default_factory=dict)
    limits: dict[str, str] = field(default_factory=dict)
    pod_labels: dict[str, str] = field(default_factory=dict)
    worker_labels: dict[str, str] = field(default_factory=dict)
    pod_annotations: dict[str, str] = field(default_factory=dict)
    worker_annotations: dict[str, str] = field(default_factory=dict)
    lws_annotations: dict[str, str] = field(default_factory=dict)
    topology_key: str = ""
    grace_seconds: int = 120
    pre_stop_seconds: int = 0
    probes: dict[str, Any] = field(default_factory=dict)
    pod_security_context: dict[str, Any] = field(default_factory=dict)
    security_context: dict[str, Any] = field(default_factory=dict)
    resource_claims: list[dict[str, Any]] = field(default_factory=list)  # pod-level (DRA), fabric only
    claims: list[dict[str, str]] = field(default_factory=list)  # the engine container's resources.claims
    runtime_class_name: str | None = None
    disruption_strategy: str = "Surge"
    rolling_update: dict[str, Any] = field(default_factory=dict)
    pdb_min_available: int = 0
    pdb_comment: str = ""
    service_name: str = ""
    service_port: int = ENGINE_PORT
    kv_events: bool = False  # the engine publishes KV-cache events: name their ports
    kv_ports: tuple[int, int] = (KV_EVENTS_PORT, KV_REPLAY_PORT)
    init_containers: list[dict[str, Any]] = field(default_factory=list)  # the serving pod's (not workers')
    epp_ports: tuple[int, int] | None = None  # the router serves the endpoint picker on these


def _render(template: str, ctx: _Ctx) -> dict[str, Any]:
    text, slots = _render_text(template, ctx)
    obj = _fill(yaml.load(text, Loader=_LOADER), slots)
    if not isinstance(obj, dict):
        raise ValueError(f"template {template} did not render a mapping")
    return obj


def common_labels(name: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "llmdeployment",
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/managed-by": "toposerve",
        "app.kubernetes.io/part-of": "toposerve",
        LABEL_DEPLOYMENT: name,
    }


def engine_selector(name: str) -> dict[str, str]:
    """Labels of every serving pod of a deployment (the scale subresource's selector)."""
    return {LABEL_DEPLOYMENT: name, LABEL_COMPONENT: "engine"}


def selector_string(name: str) -> str:
    return ",".join(f"{k}={v}" for k, v in engine_selector(name).items())


def engine_service_name(name: str) -> str:
    return f"{name}-engine"


def workload_name(name: str, pool: str, gpu_type: str) -> str:
    """``<name>-<pool>-<gpu>``, one workload per GPU type so fallback can split a pool.

    Kept <= 52 characters (LeaderWorkerSet puts the name in labels and pod hostnames, which must stay
    <= 63 with its suffixes); longer names are cut and made unique with a short hash.
    """
    slug = gpu_type.lower().replace(".", "-").replace("_", "-")
    base = f"{name}-{pool}-{slug}"
    if len(base) <= 52:
        return base
    return f"{base[:46].rstrip('-')}-{hashlib.sha1(base.encode()).hexdigest()[:5]}"


def gpu_backed(plan: DeploymentPlan, config: OperatorConfig) -> bool:
    """Whether the engine pods hold GPUs: vLLM always, the mock engine when configured to."""
    return plan.engine == "vllm" or config.mock_holds_gpus


def pod_tolerations(spec: LLMDeploymentSpec, plan: PoolPlan, config: OperatorConfig) -> list[dict[str, Any]]:
    """Tolerations of a serving pod: every provider's GPU taint, spot taints (when allowed), the user's."""
    user = [t.model_dump(by_alias=True, exclude_none=True) for t in spec.placement.tolerations]
    return serving_tolerations(plan.spot, config.label_schemes, user)


def shutdown_timeout(spec: LLMDeploymentSpec, config: OperatorConfig) -> int:
    """The engines' --shutdown-timeout: the spec's, else the operator's default."""
    t = spec.serving.shutdown_timeout_seconds
    return config.engine_shutdown_timeout_seconds if t is None else t


def engine_probes(startup_failure_threshold: int) -> dict[str, Any]:
    """Probes that do not kill a loaded engine: an engine busy with a long prefill answers /health
    late (vLLM serves it on the same event loop as the streams), so readiness waits 5 s and three
    misses before taking it out of rotation, and liveness restarts it (a full model reload) only
    after five misses of 10 s, 30 s apart: about 2.5 minutes of silence. KServe's vLLM templates
    use 10 s / 5 s timeouts, llm-d 5 s with liveness every 30 s (docs/production.md)."""
    get = {"path": "/health", "port": "http"}
    return {
        "startup": {"httpGet": get, "periodSeconds": 10, "timeoutSeconds": 5,
                    "failureThreshold": startup_failure_threshold},
        "readiness": {"httpGet": get, "periodSeconds": 5, "timeoutSeconds": 5, "failureThreshold": 3},
        "liveness": {"httpGet": get, "periodSeconds": 30, "timeoutSeconds": 10, "failureThreshold": 5},
    }  # fmt: skip


def _with_aliases(args: list[str], aliases: list[str]) -> list[str]:
    """``args`` with the aliases after the served name: vLLM's --served-model-name takes several
    names and labels its metrics with the first, which stays the planned one."""
    if not aliases or "--served-model-name" not in args:
        return list(args)
    at = args.index("--served-model-name") + 2
    return [*args[:at], *aliases, *args[at:]]


def lora_args(spec: LLMDeploymentSpec) -> list[str]:
    """vLLM's LoRA flags (the mock engine takes the same names), none without spec.lora.

    No --lora-modules and no LoRA resolver plugin: adapters are loaded at run time by the router
    through /v1/load_lora_adapter (hence VLLM_ALLOW_RUNTIME_LORA_UPDATING), because which replica
    holds which adapter is a placement decision made per replica and per request, which is the
    router's job; a static list would load every adapter on every replica at start.
    """
    lora = spec.lora
    if lora is None:
        return []
    return ["--enable-lora", "--max-loras", str(lora.max_loras), "--max-lora-rank", str(lora.max_lora_rank),
            "--max-cpu-loras", str(lora.effective_max_cpu_loras)]  # fmt: skip


def lora_env(spec: LLMDeploymentSpec) -> list[dict[str, Any]]:
    return [{"name": RUNTIME_LORA_ENV, "value": "True"}] if spec.lora is not None else []


ADAPTER_STAGE_CONTAINER = "adapter-stage"


def adapter_stage_sidecar(spec: LLMDeploymentSpec, image: str, mock: bool) -> list[dict[str, Any]]:
    """The adapter stager (toposerve/adapterstage, docs/lora.md "Staging") as a native sidecar of
    the serving pod, none without spec.lora: an init container with ``restartPolicy: Always``,
    which Kubernetes starts before the engine and keeps running for the pod's life (GA in 1.33;
    kubernetes.io/docs "Sidecar Containers"). The router asks it, on STAGE_PORT of the pod IP, to
    download https/s3/pinned-revision adapters onto the model cache the engine reads (/models).

    Always rendered with spec.lora, whatever the adapters' sources: adding a URL adapter then
    needs no rollout. Same user as the engine, so files it writes on a PVC the engine (or an
    earlier engine) owns are its own: the project's restricted user beside the mock, root
    without capabilities beside vLLM (whose image runs as root).
    """
    if spec.lora is None:
        return []
    env: list[dict[str, Any]] = [
        {"name": "HF_HOME", "value": f"{MODELS_DIR}/hf"},
        {"name": "HF_HUB_DISABLE_TELEMETRY", "value": "1"},
    ]
    if spec.serving.hf_token_secret:  # pinned-revision adapters of gated/private repos
        ref = {"name": spec.serving.hf_token_secret, "key": "HF_TOKEN", "optional": False}
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": ref}})
    # spec.lora.stagingSecret: S3 keys and endpoint, HF_ENDPOINT, a private CA; not optional, so a
    # missing Secret is a clear CreateContainerConfigError rather than a 403 at the first load.
    env_from = (
        [{"secretRef": {"name": spec.lora.staging_secret, "optional": False}}]
        if spec.lora.staging_secret
        else []
    )
    security = (
        RESTRICTED_CONTAINER
        if mock
        else {**RESTRICTED_CONTAINER, "runAsUser": 0, "runAsGroup": 0, "runAsNonRoot": False}
    )
    probe = {
        "httpGet": {"path": "/health", "port": STAGE_PORT_NAME},
        "periodSeconds": 10,
        "timeoutSeconds": 5,
    }
    return [
        {
            "name": ADAPTER_STAGE_CONTAINER,
            "image": image,
            "imagePullPolicy": "IfNotPresent",
            "restartPolicy": "Always",
            "command": ["toposerve", "adapter-stage"],
            "args": ["--host", LISTEN_ALL, "--port", str(STAGE_PORT), "--root", STAGE_ROOT],
            "env": env,
            **({"envFrom": env_from} if env_from else {}),
            "ports": [{"name": STAGE_PORT_NAME, "containerPort": STAGE_PORT, "protocol": "TCP"}],
            # started (so the engine starts) once it answers; a sidecar's readiness is the pod's too
            "startupProbe": {**probe, "periodSeconds": 2, "failureThreshold": 60},
            "readinessProbe": {**probe, "failureThreshold": 3},
            "livenessProbe": {**probe, "periodSeconds": 30, "failureThreshold": 5},
            "securityContext": security,
            "resources": {"requests": {"cpu": "50m", "memory": "128Mi"}, "limits": {"memory": "1Gi"}},
            "volumeMounts": [{"name": "models", "mountPath": MODELS_DIR}],
        }
    ]


def _vllm_commands(
    plan: PoolPlan,
    shutdown_s: int,
    leader_wait_s: int,
    kv_events: bool = False,
    spec: LLMDeploymentSpec | None = None,
) -> tuple[list[str], list[str], list[str], list[str]]:
    """(command, leader args, worker command, worker args) for vLLM.

    Multi-node replicas use vLLM's native multi-node launch (no Ray cluster to form): every pod runs
    ``vllm serve`` with the same plan and ``--nnodes``; the leader (rank 0) serves HTTP and is the
    rendezvous at its own pod IP, workers run ``--headless`` with their LeaderWorkerSet index as
    node rank and first resolve the leader's name to an address (render/multinode.py).
    Kubernetes expands ``$(LWS_...)``, which LeaderWorkerSet injects into every pod.

    ``--shutdown-timeout`` on every pod: vLLM 0.33.0 defaults it to 0, which aborts in-flight
    requests on SIGTERM (``entrypoints/launchers/launcher.py``); EngineCore reads it on every node.
    """
    base = plan.vllm_args if spec is None else _with_aliases(plan.vllm_args, spec.model.aliases)
    # LoRA on every pod of a replica: each node's workers build the LoRA layers.
    args = [*base, *(lora_args(spec) if spec is not None else []), "--shutdown-timeout", str(shutdown_s)]
    serve = [*args, "--port", str(ENGINE_PORT)]
    if kv_events:  # the scheduler publishes them: on the serving (leader) pod only
        serve += ["--kv-events-config", KV_EVENTS_CONFIG]
    if plan.nodes_per_replica <= 1:
        return ["vllm", "serve"], serve, [], []
    nnodes = ["--nnodes", str(plan.nodes_per_replica)]
    port = ["--master-port", str(MASTER_PORT)]
    leader = [*serve, *nnodes, "--master-addr", "$(POD_IP)", *port, "--node-rank", "0"]
    worker = [*args, *nnodes, "--master-addr", "", *port, "--node-rank", "$(LWS_WORKER_INDEX)", "--headless"]
    script = worker_script(worker, worker.index("--master-addr") + 1, leader_wait_s)
    return ["vllm", "serve"], leader, ["/bin/sh", "-c", script], []


# How the start-up estimate below splits its 300 s of compile + CUDA graphs for the mock's phases
# (mockengine/startup.py): 4/5 torch.compile, 1/5 graph capture, and a compiled-graph cache hit at
# a tenth of the compile. The mock's assumption, not a measurement: vLLM logs each phase's real
# figure ("torch.compile took", "Graph capturing finished in"), docs/mock-engine.md.
COMPILE_AND_GRAPHS_S = 300.0
MOCK_COMPILE_SHARE, MOCK_CACHED_COMPILE_SHARE = 0.8, 0.1
VLLM_LOAD_GBPS = 2.0  # disk to GPU memory, as startup_seconds assumes


def _gib_per_s(gbps: float) -> float:
    return gbps * 1e9 / GIB


def mock_startup_args(plan: PoolPlan, config: OperatorConfig) -> list[str]:
    """The mock's start-up flags at ``config.mock_startup_scale`` of the real estimate; none at 0."""
    scale = config.mock_startup_scale
    if scale <= 0:
        return []
    compile_s = COMPILE_AND_GRAPHS_S * MOCK_COMPILE_SHARE
    return [
        "--startup-weights-gib", f"{plan.weights_gib:g}",
        "--download-gib-per-s", f"{_gib_per_s(config.model_load_gbps) / scale:.6g}",
        "--load-gib-per-s", f"{_gib_per_s(VLLM_LOAD_GBPS) / scale:.6g}",
        "--compile-seconds", f"{compile_s * scale:.6g}",
        "--compile-cached-seconds", f"{compile_s * MOCK_CACHED_COMPILE_SHARE * scale:.6g}",
        "--graph-capture-seconds", f"{(COMPILE_AND_GRAPHS_S - compile_s) * scale:.6g}",
    ]  # fmt: skip


def startup_seconds(plan: PoolPlan, spec: LLMDeploymentSpec, config: OperatorConfig) -> int:
    """How long a replica may take to start: fetch the weights at the assumed bandwidth (a model
    image or a warm cache only reads them), load them, compile and capture graphs; 1.5x margin."""
    gb = plan.weights_gib * GIB / 1e9
    fetch = gb / config.model_load_gbps if spec.model.cache.type != "image" else 0.0
    return math.ceil((fetch + gb / VLLM_LOAD_GBPS + COMPILE_AND_GRAPHS_S) * 1.5)


def _engine_storage(
    plan: PoolPlan, spec: LLMDeploymentSpec
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]], str]:
    """(env, volumes, mounts, ephemeral-storage request) for where weights and caches live."""
    cache = spec.model.cache
    env: list[dict[str, Any]] = [
        {"name": "HF_HOME", "value": f"{MODELS_DIR}/hf"},
        {"name": "VLLM_CACHE_ROOT", "value": f"{MODELS_DIR}/vllm"},
    ]
    if spec.serving.hf_token_secret:
        # Not optional: a missing Secret is a clear CreateContainerConfigError, not a 401 mid-download.
        ref = {"name": spec.serving.hf_token_secret, "key": "HF_TOKEN", "optional": False}
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": ref}})
    size = cache_gib(spec, plan.weights_gib)
    volumes: list[dict[str, Any]] = []
    mounts: list[dict[str, Any]] = []
    storage = f"{plan.ephemeral_gib_per_pod}Gi"  # the planner checked it against the nodes
    if cache.type == "ephemeral":
        volumes.append({"name": "models", "emptyDir": {"sizeLimit": f"{size}Gi"}})
    elif cache.type == "pvc":
        volumes.append({"name": "models", "persistentVolumeClaim": {"claimName": cache.claim_name}})
    elif cache.type == "host-path":
        volumes.append({"name": "models", "hostPath": {"path": cache.host_path, "type": "DirectoryOrCreate"}})
    else:  # image: Kubernetes image volumes (the weights as an OCI artifact), read-only
        volumes.append({"name": "models", "emptyDir": {"sizeLimit": "20Gi"}})
        volumes.append({"name": "weights", "image": {"reference": cache.image, "pullPolicy": "IfNotPresent"}})
        mounts.append({"name": "weights", "mountPath": IMAGE_WEIGHTS_DIR, "readOnly": True})
    mounts.insert(0, {"name": "models", "mountPath": MODELS_DIR})
    return env, volumes, mounts, storage


# Every pod listens on all of its interfaces, as in vLLM's own images, so `kubectl port-forward`
# (which connects to the pod's loopback) works.
LISTEN_ALL = "0.0.0.0"


def _mock_args(
    plan: PoolPlan,
    served: str,
    shutdown_s: int,
    kv_events: bool = False,
    spec: LLMDeploymentSpec | None = None,
) -> list[str]:
    assert plan.gpu_type is not None
    events = ["--kv-events-config", KV_EVENTS_CONFIG] if kv_events else []
    extra: list[str] = []
    if spec is not None:
        if spec.model.aliases:
            extra += ["--served-model-name", served, *spec.model.aliases]
        extra += lora_args(spec)
    return [*events,
        "--host", LISTEN_ALL,
        "--shutdown-timeout", str(shutdown_s),
        "--port", str(ENGINE_PORT),
        "--model", served,
        "--gpu-type", plan.gpu_type,
        "--tensor-parallel-size", str(plan.tensor_parallel),
        "--max-model-len", str(plan.max_context_length),
        # The KV cache the plan gives a replica, in vLLM's default 16-token blocks.
        "--num-gpu-blocks", str(max(1, plan.kv_cache_tokens_per_replica // 16)),
        *extra,
    ]  # fmt: skip


def models_annotation(spec: LLMDeploymentSpec) -> str:
    """ANNOTATION_MODELS' value: the OpenAI model names this deployment serves."""
    return json.dumps(
        {"servedName": spec.model.primary_served_name, "aliases": list(spec.model.aliases),
         "adapters": [a.name for a in spec.adapters]},
        separators=(",", ":"),
    )  # fmt: skip


def engine_service_annotations(spec: LLMDeploymentSpec) -> dict[str, str]:
    return {ANNOTATION_MODELS: models_annotation(spec), ANNOTATION_ROUTING_MODE: spec.routing.effective_mode}


def plan_summary(plan: PoolPlan) -> str:
    """A compact, stable JSON of what was decided, stored as an annotation for `kubectl describe`."""
    keep = ("gpu_type", "tensor_parallel", "pipeline_parallel", "context_parallel", "expert_parallel",
            "gpus_per_replica", "nodes_per_replica", "kv_cache_tokens_per_replica", "max_context_length")  # fmt: skip
    return json.dumps(plan.model_dump(include=set(keep), by_alias=True), sort_keys=True)


def render_pool(
    name: str,
    namespace: str,
    spec: LLMDeploymentSpec,
    dplan: DeploymentPlan,
    plan: PoolPlan,
    config: OperatorConfig,
    owner: Owner | None = None,
    _baseline: bool = False,
    _budget_replicas: int | None = None,
    inventory: Inventory | None = None,
) -> list[dict[str, Any]]:
    """The workload (Deployment or LeaderWorkerSet), PodDisruptionBudget and Service of one pool on
    one GPU type, then what the pool's fabric needs (a GB200 ComputeDomain; render/fabric.py).

    ``inventory``: the nodes, from which a multi-node replica's fabric is chosen (EFA, GPUDirect
    RDMA, InfiniBand/RoCE, IMEX); without one no fabric is requested.

    A spot pool with an on-demand baseline gets a second workload ``<workload>-od`` holding the
    baseline's replicas on on-demand nodes only (its pods and selector carry ``toposerve.io/capacity:
    on-demand``); the pool's budget and Service select both. ``plan.on_demand_cover`` more replicas
    go there while spot replicas are under a termination notice (planner/spotcover.py).
    """
    if not plan.fits or plan.gpu_type is None:
        return []
    if plan.spot and (plan.on_demand_baseline > 0 or plan.on_demand_cover > 0):
        # the baseline, plus a cover for spot replicas under a termination notice (planner/spotcover.py)
        od = min(plan.on_demand_baseline, plan.replicas)
        rest = plan.model_copy(
            update={"on_demand_baseline": 0, "on_demand_cover": 0, "replicas": plan.replicas - od}
        )
        od_plan = plan.model_copy(
            update={
                "on_demand_baseline": 0,
                "on_demand_cover": 0,
                "spot": False,
                "replicas": od + plan.on_demand_cover,
            }
        )
        # the pool's budget selects both workloads: it counts all of the pool's replicas
        inv = inventory
        objs = render_pool(
            name, namespace, spec, dplan, rest, config, owner, _budget_replicas=plan.replicas, inventory=inv
        )
        od_objs = render_pool(
            name, namespace, spec, dplan, od_plan, config, owner, _baseline=True, inventory=inv
        )
        # the baseline's own workload, and its fabric objects (past its budget and Service)
        return objs[:1] + od_objs[:1] + objs[1:] + od_objs[3:]
    catalog = config.catalog()
    gpu = catalog.get(plan.gpu_type)
    mock = dplan.engine == "mock"
    base = common_labels(name)
    pool_sel = {LABEL_DEPLOYMENT: name, LABEL_POOL: plan.name, LABEL_GPU_TYPE: plan.gpu_type}
    labels = {**base, LABEL_POOL: plan.name, LABEL_GPU_TYPE: plan.gpu_type, LABEL_ENGINE: dplan.engine}
    pod_labels = {**labels, LABEL_COMPONENT: "engine"}
    workload_sel = pool_sel
    object_name = workload_name(name, plan.name, plan.gpu_type)
    if _baseline:
        workload_sel = {**pool_sel, LABEL_CAPACITY: "on-demand"}
        pod_labels[LABEL_CAPACITY] = "on-demand"
        object_name = workload_name(name, plan.name, f"{plan.gpu_type}-od")
    # The mock engine simulates a whole replica in one process, so it never needs a LeaderWorkerSet.
    multi = plan.nodes_per_replica > 1 and not mock
    worker_args: list[str]
    env: list[dict[str, Any]] = [
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
    ]
    dshm = {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "64Mi" if mock else "16Gi"}}
    volumes: list[dict[str, Any]] = [dshm]
    mounts: list[dict[str, Any]] = [{"name": "dshm", "mountPath": "/dev/shm"}]
    startup = 300
    shutdown_s = shutdown_timeout(spec, config)
    pod_security: dict[str, Any] = {"seccompProfile": SECCOMP_DEFAULT}
    container_security: dict[str, Any] = {"allowPrivilegeEscalation": False}
    if mock:
        image = config.toposerve_image
        worker_command: list[str] = []
        command, leader_args, worker_args = (
            ["toposerve", "mock-engine"],
            _mock_args(plan, dplan.served_name, shutdown_s, spec.routing.kv_events, spec),
            [],
        )
        pod_security, container_security = RESTRICTED_POD, RESTRICTED_CONTAINER  # the project's image
        leader_args = [*leader_args, *mock_startup_args(plan, config)]
        if spec.lora is not None or config.mock_startup_scale > 0:
            # Adapters on the model cache (cache:// sources) are read where vLLM reads them, and the
            # modelled start-up finds its weights and compiled graphs where vLLM keeps them: the
            # mock mounts the same cache volume at the same path (its weights are simulated).
            store_env, store_volumes, store_mounts, _ = _engine_storage(plan, spec)
            env += [e for e in store_env if e["name"] in ("HF_HOME", "VLLM_CACHE_ROOT")]
            volumes += store_volumes
            mounts += store_mounts
        requests = {"cpu": config.mock_cpu, "memory": config.mock_memory}
        limits = {"memory": "1Gi"}
        if config.mock_holds_gpus:  # a simulated fleet: occupy the GPUs vLLM would
            requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = str(plan.gpus_per_pod)
    else:
        image = spec.serving.image or config.vllm_image
        startup = startup_seconds(plan, spec, config)
        # A worker waits for the leader's name as long as the leader may take to start.
        command, leader_args, worker_command, worker_args = _vllm_commands(
            plan, shutdown_s, startup, spec.routing.kv_events, spec
        )
        # vLLM's get_ip() guesses an interface otherwise; the pod IP is the one peers reach
        # (production-stack sets the same).
        env.append({"name": "VLLM_HOST_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}})
        gpus = str(plan.gpus_per_pod)
        store_env, store_volumes, store_mounts, storage = _engine_storage(plan, spec)
        env += store_env
        volumes += store_volumes
        mounts += store_mounts
        requests = {
            "cpu": cpu_quantity(plan.cpu_per_pod),
            "memory": f"{plan.memory_gib_per_pod}Gi",
            "ephemeral-storage": storage,
            "nvidia.com/gpu": gpus,
        }
        limits = {"nvidia.com/gpu": gpus}
    env += lora_env(spec)
    # The fast interconnect of a multi-node vLLM replica (render/fabric.py): none for single-node
    # replicas and the mock engine.
    fabric = fabric_for(plan, dplan.engine, inventory, catalog, object_name) if multi else NO_FABRIC
    requests = {**requests, **fabric.resources}
    limits = {**limits, **fabric.resources}
    env += fabric.env
    volumes += fabric.volumes
    mounts += fabric.volume_mounts
    if fabric.capabilities:  # RDMA pins memory: IPC_LOCK, and only there
        container_security = {**container_security, "capabilities": {"add": list(fabric.capabilities)}}
    group_key = plan.topology_key if multi else None
    rules = disruption(
        spec.disruption.strategy,
        plan.replicas if _budget_replicas is None else _budget_replicas,
        plan.nodes_per_replica if multi else 1,
    )
    affinity = serving_affinity(
        gpu,
        plan.gpus_per_pod,
        plan.spot,
        config.label_schemes,
        gpu_backed(dplan, config),
        group_key,
        pool_sel,
        group_preferred_keys=plan.preferred_topology_keys if multi else (),
    )
    ctx = _Ctx(
        object_name=object_name,
        namespace=namespace,
        labels=labels,
        annotations={ANNOTATION_PLAN: plan_summary(plan)},
        owner_refs=[owner.reference()] if owner else [],
        selector=workload_sel,
        replicas=plan.replicas,
        gpu_type=plan.gpu_type,
        gpus_per_pod=plan.gpus_per_pod,
        nodes=plan.nodes_per_replica,
        node_selector=dict(spec.placement.node_selector),
        affinity=affinity,
        worker_affinity=affinity,
        tolerations=pod_tolerations(spec, plan, config),
        image=image,
        command=command,
        worker_command=worker_command,
        kv_events=spec.routing.kv_events,
        leader_args=leader_args,
        worker_args=worker_args,
        requests=requests,
        limits=limits,
        env=env,
        volumes=volumes,
        volume_mounts=mounts,
        pod_labels=pod_labels,
        worker_labels={
            **labels,
            LABEL_COMPONENT: "worker",
            **({LABEL_CAPACITY: "on-demand"} if _baseline else {}),
        },
        pod_annotations={
            "prometheus.io/scrape": "true",
            "prometheus.io/port": str(ENGINE_PORT),
            "prometheus.io/path": "/metrics",
            **fabric.pod_annotations,
        },
        worker_annotations=dict(fabric.pod_annotations),
        lws_annotations={ANNOTATION_PLAN: plan_summary(plan)},
        topology_key=plan.topology_key or "",
        pre_stop_seconds=config.pre_stop_seconds,
        grace_seconds=config.pre_stop_seconds
        + shutdown_s
        + (MOCK_TEARDOWN_SECONDS if mock else ENGINE_TEARDOWN_SECONDS),
        probes=engine_probes(max(30, math.ceil(startup / 10))),
        pod_security_context=pod_security,
        security_context=container_security,
        resource_claims=fabric.resource_claims,
        claims=fabric.claims,
        runtime_class_name=None if mock else (spec.serving.runtime_class_name or config.runtime_class_name),
        init_containers=adapter_stage_sidecar(spec, config.toposerve_image, mock),
        disruption_strategy=spec.disruption.strategy,
        rolling_update=rules.rolling_update,
        # A rollout may take as long as a start, plus time to be scheduled (and a node provisioned).
        progress_deadline_seconds=startup + 600,
    )
    workload = _render("leaderworkerset.yaml.j2" if multi else "deployment.yaml.j2", ctx)
    # A multi-node replica is down when any of its pods is: the budget covers leaders and workers.
    pdb_sel = pool_sel if multi else {**pool_sel, LABEL_COMPONENT: "engine"}
    pdb_ctx = _Ctx(
        object_name=ctx.object_name, namespace=namespace, labels=labels, owner_refs=ctx.owner_refs,
        selector=pdb_sel, pdb_min_available=rules.min_available, pdb_comment=rules.comment,
    )  # fmt: skip
    svc_labels = {**labels, LABEL_COMPONENT: "engine"}
    if plan.context_parallel > 1:
        svc_labels[LABEL_LONG_CONTEXT] = "true"
    # "<workload>-http": LeaderWorkerSet owns a headless Service named after the workload itself.
    svc_ctx = _Ctx(
        object_name=f"{ctx.object_name}-http", namespace=namespace, labels=svc_labels, owner_refs=ctx.owner_refs,
        selector={**pool_sel, LABEL_COMPONENT: "engine"}, annotations=engine_service_annotations(spec),
    )  # fmt: skip
    extra = [
        {**o, "metadata": {**o["metadata"], "namespace": namespace, "labels": dict(labels),
                           **({"ownerReferences": ctx.owner_refs} if ctx.owner_refs else {})}}
        for o in fabric.objects
    ]  # fmt: skip
    if spec.model.cache.prefetch and not _baseline and not multi:
        # warm nodes (render/prefetch.py): the weights and the image on every node the pool may use
        if mock:
            fetch = mock_prefetch_container(
                ["--host", LISTEN_ALL, "--port", str(ENGINE_PORT), "--model", dplan.served_name,
                 *mock_startup_args(plan, config)], ENGINE_PORT,
            )  # fmt: skip
        else:
            fetch = vllm_prefetch_container(plan.checkpoint or spec.model.name)
        extra.append(render_prefetch(workload, fetch))
    return [workload, _render("pdb.yaml.j2", pdb_ctx), _render("service.yaml.j2", svc_ctx), *extra]


def render_deployment(
    name: str,
    namespace: str,
    spec: LLMDeploymentSpec,
    plan: DeploymentPlan,
    config: OperatorConfig | None = None,
    owner: Owner | None = None,
    inventory: Inventory | None = None,
) -> list[dict[str, Any]]:
    """Every child object of one LLMDeployment, in apply order (``inventory``: see render_pool)."""
    config = config or OperatorConfig()
    if len(name) > MAX_NAME:
        raise SpecError(
            "metadata.name", f"must be at most {MAX_NAME} characters (children are <name>-<pool>)"
        )
    objects: list[dict[str, Any]] = []
    for pool in plan.pools:
        objects += render_pool(name, namespace, spec, plan, pool, config, owner, inventory=inventory)
    svc = _Ctx(
        object_name=engine_service_name(name), namespace=namespace,
        labels={**common_labels(name), LABEL_COMPONENT: "engine"},
        owner_refs=[owner.reference()] if owner else [], selector=engine_selector(name),
        annotations=engine_service_annotations(spec),
    )  # fmt: skip
    objects.append(_render("service.yaml.j2", svc))
    objects.append(render_evacuation_budget(name, namespace, owner))
    # gateway mode: no router of its own; the cluster's gateway finds the engine Services by their
    # labels (toposerve.io/deployment, app.kubernetes.io/component: engine) and annotations.
    if spec.routing.dedicated_router:
        objects += render_router(name, namespace, spec, config, owner)
    return objects


def evacuation_budget_name(name: str) -> str:
    return f"{name}-evacuating"


def render_evacuation_budget(name: str, namespace: str, owner: Owner | None = None) -> dict[str, Any]:
    """The budget of the pods the operator is moving (controller/evacuation.py marks them with
    LABEL_EVACUATING when it takes them out of their pool): none of them may be evicted while it
    is Ready, so a ``kubectl drain`` waits until the operator has drained the pod from the router
    (it then leaves this budget's selector) instead of cutting its replica before its replacement
    serves. Unready ones may go (``unhealthyPodEvictionPolicy: AlwaysAllow``)."""
    ctx = _Ctx(
        object_name=evacuation_budget_name(name), namespace=namespace, labels=common_labels(name),
        owner_refs=[owner.reference()] if owner else [],
        selector={LABEL_DEPLOYMENT: name, LABEL_COMPONENT: "engine", LABEL_EVACUATING: "true"},
        pdb_min_available=EVACUATION_MIN_AVAILABLE,
        pdb_comment="none of the pods the operator is moving while they serve (render/disruption.py)",
    )  # fmt: skip
    return _render("pdb.yaml.j2", ctx)


def router_name(name: str) -> str:
    return f"{name}-router"


def endpoint_url(name: str, namespace: str, spec: LLMDeploymentSpec) -> str:
    """The OpenAI base URL clients use: the router's Service, or the engines' when routing is off.

    gateway mode: the engines' Service too, until the gateway (which owns its own URL) reports one.
    """
    if spec.routing.dedicated_router:
        return f"http://{name}.{namespace}.svc:{ENGINE_PORT}/v1"
    return f"http://{engine_service_name(name)}.{namespace}.svc:{ENGINE_PORT}/v1"


def router_args(name: str, spec: LLMDeploymentSpec, config: OperatorConfig | None = None) -> list[str]:
    r = spec.routing
    args = [
        # Dual-stack: "::" listens on IPv6 and IPv4 (proxy._dual_stack_socket), IPv4 only where
        # the pod has no IPv6.
        "--host", "::",
        "--port", str(ROUTER_PORT),
        # A stream through the router lasts as long as its engine lets it (--shutdown-timeout).
        "--drain-timeout", str(shutdown_timeout(spec, config or OperatorConfig())),
        "--llmdeployment", name,
        "--strategy", r.strategy,
        "--session-header", r.session_header,
        "--session-ttl", str(r.session_ttl_seconds),
        "--bounded-load-factor", f"{r.bounded_load_factor:g}",
    ]  # fmt: skip
    if r.long_context_threshold:
        args += ["--long-context-threshold", str(r.long_context_threshold)]
    if not r.gpu_weighting:
        args.append("--no-gpu-weighting")
    if r.kv_events:  # subscribe to every engine's events on KV_EVENTS_PORT / KV_REPLAY_PORT
        args.append("--kv-events")
    # The adapter table: the router loads each adapter on the replicas it picks, at run time
    # (/v1/load_lora_adapter). SOURCE is AdapterSpec.engine_source (split on the first "=", which
    # names cannot contain): a path in the engine pod, a Hugging Face repo id, or a URI with a
    # scheme that must be staged first (docs/lora.md).
    for adapter in spec.adapters:
        args += ["--adapter", f"{adapter.name}={adapter.engine_source}"]
    if spec.lora is not None:  # adapters an engine keeps registered: its --max-cpu-loras
        args += ["--adapter-slots", str(spec.lora.effective_max_cpu_loras)]
    if epp_served(spec, config or OperatorConfig()):  # the InferencePool's endpoint picker
        args += ["--epp-port", str(EPP_PORT), "--epp-health-port", str(EPP_HEALTH_PORT)]
    a = spec.autoscaling
    if a.effective_mode in ("builtin", "keda") and a.min_replicas == 0:
        # Scale from zero: hold requests while the autoscaler starts a replica (as long as one is
        # expected to take to load, within what clients are likely to wait).
        args += ["--hold-at-zero", str(min(a.startup_grace_seconds, MAX_HOLD_SECONDS))]
    return args


def epp_served(spec: LLMDeploymentSpec, config: OperatorConfig) -> bool:
    """Whether the deployment's own router is its InferencePool's endpoint picker."""
    return spec.routing.dedicated_router and spec.routing.inference_pool_on(config.inference_pool.enabled)


def render_router(
    name: str, namespace: str, spec: LLMDeploymentSpec, config: OperatorConfig, owner: Owner | None = None
) -> list[dict[str, Any]]:
    """ServiceAccount, Role, RoleBinding, Deployment, PodDisruptionBudget and Service of the router.

    Two replicas by default, spread over nodes and kept off GPU nodes, with a budget so a drain never
    takes the deployment's only entry point: the router is as much a part of serving as the engines.
    """
    labels = {**common_labels(name), LABEL_COMPONENT: "router"}
    selector = {LABEL_DEPLOYMENT: name, LABEL_COMPONENT: "router"}
    ctx = _Ctx(
        object_name=router_name(name),
        namespace=namespace,
        labels=labels,
        owner_refs=[owner.reference()] if owner else [],
        selector=selector,
        replicas=spec.routing.replicas,
        affinity=router_affinity(config.label_schemes, config.router_node_placement, selector),
        image=config.toposerve_image,
        command=["toposerve", "router"],
        leader_args=router_args(name, spec, config),
        pre_stop_seconds=config.pre_stop_seconds,
        grace_seconds=config.pre_stop_seconds + shutdown_timeout(spec, config) + ROUTER_TEARDOWN_SECONDS,
        pod_security_context=RESTRICTED_POD,
        security_context=RESTRICTED_CONTAINER,
        requests={"cpu": "250m", "memory": "128Mi"},
        limits={"memory": "1Gi"},
        pod_labels=labels,
        pod_annotations={
            "prometheus.io/scrape": "true",
            "prometheus.io/port": str(ROUTER_PORT),
            "prometheus.io/path": "/metrics",
        },
        node_selector={},
        port=ROUTER_PORT,
        service_name=name,
        service_port=ENGINE_PORT,
        epp_ports=(EPP_PORT, EPP_HEALTH_PORT) if epp_served(spec, config) else None,
    )
    text, slots = _render_text("router.yaml.j2", ctx)
    return [_fill(d, slots) for d in yaml.load_all(text, Loader=_LOADER) if isinstance(d, dict)]
