"""EndpointSlice discovery: a thin watch loop around the pure rules in `endpoints.py`.

The official Kubernetes client is synchronous, so each list+watch (`ListWatch`, also the
gateway's two watches) runs in a worker thread and hands full lists and single events to the
event loop with `call_soon_threadsafe`. It re-lists on every watch expiry or error
(level-triggered: a missed event costs at most one timeout period), and watch timeouts are
always set, because a silent watch can otherwise stall forever.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from toposerve.router import endpoints as ep

log = logging.getLogger("toposerve.router.discovery")

Desired = Mapping[str, tuple[ep.BackendSpec, bool]]
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


class SliceWatcher:
    """Watches EndpointSlices matching a label selector in one namespace; hands each new desired
    backend set to ``on_change`` in the event loop."""

    def __init__(
        self,
        namespace: str,
        selector: str,
        on_change: Callable[[Desired], None],
        loop: asyncio.AbstractEventLoop,
        port_name: str | None = "http",
        watch_timeout_s: int = 240,
    ) -> None:
        self.on_change = on_change
        self.port_name = port_name
        self._slices: ep.Slices = {}

        def lister(api: Any) -> Callable[..., Any]:
            disc = importlib.import_module("kubernetes.client").DiscoveryV1Api(api)
            return lambda **kw: disc.list_namespaced_endpoint_slice(namespace, **kw)

        self._watch = ListWatch(
            "endpointslice",
            lister,
            self._listed,
            self._event,
            loop,
            {"label_selector": selector},
            watch_timeout_s,
        )

    def start(self) -> None:
        self._watch.start()

    def stop(self) -> None:
        self._watch.stop()

    def _listed(self, items: list[Obj]) -> None:
        self._slices = ep.from_list(items, self.port_name)
        self.on_change(ep.desired_backends(self._slices))

    def _event(self, kind: str, obj: Obj) -> None:
        self._slices = ep.apply_event(self._slices, kind, obj, self.port_name)
        self.on_change(ep.desired_backends(self._slices))
