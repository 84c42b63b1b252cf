"""Read the serving pods of one LLMDeployment into per-GPU-type facts (pure: pods are plain dicts).

A pod counts as *stuck* when the scheduler has reported it Unschedulable for longer than the
patience window: that is the signal for GPU fallback. The scheduler's own message ("0/20 nodes are
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


def summarize(
    pods: Iterable[Mapping[str, Any]], now: datetime, patience_seconds: float
) -> dict[tuple[str, str], PodFacts]:
    """Facts per (pool, gpu type) for the engine (leader) pods; terminating pods are ignored."""
    out: dict[tuple[str, str], PodFacts] = {}
    for pod in pods:
        meta = pod.get("metadata") or {}
        labels = meta.get("labels") or {}
        if labels.get(LABEL_COMPONENT) != "engine" or meta.get("deletionTimestamp"):
            continue
        key = (labels.get(LABEL_POOL, ""), labels.get(LABEL_GPU_TYPE, ""))
        facts = out.setdefault(key, PodFacts())
        facts.pods += 1
        node = (pod.get("spec") or {}).get("nodeName")
        if node:
            facts.nodes[str(meta.get("name"))] = node
        ready = _condition(pod, "Ready")
        if ready and ready.get("status") == "True":
            facts.ready += 1
        if not node:
            facts.pending += 1
            sched = _condition(pod, "PodScheduled")
            if sched and sched.get("status") == "False" and sched.get("reason") == "Unschedulable":
                since = parse_time(sched.get("lastTransitionTime")) or parse_time(
                    meta.get("creationTimestamp")
                )
                if since is not None and (now - since).total_seconds() >= patience_seconds:
                    facts.stuck += 1
                msg = sched.get("message")
                if msg and msg not in facts.messages:
                    facts.messages.append(msg)
    return out
