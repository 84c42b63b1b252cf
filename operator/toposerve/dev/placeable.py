"""Would kube-scheduler bind this pod to this node? A test oracle written from the Kubernetes docs.

The placement tests must not ask the operator's own code whether its pods fit, or the tests agree
with the code instead of with Kubernetes. So this module re-implements, from the documentation and
independently of ``toposerve.planner``, the filter plugins a pod template meets on one node:

- NodeUnschedulable: ``spec.unschedulable`` nodes take no new pods unless the pod tolerates
  ``node.kubernetes.io/unschedulable:NoSchedule``.
- NodeAffinity: ``nodeSelector`` (every pair must match) and required node affinity
  (``nodeSelectorTerms`` are ORed, each term's ``matchExpressions`` ANDed; ``In``, ``NotIn``,
  ``Exists``, ``DoesNotExist``, ``Gt``, ``Lt``). ``NotIn`` and ``DoesNotExist`` match nodes
  without the label; ``Gt``/``Lt`` compare the label, parsed as an integer, with one integer
  value, and fail when either does not parse.
  https://kubernetes.io/docs/concepts/scheduling-eviction/assign-pod-node/#operators
  https://kubernetes.io/docs/reference/kubernetes-api/workload-resources/pod-v1/#NodeSelectorRequirement
- TaintToleration: every ``NoSchedule``/``NoExecute`` taint must be tolerated (``PreferNoSchedule``
  only scores). A toleration with an empty key and ``Exists`` matches every taint; an empty effect
  matches every effect; ``Equal`` (the default) compares values, ``Exists`` ignores them.
  https://kubernetes.io/docs/concepts/scheduling-eviction/taint-and-toleration/
- InterPodAffinity (the part that needs no other pods): a node must carry the ``topologyKey`` of
  every required pod affinity term.
- NodeResourcesFit: the pod's request is, per resource, the larger of the sum over app containers
  and the largest init container, plus ``spec.overhead``; it must fit ``status.allocatable``
  (not capacity). A resource the node does not list has zero allocatable.
  https://kubernetes.io/docs/concepts/workloads/pods/init-containers/#resource-sharing-within-containers
  https://kubernetes.io/docs/concepts/scheduling-eviction/kube-scheduler/#kube-scheduler-implementation
  Requests default to limits when only limits are given (extended resources such as
  ``nvidia.com/gpu`` may only set limits).
  https://kubernetes.io/docs/concepts/configuration/manage-resources-containers/#requests-and-limits
  Each pod also takes one of the node's ``pods`` slots; pod-level ``resources`` replace the
  containers' cpu and memory.

It checks one pod against an empty node: other pods' usage, pod (anti-)affinity and topology
spread are out of scope (they depend on what already runs).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any

# https://kubernetes.io/docs/reference/kubernetes-api/common-definitions/quantity/
_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {"n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "": Decimal(1),
            "k": Decimal("1e3"), "M": Decimal("1e6"), "G": Decimal("1e9"), "T": Decimal("1e12"),
            "P": Decimal("1e15"), "E": Decimal("1e18")}  # fmt: skip
_QUANTITY = re.compile(r"^([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]?)$")

UNSCHEDULABLE_TAINT = {"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}


def parse_quantity(value: Any) -> Decimal:
    """A Kubernetes quantity ("250m", "16Gi", "1.5", "2e3", "1k") as an exact number."""
    if isinstance(value, bool):
        raise ValueError(f"not a quantity: {value!r}")
    if isinstance(value, int | float):
        return Decimal(str(value))
    m = _QUANTITY.match(str(value).strip())
    if not m:
        raise ValueError(f"not a quantity: {value!r}")
    number, suffix = m.groups()
    try:
        base = Decimal(number)
    except InvalidOperation:
        raise ValueError(f"not a quantity: {value!r}") from None
    return base * (_BINARY[suffix] if suffix in _BINARY else _DECIMAL[suffix])


def _container_requests(c: Mapping[str, Any]) -> dict[str, Decimal]:
    res = c.get("resources") or {}
    out = {k: parse_quantity(v) for k, v in (res.get("limits") or {}).items()}
    out |= {k: parse_quantity(v) for k, v in (res.get("requests") or {}).items()}
    return out


def pod_requests(pod_spec: Mapping[str, Any]) -> dict[str, Decimal]:
    """Effective requests: max(sum of app containers, largest init container) + overhead.

    ``pods`` is 1: every pod takes one of the node's pod slots.
    """
    total: dict[str, Decimal] = {"pods": Decimal(1)}
    for c in pod_spec.get("containers") or []:
        for k, v in _container_requests(c).items():
            total[k] = total.get(k, Decimal(0)) + v
    for c in pod_spec.get("initContainers") or []:
        # Sidecars (restartPolicy: Always) keep running, so they add up like app containers.
        if c.get("restartPolicy") == "Always":
            for k, v in _container_requests(c).items():
                total[k] = total.get(k, Decimal(0)) + v
            continue
        for k, v in _container_requests(c).items():
            total[k] = max(total.get(k, Decimal(0)), v)
    # Pod-level resources (KEP-2837) replace the containers' cpu and memory when set:
    # https://kubernetes.io/docs/tasks/configure-pod-container/assign-pod-level-resources/
    pod_level = pod_spec.get("resources") or {}
    for k, v in ({**(pod_level.get("limits") or {}), **(pod_level.get("requests") or {})}).items():
        if k in ("cpu", "memory"):
            total[k] = parse_quantity(v)
    for k, v in (pod_spec.get("overhead") or {}).items():
        total[k] = total.get(k, Decimal(0)) + parse_quantity(v)
    return total


def _int(s: str) -> int | None:
    try:
        return int(s)
    except (TypeError, ValueError):
        return None


def expression_matches(expr: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """One NodeSelectorRequirement against a node's labels."""
    key, op, values = expr["key"], expr["operator"], list(expr.get("values") or [])
    present = key in labels
    if op == "In":
        return present and labels[key] in values
    if op == "NotIn":
        return not present or labels[key] not in values
    if op == "Exists":
        return present
    if op == "DoesNotExist":
        return not present
    if op in ("Gt", "Lt"):
        if not present or len(values) != 1:
            return False
        have, want = _int(labels[key]), _int(values[0])
        if have is None or want is None:
            return False
        return have > want if op == "Gt" else have < want
    raise ValueError(f"unknown node selector operator {op!r}")


