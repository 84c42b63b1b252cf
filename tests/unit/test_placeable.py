"""The scheduler-semantics oracle: one table of cases per kube-scheduler filter rule."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from toposerve.dev.placeable import (
    expression_matches,
    group_topology_keys,
    parse_quantity,
    placeable_nodes,
    pod_requests,
    pod_templates,
    reasons,
    tolerates,
    why_not,
)


def node(
    labels: dict[str, str] | None = None,
    taints: list[dict[str, str]] | None = None,
    allocatable: dict[str, str] | None = None,
    unschedulable: bool = False,
    name: str = "n",
) -> dict[str, Any]:
    spec: dict[str, Any] = {"taints": taints or []}
    if unschedulable:
        spec["unschedulable"] = True
    return {
        "metadata": {"name": name, "labels": labels or {}},
        "spec": spec,
        "status": {"allocatable": allocatable or {"cpu": "4", "memory": "16Gi", "pods": "110"}},
    }


def pod(**spec: Any) -> dict[str, Any]:
    spec.setdefault("containers", [{"name": "c"}])
    return spec


def affinity(*terms: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": t} for t in terms]
            }
        }
    }


def req(key: str, op: str, *values: str) -> dict[str, Any]:
    e: dict[str, Any] = {"key": key, "operator": op}
    if values:
        e["values"] = list(values)
    return e


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1", Decimal(1)),
        ("250m", Decimal("0.25")),
        ("3920m", Decimal("3.92")),
        ("1.5", Decimal("1.5")),
        ("1Ki", Decimal(1024)),
        ("16Gi", Decimal(16 * 2**30)),
        ("13621Mi", Decimal(13621 * 2**20)),
        ("2Ti", Decimal(2 * 2**40)),
        ("1k", Decimal(1000)),
        ("1M", Decimal(10**6)),
        ("16G", Decimal(16 * 10**9)),
        ("2e3", Decimal(2000)),
        ("100n", Decimal("1e-7")),
        (8, Decimal(8)),
    ],
)
def test_quantities(text: Any, value: Decimal) -> None:
    assert parse_quantity(text) == value


@pytest.mark.parametrize("bad", ["", "1Gb", "Gi", "1 Gi", "abc", "1.2.3", True])
def test_bad_quantities_are_refused(bad: Any) -> None:
    with pytest.raises(ValueError):
        parse_quantity(bad)


LABELS = {"gpu": "h100", "count": "8", "word": "eight"}


@pytest.mark.parametrize(
    ("expr", "matches"),
    [
        (req("gpu", "In", "h100", "a100"), True),
        (req("gpu", "In", "l4"), False),
        (req("missing", "In", "x"), False),
        (req("gpu", "NotIn", "l4"), True),
        (req("gpu", "NotIn", "h100"), False),
        (req("missing", "NotIn", "x"), True),  # NotIn matches nodes without the label
        (req("gpu", "Exists"), True),
        (req("missing", "Exists"), False),
        (req("missing", "DoesNotExist"), True),
        (req("gpu", "DoesNotExist"), False),
        (req("count", "Gt", "7"), True),
        (req("count", "Gt", "8"), False),  # strictly greater
        (req("count", "Lt", "9"), True),
        (req("count", "Lt", "8"), False),
        (req("missing", "Gt", "0"), False),
        (req("word", "Gt", "0"), False),  # label not an integer
        (req("count", "Gt", "seven"), False),  # value not an integer
        (req("count", "Gt", "1", "2"), False),  # exactly one value
        (req("count", "Gt", "7.5"), False),  # integers only
    ],
)
def test_node_selector_operators(expr: dict[str, Any], matches: bool) -> None:
    assert expression_matches(expr, LABELS) is matches


def test_unknown_operator_is_an_error() -> None:
    with pytest.raises(ValueError):
        expression_matches(req("gpu", "Like", "h"), LABELS)


@pytest.mark.parametrize(
    ("spec", "blocked_by"),
    [
        (pod(nodeSelector={"gpu": "h100"}), None),
        (pod(nodeSelector={"gpu": "h100", "count": "8"}), None),
        (pod(nodeSelector={"gpu": "a100"}), "nodeSelector needs gpu=a100"),
        (pod(nodeSelector={"zone": "a"}), "nodeSelector needs zone=a"),
        # terms ORed: the second matches
        (pod(affinity=affinity([req("gpu", "In", "l4")], [req("gpu", "In", "h100")])), None),
        # expressions ANDed: one fails
        (
            pod(affinity=affinity([req("gpu", "In", "h100"), req("count", "Gt", "8")])),
            "required node affinity not met: count Gt ['8']",
        ),
        (pod(affinity=affinity([req("nvidia.com/gpu.product", "In", "X")])), "nvidia.com/gpu.product In"),
        # an empty term matches nothing
        (
            pod(
                affinity={
                    "nodeAffinity": {
                        "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{}]}
                    }
                }
            ),
            "required node affinity not met",
        ),
        # preferred affinity never blocks
        (
            pod(
                affinity={
                    "nodeAffinity": {
                        "preferredDuringSchedulingIgnoredDuringExecution": [
                            {"weight": 1, "preference": {"matchExpressions": [req("gpu", "In", "l4")]}}
                        ]
                    }
                }
            ),
            None,
        ),
        # matchFields on metadata.name
        (
            pod(
                affinity={
                    "nodeAffinity": {
                        "requiredDuringSchedulingIgnoredDuringExecution": {
                            "nodeSelectorTerms": [{"matchFields": [req("metadata.name", "In", "other")]}]
                        }
                    }
                }
            ),
            "required node affinity not met",
        ),
        (
            pod(
                affinity={
                    "nodeAffinity": {
                        "requiredDuringSchedulingIgnoredDuringExecution": {
                            "nodeSelectorTerms": [{"matchFields": [req("metadata.name", "In", "n")]}]
                        }
                    }
                }
            ),
            None,
        ),
        # nodeSelector and affinity must both hold
        (pod(nodeSelector={"gpu": "h100"}, affinity=affinity([req("gpu", "In", "l4")])), "gpu In ['l4']"),
    ],
)
def test_node_selector_and_required_affinity(spec: dict[str, Any], blocked_by: str | None) -> None:
    why = why_not(spec, node(LABELS))
    if blocked_by is None:
        assert why is None
    else:
        assert why is not None and blocked_by in why


TAINT_GPU = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
TAINT_KEY_ONLY = {"key": "nvidia.com/gpu", "effect": "NoSchedule"}
TAINT_EXEC = {"key": "maintenance", "value": "yes", "effect": "NoExecute"}


@pytest.mark.parametrize(
    ("toleration", "taint", "ok"),
    [
        ({"key": "nvidia.com/gpu", "operator": "Exists"}, TAINT_GPU, True),
        ({"key": "nvidia.com/gpu", "operator": "Equal", "value": "present"}, TAINT_GPU, True),
        ({"key": "nvidia.com/gpu", "value": "present"}, TAINT_GPU, True),  # Equal is the default
        ({"key": "nvidia.com/gpu", "operator": "Equal", "value": "true"}, TAINT_GPU, False),
        ({"key": "nvidia.com/gpu", "operator": "Equal"}, TAINT_KEY_ONLY, True),  # empty == empty
        ({"key": "nvidia.com/gpu", "operator": "Equal", "value": "present"}, TAINT_KEY_ONLY, False),
        ({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}, TAINT_GPU, True),
        ({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoExecute"}, TAINT_GPU, False),
        ({"operator": "Exists"}, TAINT_GPU, True),  # empty key + Exists: everything
        ({"operator": "Exists"}, TAINT_EXEC, True),
        ({"operator": "Exists", "effect": "NoSchedule"}, TAINT_EXEC, False),
        ({"operator": "Equal", "value": "present"}, TAINT_GPU, False),  # empty key needs Exists
        ({"key": "other", "operator": "Exists"}, TAINT_GPU, False),
    ],
)
def test_toleration_matching(toleration: dict[str, Any], taint: dict[str, str], ok: bool) -> None:
    assert tolerates(toleration, taint) is ok
    assert (why_not(pod(tolerations=[toleration]), node(taints=[taint])) is None) is ok


def test_taint_effects() -> None:
    prefer = {"key": "x", "value": "y", "effect": "PreferNoSchedule"}
    assert why_not(pod(), node(taints=[prefer])) is None  # scoring only
    assert why_not(pod(), node(taints=[TAINT_GPU])) == "untolerated taint nvidia.com/gpu=present:NoSchedule"
    assert why_not(pod(), node(taints=[TAINT_EXEC])) == "untolerated taint maintenance=yes:NoExecute"
    assert why_not(pod(), node(taints=[TAINT_KEY_ONLY])) == "untolerated taint nvidia.com/gpu:NoSchedule"
    # every taint needs its own toleration
    both = node(taints=[TAINT_GPU, TAINT_EXEC])
    assert why_not(pod(tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists"}]), both) is not None
    tols = [{"key": "nvidia.com/gpu", "operator": "Exists"}, {"key": "maintenance", "operator": "Exists"}]
    assert why_not(pod(tolerations=tols), both) is None


def test_unschedulable_node() -> None:
    cordoned = node(unschedulable=True)
    assert why_not(pod(), cordoned) == "node is unschedulable (cordoned)"
    tol = {"key": "node.kubernetes.io/unschedulable", "operator": "Exists", "effect": "NoSchedule"}
    assert why_not(pod(tolerations=[tol]), cordoned) is None
    assert why_not(pod(tolerations=[{"operator": "Exists"}]), cordoned) is None


def container(
    requests: dict[str, str] | None = None, limits: dict[str, str] | None = None, **kw: Any
) -> dict[str, Any]:
    res: dict[str, Any] = {}
    if requests:
        res["requests"] = requests
    if limits:
        res["limits"] = limits
    return {"name": "c", "resources": res, **kw}


SMALL = {
    "cpu": "3920m",
    "memory": "13621Mi",
    "ephemeral-storage": "50Gi",
    "nvidia.com/gpu": "1",
    "pods": "110",
}


@pytest.mark.parametrize(
    ("spec", "blocked_by"),
    [
        (pod(containers=[container({"cpu": "3920m"})]), None),
        (pod(containers=[container({"cpu": "4"})]), "cpu request 4 > allocatable 3.92"),
        (
            pod(containers=[container({"cpu": "2"}), container({"cpu": "2"})]),
            "cpu request 4 > allocatable 3.92",
        ),
        (pod(containers=[container({"memory": "16Gi"})]), "memory request 16Gi > allocatable 13.3Gi"),
        (pod(containers=[container({"memory": "13Gi"})]), None),
        (pod(containers=[container(limits={"nvidia.com/gpu": "1"})]), None),  # requests default to limits
        (
            pod(containers=[container(limits={"nvidia.com/gpu": "2"})]),
            "nvidia.com/gpu request 2 > allocatable 1",
        ),
        (pod(containers=[container({"cpu": "1"}, {"cpu": "8"})]), None),  # limits above allocatable are fine
        (pod(containers=[container({"ephemeral-storage": "60Gi"})]), "ephemeral-storage request"),
        (
            pod(containers=[container(limits={"example.com/fpga": "1"})]),
            "example.com/fpga request 1 > allocatable 0",
        ),
        # init containers: the max, not the sum, and not added to app containers
        (
            pod(
                initContainers=[container({"cpu": "3"}), container({"cpu": "3"})],
                containers=[container({"cpu": "3"})],
            ),
            None,
        ),
        (
            pod(initContainers=[container({"cpu": "4"})], containers=[container({"cpu": "1"})]),
            "cpu request 4 > allocatable 3.92",
        ),
        # sidecar init containers (restartPolicy Always) add up with app containers
        (
            pod(
                initContainers=[container({"cpu": "2"}, restartPolicy="Always")],
                containers=[container({"cpu": "2"})],
            ),
            "cpu request 4 > allocatable 3.92",
        ),
        (
            pod(overhead={"cpu": "1"}, containers=[container({"cpu": "3"})]),
            "cpu request 4 > allocatable 3.92",
        ),
    ],
)
def test_resources_fit_allocatable(spec: dict[str, Any], blocked_by: str | None) -> None:
    why = why_not(spec, node(allocatable=SMALL))
    if blocked_by is None:
        assert why is None
    else:
        assert why is not None and why.startswith(blocked_by)


def test_allocatable_not_capacity() -> None:
    n = node(allocatable={"cpu": "3920m", "memory": "13621Mi"})
    n["status"]["capacity"] = {"cpu": "4", "memory": "16Gi"}
    assert why_not(pod(containers=[container({"cpu": "4"})]), n) == "cpu request 4 > allocatable 3.92"


def test_pod_requests_combine_containers() -> None:
    spec = pod(
        initContainers=[container({"cpu": "500m", "memory": "4Gi"})],
        containers=[container({"cpu": "1"}, {"nvidia.com/gpu": "4"}), container({"memory": "1Gi"})],
    )
    assert pod_requests(spec) == {
        "pods": Decimal(1),
        "cpu": Decimal(1),
        "memory": Decimal(4 * 2**30),
        "nvidia.com/gpu": Decimal(4),
    }


def test_placeable_nodes_lists_names() -> None:
    nodes = [
        node({"gpu": "h100"}, name="a"),
        node({"gpu": "l4"}, name="b"),
        node({"gpu": "h100"}, taints=[TAINT_GPU], name="c"),
    ]
    assert placeable_nodes(pod(nodeSelector={"gpu": "h100"}), nodes) == ["a"]


def test_pod_templates_of_workloads() -> None:
    tpl = {"spec": {"containers": [{"name": "x"}]}}
    dep = {"kind": "Deployment", "spec": {"template": tpl}}
    assert pod_templates(dep) == [("pod", tpl["spec"], 1)]
    leader = {"spec": {"containers": [{"name": "leader"}]}}
    lws = {"kind": "LeaderWorkerSet", "spec": {"leaderWorkerTemplate": {
        "size": 4, "leaderTemplate": leader, "workerTemplate": tpl}}}  # fmt: skip
    assert pod_templates(lws) == [("leader", leader["spec"], 1), ("worker", tpl["spec"], 3)]
    no_leader = {
        "kind": "LeaderWorkerSet",
        "spec": {"leaderWorkerTemplate": {"size": 2, "workerTemplate": tpl}},
    }
    assert pod_templates(no_leader) == [("leader", tpl["spec"], 1), ("worker", tpl["spec"], 1)]
    assert pod_templates({"kind": "Service", "spec": {}}) == []


def test_reasons_lists_every_failing_rule_in_scheduler_order() -> None:
    n = node({"gpu": "l4"}, taints=[TAINT_GPU], allocatable=SMALL, unschedulable=True)
    spec = pod(
        nodeSelector={"gpu": "h100"},
        affinity=affinity([req("count", "Gt", "3")]),
        containers=[container({"cpu": "8"}, {"nvidia.com/gpu": "1"})],
    )
    assert reasons(spec, n) == [
        "node is unschedulable (cordoned)",
        "nodeSelector needs gpu=h100 (node has 'l4')",
        "required node affinity not met: count Gt ['3']",
        "untolerated taint nvidia.com/gpu=present:NoSchedule",
        "cpu request 8 > allocatable 3.92",
    ]
    assert why_not(spec, n) == "node is unschedulable (cordoned)"
    assert reasons(pod(), node()) == []


def test_pod_slots_and_pod_level_resources() -> None:
    full = node(allocatable={"cpu": "4", "memory": "16Gi", "pods": "0"})
    assert why_not(pod(), full) == "pods request 1 > allocatable 0"
    spec = pod(
        resources={"requests": {"cpu": "2"}}, containers=[container({"cpu": "1"}), container({"cpu": "1"})]
    )
    assert pod_requests(spec)["cpu"] == Decimal(2)
    big = pod(resources={"requests": {"cpu": "5"}}, containers=[container({"cpu": "1"})])
    assert why_not(big, node()) == "cpu request 5 > allocatable 4"


def test_node_without_pods_allocatable_takes_none() -> None:
    n = node(allocatable={"cpu": "4", "memory": "16Gi"})
    assert why_not(pod(), n) == "pods request 1 > allocatable 0"


def test_required_pod_affinity_needs_the_topology_label_on_the_node() -> None:
    term = {"labelSelector": {"matchLabels": {"g": "1"}}, "topologyKey": "nvidia.com/gpu.clique"}
    spec = pod(affinity={"podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [term]}})
    assert why_not(spec, node({"nvidia.com/gpu.clique": "u.1"})) is None
    assert why_not(spec, node()) == "required pod affinity needs node label nvidia.com/gpu.clique"
    preferred = pod(affinity={"podAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
        {"weight": 1, "podAffinityTerm": term}]}})  # fmt: skip
    assert why_not(preferred, node()) is None


def test_group_topology_keys_of_a_leaderworkerset() -> None:
    term = {"labelSelector": {"matchLabels": {"g": "1"}}, "topologyKey": "rack"}
    tpl = {"spec": {"affinity": {"podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [term]}}}}
    lws = {
        "kind": "LeaderWorkerSet",
        "metadata": {
            "annotations": {"leaderworkerset.sigs.k8s.io/exclusive-topology": "nvidia.com/gpu.clique"}
        },
        "spec": {"leaderWorkerTemplate": {"size": 2, "workerTemplate": tpl}},
    }
    assert group_topology_keys(lws) == {"nvidia.com/gpu.clique", "rack"}
    assert group_topology_keys({"kind": "Deployment", "spec": {"template": tpl}}) == set()
