"""The gateway's tenant gate: admission (tenants.py) and flow control (flowcontrol.py) on aiohttp.

A thin shell: per request it asks `Admission.admit` (401 / 403 / 429 + Retry-After, or a ticket),
and when the deployment's replicas are saturated it waits in that deployment's `FlowQueue`
(priority band, then weighted fair queuing on tokens) until the pump lets it go, it is shed
for a higher band (429), or it waits past the bound (429 with Retry-After). Then the member
router routes it as before, and the ticket is settled with the engine's usage. The endpoint
picker's requests wait in the same queues (`wait`) and settle from the response it saw
(`settle`).

"Saturated" is the member router's own rule, seen from the gateway: at least one replica is
eligible (healthy, not draining) and either none of them can take a request now
(`strategies.available`: every one at `max_in_flight` requests or `max_waiting` engine queue)
or the gateway already has as many requests on the deployment as its eligible replicas'
`max_in_flight` in all. No eligible replica at all is *not* saturation: the member holds the
request at zero (hold-at-zero), which the autoscaler reads. While a request waits here the
member's `queued` figure counts it, so `toposerve_router_queued_requests{llmdeployment=...}`,
which the autoscaler reads, sees the gateway's queue.

Flow control runs only when tenants are configured; without them the gateway is unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from toposerve.router import flowcontrol as fc
from toposerve.router import strategies as st
from toposerve.router import tenants as tn
from toposerve.router.errors import error_body
from toposerve.router.proxy import USAGE_KEY, Router, parse_request

log = logging.getLogger("toposerve.router.tenants")

UNAUTHENTICATED = "unauthenticated"  # the tenant label of 401s
_GO, _SHED = "go", "shed"


@dataclass(frozen=True)
class FlowOptions:
    max_bytes: int = 64 * 1024 * 1024  # request bodies waiting, per deployment
    max_wait_s: float = 30.0  # longer: 429 with Retry-After
    tick_s: float = 0.1  # how often a waiter looks again (engine queues change between scrapes)


class _QueueGauge(Collector):
    def __init__(self, gate: TenantGate) -> None:
        self.gate = gate

    def collect(self) -> Iterator[Metric]:
        g = GaugeMetricFamily(
            "toposerve_gateway_flow_queued_requests",
            "Requests waiting in the gateway's flow-control queues (replicas saturated), by band.",
            labels=["band"],
        )
        for i, band in enumerate(tn.BANDS):
            g.add_metric([band], sum(q.waiting(i) for q in self.gate.queues.values()))
        yield g


class TenantGate:
    def __init__(
        self,
        registry: CollectorRegistry,
        in_flight: Callable[[Router], int],
        admission: tn.Admission | None = None,
        flow: FlowOptions | None = None,
    ) -> None:
        self.admission = admission or tn.Admission()
        self.flow = flow or FlowOptions()
        self.in_flight = in_flight  # requests the gateway has on a member now
        self.queues: dict[int, fc.FlowQueue] = {}  # id(member) -> its queue
        self._members: dict[int, Router] = {}
        self._futures: dict[int, asyncio.Future[str]] = {}
        self._launching: dict[int, int] = {}  # id(member) -> let go, not yet on the member
        self._ids = itertools.count(1)
        self.source: Any = None  # tenant_watch.TenantSource, when keys and policy are watched
        self.sharing: Any = None  # peer_sync.PeerSync, when budgets are shared across replicas
        self.requests = Counter(
            "toposerve_tenant_requests",
            "Requests by tenant, requested model and answer code (401s as tenant=unauthenticated).",
            ["tenant", "model", "code"],
            registry=registry,
        )
        self.tokens = Counter(
            "toposerve_tenant_tokens",
            "Tokens by tenant, requested model and kind (prompt, completion), from the engines' usage.",
            ["tenant", "model", "kind"],
            registry=registry,
        )
        registry.register(_QueueGauge(self))

    @property
    def active(self) -> bool:
        return self.admission.active

    def authenticate(self, headers: Mapping[str, str]) -> web.Response | None:
        """The 401, before anything else is said about models, where keys are required."""
        t = self.admission.tenant_for(headers)
        if isinstance(t, tn.Decision):
            self.requests.labels(UNAUTHENTICATED, "", str(t.status)).inc()
            return _answer(t)
        return None

    def allowed_models(self, headers: Mapping[str, str]) -> Callable[[str], bool]:
        t = self.admission.tenant_for(headers)
        return (lambda _m: False) if isinstance(t, tn.Decision) else t.allows

    def admit(
        self, path: str, headers: Mapping[str, str], body: Mapping[str, Any], model: str, member: Router
    ) -> tuple[tn.Ticket, int] | web.Response:
        """Admission of one request for `model` routed by `member` (the HTTP path and the endpoint
        picker): its ticket and token estimate, or the refusal to answer (counted and logged)."""
        estimate = admission_tokens(path, body, headers, member)
        d = self.admission.admit(headers, model, estimate)
        if not d.allowed or d.ticket is None:
            self.requests.labels(d.tenant or UNAUTHENTICATED, model, str(d.status)).inc()
            log.log(logging.DEBUG if d.status == 429 else logging.INFO, "%d: %s", d.status, d.message)
            return _answer(d)
        return d.ticket, estimate

    async def serve(
        self,
        request: web.Request,
        model: str,
        member: Router,
        body: Mapping[str, Any],
        size: int,
        call: Callable[[], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        admitted = self.admit(request.path, request.headers, body, model, member)
        if isinstance(admitted, web.Response):
            return admitted
        (ticket, estimate), used = admitted, None
        try:
            refused = await self.wait(member, ticket, estimate, size)
            if refused is not None:
                self.requests.labels(ticket.tenant, model, str(refused.status)).inc()
                return refused
            resp = await call()
            usage = request.get(USAGE_KEY)
            if usage is not None:
                used = usage[0] + usage[1]
                self.tokens.labels(ticket.tenant, model, "prompt").inc(usage[0])
                self.tokens.labels(ticket.tenant, model, "completion").inc(usage[1])
            elif resp.status >= 400:
                used = 0  # refused by the router or the engine: nothing was generated
            self.requests.labels(ticket.tenant, model, str(resp.status)).inc()
            return resp
        finally:
            self.admission.finish(ticket, used)
            self.pump(member)

    # ------------------------------------------------------------------------------ flow control

    def settle(
        self, ticket: tn.Ticket, model: str, status: int | None, usage: tuple[int, int] | None
    ) -> None:
        """The end of a request the endpoint picker routed: tokens counted and settled from the
        response's usage as on the HTTP path (`serve`); no usage: an error status settles 0,
        otherwise the reservation stays charged."""
        used = None
        if usage is not None:
            used = usage[0] + usage[1]
            self.tokens.labels(ticket.tenant, model, "prompt").inc(usage[0])
            self.tokens.labels(ticket.tenant, model, "completion").inc(usage[1])
        elif status is not None and status >= 400:
            used = 0
        if status is not None:
            self.requests.labels(ticket.tenant, model, str(status)).inc()
        self.admission.finish(ticket, used)

    def saturated(self, member: Router) -> bool:
        snap = member.snapshot()
        eligible = [b for b in snap if st.is_eligible(b)]
        if not eligible:
            return False  # nothing to wait for here: the member holds it (scale from zero)
        busy = self.in_flight(member) + self._launching.get(id(member), 0)
        cap = member.cfg.routing.max_in_flight * len(eligible)
        return busy >= cap or not st.available(snap, member.cfg.routing)

    def pump(self, member: Router) -> None:
        """Let waiting requests go while the member has room, highest band first."""
        key = id(member)
        q = self.queues.get(key)
        while q is not None and len(q) and not self.saturated(member):
            item = q.pop()
            waiter = self._futures.get(item.id) if item is not None else None
            if waiter is not None and not waiter.done():
                self._launching[key] = self._launching.get(key, 0) + 1
                waiter.set_result(_GO)
        if q is not None and not len(q):
            del self.queues[key]

    async def wait(self, member: Router, ticket: tn.Ticket, estimate: int, size: int) -> web.Response | None:
        """Wait in `member`'s flow-control queue while its replicas are saturated (the HTTP path
        and the endpoint picker): None once it may go, or the 429 to answer (shed, or waited
        past the bound)."""
        key = id(member)
        if key not in self.queues and not self.saturated(member):
            return None
        q = self.queues.setdefault(
            key, fc.FlowQueue(len(tn.BANDS), self.flow.max_bytes, self.flow.max_wait_s)
        )
        now = time.monotonic()
        item = fc.Item(
            next(self._ids), ticket.tenant, tn.BANDS.index(ticket.band), ticket.weight, estimate, size, now
        )
        pushed = q.push(item)
        for e in pushed.evicted:
            victim = self._futures.get(e.id)
            if victim is not None and not victim.done():
                victim.set_result(_SHED)
        if not pushed.accepted:
            return _error(429, "the flow-control queue is full", "flow_control", q.retry_after_s())
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._futures[item.id] = fut
        member.queued += 1  # the autoscaler reads the member's queued figure
        taken = False
        try:
            deadline = now + self.flow.max_wait_s
            while True:
                self.pump(member)
                if fut.done():
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    msg = f"replicas saturated: waited {self.flow.max_wait_s:g}s in the flow-control queue"
                    return _error(429, msg, "flow_control", q.retry_after_s())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(fut), min(left, self.flow.tick_s))
            taken = True
            if fut.result() == _SHED:
                msg = f"shed under overload for higher-priority traffic ({ticket.band} band)"
                return _error(429, msg, "priority", q.retry_after_s())
            return None
        finally:
            member.queued -= 1
            self._futures.pop(item.id, None)
            if item.id in q:
                q.remove(item.id)  # timed out, or the client went away
            if fut.done() and not fut.cancelled() and fut.result() == _GO:
                self._launching[key] -= 1  # on its way to the member (or gone): no longer launching
            if not taken and not fut.done():
                fut.cancel()


def admission_tokens(path: str, body: Mapping[str, Any], headers: Mapping[str, str], member: Router) -> int:
    """What admission reserves for a request: the member router's prompt estimate plus its
    max_tokens (or the router's default). The endpoint picker uses the same figure."""
    parsed = parse_request(path, body, headers, member.estimator, member.cfg, False)
    return parsed.request.prompt_tokens + parsed.request.max_tokens


def _answer(d: tn.Decision) -> web.Response:
    return web.json_response(d.body(), status=d.status, headers=d.headers())


def _error(status: int, message: str, param: str, retry_after: int) -> web.Response:
    return web.json_response(
        error_body(status, message, param), status=status, headers={"Retry-After": str(retry_after)}
    )
