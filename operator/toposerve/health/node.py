"""Publish a node's GPU verdict: the Node condition ``GPUHealthy`` and the taint
``toposerve.io/gpu-unhealthy:NoSchedule`` while unhealthy.

The decision of what to write is pure (``plan_node_update``); ``publish`` is the thin shell. The
condition goes to ``nodes/<name>/status`` as a strategic merge patch (conditions merge by
``type``, as node-problem-detector writes its conditions), so the kubelet's own conditions are
untouched. The taint list has no merge key, so it is replaced as a whole with the node's
``resourceVersion`` as precondition: a concurrent change (another taint added meanwhile) makes the
API server answer 409 and the agent retries on its next sample instead of dropping it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

CONDITION_TYPE = "GPUHealthy"
TAINT_KEY = "toposerve.io/gpu-unhealthy"
TAINT_EFFECT = "NoSchedule"


@dataclass(frozen=True)
class NodeUpdate:
    status_patch: dict[str, Any] | None  # for nodes/<name>/status (strategic merge)
    taints: list[dict[str, Any]] | None  # the node's full new taint list, or None: unchanged
    resource_version: str | None


def _parse(ts: str | None) -> datetime | None:
    if not ts:
        return None
    try:
        return datetime.fromisoformat(ts.replace("Z", "+00:00"))
    except ValueError:
        return None


def plan_node_update(
    node: Mapping[str, Any],
    healthy: bool,
    reason: str,
    message: str,
    now: datetime,
    heartbeat_seconds: float = 300.0,
    taint_key: str = TAINT_KEY,
    taint: bool = True,
) -> NodeUpdate:
    """What to write so the node says ``healthy``; nothing when it already does (and the condition's
    heartbeat is fresh). ``taint``: whether this agent manages the taint at all."""
    stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    status = "True" if healthy else "False"
    current = next(
        (c for c in (node.get("status") or {}).get("conditions") or [] if c.get("type") == CONDITION_TYPE),
        None,
    )
    same = current is not None and (current.get("status"), current.get("reason"), current.get("message")) == (
        status,
        reason,
        message,
    )
    beat = _parse((current or {}).get("lastHeartbeatTime"))
    fresh = beat is not None and (now - beat).total_seconds() < heartbeat_seconds
    status_patch = None
    if not (same and fresh):
        flipped = current is None or current.get("status") != status
        since = stamp if flipped else (current or {}).get("lastTransitionTime") or stamp
        status_patch = {
            "status": {
                "conditions": [
                    {
                        "type": CONDITION_TYPE,
                        "status": status,
                        "reason": reason,
                        "message": message[:1024],
                        "lastHeartbeatTime": stamp,
                        "lastTransitionTime": since,
                    }
                ]
            }
        }
    taints: list[dict[str, Any]] | None = None
    if taint:
        existing: Sequence[Mapping[str, Any]] = (node.get("spec") or {}).get("taints") or []
        ours = [t for t in existing if t.get("key") == taint_key and t.get("effect") == TAINT_EFFECT]
        if not healthy and not ours:
            taints = [dict(t) for t in existing] + [{"key": taint_key, "effect": TAINT_EFFECT}]
        elif healthy and ours:
            taints = [
                dict(t)
                for t in existing
                if not (t.get("key") == taint_key and t.get("effect") == TAINT_EFFECT)
            ]
    rv = (node.get("metadata") or {}).get("resourceVersion")
    return NodeUpdate(status_patch=status_patch, taints=taints, resource_version=str(rv) if rv else None)


def read_node(kube: Any, node_name: str) -> dict[str, Any]:
    """The agent's Node (a ``controller.kube.Kube``)."""
    return dict(kube.request("GET", f"/api/v1/nodes/{node_name}"))


def publish(kube: Any, node_name: str, update: NodeUpdate) -> None:
    """Write ``update`` (a ``controller.kube.Kube``); ApiException (e.g. 409) propagates to the caller."""
    url = f"/api/v1/nodes/{node_name}"
    if update.taints is not None:
        body: dict[str, Any] = {"spec": {"taints": update.taints}}
        if update.resource_version:
            body["metadata"] = {"resourceVersion": update.resource_version}
        kube.request("PATCH", url, body=body, content_type="application/merge-patch+json")
    if update.status_patch is not None:
        kube.request(
            "PATCH",
            url + "/status",
            body=update.status_patch,
            content_type="application/strategic-merge-patch+json",
        )
