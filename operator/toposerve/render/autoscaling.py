"""spec.autoscaling -> the HorizontalPodAutoscaler (hpa mode) or KEDA ScaledObject (keda mode).

Both target the LLMDeployment's scale subresource, so whichever mode is on, the one writer of
spec.replicas goes through the same door, and the reconcile's children are resized from there.
The builtin mode renders nothing: the operator's own loop is the writer. Pure, like the rest of
render/; the unit suite validates the output against Kubernetes' and KEDA's real schemas.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

from toposerve import API_GROUP, API_VERSION
from toposerve.api.config import OperatorConfig
from toposerve.api.spec import WEEKDAYS, LLMDeploymentSpec, ScalingRules, ScheduleWindow
from toposerve.autoscale import promql
from toposerve.render.objects import _LOADER, Owner, _fill, _render_text, common_labels

HPA_KIND = ("autoscaling/v2", "HorizontalPodAutoscaler")
SCALED_OBJECT_KIND = ("keda.sh/v1alpha1", "ScaledObject")
LABEL_COMPONENT_VALUE = "autoscaler"
DEFAULT_TOLERANCE = 0.1  # kube-controller-manager's --horizontal-pod-autoscaler-tolerance


@dataclass
class _Ctx:
    object_name: str
    namespace: str
    labels: dict[str, str]
    owner_refs: list[dict[str, Any]]
    target: dict[str, str]
    min_replicas: int
    max_replicas: int
    behavior: dict[str, Any]
    metrics: list[dict[str, Any]] = field(default_factory=list)
    triggers: list[dict[str, Any]] = field(default_factory=list)
    polling_interval: int = 15
    cooldown: int = 300
    hpa_name: str = ""


def autoscaler_name(name: str) -> str:
    return name  # one autoscaler per LLMDeployment; the kind tells them apart


def quantity(x: float) -> str:
    """A Kubernetes quantity for a decimal: 0.7 -> 700m, 4.0 -> 4 (exact to the milli-unit)."""
    milli = round(x * 1000)
    return str(milli // 1000) if milli % 1000 == 0 else f"{milli}m"


def _decimal(x: float) -> str:
    return f"{x:g}"


def _rules(r: ScalingRules, tolerance: float) -> dict[str, Any]:
    out: dict[str, Any] = {
        "stabilizationWindowSeconds": r.stabilization_window_seconds,
        "selectPolicy": r.select_policy,
    }
    if r.policies:  # none: Kubernetes' defaults, the same the builtin decision uses
        out["policies"] = [
            {"type": p.type, "value": p.value, "periodSeconds": p.period_seconds} for p in r.policies
        ]
    if abs(tolerance - DEFAULT_TOLERANCE) > 1e-9:  # beta HPAConfigurableTolerance: only when asked
        out["tolerance"] = quantity(tolerance)
    return out


def behavior(spec: LLMDeploymentSpec) -> dict[str, Any]:
    a = spec.autoscaling
    return {"scaleUp": _rules(a.scale_up, a.tolerance), "scaleDown": _rules(a.scale_down, a.tolerance)}


def _target(name: str) -> dict[str, str]:
    return {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": "LLMDeployment", "name": name}


def _cron_days(days: list[str], shift: int) -> str:
    """Cron day-of-week numbers (Sun=0) of ``days``, shifted by ``shift`` days."""
    nums = sorted({(WEEKDAYS.index(d) + 1 + shift) % 7 for d in days})
    return ",".join(str(n) for n in nums)


def cron_trigger(w: ScheduleWindow) -> dict[str, Any]:
    """A KEDA cron trigger for a schedule window (an overnight window ends on the next days)."""
    sh, sm = w.start.split(":")
    eh, em = w.end.split(":")
    overnight = w.end <= w.start
    return {
        "type": "cron",
        "name": f"schedule-{w.name}",
        "metadata": {
            "timezone": w.time_zone,
            "start": f"{int(sm)} {int(sh)} * * {_cron_days(list(w.days), 0)}",
            "end": f"{int(em)} {int(eh)} * * {_cron_days(list(w.days), 1 if overnight else 0)}",
            "desiredReplicas": str(w.min_replicas),
        },
    }


def render_hpa(
    name: str, namespace: str, spec: LLMDeploymentSpec, config: OperatorConfig, owner: Owner | None = None
) -> dict[str, Any]:
    a = spec.autoscaling
    metrics = [
        {"type": "Pods", "pods": {"metric": {"name": config.hpa_kv_cache_metric},
                                  "target": {"type": "AverageValue",
                                             "averageValue": quantity(a.target_kv_cache_utilization)}}},
        {"type": "Pods", "pods": {"metric": {"name": config.hpa_waiting_metric},
                                  "target": {"type": "AverageValue",
                                             "averageValue": quantity(a.target_waiting_requests)}}},
    ]  # fmt: skip
    ctx = _Ctx(
        object_name=autoscaler_name(name),
        namespace=namespace,
        labels={**common_labels(name), "app.kubernetes.io/component": LABEL_COMPONENT_VALUE},
        owner_refs=[owner.reference()] if owner else [],
        target=_target(name),
        min_replicas=max(1, a.min_replicas),
        max_replicas=a.max_replicas,
        behavior=behavior(spec),
        metrics=metrics,
    )
    return _load("hpa.yaml.j2", ctx)


def render_scaled_object(
    name: str, namespace: str, spec: LLMDeploymentSpec, config: OperatorConfig, owner: Owner | None = None
) -> dict[str, Any]:
    a = spec.autoscaling
    if not config.prometheus_url:
        raise ValueError("keda mode needs the operator config's prometheusUrl")
    sel = promql.selector(config.prometheus_selector, namespace, name)
    window = a.metrics_window_seconds

    router_sel = promql.selector(config.prometheus_router_selector, namespace, name)

    def prometheus(
        trigger: str, query: str, threshold: float, metric_type: str = "AverageValue"
    ) -> dict[str, Any]:
        return {
            "type": "prometheus",
            "name": trigger,
            "metricType": metric_type,
            "metadata": {
                "serverAddress": config.prometheus_url,
                "query": query,
                "threshold": _decimal(threshold),
                # Active (0 -> 1, and kept above zero) while the value is above this.
                "activationThreshold": "0",
            },
        }

    triggers = [
        prometheus("kv-cache", promql.total(promql.KV, sel, window), a.target_kv_cache_utilization),
        # Held requests count as waiting: at zero replicas they are the only signal there is.
        prometheus(
            "waiting-requests", promql.waiting_or_held(sel, router_sel, window), a.target_waiting_requests
        ),
        *(cron_trigger(w) for w in a.schedules),
    ]
    if a.ttft_slo is not None:
        # One quantile for the whole deployment, so metricType Value: the HPA underneath computes
        # ceil(replicas x TTFT / SLO), the builtin decision's TTFT proposal.
        q = promql.ttft_trigger(sel, a.ttft_slo.quantile, window)
        triggers.insert(2, prometheus("ttft", q, a.ttft_slo.seconds, metric_type="Value"))
    ctx = _Ctx(
        object_name=autoscaler_name(name),
        namespace=namespace,
        labels={**common_labels(name), "app.kubernetes.io/component": LABEL_COMPONENT_VALUE},
        owner_refs=[owner.reference()] if owner else [],
        target=_target(name),
        min_replicas=a.min_replicas,
        max_replicas=a.max_replicas,
        behavior=behavior(spec),
        triggers=triggers,
        polling_interval=a.sync_period_seconds,
        cooldown=a.scale_down.stabilization_window_seconds,
        hpa_name=f"keda-hpa-{name}",
    )
    return _load("scaledobject.yaml.j2", ctx)


def _load(template: str, ctx: _Ctx) -> dict[str, Any]:
    text, slots = _render_text(template, ctx)  # the same path as every other child (values slotted in)
    obj = _fill(yaml.load(text, Loader=_LOADER), slots)
    assert isinstance(obj, dict)
    return obj


def render_autoscaler(
    name: str, namespace: str, spec: LLMDeploymentSpec, config: OperatorConfig, owner: Owner | None = None
) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """(children, notices): the HPA or ScaledObject the mode asks for, and what stops one."""
    mode = spec.autoscaling.effective_mode
    if mode == "hpa":
        return [render_hpa(name, namespace, spec, config, owner)], []
    if mode == "keda":
        if not config.prometheus_url:
            why = "autoscaling.mode keda needs the operator config's prometheusUrl; no ScaledObject rendered"
            return [], [("PrometheusRequired", why)]
        return [render_scaled_object(name, namespace, spec, config, owner)], []
    return [], []
