"""The gateway's two watches: LLMDeployments and engine EndpointSlices, in one namespace or all.

A thin shell like discovery.py: the official client is synchronous, so each list+watch runs in
a worker thread and hands full lists and single events to the event loop with
`call_soon_threadsafe`; the rules live in gateway.py / models.py / endpoints.py. Each watch
re-lists on expiry or error (level-triggered), with timeouts always set.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from collections.abc import Callable
from typing import Any

from toposerve import API_GROUP, API_VERSION
from toposerve.router import endpoints as ep
from toposerve.router.discovery import ListWatch
from toposerve.router.gateway import Gateway

log = logging.getLogger("toposerve.router.gateway")

PLURAL = "llmdeployments"
ENGINE_SLICES = f"{ep.COMPONENT_LABEL}=engine,{ep.DEPLOYMENT_LABEL}"


def watches(gw: Gateway, loop: asyncio.AbstractEventLoop) -> list[ListWatch]:
    """The LLMDeployment and EndpointSlice watches of a gateway (namespace None: cluster-wide)."""
    ns = gw.namespace
    client: Any = importlib.import_module("kubernetes.client")

    def deployments(api: Any) -> Callable[..., Any]:
        objs = client.CustomObjectsApi(api)
        if ns is None:
            return lambda **kw: objs.list_cluster_custom_object(API_GROUP, API_VERSION, PLURAL, **kw)
        return lambda **kw: objs.list_namespaced_custom_object(API_GROUP, API_VERSION, ns, PLURAL, **kw)

    def slices(api: Any) -> Callable[..., Any]:
        disc = client.DiscoveryV1Api(api)
        if ns is None:
            return lambda **kw: disc.list_endpoint_slice_for_all_namespaces(**kw)
        return lambda **kw: disc.list_namespaced_endpoint_slice(ns, **kw)

    return [
        ListWatch("llmdeployment", deployments, gw.deployments_listed, gw.deployment_event, loop),
        ListWatch(
            "endpointslice",
            slices,
            gw.slices_listed,
            gw.slice_event,
            loop,
            {"label_selector": ENGINE_SLICES},
        ),
    ]