def _term_matches(term: Mapping[str, Any], node: Mapping[str, Any]) -> bool:
    labels = node.get("metadata", {}).get("labels") or {}
    exprs = term.get("matchExpressions") or []
    fields = term.get("matchFields") or []
    if not exprs and not fields:
        return False  # an empty term matches no objects (NodeSelectorTerm docs)
    name = {"metadata.name": node.get("metadata", {}).get("name", "")}
    return all(expression_matches(e, labels) for e in exprs) and all(
        expression_matches(f, name) for f in fields
    )


def tolerates(toleration: Mapping[str, Any], taint: Mapping[str, Any]) -> bool:
    """One toleration against one taint (ToleratesTaint in k8s.io/api/core/v1)."""
    effect = toleration.get("effect") or ""
    if effect and effect != taint.get("effect"):
        return False
    key = toleration.get("key") or ""
    op = toleration.get("operator") or "Equal"
    if not key:
        return op == "Exists"  # empty key needs Exists, then it matches every key
    if key != taint.get("key"):
        return False
    if op == "Exists":
        return True
    return bool(op == "Equal" and (toleration.get("value") or "") == (taint.get("value") or ""))


def _untolerated(tolerations: Sequence[Mapping[str, Any]], taints: Iterable[Mapping[str, Any]]) -> list[str]:
    out = []
    for t in taints:
        if t.get("effect") == "PreferNoSchedule":
            continue
        if not any(tolerates(tol, t) for tol in tolerations):
            value = f"={t['value']}" if t.get("value") else ""
            out.append(f"untolerated taint {t['key']}{value}:{t.get('effect')}")
    return out


def _fmt(res: str, q: Decimal) -> str:
    """Bytes as GiB (readable in reports), everything else as a plain number."""
    if res in ("memory", "ephemeral-storage") or res.startswith("hugepages-"):
        return f"{float(q) / 2**30:.4g}Gi"
    return format(q.normalize(), "f")


