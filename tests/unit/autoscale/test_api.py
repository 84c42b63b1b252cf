"""spec.autoscaling: modes, schedules and the errors bad input gets (naming the field)."""

from __future__ import annotations

from typing import Any

import pytest

from toposerve.api.crd import crd
from toposerve.api.errors import SpecError
from toposerve.api.manifest import parse_spec
from toposerve.api.spec import AUTOSCALING_RULES, BURST_HEADROOM_MESSAGE, AutoscalingSpec

M = {"name": "Qwen/Qwen2.5-0.5B-Instruct"}


def spec(**auto: Any) -> dict[str, Any]:
    return {"model": M, "autoscaling": auto}


@pytest.mark.parametrize(
    ("auto", "mode"),
    [
        ({}, "off"),
        ({"enabled": True}, "builtin"),
        ({"enabled": True, "mode": "keda"}, "keda"),
        ({"enabled": True, "mode": "hpa"}, "hpa"),
        ({"enabled": True, "mode": "off"}, "off"),
        ({"mode": "off"}, "off"),
    ],
)
def test_effective_mode(auto: dict[str, Any], mode: str) -> None:
    assert parse_spec(spec(**auto)).autoscaling.effective_mode == mode


BAD = [
    ({"mode": "hpa"}, "spec.autoscaling.mode", "mode builtin, hpa or keda needs enabled: true"),
    ({"enabled": True, "minReplicas": 5, "maxReplicas": 4}, "spec.autoscaling.minReplicas",
     "minReplicas must be <= maxReplicas"),
    ({"enabled": True, "mode": "vpa"}, "spec.autoscaling.mode", "Input should be 'builtin', 'hpa', 'keda' or 'off'"),
    ({"enabled": True, "tolerance": 1.0}, "spec.autoscaling.tolerance", "less than 1"),
    ({"enabled": True, "targetWaitingRequests": 0}, "spec.autoscaling.targetWaitingRequests", "greater than 0"),
    ({"enabled": True, "maxReplicas": 3, "schedules": [{"name": "a", "start": "08:00", "end": "18:00", "minReplicas": 5}]},
     "spec.autoscaling.schedules", "a schedule's minReplicas must be <= maxReplicas"),
    ({"enabled": True, "mode": "hpa", "schedules": [{"name": "a", "start": "08:00", "end": "18:00", "minReplicas": 1}]},
     "spec.autoscaling.schedules", "schedules need mode builtin or keda (an HPA has no schedules)"),
    ({"enabled": True, "mode": "hpa", "minReplicas": 0}, "spec.autoscaling.minReplicas",
     "mode hpa needs minReplicas >= 1 (an HPA does not scale to zero; keda does)"),
    ({"enabled": True, "mode": "keda", "forecast": {"enabled": True}}, "spec.autoscaling.forecast", "forecast needs mode builtin"),
    ({"enabled": True, "forecast": {"period": "hourly"}}, "spec.autoscaling.forecast.period", "Input should be"),
    ({"enabled": True, "mode": "keda", "warmStandby": 1}, "spec.autoscaling.warmStandby",
     "warmStandby needs mode builtin (an HPA or KEDA cannot promote a standby)"),
    ({"enabled": True, "mode": "hpa", "warmStandbyPercent": 25}, "spec.autoscaling.warmStandbyPercent",
     "warmStandbyPercent needs mode builtin (an HPA or KEDA cannot promote a standby)"),
    ({"enabled": True, "warmStandbyPercent": 101}, "spec.autoscaling.warmStandbyPercent", "less than or equal to 100"),
    ({"enabled": True, "schedules": [{"name": "a", "start": "8:00", "end": "18:00", "minReplicas": 1}]},
     "spec.autoscaling.schedules[0].start", "should match pattern"),
    ({"enabled": True, "schedules": [{"name": "a", "start": "08:00", "end": "24:00", "minReplicas": 1}]},
     "spec.autoscaling.schedules[0].end", "should match pattern"),
    ({"enabled": True, "schedules": [{"name": "a", "start": "08:00", "end": "08:00", "minReplicas": 1}]},
     "spec.autoscaling.schedules[0].end", "start and end must differ"),
    ({"enabled": True, "schedules": [{"name": "a", "start": "08:00", "end": "18:00", "minReplicas": 1,
                                      "timeZone": "Mars/Olympus"}]},
     "spec.autoscaling.schedules[0].timeZone", "unknown time zone 'Mars/Olympus'"),
    ({"enabled": True, "schedules": [{"name": "a", "start": "08:00", "end": "18:00", "minReplicas": 1,
                                      "days": ["Monday"]}]},
     "spec.autoscaling.schedules[0].days[0]", "Input should be 'Mon'"),
    ({"enabled": True, "schedules": [{"name": "a", "start": "08:00", "end": "18:00", "minReplicas": 1},
                                     {"name": "a", "start": "19:00", "end": "20:00", "minReplicas": 1}]},
     "spec.autoscaling.schedules", "schedule names must be unique"),
    ({"enabled": True, "scaleUp": {"selectPolicy": "Sometimes"}}, "spec.autoscaling.scaleUp.selectPolicy",
     "Input should be 'Max', 'Min' or 'Disabled'"),
    ({"enabled": True, "mode": "hpa", "ttftSLO": {"seconds": 1}}, "spec.autoscaling.ttftSLO",
     "ttftSLO needs mode builtin or keda: an HPA would read it as an External metric, which needs a metrics "
     "adapter that serves a histogram quantile"),
    ({"enabled": True, "ttftSLO": {"seconds": 0}}, "spec.autoscaling.ttftSLO.seconds", "greater than 0"),
    ({"enabled": True, "mode": "hpa", "burstHeadroom": 1}, "spec.autoscaling.burstHeadroom", BURST_HEADROOM_MESSAGE),
    ({"enabled": True, "mode": "hpa", "leadingSignal": True}, "spec.autoscaling.leadingSignal",
     "leadingSignal needs mode builtin (only the operator's loop reads the routers)"),
    ({"enabled": True, "mode": "keda", "burstHeadroom": 0.5}, "spec.autoscaling.burstHeadroom",
     "burstHeadroom needs mode builtin"),
    ({"enabled": True, "burstHeadroom": -0.5}, "spec.autoscaling.burstHeadroom", "greater than or equal to 0"),
    ({"enabled": True, "burstHeadroom": 11}, "spec.autoscaling.burstHeadroom", "less than or equal to 10"),
    ({"enabled": True, "ttftSLO": {"seconds": 1, "quantile": 1}}, "spec.autoscaling.ttftSLO.quantile",
     "less than 1"),
    ({"enabled": True, "ttftSLO": {"quantile": 0.9}}, "spec.autoscaling.ttftSLO.seconds", "Field required"),
    ({"enabled": True, "ttftSLO": {"seconds": 1, "p": 99}}, "spec.autoscaling.ttftSLO.p", "Extra inputs"),
]  # fmt: skip


