"""Gateway replicas exchange their tenants' usage: the thin I/O shell of budget_share.py.

Each replica serves its own usage on a small internal HTTP port (`--peer-port`, not on the
gateway's Service: clients cannot reach it through it), `GET /peer/usage` ->
`{"id": ..., "tenants": {tenant: {requests, tokens, concurrent}}}`, and every `--peer-interval`
seconds fetches every peer's (pull: nobody can push usage into a replica), then takes the
exchange (`SharedBudgets.sync`). A replica learns its peers from the EndpointSlices of the
gateway's Service (`--peer-service`, in its own namespace: list + watch on endpointslices
there; endpoints `serving`, so a terminating replica still reports), or from a static
`--peers` list (no Kubernetes: benchmarks, tests). It recognises itself by `$POD_IP` and by
the random id in each answer (a replica that fetched its own id drops that address).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import secrets
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from toposerve.router import budget_share as bs
from toposerve.router.discovery import ListWatch

log = logging.getLogger("toposerve.router.tenants")

PATH = "/peer/usage"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"


def _host_port(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def slice_addresses(obj: Mapping[str, Any]) -> set[str]:
    """The addresses of an EndpointSlice's endpoints that serve (`serving`, else `ready`;
    absent conditions count as serving, as the API defines them)."""
    out: set[str] = set()
    for e in obj.get("endpoints") or []:
        cond = e.get("conditions") or {}
        serving = cond.get("serving")
        if serving is None:
            serving = cond.get("ready")
        if serving is None or serving:
            out.update(a for a in e.get("addresses") or [] if isinstance(a, str))
    return out


class _Gauges(Collector):
    def __init__(self, sync: PeerSync) -> None:
        self.sync = sync

    def collect(self) -> Iterator[Metric]:
        now = time.monotonic()
        shared = self.sync.shared
        mode = shared.mode(now)
        g = GaugeMetricFamily(
            "toposerve_gateway_budget_sharing",
            "Tenant budgets across gateway replicas: 1 for the mode in force (alone: no peer known; "
            "shared: every peer reported; degraded: some did not, each replica keeps to budget / replicas).",
            labels=["mode"],
        )
        for m in bs.MODES:
            g.add_metric([m], 1.0 if m == mode else 0.0)
        yield g
        p = GaugeMetricFamily(
            "toposerve_gateway_budget_peers",
            "Other gateway replicas: known (discovery) and live (reported within the report lifetime).",
            labels=["state"],
        )
        p.add_metric(["known"], len(shared.known))
        p.add_metric(["live"], len(shared.live(now)))
        yield p


class PeerSync:
    """Serves this replica's usage and fetches its peers'; `shared` is the admission's."""

    def __init__(
        self,
        shared: bs.SharedBudgets,
        port: int,
        self_ip: str = "",
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.shared = shared
        self.port = port
        self.self_ip = self_ip
        self.clock = clock
        self.ident = secrets.token_hex(8)
        self.selves: set[str] = set()  # addresses that answered with our own id
        self._slices: dict[str, set[str]] = {}
        self._static: set[str] = set()
        self._runner: web.AppRunner | None = None
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self.bound_port = 0
        if registry is not None:
            registry.register(_Gauges(self))

    # ------------------------------------------------------------------ discovery

    def set_static(self, peers: Iterable[str]) -> None:
        self._static = {p.strip() for p in peers if p.strip()}
        self._publish()

    def slices_listed(self, items: list[Mapping[str, Any]]) -> None:
        self._slices = {_key(o): slice_addresses(o) for o in items}
        self._publish()

    def slice_event(self, kind: str, obj: Mapping[str, Any]) -> None:
        if kind == "DELETED":
            self._slices.pop(_key(obj), None)
        elif kind in ("ADDED", "MODIFIED"):
            self._slices[_key(obj)] = slice_addresses(obj)
        self._publish()

    def _publish(self) -> None:
        addrs = {_host_port(a, self.port) for s in self._slices.values() for a in s if a != self.self_ip}
        self.shared.set_known((addrs | self._static) - self.selves)

    def watch(self, namespace: str, service: str, loop: asyncio.AbstractEventLoop) -> ListWatch:
        def lister(api: Any) -> Callable[..., Any]:
            disc = importlib.import_module("kubernetes.client").DiscoveryV1Api(api)
            return lambda **kw: disc.list_namespaced_endpoint_slice(namespace, **kw)

        return ListWatch(
            "peer-endpointslice",
            lister,
            self.slices_listed,
            self.slice_event,
            loop,
            {"label_selector": f"{SERVICE_NAME_LABEL}={service}"},
        )

    # ------------------------------------------------------------------ serving and fetching

    async def handle(self, request: web.Request) -> web.Response:
        return web.json_response({"id": self.ident, "tenants": self.shared.report(self.clock())})

    async def start(self, host: str) -> None:
        app = web.Application()
        app.router.add_get(PATH, self.handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        # "::": every address, IPv4 and IPv6 (pod IPs are either)
        site = web.TCPSite(self._runner, None if host == "::" else host, self.port, reuse_address=True)
        await site.start()
        server = getattr(site, "_server", None)
        socks = getattr(server, "sockets", None) or []
        self.bound_port = socks[0].getsockname()[1] if socks else self.port
        timeout = aiohttp.ClientTimeout(total=max(0.2, self.shared.interval_s * 0.8))
        self._session = aiohttp.ClientSession(timeout=timeout)
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._session is not None:
            await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _loop(self) -> None:
        while True:
            await self.exchange()
            await asyncio.sleep(self.shared.interval_s)

    async def exchange(self) -> None:
        """Fetch every known peer's usage (at once, each bounded by the timeout), then sync."""
        peers = sorted(self.shared.known)
        results = await asyncio.gather(*(self._fetch(p) for p in peers), return_exceptions=True)
        now = self.clock()
        for peer, res in zip(peers, results, strict=True):
            if isinstance(res, BaseException) or res is None:
                log.debug("peer %s did not answer: %s", peer, res)
                continue
            ident, usage = res
            if ident == self.ident:
                self.selves.add(peer)
                self._publish()
                continue
            self.shared.receive(peer, usage, now)
        self.shared.sync(now)

    async def _fetch(self, peer: str) -> tuple[str, dict[str, dict[str, float]]] | None:
        assert self._session is not None
        async with self._session.get(f"http://{peer}{PATH}") as r:
            if r.status != 200:
                return None
            doc = await r.json()
        if not isinstance(doc, Mapping):
            return None
        return str(doc.get("id", "")), bs.parse_usage(doc.get("tenants"))

    def status(self) -> dict[str, Any]:
        """For the gateway's /health."""
        now = self.clock()
        return {
            "mode": self.shared.mode(now),
            "replicas": self.shared.replicas(),
            "livePeers": len(self.shared.live(now)),
        }


def _key(obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    return f"{meta.get('namespace', '')}/{meta.get('name', '')}"
