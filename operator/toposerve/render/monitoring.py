"""PodMonitors (Prometheus Operator, ``monitoring.coreos.com/v1``) for an LLMDeployment's engines
and router.

Without them a Prometheus Operator's Prometheus scrapes nothing of ours: it ignores the
``prometheus.io/*`` pod annotations the pods carry for annotation-driven setups. So where the
cluster serves the PodMonitor kind (operator config ``prometheusOperator: auto``, the default,
asks API discovery; ``on`` renders them regardless, ``off`` never), each LLMDeployment gets
``<name>-engine`` (its engine pods, port ``http`` 8000, ``/metrics``) and, with routing on,
``<name>-router`` (its router pods, port ``http`` 8080).

Why PodMonitors and not ServiceMonitors (which vLLM's production-stack ships): the engines sit
behind two Services each (the deployment-wide ``<name>-engine`` and their pool's
``<workload>-http``), so a ServiceMonitor would have to pick one of them by a label that exists
for no other reason, or scrape every engine twice. A pod that leaves rotation leaves both Services
(a draining pod relabelled ``app.kubernetes.io/component: draining``, a warm standby ``standby``)
while its engine still runs requests and counts tokens: a PodMonitor keeps scraping it, and the
``app_kubernetes_io_component`` label on its series tells it apart. And one kind for engines and
router means one CRD to detect and one RBAC rule. The pods' labels are copied onto the targets
(``podTargetLabels``) under the names the operator's default ``prometheusSelector`` expects
(``toposerve_io_deployment``, ``app_kubernetes_io_component``; ``namespace`` is the PodMonitor's
own), so the builtin autoscaler, keda mode and observed cost read these series unchanged.

Pure, like the rest of render/; the unit suite validates the output against the Prometheus
Operator's real CRD schema (tests/unit/schemas, vendored by hack/vendor_monitoring_schemas.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import yaml

from toposerve.api.config import OperatorConfig
from toposerve.api.spec import LLMDeploymentSpec
from toposerve.render.objects import (
    _LOADER,
    ENGINE_PORT,
    LABEL_COMPONENT,
    LABEL_DEPLOYMENT,
    LABEL_ENGINE,
    LABEL_GPU_TYPE,
    LABEL_POOL,
    ROUTER_PORT,
    Owner,
    _fill,
    _render_text,
    common_labels,
    engine_service_name,
    router_name,
)

POD_MONITOR = ("monitoring.coreos.com/v1", "PodMonitor")
POD_MONITOR_PLURAL = "podmonitors"
PORT_NAME = "http"  # the container port of engines (8000) and routers (8080)
METRICS_PATH = "/metrics"
# Every value app.kubernetes.io/component takes on a pod whose engine serves /metrics: in rotation,
# warm standby (controller/autoscaler.py), draining before eviction (controller/evacuation.py). Workers of
# a multi-node replica (``worker``) run vLLM headless, without an HTTP server, and are left out.
ENGINE_COMPONENTS = ("engine", "standby", "draining")
TARGET_LABELS = [LABEL_DEPLOYMENT, LABEL_COMPONENT, LABEL_POOL, LABEL_GPU_TYPE, LABEL_ENGINE]

Mode = Literal["auto", "on", "off"]


def wanted(mode: Mode, served: bool | None) -> bool:
    """Whether to render PodMonitors: ``on`` always, ``off`` never, ``auto`` where the API serves
    the kind (``served`` None: not known, e.g. offline rendering: no)."""
    return mode == "on" or (mode == "auto" and bool(served))


@dataclass
class _Ctx:
    object_name: str
    namespace: str
    labels: dict[str, str]
    owner_refs: list[dict[str, Any]]
    selector: dict[str, Any]
    target_labels: list[str]
    endpoints: list[dict[str, Any]]


def _endpoint(config: OperatorConfig) -> dict[str, Any]:
    ep: dict[str, Any] = {"port": PORT_NAME, "path": METRICS_PATH}
    if config.monitor_interval:
        ep["interval"] = config.monitor_interval
    return ep


def _monitor(
    object_name: str,
    name: str,
    namespace: str,
    component: str,
    selector: dict[str, Any],
    config: OperatorConfig,
    owner: Owner | None,
) -> dict[str, Any]:
    ctx = _Ctx(
        object_name=object_name,
        namespace=namespace,
        # The user's labels first: ours (which the operator's watches select by) always win.
        labels={**config.monitor_labels, **common_labels(name), LABEL_COMPONENT: component},
        owner_refs=[owner.reference()] if owner else [],
        selector=selector,
        target_labels=list(TARGET_LABELS),
        endpoints=[_endpoint(config)],
    )
    text, slots = _render_text("podmonitor.yaml.j2", ctx)
    obj = _fill(yaml.load(text, Loader=_LOADER), slots)
    assert isinstance(obj, dict)
    return obj


def engine_monitor_selector(name: str) -> dict[str, Any]:
    return {
        "matchLabels": {LABEL_DEPLOYMENT: name},
        "matchExpressions": [{"key": LABEL_COMPONENT, "operator": "In", "values": list(ENGINE_COMPONENTS)}],
    }


def router_monitor_selector(name: str) -> dict[str, Any]:
    return {"matchLabels": {LABEL_DEPLOYMENT: name, LABEL_COMPONENT: "router"}}


def render_monitors(
    name: str,
    namespace: str,
    spec: LLMDeploymentSpec,
    config: OperatorConfig,
    owner: Owner | None = None,
    served: bool | None = None,
) -> list[dict[str, Any]]:
    """The PodMonitors of one LLMDeployment (none unless ``wanted``): engines, then the router."""
    if not wanted(config.prometheus_operator, served):
        return []
    out = [
        _monitor(
            engine_service_name(name), name, namespace, "engine", engine_monitor_selector(name), config, owner
        )
    ]
    if spec.routing.dedicated_router:  # gateway mode: the gateway's own monitor, not one per deployment
        out.append(
            _monitor(
                router_name(name), name, namespace, "router", router_monitor_selector(name), config, owner
            )
        )
    return out


# The ports the monitors scrape, for the documentation and tests: (component, container port).
PORTS = {"engine": ENGINE_PORT, "router": ROUTER_PORT}
