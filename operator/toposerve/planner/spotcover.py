"""On-demand cover for spot replicas under a termination notice (pure).

A spot node's termination notice (an interruption taint: AWS's 2-minute spot notice, GKE's 30 s,
Karpenter's disruption) starts the evacuation (controller/evacuation.py): the pod is taken out of
its workload's selector, and the spot workload's ReplicaSet creates a replacement of the same type
on spot capacity, which is exactly what is being reclaimed. A replacement takes a model load
(minutes), and when spot capacity is short it does not start at all.

So the operator also pre-scales on demand: each spot replica under a notice gets a *cover*, one
more replica in the same pool and GPU type's on-demand workload (``<workload>-od``, the one that
holds the on-demand baseline; render/objects.py ``render_pool``), started the moment the notice is
seen. The cover holds while the spot workload is short of ready replicas (its replacements still
loading or unschedulable), never more than it was, and ends once the spot side is whole again: the
on-demand workload then returns to its baseline (the most expensive capacity leaves first).

State lives in the LLMDeployment's status (``pools[].onDemandCover``), so an operator restart
resumes the cover instead of dropping it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class SpotPod:
    """What the cover reads of one engine pod of a spot pool's GPU type."""

    ready: bool
    on_demand: bool  # a pod of the on-demand baseline workload (``toposerve.io/capacity: on-demand``)
    interrupted: bool  # marked for evacuation because its node has a termination notice
    leaving: bool = False  # marked for evacuation for another reason, or being deleted


def spot_desired(replicas: int, on_demand_baseline: int) -> int:
    """Replicas the spot workload runs out of the type's ``replicas`` (the rest is the baseline)."""
    return max(0, replicas - min(on_demand_baseline, replicas))


def cover(pods: Iterable[SpotPod], replicas: int, on_demand_baseline: int, previous: int) -> int:
    """Extra on-demand replicas for one pool's GPU type.

    ``replicas``: what the type runs (spot and baseline); ``previous``: the cover in force before
    (status). The cover is at least the spot replicas under a notice (each needs a twin now, before
    its node goes) and, once they are gone, stays while the spot workload has fewer ready replicas
    than it should, never above ``previous``: ``max(at_risk, min(previous, short))``.
    """
    pods = list(pods)
    at_risk = sum(1 for p in pods if p.interrupted and not p.on_demand)
    ready_spot = sum(1 for p in pods if p.ready and not p.on_demand and not p.interrupted and not p.leaving)
    short = max(0, spot_desired(replicas, on_demand_baseline) - ready_spot)
    return max(at_risk, min(max(0, previous), short))
