"""EndpointSlice discovery: a thin watch loop around the pure rules in `endpoints.py`.

The official Kubernetes client is synchronous, so the list+watch runs in a worker thread and
hands each new desired backend set to the event loop with `call_soon_threadsafe`. It re-lists on
every watch expiry or error (level-triggered: a missed event costs at most one timeout period),
and watch timeouts are always set, because a silent watch can otherwise stall forever.
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


class SliceWatcher:
    """Watches EndpointSlices matching a label selector in one namespace."""

    def __init__(
        self,
        namespace: str,
        selector: str,
        on_change: Callable[[Desired], None],
        loop: asyncio.AbstractEventLoop,
        port_name: str | None = "http",
        watch_timeout_s: int = 240,
    ) -> None:
        self.namespace = namespace
        self.selector = selector
        self.on_change = on_change
        self.loop = loop
        self.port_name = port_name
        self.watch_timeout_s = watch_timeout_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="endpointslice-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _emit(self, slices: ep.Slices) -> None:
        desired = ep.desired_backends(slices)
        self.loop.call_soon_threadsafe(self.on_change, desired)

    def _run(self) -> None:  # pragma: no cover - exercised by the cluster tests
        # Typed as Any: the client is untyped, and this shell only passes its objects through.
        client: Any = importlib.import_module("kubernetes.client")
        config: Any = importlib.import_module("kubernetes.config")
        watch: Any = importlib.import_module("kubernetes.watch")
        api: Any = None
        to_dict: Callable[[Any], dict[str, Any]] = client.ApiClient().sanitize_for_serialization
        backoff = 1.0
        while not self._stop.is_set():
            try:
                if api is None:  # in a pod: the service account; elsewhere: kubeconfig
                    try:
                        config.load_incluster_config()
                    except config.ConfigException:
                        config.load_kube_config()
                    api = client.DiscoveryV1Api()
                lst = api.list_namespaced_endpoint_slice(
                    self.namespace, label_selector=self.selector, _request_timeout=30
                )
                slices = ep.from_list([to_dict(o) for o in lst.items], self.port_name)
                self._emit(slices)
                rv = lst.metadata.resource_version
                w = watch.Watch()
                for event in w.stream(
                    api.list_namespaced_endpoint_slice,
                    self.namespace,
                    label_selector=self.selector,
                    resource_version=rv,
                    timeout_seconds=self.watch_timeout_s,
                    _request_timeout=self.watch_timeout_s + 30,
                ):
                    if self._stop.is_set():
                        w.stop()
                        break
                    obj = event["object"]
                    raw = obj if isinstance(obj, dict) else to_dict(obj)
                    slices = ep.apply_event(slices, event["type"], raw, self.port_name)
                    self._emit(slices)
                backoff = 1.0
            except Exception as e:  # retry on anything: no config yet, 410 Gone, network, API restarts
                log.warning("endpointslice watch failed (%s); retrying in %.0fs", e, backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
