"""Read the serving pods of one LLMDeployment into per-GPU-type facts (pure: pods are plain dicts).

A pod counts as *stuck* when the scheduler has reported it Unschedulable for longer than the
patience window: that is the signal for GPU fallback. LeaderWorkerSet workers count too (a group
whose worker cannot be placed never serves), once per group, so a multi-node replica whose second
node is missing falls back like a single-node one. The scheduler's own message ("0/20 nodes are
available: 8 Insufficient nvidia.com/gpu ...") is kept for status and Events.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

LABEL_GPU_TYPE = "toposerve.io/gpu-type"
LABEL_POOL = "toposerve.io/pool"
LABEL_COMPONENT = "app.kubernetes.io/component"
LWS_NAME = "leaderworkerset.sigs.k8s.io/name"
LWS_GROUP = "leaderworkerset.sigs.k8s.io/group-index"
LWS_SIZE = "leaderworkerset.sigs.k8s.io/size"  # annotation on every pod of a group
# On a pod being moved off a bad node (controller/evacuation.py): it left its workload, whose
# replacement is what counts now.
ANNOTATION_EVACUATION = "toposerve.io/evacuation"


@dataclass
class PodFacts:
    """Counts for one (pool, GPU type)."""

    pods: int = 0
    ready: int = 0
    pending: int = 0
    stuck: int = 0
    messages: list[str] = field(default_factory=list)
    nodes: dict[str, str] = field(default_factory=dict)  # pod name -> node name


def parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def _condition(pod: Mapping[str, Any], kind: str) -> Mapping[str, Any] | None:
    for c in (pod.get("status") or {}).get("conditions") or []:
        if c.get("type") == kind:
            return dict(c)
    return None


def bound_replicas(pods: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str], int]:
    """Replicas per (pool, gpu type) whose pod (a multi-node replica's leader) is bound to a node:
    serving and warm standby alike, since both hold their GPUs; terminating pods are left out."""
    out: dict[tuple[str, str], int] = {}
    for pod in pods:
        meta = pod.get("metadata") or {}
        labels = meta.get("labels") or {}
        if labels.get(LABEL_COMPONENT) not in ("engine", "standby") or meta.get("deletionTimestamp"):
            continue
        if (pod.get("spec") or {}).get("nodeName"):
            key = (labels.get(LABEL_POOL, ""), labels.get(LABEL_GPU_TYPE, ""))
            out[key] = out.get(key, 0) + 1
    return out


def summarize(
    pods: Iterable[Mapping[str, Any]], now: datetime, patience_seconds: float
) -> dict[tuple[str, str], PodFacts]:
    """Facts per (pool, gpu type): pods and readiness from the engine (leader) pods, pending and stuck
    replicas from leaders and workers (one per group); terminating and evacuated pods are ignored."""
    out: dict[tuple[str, str], PodFacts] = {}
    pending_groups: dict[tuple[str, str], set[tuple[str, str]]] = {}
    stuck_groups: dict[tuple[str, str], set[tuple[str, str]]] = {}
    # A multi-node replica serves only when every pod of its group is ready, and its workers may
    # not even exist yet when the leader is: count a leader ready only with its whole group.
    group_ready: dict[tuple[str, str], int] = {}
    group_size: dict[tuple[str, str], int] = {}
    ready_leaders: list[tuple[tuple[str, str], tuple[str, str]]] = []
    for pod in pods:
        meta = pod.get("metadata") or {}
        labels = meta.get("labels") or {}
        role = labels.get(LABEL_COMPONENT)
        if role not in ("engine", "worker") or meta.get("deletionTimestamp"):
            continue
        if ANNOTATION_EVACUATION in (meta.get("annotations") or {}):
            continue
        key = (labels.get(LABEL_POOL, ""), labels.get(LABEL_GPU_TYPE, ""))
        facts = out.setdefault(key, PodFacts())
        group = (
            (str(labels[LWS_NAME]), str(labels[LWS_GROUP]))
            if LWS_NAME in labels and LWS_GROUP in labels
            else ("pod", str(meta.get("uid") or meta.get("name")))
        )
        node = (pod.get("spec") or {}).get("nodeName")
        ready = _condition(pod, "Ready")
        is_ready = bool(ready and ready.get("status") == "True")
        size = (meta.get("annotations") or {}).get(LWS_SIZE)
        if size and str(size).isdigit():
            group_size[group] = int(size)
        group_ready[group] = group_ready.get(group, 0) + (1 if is_ready else 0)
        if role == "engine":
            facts.pods += 1
            if node:
                facts.nodes[str(meta.get("name"))] = node
            if is_ready:
                ready_leaders.append((key, group))
        if not node:
            if group not in pending_groups.setdefault(key, set()):
                pending_groups[key].add(group)
                facts.pending += 1
            sched = _condition(pod, "PodScheduled")
            if sched and sched.get("status") == "False" and sched.get("reason") == "Unschedulable":
                since = parse_time(sched.get("lastTransitionTime")) or parse_time(
                    meta.get("creationTimestamp")
                )
                long_enough = since is not None and (now - since).total_seconds() >= patience_seconds
                if long_enough and group not in stuck_groups.setdefault(key, set()):
                    stuck_groups[key].add(group)
                    facts.stuck += 1
                msg = sched.get("message")
                if msg and msg not in facts.messages:
                    facts.messages.append(msg)
    for key, group in ready_leaders:
        if group_ready.get(group, 0) >= group_size.get(group, 1):
            out[key].ready += 1
    return out


def router_readiness(pods: Iterable[Mapping[str, Any]]) -> tuple[int, int]:
    """(router pods, ready router pods), ignoring terminating ones."""
    total = ready = 0
    for pod in pods:
        meta = pod.get("metadata") or {}
        if (meta.get("labels") or {}).get(LABEL_COMPONENT) != "router" or meta.get("deletionTimestamp"):
            continue
        total += 1
        cond = _condition(pod, "Ready")
        if cond and cond.get("status") == "True":
            ready += 1
    return total, ready
