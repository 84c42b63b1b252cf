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
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from toposerve import API_GROUP, API_VERSION
from toposerve.router import endpoints as ep
from toposerve.router.gateway import Gateway

log = logging.getLogger("toposerve.router.gateway")

PLURAL = "llmdeployments"
ENGINE_SLICES = f"{ep.COMPONENT_LABEL}=engine,{ep.DEPLOYMENT_LABEL}"

Obj = Mapping[str, Any]


class ListWatch:
    """List, then watch from the list's resourceVersion; again on expiry or any error."""

    def __init__(
        self,
        name: str,
        lister: Callable[[Any], Callable[..., Any]],
        on_list: Callable[[list[Obj]], None],
        on_event: Callable[[str, Obj], None],
        loop: asyncio.AbstractEventLoop,
        kwargs: Mapping[str, Any] | None = None,
        watch_timeout_s: int = 240,
    ) -> None:
        self.name = name
        self.lister = lister  # api client -> the list function (also what the watch streams)
        self.on_list = on_list
        self.on_event = on_event
        self.loop = loop
        self.kwargs = dict(kwargs or {})
        self.watch_timeout_s = watch_timeout_s
        self._stop = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._run, name=f"{self.name}-watch", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:  # pragma: no cover - exercised by the cluster tests
        client: Any = importlib.import_module("kubernetes.client")
        config: Any = importlib.import_module("kubernetes.config")
        watch: Any = importlib.import_module("kubernetes.watch")
        api_client: Any = None
        backoff = 1.0
        while not self._stop.is_set():
            try:
                if api_client is None:
                    try:
                        config.load_incluster_config()
                    except config.ConfigException:
                        config.load_kube_config()
                    api_client = client.ApiClient()
                fn = self.lister(api_client)
                lst = fn(**self.kwargs, _request_timeout=30)
                raw = lst if isinstance(lst, dict) else api_client.sanitize_for_serialization(lst)
                self.loop.call_soon_threadsafe(self.on_list, list(raw.get("items") or []))
                rv = (raw.get("metadata") or {}).get("resourceVersion")
                w = watch.Watch()
                for event in w.stream(
                    fn,
                    **self.kwargs,
                    resource_version=rv,
                    timeout_seconds=self.watch_timeout_s,
                    _request_timeout=self.watch_timeout_s + 30,
                ):
                    if self._stop.is_set():
                        w.stop()
                        break
                    obj = event["object"]
                    obj = obj if isinstance(obj, dict) else api_client.sanitize_for_serialization(obj)
                    if event["type"] == "ERROR":  # 410 Gone mid-watch: list again
                        break
                    self.loop.call_soon_threadsafe(self.on_event, event["type"], obj)
                backoff = 1.0
            except Exception as e:  # no config yet, 410 Gone, network, API restarts, RBAC not yet bound
                log.warning("%s watch failed (%s); retrying in %.0fs", self.name, e, backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, 30.0)


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
