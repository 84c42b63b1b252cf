"""placement.spot: enabled, on-demand baseline, the operator's spot tiers, providers' spot labels and
interruption taints; rendering of the baseline's on-demand workload; planned cost with a baseline."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest
from pydantic import ValidationError

from tests.unit.conftest import make_spec
from toposerve.api.config import OperatorConfig
from toposerve.api.gpus import DEFAULT_CATALOG
from toposerve.api.nodelabels import TaintMatch
from toposerve.api.spec import LLMDeploymentSpec
from toposerve.planner.inventory import interruption, inventory_from_nodes, is_spot
from toposerve.planner.plan import plan_deployment, planned_cost
from toposerve.render.objects import LABEL_CAPACITY, render_deployment

L8 = "meta-llama/Llama-3.1-8B-Instruct"
H100 = DEFAULT_CATALOG.get("H100")


def spec(spot: dict[str, Any], replicas: int = 4, tier: str = "throughput") -> LLMDeploymentSpec:
    return make_spec(L8, 8192, ["H100"], replicas=replicas, placement={"spot": spot, "tier": tier})


def test_spot_is_an_object_and_a_bare_boolean_is_refused_naming_the_field() -> None:
    s = make_spec(L8, 8192, ["H100"])
    assert (s.placement.spot.enabled, s.placement.spot.on_demand_baseline) == (False, 0)
    with pytest.raises(ValidationError, match=r"placement\.spot"):
        make_spec(L8, 8192, ["H100"], placement={"spot": True})
    # and says what to write instead
    with pytest.raises(ValidationError, match=r"write spot: \{enabled: true\}"):
        make_spec(L8, 8192, ["H100"], placement={"spot": True})
    with pytest.raises(ValidationError, match="onDemandBaseline"):
        spec({"enabled": True, "onDemandBaseline": -1})


def test_the_operator_limits_spot_to_its_spot_tiers() -> None:
    cfg = OperatorConfig.model_validate({"spotTiers": ["batch", "throughput"]})
    (lat,) = plan_deployment("d", spec({"enabled": True}, tier="latency-critical"), cfg).pools
    assert not lat.spot and lat.spot_note and "latency-critical runs on on-demand" in lat.spot_note
    (thr,) = plan_deployment("d", spec({"enabled": True}), cfg).pools
    assert thr.spot and thr.spot_note is None
    assert thr.cost_per_hour_per_replica == pytest.approx(H100.spot_hourly_price * thr.gpus_per_replica)


def test_planned_cost_prices_the_baseline_on_demand() -> None:
    (p,) = plan_deployment("d", spec({"enabled": True, "onDemandBaseline": 1}, replicas=4)).pools
    g = p.gpus_per_replica
    assert p.on_demand_baseline == 1
    assert p.cost_per_hour == pytest.approx(g * (H100.hourly_price + 3 * H100.spot_hourly_price))
    assert planned_cost(p, 0) == 0 and planned_cost(p, 1) == pytest.approx(g * H100.hourly_price)
    (no_spot,) = plan_deployment("d", spec({"enabled": False, "onDemandBaseline": 2})).pools
    assert no_spot.on_demand_baseline == 0  # a baseline without spot means nothing


def workloads(objs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        o["metadata"]["name"]: o
        for o in objs
        if o["kind"] == "Deployment" and "router" not in o["metadata"]["name"]
    }


def _pod(d: dict[str, Any]) -> dict[str, Any]:
    return dict(d["spec"]["template"]["spec"])


def _spot_keys(pod: dict[str, Any]) -> set[str]:
    return {t["key"] for t in pod["tolerations"] if t.get("value") in ("spot", "true")}


def test_the_baseline_gets_its_own_on_demand_workload() -> None:
    s = spec({"enabled": True, "onDemandBaseline": 1}, replicas=4)
    objs = render_deployment("d", "ns", s, plan_deployment("d", s))
    ws = workloads(objs)
    main, od = ws["d-default-h100"], ws["d-default-h100-od"]
    assert (main["spec"]["replicas"], od["spec"]["replicas"]) == (3, 1)
    # spot part: tolerates spot taints, no NotIn-spot constraint
    assert _spot_keys(_pod(main)) and "gke-spot" not in str(_pod(main)["affinity"])
    # on-demand part: no spot toleration, every term forbids spot labels, own selector label
    assert not _spot_keys(_pod(od))
    for term in _pod(od)["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]:
        assert {"key": "karpenter.sh/capacity-type", "operator": "NotIn", "values": ["spot"]} in term[
            "matchExpressions"
        ]
    assert od["spec"]["selector"]["matchLabels"][LABEL_CAPACITY] == "on-demand"
    assert od["spec"]["template"]["metadata"]["labels"][LABEL_CAPACITY] == "on-demand"
    assert LABEL_CAPACITY not in main["spec"]["selector"]["matchLabels"]  # unchanged: selectors are immutable
    # one budget and one Service per pool cover both workloads
    (pdb,) = [
        o
        for o in objs
        if o["kind"] == "PodDisruptionBudget" and o["metadata"]["name"] == main["metadata"]["name"]
    ]
    # counts the pool's replicas in both workloads (Surge: none evicted without a replacement)
    assert pdb["spec"]["minAvailable"] == main["spec"]["replicas"] + od["spec"]["replicas"]
    for o in (main, od):
        kubernetes_validate.validate(o, "1.35", strict=True)


def test_a_baseline_above_the_replicas_keeps_every_replica_on_demand() -> None:
    s = spec({"enabled": True, "onDemandBaseline": 5}, replicas=2)
    ws = workloads(render_deployment("d", "ns", s, plan_deployment("d", s)))
    assert (ws["d-default-h100"]["spec"]["replicas"], ws["d-default-h100-od"]["spec"]["replicas"]) == (0, 2)
    s = spec({"enabled": True}, replicas=2)
    assert list(workloads(render_deployment("d", "ns", s, plan_deployment("d", s)))) == ["d-default-h100"]


def test_providers_spot_labels_including_gke_provisioning() -> None:
    assert is_spot({"cloud.google.com/gke-provisioning": "spot"})
    assert not is_spot({"cloud.google.com/gke-provisioning": "standard"})
    assert is_spot({"karpenter.sh/capacity-type": "spot"}) and is_spot(
        {"eks.amazonaws.com/capacityType": "SPOT"}
    )
    assert is_spot({"kubernetes.azure.com/scalesetpriority": "spot"})


def _node(name: str, taints: list[dict[str, str]]) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3", "nvidia.com/gpu.count": "8"}},
            "spec": {"taints": taints}, "status": {"allocatable": {"nvidia.com/gpu": "8"}}}  # fmt: skip


@pytest.mark.parametrize(
    "taint",
    [
        {"key": "aws-node-termination-handler/spot-itn", "value": "1700000000", "effect": "NoSchedule"},
        {"key": "cloud.google.com/impending-node-termination", "effect": "NoSchedule"},
        {"key": "karpenter.sh/disruption", "value": "disrupting", "effect": "NoSchedule"},
        # Even as PreferNoSchedule (NTH's taintEffect is configurable), a terminating node offers nothing.
        {"key": "aws-node-termination-handler/rebalance-recommendation", "effect": "PreferNoSchedule"},
    ],
)
def test_interruption_taints_take_a_nodes_capacity_away(taint: dict[str, str]) -> None:
    assert interruption([taint]) == taint["key"]
    inv = inventory_from_nodes([_node("ok", []), _node("going", [taint])], DEFAULT_CATALOG)
    by = {n.name: n for n in inv.nodes}
    assert by["going"].interrupted and by["going"].free_gpus == 0
    assert not by["ok"].interrupted and by["ok"].free_gpus == 8


def test_interruption_taints_are_configurable() -> None:
    cfg = OperatorConfig.model_validate(
        {"labelSchemes": {"interruptionTaints": [{"key": "example.com/draining"}]}}
    )
    schemes = cfg.label_schemes
    assert (
        interruption([{"key": "example.com/draining", "effect": "NoExecute"}], schemes)
        == "example.com/draining"
    )
    assert interruption([{"key": "cloud.google.com/impending-node-termination"}], schemes) is None
    assert TaintMatch(key="k", value="v").matches({"key": "k", "value": "v", "effect": "NoSchedule"})
    assert not TaintMatch(key="k", value="v").matches({"key": "k", "value": "w"})


def test_status_says_when_spot_was_not_allowed() -> None:
    from toposerve.controller.reconcile import _notices

    cfg = OperatorConfig.model_validate({"spotTiers": ["batch"]})
    s = spec({"enabled": True}, tier="latency-critical")
    notices = dict(_notices(s, plan_deployment("d", s, cfg)))  # a gated model adds HFTokenMissing
    assert notices["SpotNotAllowed"].startswith("pool default: spot requested")
    batch = spec({"enabled": True}, tier="batch")
    assert "SpotNotAllowed" not in dict(_notices(batch, plan_deployment("d", batch, cfg)))
