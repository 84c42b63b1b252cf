"""The Gateway API Inference Extension's InferencePool (``inference.networking.k8s.io/v1``, GIE
v1.6.2) of an LLMDeployment: how a cluster's own Gateway (Istio, kgateway, NGINX Gateway Fabric,
GKE Gateway) reaches its engines through toposerve's endpoint picker (docs/gateway-api.md).

One pool per LLMDeployment, not per ``spec.pools`` entry: a GIE pool is what one picker chooses
among, and toposerve's picker (the deployment's router, or the gateway's member router for it)
chooses across all of a deployment's GPU pools at once (GPU-weighted, long context to its pool),
while an HTTPRoute names one backend per model. The pool is named after the LLMDeployment, so a
route's ``backendRef`` is ``{group: inference.networking.k8s.io, kind: InferencePool, name: <name>}``.

Its selector is the engine Service's (``toposerve.io/deployment``, ``app.kubernetes.io/component:
engine``): exactly the pods that serve HTTP. Multi-node replicas' workers are ``worker`` (vLLM
``--headless``, no HTTP server), warm standby pods ``standby`` and pods being evacuated
``draining``, so none of them are members, just as none are in the engine Service.

The picker (``endpointPickerRef``, port 9002 as GIE's EPP): mode dedicated, the deployment's router
Service ``<name>``; mode gateway, the chart's gateway Service (operator config ``gatewayService``).
GIE v1's reference has no namespace (the picker lives beside its pool), so in gateway mode the
pool is rendered only for LLMDeployments in the gateway's namespace (``gatewayNamespace``); elsewhere
the deployment says why in its Degraded condition and gets no pool (mode dedicated works in every
namespace). Mode none has no picker: an explicit ``inferencePool.enabled: true`` is refused by the
CRD's CEL rule and the spec's validator (api/spec.py), the cluster-wide default skips it.

Pure; the unit suite validates the output against the vendored CRD (tests/unit/schemas, by
hack/vendor_gie_schemas.py), the cluster tests against the API server with that CRD installed.
"""

from __future__ import annotations

from typing import Any

from toposerve.api.config import OperatorConfig
from toposerve.api.spec import LLMDeploymentSpec
from toposerve.render.objects import (
    ENGINE_PORT,
    EPP_PORT,
    LABEL_COMPONENT,
    Owner,
    common_labels,
    engine_selector,
)

INFERENCE_POOL = ("inference.networking.k8s.io/v1", "InferencePool")
INFERENCE_POOL_PLURAL = "inferencepools"
GIE_VERSION = "v1.6.2"
CRD_NAME = "inferencepools.inference.networking.k8s.io"
CRD_URL = (
    "https://raw.githubusercontent.com/kubernetes-sigs/gateway-api-inference-extension/"
    f"{GIE_VERSION}/config/crd/bases/inference.networking.k8s.io_inferencepools.yaml"
)
REASON_CRD_MISSING = "InferencePoolCRDMissing"
REASON_NO_PICKER = "InferencePoolNoPicker"
CRD_MISSING_MESSAGE = (
    f"spec.routing.inferencePool is enabled but the API server does not serve {INFERENCE_POOL[0]} "
    f"{INFERENCE_POOL[1]} (CRD {CRD_NAME}); everything else serves. Install it: kubectl apply "
    f"--server-side -f {CRD_URL}"
)

Notice = tuple[str, str]


def picker_service(
    name: str, namespace: str, spec: LLMDeploymentSpec, config: OperatorConfig
) -> str | Notice:
    """The Service of the pool's endpoint picker, or (reason, message) why there is none here."""
    mode = spec.routing.effective_mode
    if mode == "dedicated":
        return name  # render_router's Service
    gw = config.gateway_namespace
    if gw != namespace:
        where = f"in namespace {gw}" if gw else "in a namespace the operator config does not name"
        return (
            REASON_NO_PICKER,
            f"spec.routing.inferencePool: routing.mode gateway's picker is the gateway Service "
            f"{config.gateway_service} {where}, and an InferencePool's endpointPickerRef (GIE v1) names a "
            f"Service in the pool's own namespace ({namespace}); no InferencePool is rendered. Use "
            "routing.mode dedicated (the deployment's router picks) or deploy in the gateway's namespace"
            + ("" if gw else " (operator config gatewayNamespace)"),
        )
    return config.gateway_service


def render_inference_pool(
    name: str,
    namespace: str,
    spec: LLMDeploymentSpec,
    config: OperatorConfig,
    owner: Owner | None = None,
    served: bool = True,
) -> tuple[list[dict[str, Any]], list[Notice]]:
    """(objects, notices): the InferencePool when enabled and possible, else why not (``served``:
    whether the API serves the kind; offline rendering assumes it does)."""
    if not spec.routing.inference_pool_on(config.inference_pool.enabled):
        return [], []
    if not served:
        return [], [(REASON_CRD_MISSING, CRD_MISSING_MESSAGE)]
    picker = picker_service(name, namespace, spec, config)
    if isinstance(picker, tuple):
        return [], [picker]
    meta: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "labels": {**common_labels(name), LABEL_COMPONENT: "inference-pool"},
    }
    if owner is not None:
        meta["ownerReferences"] = [owner.reference()]
    pool = {
        "apiVersion": INFERENCE_POOL[0],
        "kind": INFERENCE_POOL[1],
        "metadata": meta,
        "spec": {
            "selector": {"matchLabels": engine_selector(name)},
            "targetPorts": [{"number": ENGINE_PORT}],
            "appProtocol": "http",  # vLLM and the mock engine serve HTTP/1.1
            "endpointPickerRef": {
                "group": "",
                "kind": "Service",
                "name": picker,
                "port": {"number": EPP_PORT},
                "failureMode": spec.routing.inference_pool.failure_mode or config.inference_pool.failure_mode,
            },
        },
    }
    return [pool], []
