"""Moving serving pods off nodes that are going bad: GPUs unhealthy, a termination notice (spot), or
cordoned for a drain (``kubectl drain`` first cordons, then evicts; with ``spec.disruption.strategy:
Surge`` the pool's budget refuses the eviction until this surge has a replacement serving).

Pure: the decision is a function of plain data (the deployment's pods, which nodes are in trouble,
how many replicas each pool wants, what the engines say is in flight, the clock); the reconcile
shell executes it. Each evacuated pod goes through three steps, recorded on the pod itself so that
an operator restart resumes where it was:

1. **mark** (replacement first): the pod loses its ``toposerve.io/pool`` label, so it no longer
   matches its ReplicaSet's selector, and it is owned by the LLMDeployment instead. The ReplicaSet
   at once creates a replacement from the same template (same GPU type; the scheduler keeps it off
   the tainted node; GPU fallback moves it on if it stays unschedulable) while the old pod keeps
   serving through the deployment-wide ``<name>-engine`` Service. No replica count changes, so the
   replica accounting and GPU fallback need no notion of "surge".
2. **drain**: its ``app.kubernetes.io/component`` becomes ``draining``: out of every Service, so the
   router's EndpointSlice discovery drops it and sends it nothing new while in-flight requests
   finish. This happens once the pool has its desired number of ready replicas without it (the
   replacement is Ready), or at the latest ``drain_after`` seconds after the mark.
3. **delete**: once the engine reports nothing running or waiting (after at least ``min_drain``
   seconds, so requests the router dispatched just before it noticed have arrived), or at the
   latest ``drain_timeout`` seconds after the drain began.

A marked pod carries ``toposerve.io/evacuating: "true"`` while it serves: the deployment's
evacuation budget (render/objects.py ``render_evacuation_budget``) refuses its eviction until the
drain step takes it out of that budget's selector.

Multi-node replicas (LeaderWorkerSet groups) are left alone: a group cannot be surged pod by pod.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from toposerve.controller.observe import (
    ANNOTATION_EVACUATION,
    LABEL_COMPONENT,
    LABEL_POOL,
    LWS_NAME,
    parse_time,
)

ANNOTATION_REASON = ANNOTATION_EVACUATION  # why the pod is being moved (REASON_*)
ANNOTATION_MESSAGE = "toposerve.io/evacuation-message"
ANNOTATION_POOL = "toposerve.io/evacuated-pool"  # the pool label it had
ANNOTATION_MARKED = "toposerve.io/evacuation-started"  # RFC 3339: replacement started
ANNOTATION_DRAINING = "toposerve.io/drain-started"  # RFC 3339: out of the Services
COMPONENT_DRAINING = "draining"

REASON_UNHEALTHY = "GPUUnhealthy"
REASON_INTERRUPTED = "NodeInterrupted"
REASON_DRAINED = "NodeDrained"  # cordoned (spec.unschedulable), the start of a kubectl drain


@dataclass(frozen=True)
class Timing:
    """Deadlines for one kind of trouble (seconds)."""

    drain_after: float  # mark -> drain at the latest, replacement Ready or not
    drain_timeout: float  # drain -> delete at the latest, requests in flight or not


@dataclass(frozen=True)
class Trouble:
    """Why a node's pods must move."""

    reason: str  # REASON_UNHEALTHY or REASON_INTERRUPTED
    detail: str  # the agent's message, or the interruption taint


@dataclass(frozen=True)
class PodView:
    """What the decision reads of one serving pod."""

    name: str
    node: str | None
    pool: str
    ready: bool
    ip: str | None = None
    multi_node: bool = False
    terminating: bool = False
    reason: str | None = None  # set once marked
    marked_at: datetime | None = None
    draining_at: datetime | None = None


def pod_view(pod: Mapping[str, Any]) -> PodView | None:
    """The view of an engine pod (marked or draining ones included); None for anything else."""
    meta = pod.get("metadata") or {}
    labels = meta.get("labels") or {}
    notes = meta.get("annotations") or {}
    component = labels.get(LABEL_COMPONENT)
    reason = notes.get(ANNOTATION_REASON)
    if component not in ("engine", COMPONENT_DRAINING) or (component == COMPONENT_DRAINING and not reason):
        return None
    spec = pod.get("spec") or {}
    status = pod.get("status") or {}
    ready = any(
        c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or []
    )
    draining_at = parse_time(str(notes.get(ANNOTATION_DRAINING) or "") or None)
    return PodView(
        name=str(meta.get("name") or ""),
        node=str(spec["nodeName"]) if spec.get("nodeName") else None,
        pool=str(notes.get(ANNOTATION_POOL) if reason else labels.get(LABEL_POOL) or ""),
        ready=ready,
        ip=str(status["podIP"]) if status.get("podIP") else None,
        multi_node=LWS_NAME in labels,
        terminating=bool(meta.get("deletionTimestamp")),
        reason=str(reason) if reason else None,
        marked_at=parse_time(str(notes.get(ANNOTATION_MARKED) or "") or None),
        draining_at=draining_at if component == COMPONENT_DRAINING else None,
    )


