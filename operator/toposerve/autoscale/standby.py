"""Warm standby (pure): which pods to move into or out of the router's rotation.

The workloads run ``spec.replicas + warmStandby`` pods; all start as serving pods
(``app.kubernetes.io/component: engine``, what every Service, the router's discovery, the PDB,
Prometheus' selector and the scale subresource's selector match). The autoscaler relabels the
surplus ``standby``: loaded, out of rotation, still owned by their ReplicaSet (whose selector does
not include the component label). A scale-up relabels a ready standby back to ``engine`` (seconds,
no model load) while the workload starts a new pod behind it, which becomes the next standby.

Level-triggered: from the pods as they are, the relabelling that makes ``serving`` of them
engines and up to ``standby`` of the rest standby, whatever happened before (a pod deleted by a
ReplicaSet's scale-down, an operator restart between two patches).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Pod:
    name: str
    standby: bool  # labelled standby now
    ready: bool
    age: float  # seconds since creation


@dataclass(frozen=True)
class Relabel:
    promote: tuple[str, ...] = ()  # standby -> engine
    demote: tuple[str, ...] = ()  # engine -> standby


def relabel(pods: Sequence[Pod], serving: int, standby: int) -> Relabel:
    """Promote standby pods while engines are short of ``serving`` (ready ones first, oldest first:
    the most likely to be loaded); demote surplus engines while standby pods are short of
    ``standby``: starting ones first (they serve nobody yet), then the youngest ready ones."""
    engines = [p for p in pods if not p.standby]
    spares = [p for p in pods if p.standby]
    if len(engines) < serving:
        order = sorted(spares, key=lambda p: (not p.ready, -p.age, p.name))
        return Relabel(promote=tuple(p.name for p in order[: serving - len(engines)]))
    surplus = len(engines) - serving
    room = standby - len(spares)
    if surplus > 0 and room > 0:
        order = sorted(engines, key=lambda p: (p.ready, p.age, p.name))
        return Relabel(demote=tuple(p.name for p in order[: min(surplus, room)]))
    return Relabel()
