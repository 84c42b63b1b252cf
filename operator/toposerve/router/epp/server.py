"""Starts the Endpoint Picker: ext_proc on one port, gRPC health on it and on another port.

Health (grpc.health.v1): `liveness` serves while the process answers; `readiness`, the ext_proc
service name and "" serve once the router is ready to pick (discovery answered, not draining),
as GIE's proposal 004 defines them; `inference-extension`, the reference picker's name, too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from toposerve.router.epp import protocol as pr
from toposerve.router.epp.picker import RouterPicker
from toposerve.router.epp.service import EppMetrics, ExtProc
from toposerve.router.proxy import Router

log = logging.getLogger("toposerve.router.epp")

READY_NAMES = (pr.READINESS, pr.EXT_PROC_SERVICE, pr.LWEPP_HEALTH, "")
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class EndpointPicker:
    """The running picker: its gRPC servers and the task that keeps health statuses true."""

    def __init__(self, router: Router, registry: CollectorRegistry | None = None, fallbacks: int = 2) -> None:
        self.picker = RouterPicker(router, fallbacks)
        self.metrics = EppMetrics(registry if registry is not None else router.metrics.registry)
        self.servicer = ExtProc(self.picker, self.metrics, router.cfg.max_body_bytes)
        self.health = health.aio.HealthServicer()
        self.servers: list[grpc.aio.Server] = []
        self.ports: list[int] = []
        self._task: asyncio.Task[None] | None = None

    async def start(
        self,
        host: str,
        port: int,
        health_port: int | None = None,
        period_s: float = 0.5,
        tls: grpc.ServerCredentials | None = None,
    ) -> None:
        """Listen on `port` (ext_proc + health; with `tls`, TLS only: epp/tls.py) and, unless
        None, `health_port` (health only, plaintext: kubelet gRPC probes speak no TLS); port 0
        binds a free port (tests): the bound ones are in `self.ports`."""
        await self._sync()
        main = grpc.aio.server()
        pb_grpc.add_ExternalProcessorServicer_to_server(self.servicer, main)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, main)
        addr = _addr(host, port)
        self.ports = [main.add_secure_port(addr, tls) if tls is not None else main.add_insecure_port(addr)]
        self.servers = [main]
        if health_port is not None:
            side = grpc.aio.server()
            health_pb2_grpc.add_HealthServicer_to_server(self.health, side)
            self.ports.append(side.add_insecure_port(_addr(host, health_port)))
            self.servers.append(side)
        for s in self.servers:
            await s.start()
        self._task = asyncio.create_task(self._keep(period_s))

    async def _sync(self) -> None:
        await self.health.set(pr.LIVENESS, SERVING)
        status = SERVING if self.picker.ready() else NOT_SERVING
        for name in READY_NAMES:
            await self.health.set(name, status)

    async def _keep(self, period_s: float) -> None:
        while True:
            await asyncio.sleep(period_s)
            await self._sync()

    async def stop(self, grace_s: float = 1.0) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await asyncio.gather(*(s.stop(grace_s) for s in self.servers))


def _addr(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
