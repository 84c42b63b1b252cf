"""How a pool's replicas are replaced (rollouts) and protected (evictions by drains): pure.

Why integers everywhere: a PodDisruptionBudget with an integer ``minAvailable`` counts the pods it
selects directly (the disruption controller needs no controller's scale for it, Kubernetes docs,
"Specifying a Disruption Budget": arbitrary controllers and bare pods may only use an integer
minAvailable), so the same rule holds for Deployment pods, LeaderWorkerSet pods (owned by
StatefulSets, the workers' by their leader pod) and pods the operator took over while evacuating.

- Surge, single-node replicas: the rollout brings one successor up before an old replica goes
  (``maxSurge: 1, maxUnavailable: 0``, the shape production-stack ships with 100 %; one replica at a
  time keeps the spare-GPU need at one replica's), and the budget allows no eviction of the pool's
  serving replicas (``minAvailable`` = replicas): a ``kubectl drain`` waits while the operator
  surges a replacement for each pod on the cordoned node (controller/evacuation.py), and proceeds
  once that pod was drained from the router. Needs the operator running for drains to progress.
- InPlace (no spare GPUs): the old replica goes first (``maxSurge: 0, maxUnavailable: 1``) and the
  budget lets one replica be evicted at a time. A one-replica pool is down for a whole start-up.
- Multi-node replicas (LeaderWorkerSet groups): evicting any pod restarts its whole group
  (``RecreateGroupOnPodRestart``), and a group cannot be replaced before it goes (LWS scales down
  the highest group index, not the one on the drained node). So the budget is counted in groups:
  ``minAvailable`` = all pods but one, which lets exactly one pod, and so one group, be evicted;
  the group's other pods then turn unready and hold the budget at zero until it is back. The
  eviction API records each eviction in the budget's ``disruptedPods`` before the next is decided,
  so two drains at once cannot take two groups. Rollouts surge a whole group when Surge.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Strategy = Literal["Surge", "InPlace"]

# The evacuation budget's minAvailable: above any deployment's pod count (spec.replicas <= 1000 and
# evacuated pods are single-node), so a pod the operator is moving is never evicted while Ready.
EVACUATION_MIN_AVAILABLE = 1000


@dataclass(frozen=True)
class Disruption:
    rolling_update: dict[str, Any]  # Deployment strategy.rollingUpdate / LWS rollingUpdateConfiguration
    min_available: int  # the pool's PodDisruptionBudget
    comment: str  # what the budget means, rendered above it


def disruption(strategy: Strategy, replicas: int, nodes_per_replica: int = 1) -> Disruption:
    """The rollout and eviction rules of one pool of ``replicas`` replicas (all its workloads)."""
    surge = strategy == "Surge"
    rolling: dict[str, Any] = (
        {"maxSurge": 1, "maxUnavailable": 0} if surge else {"maxSurge": 0, "maxUnavailable": 1}
    )
    if nodes_per_replica > 1:
        pods = replicas * nodes_per_replica
        return Disruption(
            rolling,
            max(0, pods - 1),
            f"one {nodes_per_replica}-pod group at a time (one eviction restarts its whole group)",
        )
    if surge:
        return Disruption(
            rolling,
            replicas,
            "none while the pool has only its replicas; the operator surges a replacement for a pod on "
            "a cordoned node, which is then drained from the router and may go",
        )
    return Disruption(rolling, max(0, replicas - 1), "one replica at a time (InPlace: no spare GPUs)")


def in_place_outage(strategy: Strategy, replicas: int, nodes_per_replica: int) -> bool:
    """Whether a rollout or a node drain takes the whole pool down: a one-replica pool replaced in
    place, or a one-group multi-node pool drained (groups cannot be surged on a drain)."""
    return replicas == 1 and (strategy == "InPlace" or nodes_per_replica > 1)


def disruption_note(strategy: Strategy, replicas: int, nodes_per_replica: int) -> str:
    """What a rollout and a node drain do to this pool, for its status (and an Event when it turns
    into an outage): the consequence of spec.disruption.strategy, stated where users look."""
    if in_place_outage(strategy, replicas, nodes_per_replica):
        if strategy == "InPlace":
            return (
                "InPlace with 1 replica: a rollout or a node drain takes the pool down until its "
                "replacement has loaded the model (Surge avoids this with one spare replica's GPUs)"
            )
        return (
            f"Surge with 1 replica of {nodes_per_replica} nodes: a rollout surges a new group, but a node drain "
            "restarts the only group and the pool is down until it has loaded the model again "
            "(2 replicas avoid this)"
        )
    if strategy == "InPlace":
        return "InPlace: rollouts and drains take one replica at a time; the others keep serving"
    if nodes_per_replica > 1:
        return "Surge: rollouts bring a new group up before an old one goes; drains take one group at a time"
    return "Surge: rollouts and drains bring a successor up before a replica goes"
