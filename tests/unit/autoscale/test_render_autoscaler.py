"""hpa and keda modes render objects that the real schemas accept (Kubernetes v1.35.4's
autoscaling/v2 OpenAPI, KEDA v2.21.0's ScaledObject CRD: vendored under tests/unit/schemas by
hack/vendor_autoscaler_schemas.py), strictly: an unknown field is an error here, where the API
server would silently prune it."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from toposerve.api.config import OperatorConfig
from toposerve.api.manifest import parse_spec
from toposerve.render.autoscaling import cron_trigger, quantity, render_autoscaler
from toposerve.render.objects import Owner

SCHEMAS = Path(__file__).resolve().parents[1] / "schemas"
HPA_SCHEMA = "io.k8s.api.autoscaling.v2.HorizontalPodAutoscaler"
PROM = OperatorConfig(prometheus_url="http://prometheus.monitoring:9090")
OWNER = Owner(name="llm", uid="0000-1111")


def strict(node: Any) -> Any:
    """Objects with declared properties accept nothing else (kubectl --validate=strict)."""
    if isinstance(node, dict):
        out = {k: strict(v) for k, v in node.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(node, list):
        return [strict(v) for v in node]
    return node


def hpa_validator() -> jsonschema.Draft202012Validator:
    doc = json.loads((SCHEMAS / "autoscaling-v2-hpa.openapi.json").read_text())
    schema = {"$ref": f"#/components/schemas/{HPA_SCHEMA}", "components": strict(doc["components"])}
    return jsonschema.Draft202012Validator(schema)


def keda_validator() -> jsonschema.Draft202012Validator:
    crd = yaml.safe_load((SCHEMAS / "keda-v2.21.0-scaledobjects.yaml").read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    return jsonschema.Draft202012Validator(strict(version["schema"]["openAPIV3Schema"]))


def errors(v: jsonschema.Draft202012Validator, obj: dict[str, Any]) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in v.iter_errors(obj)]


SEED = {
    "model": {"name": "Qwen/Qwen2.5-0.5B-Instruct"},
    "autoscaling": {
        "enabled": True,
        "minReplicas": 2,
        "maxReplicas": 16,
        "targetKVCacheUtilization": 0.70,
        "scaleUp": {
            "stabilizationWindowSeconds": 60,
            "policies": [{"type": "Pods", "value": 2, "periodSeconds": 120}],
        },
        "scaleDown": {
            "stabilizationWindowSeconds": 300,
            "policies": [{"type": "Pods", "value": 1, "periodSeconds": 300}],
        },
    },
}


def with_auto(**kw: Any) -> dict[str, Any]:
    s = copy.deepcopy(SEED)
    s["autoscaling"].update(kw)
    return s


def render(
    raw: dict[str, Any], config: OperatorConfig = PROM
) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    return render_autoscaler("llm", "team-a", parse_spec(raw), config, OWNER)


def test_hpa_mode_renders_the_seed_lessons_hpa_against_the_real_schema() -> None:
    (hpa,), notices = render(with_auto(mode="hpa"))
    assert notices == []
    assert errors(hpa_validator(), hpa) == []
    assert hpa["apiVersion"] == "autoscaling/v2" and hpa["kind"] == "HorizontalPodAutoscaler"
    spec = hpa["spec"]
    assert spec["scaleTargetRef"] == {
        "apiVersion": "toposerve.io/v1alpha1",
        "kind": "LLMDeployment",
        "name": "llm",
    }
    assert (spec["minReplicas"], spec["maxReplicas"]) == (2, 16)
    kv = spec["metrics"][0]["pods"]
    assert kv == {
        "metric": {"name": "vllm_kv_cache_usage_perc"},
        "target": {"type": "AverageValue", "averageValue": "700m"},
    }
    assert spec["behavior"] == {
        "scaleUp": {"stabilizationWindowSeconds": 60, "selectPolicy": "Max",
                    "policies": [{"type": "Pods", "value": 2, "periodSeconds": 120}]},
        "scaleDown": {"stabilizationWindowSeconds": 300, "selectPolicy": "Max",
                      "policies": [{"type": "Pods", "value": 1, "periodSeconds": 300}]},
    }  # fmt: skip
    assert hpa["metadata"]["ownerReferences"][0]["uid"] == "0000-1111"


def test_hpa_variants_validate() -> None:
    v = hpa_validator()
    for raw in (
        with_auto(mode="hpa", scaleUp={"selectPolicy": "Disabled"}, tolerance=0.05),
        with_auto(mode="hpa", scaleDown={"policies": [], "stabilizationWindowSeconds": 0}),
    ):
        (hpa,), _ = render(raw)
        assert errors(v, hpa) == []
    (hpa,), _ = render(with_auto(mode="hpa", tolerance=0.05))
    assert hpa["spec"]["behavior"]["scaleUp"]["tolerance"] == "50m"
    (hpa,), _ = render(with_auto(mode="hpa", scaleDown={"policies": []}))
    assert "policies" not in hpa["spec"]["behavior"]["scaleDown"]  # Kubernetes' defaults


def test_the_validators_can_fail() -> None:
    (hpa,), _ = render(with_auto(mode="hpa"))
    bad = copy.deepcopy(hpa)
    bad["spec"]["behavior"]["scaleUp"]["stabilisationWindowSeconds"] = 60
    bad["spec"]["maxReplicas"] = "16"
    assert len(errors(hpa_validator(), bad)) == 2
    (so,), _ = render(with_auto(mode="keda"))
    bad = copy.deepcopy(so)
    del bad["spec"]["triggers"][0]["metadata"]
    bad["spec"]["pollingInterval"] = "15s"
    assert len(errors(keda_validator(), bad)) == 2


def test_keda_mode_renders_a_scaled_object_against_the_real_crd() -> None:
    raw = with_auto(
        mode="keda",
        minReplicas=0,
        metricsWindowSeconds=30,
        schedules=[
            {"name": "office", "days": ["Mon", "Tue", "Wed", "Thu", "Fri"], "start": "08:45", "end": "18:00",
             "timeZone": "Europe/Paris", "minReplicas": 4},
            {"name": "night", "days": ["Sat", "Sun"], "start": "22:30", "end": "06:00", "minReplicas": 1},
        ],
    )  # fmt: skip
    (so,), notices = render(raw)
    assert notices == []
    assert errors(keda_validator(), so) == []
    spec = so["spec"]
    assert spec["scaleTargetRef"] == {
        "apiVersion": "toposerve.io/v1alpha1",
        "kind": "LLMDeployment",
        "name": "llm",
    }
    assert (spec["minReplicaCount"], spec["maxReplicaCount"], spec["pollingInterval"]) == (0, 16, 15)
    kv, waiting, office, night = spec["triggers"]
    sel = 'namespace="team-a",toposerve_io_deployment="llm",app_kubernetes_io_component="engine"'
    assert kv["metadata"] == {
        "serverAddress": "http://prometheus.monitoring:9090",
        # per pod first: a pod's engine series (data parallelism) are averaged, not added
        "query": f"sum(avg by (pod) (avg_over_time(vllm:kv_cache_usage_perc{{{sel}}}[30s]))) or vector(0)",
        "threshold": "0.7",
        "activationThreshold": "0",
    }
    assert kv["metricType"] == "AverageValue" and waiting["metadata"]["threshold"] == "4"
    assert office["metadata"] == {"timezone": "Europe/Paris", "start": "45 8 * * 1,2,3,4,5",
                                  "end": "0 18 * * 1,2,3,4,5", "desiredReplicas": "4"}  # fmt: skip
    assert night["metadata"]["start"] == "30 22 * * 0,6"
    assert night["metadata"]["end"] == "0 6 * * 0,1"  # Sat night ends Sun, Sun night ends Mon
    assert (
        spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"][
            "stabilizationWindowSeconds"
        ]
        == 300
    )


def test_keda_without_prometheus_is_refused_with_a_notice() -> None:
    objs, notices = render(with_auto(mode="keda"), OperatorConfig())
    assert objs == [] and notices[0][0] == "PrometheusRequired"
    assert "prometheusUrl" in notices[0][1]


@pytest.mark.parametrize("mode", ["builtin", "off", None])
def test_other_modes_render_nothing(mode: str | None) -> None:
    raw = with_auto(mode=mode) if mode else {"model": SEED["model"]}
    assert render(raw) == ([], [])


def test_quantities_and_cron() -> None:
    assert [quantity(x) for x in (0.7, 4.0, 0.05, 1.0, 12.5)] == ["700m", "4", "50m", "1", "12500m"]
    w = parse_spec(with_auto(schedules=[{"name": "w", "start": "23:00", "end": "01:00", "minReplicas": 1}]))
    assert cron_trigger(w.autoscaling.schedules[0])["metadata"]["end"] == "0 1 * * 0,1,2,3,4,5,6"


def test_router_holds_requests_when_the_deployment_may_scale_from_zero() -> None:
    from toposerve.render.objects import router_args

    def args(**auto: Any) -> list[str]:
        return router_args("llm", parse_spec(with_auto(**auto)))

    a = args(minReplicas=0)
    assert a[a.index("--hold-at-zero") + 1] == "300"  # min(startupGraceSeconds 600, 300)
    a = args(minReplicas=0, mode="keda", startupGraceSeconds=90)
    assert a[a.index("--hold-at-zero") + 1] == "90"
    assert "--hold-at-zero" not in args(minReplicas=1)
    assert "--hold-at-zero" not in args(minReplicas=0, enabled=False)
    (so,), _ = render(with_auto(mode="keda", minReplicas=0))
    waiting = so["spec"]["triggers"][1]["metadata"]["query"]
    assert "toposerve_router_held_requests{" in waiting and 'app_kubernetes_io_component="router"' in waiting


def test_keda_mode_adds_a_ttft_trigger_of_metric_type_value() -> None:
    raw = with_auto(mode="keda", metricsWindowSeconds=30, ttftSLO={"seconds": 1.5, "quantile": 0.9})
    (so,), _ = render(raw)
    assert errors(keda_validator(), so) == []
    kv, waiting, ttft = so["spec"]["triggers"]
    sel = 'namespace="team-a",toposerve_io_deployment="llm",app_kubernetes_io_component="engine"'
    assert ttft["name"] == "ttft" and ttft["metricType"] == "Value"
    assert ttft["metadata"] == {
        "serverAddress": "http://prometheus.monitoring:9090",
        "query": f"(histogram_quantile(0.9, sum by (le) (rate(vllm:time_to_first_token_seconds_bucket{{{sel}}}"
        "[30s]))) >= 0) or vector(0)",
        "threshold": "1.5",
        "activationThreshold": "0",
    }
    assert kv["metricType"] == waiting["metricType"] == "AverageValue"
    # without an SLO, no TTFT trigger
    (plain,), _ = render(with_auto(mode="keda"))
    assert [t["name"] for t in plain["spec"]["triggers"]] == ["kv-cache", "waiting-requests"]
