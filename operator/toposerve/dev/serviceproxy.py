"""A kube-proxy stand-in for one Service, for tests and the demo on the local cluster.

The local cluster has no kube-proxy, so a ClusterIP routes nowhere (docs/local-cluster.md). Clients
of a Service meet kube-proxy's rules, and a rollout or a drain is only hitless if the pods play by
them, so tests that claim "zero failed requests" must go through the same rules rather than to
one pod IP. What this reproduces, from the Kubernetes documentation ("Virtual IPs and Service
Proxies", "EndpointSlices", KEP-1669 "Proxy Terminating Endpoints"):

- each **new connection** goes to one endpoint chosen among the Service's EndpointSlices, at
  random (iptables mode's probability rules), among the endpoints with ``ready: true``;
- when none is ready, to those ``serving: true`` and ``terminating: true`` (KEP-1669, GA in 1.28);
- with none of either, the connection is refused (kube-proxy REJECTs: "no endpoints");
- an **established connection stays** with its endpoint after the endpoint leaves the slice
  (conntrack keeps the flow; kube-proxy flushes conntrack only for UDP), until either side
  closes it. So a kept-alive client connection reaches a terminating pod until that pod closes it.

Endpoint changes arrive through a watch on the Service's EndpointSlices, as kube-proxy's informer.
"""

from __future__ import annotations

import importlib
import logging
import random
import socket
import threading
from collections.abc import Iterable, Mapping
from typing import Any

from toposerve.dev.podrunner import forward

log = logging.getLogger("toposerve.serviceproxy")


def choices(slices: Iterable[Mapping[str, Any]], port_name: str) -> list[tuple[str, int]]:
    """The addresses a new connection may go to: ready endpoints, else serving terminating ones."""
    ready: list[tuple[str, int]] = []
    terminating: list[tuple[str, int]] = []
    for s in slices:
        port = next((p.get("port") for p in s.get("ports") or [] if p.get("name", "") == port_name), None)
        if port is None:
            continue
        for ep in s.get("endpoints") or []:
            cond = ep.get("conditions") or {}
            # API semantics: nil ready means ready; nil serving means the same as ready.
            is_ready = cond.get("ready") is not False
            serving = cond.get("serving", is_ready) is not False
            addrs = [(a, int(port)) for a in ep.get("addresses") or []]
            if is_ready and not cond.get("terminating"):
                ready += addrs
            elif serving and cond.get("terminating"):
                terminating += addrs
    return ready or terminating


class ServiceProxy:
    """Listens on ``listen`` and relays each new connection to one endpoint of a Service."""

    def __init__(
        self, discovery: Any, namespace: str, service: str, port_name: str = "http", seed: int | None = None
    ) -> None:
        self.discovery, self.namespace, self.service, self.port_name = (
            discovery,
            namespace,
            service,
            port_name,
        )
        self._slices: dict[str, Mapping[str, Any]] = {}
        self._lock = threading.Lock()
        self._rnd = random.Random(seed)
        self._stop = threading.Event()
        self._server: socket.socket | None = None
        self.chosen: list[tuple[str, int]] = []  # every connection's endpoint, in order

    def endpoints(self) -> list[tuple[str, int]]:
        with self._lock:
            return choices(self._slices.values(), self.port_name)

    def _choose(self) -> tuple[str, int] | None:
        eps = self.endpoints()
        if not eps:
            log.warning("%s/%s: no endpoints, connection refused", self.namespace, self.service)
            return None
        to = self._rnd.choice(eps)
        self.chosen.append(to)
        return to

    def _watch(self) -> None:
        watch: Any = importlib.import_module("kubernetes.watch")  # untyped: kept Any, as podrunner does
        selector = f"kubernetes.io/service-name={self.service}"
        while not self._stop.is_set():
            w = watch.Watch()
            try:
                listing = self.discovery.list_namespaced_endpoint_slice(
                    self.namespace, label_selector=selector
                )
                with self._lock:
                    self._slices = {
                        s.metadata.name: self.discovery.api_client.sanitize_for_serialization(s)
                        for s in listing.items
                    }
                for ev in w.stream(
                    self.discovery.list_namespaced_endpoint_slice,
                    self.namespace,
                    label_selector=selector,
                    resource_version=listing.metadata.resource_version,
                    timeout_seconds=30,
                ):
                    obj = self.discovery.api_client.sanitize_for_serialization(ev["object"])
                    with self._lock:
                        if ev["type"] == "DELETED":
                            self._slices.pop(obj["metadata"]["name"], None)
                        else:
                            self._slices[obj["metadata"]["name"]] = obj
                    if self._stop.is_set():
                        break
            except Exception as e:  # a dropped watch: list again, as an informer does
                log.debug("endpointslice watch: %s", e)
                self._stop.wait(0.5)
            finally:
                w.stop()

    def start(self, listen: tuple[str, int] = ("127.0.0.1", 0)) -> tuple[str, int]:
        """Start watching and listening; returns the address clients connect to."""
        threading.Thread(target=self._watch, daemon=True, name=f"svc-{self.service}").start()
        self._server = forward(listen, self._choose)
        host, port = self._server.getsockname()[:2]
        return str(host), int(port)

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.close()