def test_burst_headroom_is_builtin_only_and_zero_is_fine_everywhere() -> None:
    assert parse_spec(spec(enabled=True, burstHeadroom=1.5)).autoscaling.burst_headroom == 1.5
    for mode in ("builtin", "hpa", "keda"):
        assert parse_spec(spec(enabled=True, mode=mode, burstHeadroom=0)).autoscaling.burst_headroom == 0


def test_ttft_slo_defaults_to_p95_and_is_fine_in_builtin_and_keda_modes() -> None:
    for mode in ("builtin", "keda"):
        slo = parse_spec(spec(enabled=True, mode=mode, ttftSLO={"seconds": 2})).autoscaling.ttft_slo
        assert slo is not None and (slo.seconds, slo.quantile) == (2.0, 0.95)


@pytest.mark.parametrize(("auto", "field", "message"), BAD, ids=[b[2] for b in BAD])
def test_bad_input_names_the_field(auto: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(SpecError) as e:
        parse_spec(spec(**auto))
    assert e.value.field == field
    assert message in e.value.message


def test_each_cross_field_rule_is_named_where_the_api_servers_cel_names_it() -> None:
    """The CLI and the operator name the field the API server's CEL rule names (its fieldPath), with
    its message: one table (AUTOSCALING_RULES) feeds both, and each rule has a case above."""
    auto = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"][
        "autoscaling"
    ]
    cel = {(r["message"], r["fieldPath"]) for r in auto["x-kubernetes-validations"]}
    assert cel == {(r.message, f".{r.field}") for r in AUTOSCALING_RULES}
    covered = {(message, field) for _, field, message in BAD}
    for message, path in cel:
        assert (message, f"spec.autoscaling{path}") in covered, (message, path)


def test_the_crd_carries_the_same_rules_for_the_api_server() -> None:
    auto = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"][
        "autoscaling"
    ]
    messages = {r["message"] for r in auto["x-kubernetes-validations"]}
    assert {
        "minReplicas must be <= maxReplicas",
        "mode builtin, hpa or keda needs enabled: true",
        "a schedule's minReplicas must be <= maxReplicas",
        "schedules need mode builtin or keda (an HPA has no schedules)",
        "warmStandby needs mode builtin (an HPA or KEDA cannot promote a standby)",
        "warmStandbyPercent needs mode builtin (an HPA or KEDA cannot promote a standby)",
        "mode hpa needs minReplicas >= 1 (an HPA does not scale to zero; keda does)",
        BURST_HEADROOM_MESSAGE,
        "ttftSLO needs mode builtin or keda: an HPA would read it as an External metric, which needs a "
        "metrics adapter that serves a histogram quantile",
    } <= messages
    props = auto["properties"]
    assert props["mode"]["enum"] == ["builtin", "hpa", "keda", "off"]
    window = props["schedules"]["items"]
    assert window["properties"]["start"]["pattern"] and window["x-kubernetes-validations"]
    assert props["schedules"]["x-kubernetes-list-map-keys"] == ["name"]


@pytest.mark.parametrize(
    ("count", "percent", "replicas", "standby"),
    [
        (0, 0, 8, 0),  # off
        (1, 0, 8, 1),  # a fixed count, whatever the load
        (0, 25, 3, 0),  # one per 4 serving replicas: none below 4 (night)
        (0, 25, 4, 1),
        (0, 25, 12, 3),
        (1, 25, 2, 1),  # warmStandby is the least there are
        (1, 25, 9, 2),
        (0, 100, 5, 5),
        (2, 50, 0, 2),  # at zero: the count
    ],
)
def test_standby_for_follows_the_load_with_warm_standby_as_the_least(
    count: int, percent: int, replicas: int, standby: int
) -> None:
    a = AutoscalingSpec.model_validate({"enabled": True, "warmStandby": count, "warmStandbyPercent": percent})
    assert a.standby_for(replicas) == standby