@dataclass(frozen=True)
class Mark:
    pod: str
    pool: str
    node: str
    trouble: Trouble


@dataclass(frozen=True)
class Drain:
    pod: str
    why: str  # "ReplacementReady", "Deadline" or "NotServing"


@dataclass(frozen=True)
class Delete:
    pod: str
    why: str  # "Drained", "Deadline" or "NotServing"


@dataclass(frozen=True)
class Decision:
    mark: list[Mark] = field(default_factory=list)
    drain: list[Drain] = field(default_factory=list)
    delete: list[Delete] = field(default_factory=list)
    requeue_after: float | None = None  # look again then (a deadline, or the next in-flight check)

    @property
    def draining(self) -> list[str]:
        """Pods that will be draining after this decision (their in-flight count matters next)."""
        return [d.pod for d in self.drain]


def decide(
    pods: Iterable[PodView],
    troubles: Mapping[str, Trouble],
    desired: Mapping[str, int],
    in_flight: Mapping[str, int | None],
    now: datetime,
    timing: Mapping[str, Timing],
    min_drain: float = 5.0,
    poll: float = 2.0,
) -> Decision:
    """What to do now.

    ``troubles``: node name -> trouble; ``desired``: pool -> replicas wanted (a pool not listed wants
    none); ``in_flight``: pod -> requests the engine has running or waiting, None when it could not
    be asked (only draining pods are asked); ``timing``: reason -> deadlines; ``poll``: how often to
    ask a draining engine again.
    """
    views = [p for p in pods if not p.terminating]
    marks: list[Mark] = []
    # The pods that are evacuees after this decision: (view, reason, marked at).
    evacuees: list[tuple[PodView, str, datetime]] = []
    healthy_ready: dict[str, int] = {}
    for p in views:
        if p.reason is not None:
            evacuees.append((p, p.reason, p.marked_at or now))
            continue
        trouble = troubles.get(p.node) if p.node else None
        if trouble is not None and not p.multi_node:
            marks.append(Mark(p.name, p.pool, p.node or "", trouble))
            evacuees.append((p, trouble.reason, now))
        elif p.ready:
            healthy_ready[p.pool] = healthy_ready.get(p.pool, 0) + 1
    drains: list[Drain] = []
    deletes: list[Delete] = []
    waits: list[float] = []
    serving: dict[str, list[tuple[PodView, str, datetime]]] = {}
    for p, reason, marked in evacuees:
        t = timing[reason]
        if p.draining_at is not None:
            drained_for = (now - p.draining_at).total_seconds()
            flight = in_flight.get(p.name)
            if not p.ready:
                deletes.append(Delete(p.name, "NotServing"))
            elif flight == 0 and drained_for >= min_drain:
                deletes.append(Delete(p.name, "Drained"))
            elif drained_for >= t.drain_timeout:
                deletes.append(Delete(p.name, "Deadline"))
            else:
                waits.append(min(t.drain_timeout - drained_for, max(poll, min_drain - drained_for)))
        elif not p.ready:
            drains.append(Drain(p.name, "NotServing"))
        else:
            serving.setdefault(p.pool, []).append((p, reason, marked))
    for pool, group in serving.items():
        # Keep serving only as many evacuees as the pool is short of its desired ready replicas;
        # the longest-marked go first.
        group.sort(key=lambda e: (e[2], e[0].name))
        keep = max(0, desired.get(pool, 0) - healthy_ready.get(pool, 0))
        for i, (p, reason, marked) in enumerate(group):
            left = timing[reason].drain_after - (now - marked).total_seconds()
            if i < len(group) - keep:
                drains.append(Drain(p.name, "ReplacementReady"))
            elif left <= 0:
                drains.append(Drain(p.name, "Deadline"))
            else:
                waits.append(left)
    for d in drains:
        reason = next(r for p, r, _ in evacuees if p.name == d.pod)
        waits.append(min(timing[reason].drain_timeout, max(poll, min_drain)))
    requeue = max(0.5, min(waits)) if waits else None
    return Decision(marks, drains, deletes, requeue)


def node_troubles(
    nodes: Iterable[tuple[str, bool, str, str | None]], cordoned: Iterable[str] = ()
) -> dict[str, Trouble]:
    """(name, GPUs unhealthy, health message, interruption taint key or None) -> troubles by node;
    ``cordoned``: nodes being drained whose pods should be surged away (Surge deployments only).

    An interruption wins over unhealthy GPUs: the node is going away whatever its GPUs say, and its
    deadlines are the shorter ones; both win over a cordon (their deadlines are shorter)."""
    out: dict[str, Trouble] = {
        name: Trouble(REASON_DRAINED, "node cordoned (kubectl drain or cordon)") for name in cordoned
    }
    for name, unhealthy, message, interruption in nodes:
        if interruption:
            out[name] = Trouble(REASON_INTERRUPTED, f"termination notice (taint {interruption})")
        elif unhealthy:
            out[name] = Trouble(REASON_UNHEALTHY, f"GPUs unhealthy ({message or 'GPUHealthy=False'})")
    return out