def _required_pod_affinity(pod_spec: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    pa = (pod_spec.get("affinity") or {}).get("podAffinity") or {}
    return list(pa.get("requiredDuringSchedulingIgnoredDuringExecution") or [])


def reasons(pod_spec: Mapping[str, Any], node: Mapping[str, Any]) -> list[str]:
    """Every rule that keeps a pod with this spec off this (empty) node; empty if it would bind.

    Unlike the scheduler, which stops at the first failing filter, this lists them all, so a
    report says everything a fix has to change.
    """
    spec = node.get("spec") or {}
    labels = node.get("metadata", {}).get("labels") or {}
    tolerations = list(pod_spec.get("tolerations") or [])
    out: list[str] = []
    if spec.get("unschedulable") and not any(tolerates(t, UNSCHEDULABLE_TAINT) for t in tolerations):
        out.append("node is unschedulable (cordoned)")
    for k, v in (pod_spec.get("nodeSelector") or {}).items():
        if labels.get(k) != v:
            out.append(f"nodeSelector needs {k}={v}" + (f" (node has {labels[k]!r})" if k in labels else ""))
    required = ((pod_spec.get("affinity") or {}).get("nodeAffinity") or {}).get(
        "requiredDuringSchedulingIgnoredDuringExecution"
    ) or {}
    terms = required.get("nodeSelectorTerms")
    if terms is not None and not any(_term_matches(t, node) for t in terms):
        failed = sorted(
            {
                f"{e['key']} {e['operator']} {e.get('values') or ''}".rstrip()
                for t in terms
                for e in t.get("matchExpressions") or []
                if not expression_matches(e, labels)
            }
        )
        out.append("required node affinity not met: " + ("; ".join(failed) or "no term matches"))
    # InterPodAffinity: whatever pods already run, a node must carry every required affinity
    # term's topologyKey ("All topology labels must exist on the node", satisfyPodAffinity in
    # kube-scheduler's interpodaffinity plugin).
    for term in _required_pod_affinity(pod_spec):
        if term.get("topologyKey") and term["topologyKey"] not in labels:
            out.append(f"required pod affinity needs node label {term['topologyKey']}")
    out += _untolerated(tolerations, spec.get("taints") or [])
    allocatable = {
        k: parse_quantity(v) for k, v in ((node.get("status") or {}).get("allocatable") or {}).items()
    }
    for res, want in sorted(pod_requests(pod_spec).items()):
        have = allocatable.get(res, Decimal(0))
        if want > have:
            out.append(f"{res} request {_fmt(res, want)} > allocatable {_fmt(res, have)}")
    return out


def why_not(pod_spec: Mapping[str, Any], node: Mapping[str, Any]) -> str | None:
    """Why kube-scheduler would not bind a pod with this spec to this (empty) node; None if it would."""
    found = reasons(pod_spec, node)
    return found[0] if found else None


def placeable_nodes(pod_spec: Mapping[str, Any], nodes: Iterable[Mapping[str, Any]]) -> list[str]:
    """Names of the nodes a pod with this spec could be bound to, each node considered empty."""
    return [n["metadata"]["name"] for n in nodes if why_not(pod_spec, n) is None]


# LeaderWorkerSet's exclusive placement: every pod of a group lands in one domain of this node
# label, one group per domain (https://lws.sigs.k8s.io/docs/concepts/#exclusive-lws-to-topology-placement).
# Nodes without the label belong to no domain.
EXCLUSIVE_TOPOLOGY = "leaderworkerset.sigs.k8s.io/exclusive-topology"


def group_topology_keys(obj: Mapping[str, Any]) -> set[str]:
    """Node labels every pod of one LeaderWorkerSet group must share: the exclusive-topology
    annotation, and the topologyKeys of the templates' required pod affinity (which LWS renders
    pointing at the group's own pods)."""
    keys = set()
    if key := ((obj.get("metadata") or {}).get("annotations") or {}).get(EXCLUSIVE_TOPOLOGY):
        keys.add(key)
    if obj.get("kind") == "LeaderWorkerSet":
        for _, spec, _ in pod_templates(obj):
            keys |= {t["topologyKey"] for t in _required_pod_affinity(spec) if t.get("topologyKey")}
    return keys


def pod_templates(obj: Mapping[str, Any]) -> list[tuple[str, dict[str, Any], int]]:
    """(role, pod spec, pods per replica) of a workload: Deployment, StatefulSet or LeaderWorkerSet.

    A LeaderWorkerSet replica is one leader plus ``size - 1`` workers; the leader uses
    ``leaderTemplate`` when given, else ``workerTemplate`` (https://lws.sigs.k8s.io/docs/concepts/).
    """
    kind = obj.get("kind")
    spec = obj.get("spec") or {}
    if kind in ("Deployment", "StatefulSet", "ReplicaSet", "Job"):
        return [("pod", spec["template"]["spec"], 1)]
    if kind == "LeaderWorkerSet":
        lwt = spec["leaderWorkerTemplate"]
        worker = lwt["workerTemplate"]["spec"]
        leader = (lwt.get("leaderTemplate") or lwt["workerTemplate"])["spec"]
        size = int(lwt.get("size", 1))
        out = [("leader", leader, 1)]
        if size > 1:
            out.append(("worker", worker, size - 1))
        return out
    return []
