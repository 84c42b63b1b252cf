"""Warm nodes: a DaemonSet that puts a pool's weights (and its engine image) on every node the
pool's replicas may land on, before any replica needs them (``model.cache.prefetch``, host-path
caches only). Pure: built from the pool's rendered workload, so it follows exactly the same
node affinity, node selector and tolerations (spot, GPU taints, the user's) as the replicas.

Why a DaemonSet of the engine image: a node that has run it has pulled the image (the kubelet
keeps it), and has the weights in the node's host-path cache at ``HF_HOME`` (``/models/hf``),
where vLLM 0.33.0 looks first; a replica scheduled there then skips both and only loads. The
download is ``hf download`` (huggingface_hub's CLI, 2.4.0 in vllm/vllm-openai:v0.33.0) with the
file patterns vLLM's default loader fetches (``model_executor/model_loader/default_loader.py``:
``*.safetensors``, falling back to ``*.bin`` / ``*.pt``, plus configuration and tokenizer files).
The mock engine's pods run ``toposerve mock-engine --prefetch-only`` (the modelled download,
mockengine/startup.py). What a start-up still costs after that (load, compile, graphs) is in
docs/mock-engine.md "Start-up".

The pods request no GPU and little CPU; they stay Running (ready once the download is done) so the
DaemonSet's ``numberReady`` says how many nodes are warm. Multi-node (LeaderWorkerSet) pools get
none: their nodes are chosen per group (topology), so "the pool's nodes" is not a node set.
"""

from __future__ import annotations

import shlex
from typing import Any

PREFETCH_COMPONENT = "prefetch"
PREFETCH_DONE = "/tmp/prefetched"  # written by the vLLM-image container when the download is over
# vLLM 0.33.0's default loader: safetensors (else .bin/.pt), plus what the tokenizer and config need
HF_PATTERNS = ("*.safetensors", "*.json", "tokenizer*", "*.model", "*.tiktoken", "*.txt")
ENV_KEEP = ("HF_HOME", "HF_TOKEN", "HF_ENDPOINT", "HF_HUB_OFFLINE", "HF_HUB_ENABLE_HF_TRANSFER")


def hf_download_argv(repo: str) -> list[str]:
    """``hf download`` of what vLLM loads from ``repo`` into ``$HF_HOME/hub`` (no --local-dir: the
    Hub cache layout, where vLLM looks)."""
    argv = ["hf", "download", repo]
    for pattern in HF_PATTERNS:
        argv += ["--include", pattern]
    return argv


def vllm_prefetch_container(repo: str) -> dict[str, Any]:
    """The container of a vLLM pool's prefetch pods (the engine image)."""
    script = f"{shlex.join(hf_download_argv(repo))} && touch {PREFETCH_DONE} && exec sleep infinity"
    return {
        "command": ["/bin/sh", "-c", script],
        "readinessProbe": {"exec": {"command": ["test", "-f", PREFETCH_DONE]}, "periodSeconds": 10},
    }


def mock_prefetch_container(args: list[str], port: int) -> dict[str, Any]:
    """The container of a mock pool's prefetch pods (the project image)."""
    return {
        "command": ["toposerve", "mock-engine"],
        "args": ["--prefetch-only", *args],
        "readinessProbe": {"httpGet": {"path": "/health", "port": port}, "periodSeconds": 2},
    }


def render_prefetch(workload: dict[str, Any], container: dict[str, Any]) -> dict[str, Any]:
    """The DaemonSet ``<workload>-prefetch`` for a Deployment of engine pods: same node constraints
    and model cache, ``container`` (command, args, readiness) instead of the engine."""
    meta = workload["metadata"]
    pod = workload["spec"]["template"]["spec"]
    (engine,) = [c for c in pod["containers"] if c["name"] == "engine"]
    labels = {**meta.get("labels", {}), "app.kubernetes.io/component": PREFETCH_COMPONENT}
    labels.pop("toposerve.io/pool", None)  # not a replica: nothing counts it as one of the pool's
    selector = {k: labels[k] for k in ("toposerve.io/deployment", "app.kubernetes.io/component")}
    selector["toposerve.io/prefetch-for"] = labels["toposerve.io/prefetch-for"] = meta["name"]
    models = [v for v in pod.get("volumes", []) if v["name"] == "models"]
    spec: dict[str, Any] = {
        "containers": [
            {
                "name": "prefetch",
                "image": engine["image"],
                **container,
                "env": [e for e in engine.get("env", []) if e["name"] in ENV_KEEP],
                "volumeMounts": [m for m in engine.get("volumeMounts", []) if m["name"] == "models"],
                "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "2Gi"}},
                **({"securityContext": engine["securityContext"]} if "securityContext" in engine else {}),
            }
        ],
        "volumes": models,
        "terminationGracePeriodSeconds": 5,
        "automountServiceAccountToken": False,
    }
    node_affinity = (pod.get("affinity") or {}).get("nodeAffinity")
    if node_affinity:
        spec["affinity"] = {"nodeAffinity": node_affinity}
    for key in ("tolerations", "nodeSelector", "securityContext", "imagePullSecrets"):
        if pod.get(key):
            spec[key] = pod[key]
    out_meta = {"name": f"{meta['name']}-prefetch", "namespace": meta["namespace"], "labels": dict(labels)}
    if meta.get("ownerReferences"):
        out_meta["ownerReferences"] = meta["ownerReferences"]
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": out_meta,
        "spec": {
            "selector": {"matchLabels": selector},
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "25%"}},
            "template": {"metadata": {"labels": dict(labels)}, "spec": spec},
        },
    }
