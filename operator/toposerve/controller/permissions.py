"""Every Kubernetes permission the operator needs, as data: the single source of its RBAC.

The Helm chart's ClusterRole/Role rules are written by hand (templates cannot import Python) and a
test requires them to equal ``rules(...)`` exactly; other tests require every kind the operator's
client knows (``kube.PLURALS``) and every kopf watch to be covered here. So a new API call is one
line here, and the chart test then says which template lacks it. No wildcards, by construction.

Scopes, i.e. where a rule must be granted:

* ``cluster``: a ClusterRole always (cluster-scoped kinds, or reads across all namespaces);
* ``watched``: every namespace the operator watches (one ClusterRole when it watches them all);
* ``own``: only the operator's own namespace (the leader-election Lease).

A rule may apply only when the operator watches a list of namespaces (``namespaced_only``): kopf
then lists and watches Namespace objects to follow them, and does not when it watches the cluster.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Scope = Literal["cluster", "watched", "own"]
SCOPES: tuple[Scope, ...] = ("cluster", "watched", "own")
LEASE_NAME = "toposerve-operator"  # controller/operator.py: Runtime.lease_name


@dataclass(frozen=True)
class Permission:
    group: str
    resource: str  # plural, optionally with a subresource: "llmdeployments/status"
    verbs: tuple[str, ...]
    scope: Scope
    why: str
    resource_names: tuple[str, ...] = ()
    namespaced_only: bool = False


# list and watch (controller/children.py keeps them in memory), server-side apply (create or
# patch), prune
_WRITE_CHILD = ("list", "watch", "create", "patch", "delete")

PERMISSIONS: tuple[Permission, ...] = (
    # The custom resource.
    Permission("toposerve.io", "llmdeployments", ("get", "list", "watch"), "watched",
               "reconcile reads it, the resync lists it, kopf watches it"),
    Permission("toposerve.io", "llmdeployments/status", ("patch",), "watched",
               "status is a merge patch by the operator"),
    Permission("toposerve.io", "llmdeployments/scale", ("patch",), "watched",
               "the builtin autoscaler writes spec.replicas only through the scale subresource"),
    Permission("toposerve.io", "llmdeployments/finalizers", ("update",), "watched",
               "children carry blockOwnerDeletion owner references; clusters with the "
               "OwnerReferencesPermissionEnforcement admission plugin check this"),
    # Children (kube.CHILD_KINDS): watched by label, server-side applied, pruned.
    Permission("apps", "deployments", _WRITE_CHILD, "watched", "engine and router Deployments"),
    Permission("apps", "daemonsets", _WRITE_CHILD, "watched",
               "model.cache.prefetch: the warm-node DaemonSet of each pool (render/prefetch.py)"),
    Permission("leaderworkerset.x-k8s.io", "leaderworkersets", _WRITE_CHILD, "watched",
               "multi-node engine replicas"),
    Permission("policy", "poddisruptionbudgets", _WRITE_CHILD, "watched", "one PDB per workload"),
    Permission("", "services", _WRITE_CHILD, "watched", "engine and router Services"),
    Permission("", "serviceaccounts", _WRITE_CHILD, "watched", "the router's ServiceAccount"),
    Permission("rbac.authorization.k8s.io", "roles", _WRITE_CHILD, "watched", "the router's Role"),
    Permission("rbac.authorization.k8s.io", "rolebindings", _WRITE_CHILD, "watched",
               "the router's RoleBinding"),
    Permission("autoscaling", "horizontalpodautoscalers", _WRITE_CHILD, "watched",
               "autoscaling.mode hpa: the HorizontalPodAutoscaler"),
    Permission("keda.sh", "scaledobjects", _WRITE_CHILD, "watched", "autoscaling.mode keda: the ScaledObject"),
    Permission("monitoring.coreos.com", "podmonitors", _WRITE_CHILD, "watched",
               "with the Prometheus Operator: the engines' and router's PodMonitors"),
    Permission("resource.nvidia.com", "computedomains", _WRITE_CHILD, "watched",
               "multi-node NVLink (GB200 IMEX) with NVIDIA's DRA driver: one ComputeDomain per workload"),
    Permission("inference.networking.k8s.io", "inferencepools", _WRITE_CHILD, "watched",
               "routing.inferencePool: the Gateway API Inference Extension's InferencePool"),
    # Never called by the operator: held so that it may grant them to the router's Role without
    # the `escalate` or `bind` verbs (RBAC only lets a subject grant what it holds itself).
    Permission("discovery.k8s.io", "endpointslices", ("get", "list", "watch"), "watched",
               "granted to each router's Role (the router discovers engines through them)"),
    # Serving pods: watched by label (readiness, scheduling; controller/children.py).
    Permission("", "pods", ("list", "watch", "patch", "delete"), "watched",
               "serving pods, watched by label; pods on a node with unhealthy GPUs or a termination "
               "notice are relabelled out of their workload and deleted once drained (evacuation.py); "
               "warm standby pods are relabelled in and out of rotation (controller/autoscaler.py)"),
    Permission("", "events", ("create",), "watched", "the operator's and kopf's Events"),
    # Inventory (controller/cache.py watches): free capacity = node allocatable minus the requests
    # of every bound pod, in every namespace.
    Permission("", "nodes", ("list", "watch"), "cluster", "GPU inventory, kept current by a watch"),
    Permission("", "pods", ("list", "watch"), "cluster",
               "resources already requested on each node, all namespaces (watched)"),
    Permission("apiextensions.k8s.io", "customresourcedefinitions", ("get", "list", "watch"), "cluster",
               "is the LeaderWorkerSet CRD installed (get); kopf follows CRDs (list, watch)"),
    Permission("", "namespaces", ("list", "watch"), "cluster",
               "kopf follows the watched namespaces", namespaced_only=True),
    # Leader election.
    Permission("coordination.k8s.io", "leases", ("create",), "own",
               "the first replica creates the Lease (create cannot be limited by name)"),
    Permission("coordination.k8s.io", "leases", ("get", "update"), "own",
               "replicas read and renew the Lease", resource_names=(LEASE_NAME,)),
)  # fmt: skip


# The GPU health agent (health/node.py, a DaemonSet with its own ServiceAccount): it reads its node
# and writes the GPUHealthy condition and its taint. Cluster-scoped kind, so a ClusterRole; RBAC cannot
# limit it to "its own" node by name (the Node authorizer does that for kubelets only).
AGENT_PERMISSIONS: tuple[Permission, ...] = (
    Permission(
        "", "nodes", ("get", "patch"), "cluster", "read its node; add/remove toposerve.io/gpu-unhealthy"
    ),
    Permission("", "nodes/status", ("patch",), "cluster", "the GPUHealthy condition (strategic merge)"),
)

# The gateway (`toposerve gateway`, charts/toposerve/templates/gateway.yaml): reads only. Its
# "watched" scope is the cluster, or the one namespace of gateway.watchNamespace (a Role there);
# "own" (only with gateway.tenants.enabled): its release namespace, a Role there.
GATEWAY_PERMISSIONS: tuple[Permission, ...] = (
    Permission("toposerve.io", "llmdeployments", ("get", "list", "watch"), "watched", "the model table"),
    Permission("discovery.k8s.io", "endpointslices", ("get", "list", "watch"), "watched", "engine endpoints"),
    Permission("", "secrets", ("get", "list", "watch"), "own", "tenant API keys (docs/tenants.md)"),
    Permission(
        "discovery.k8s.io",
        "endpointslices",
        ("list", "watch"),
        "own",
        "the gateway's replicas, from its Service's slices (tenant budgets shared, docs/tenants.md)",
    ),
)


def needed(scope: Scope, namespaced: bool) -> list[Permission]:
    """The permissions of one scope; ``namespaced``: the operator watches a list of namespaces."""
    return [p for p in PERMISSIONS if p.scope == scope and (namespaced or not p.namespaced_only)]


def grants(perms: list[Permission]) -> set[tuple[str, str, str, str]]:
    """Flatten to (group, resource, verb, resourceName or '') for exact comparison with RBAC rules."""
    return {
        (p.group, p.resource, verb, name)
        for p in perms
        for verb in p.verbs
        for name in (p.resource_names or ("",))
    }


def rules(perms: list[Permission]) -> list[dict[str, Any]]:
    """RBAC ``rules`` for a Role or ClusterRole, one rule per permission line (no merging, no wildcards)."""
    out: list[dict[str, Any]] = []
    for p in perms:
        rule: dict[str, Any] = {"apiGroups": [p.group], "resources": [p.resource], "verbs": list(p.verbs)}
        if p.resource_names:
            rule["resourceNames"] = list(p.resource_names)
        out.append(rule)
    return out
