"""The bridge from the protocol's `PickInput` to `Router.pick`: no picking logic of its own.

A subset (`ip:port` strings from the data plane) becomes the backend URLs it names; the
router's answer (a `Pick`, or the error it would have answered over HTTP) becomes a `Routed` or
a `Refused`. For the gateway, the body's `model` chooses the member router first, as on its
HTTP path (`Gateway.member_for`).
"""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from toposerve.router import tenants as tn
from toposerve.router.epp.protocol import PickInput, Refused, ResponseSeen, Routed, endpoint_of, in_subset
from toposerve.router.proxy import Pick, Router, _usage_field
from toposerve.router.tenant_gate import TenantGate


@dataclass
class Held:
    """One routed request: the router that picked it and its pick (load held until finish)."""

    router: Router
    pick: Pick
    front: Router | None = None  # the gateway, when a member picked: its drain waits for this too
    ticket: tn.Ticket | None = None  # its tenant's admission (gateway with tenants), settled at finish
    model: str = ""


def refused(resp: web.Response) -> Refused:
    """The router's HTTP error as an ImmediateResponse: same status, body and Retry-After."""
    body = resp.body if isinstance(resp.body, bytes) else b""
    keep = ("Content-Type", "Retry-After")
    return Refused(resp.status, body, tuple((k.lower(), resp.headers[k]) for k in keep if k in resp.headers))


class RouterPicker:
    """Picks with one router (`toposerve router`), or with the gateway's member routers
    (`toposerve gateway`: the router passed is a `Gateway`, recognised by `member_for`)."""

    def __init__(self, router: Router, fallbacks: int = 2) -> None:
        self.router = router
        self.fallbacks = fallbacks

    def ready(self) -> bool:
        """Ready to pick: discovery has answered and no drain began (gRPC `readiness`)."""
        return not self.router.discovering and not self.router.draining

    def _member(self, inp: PickInput) -> Router | web.Response:
        member_for = getattr(self.router, "member_for", None)
        if member_for is None:
            return self.router
        member = member_for(inp.body.get("model"))
        assert isinstance(member, Router | web.Response)
        return member

    def _gate(self) -> TenantGate | None:
        """The gateway's tenants (docs/tenants.md), when configured: the picker admits as the
        gateway's HTTP path does, on the key header the data plane passes on."""
        gate = getattr(self.router, "tenants", None)
        return gate if isinstance(gate, TenantGate) and gate.active else None

    async def pick(self, inp: PickInput) -> tuple[Routed | Refused, Held | None]:
        gate = self._gate()
        if gate is not None and (unauthenticated := gate.authenticate(inp.headers)) is not None:
            return refused(unauthenticated), None  # 401 before anything is said about models
        member = self._member(inp)
        if isinstance(member, web.Response):
            return refused(member), None
        ticket = None
        model = str(inp.body.get("model") or "")
        if gate is not None:
            admitted = gate.admit(inp.path, inp.headers, inp.body, model, member)
            if isinstance(admitted, web.Response):
                return refused(admitted), None
            ticket, estimate = admitted
            # replicas saturated: wait in the flow-control queue as the HTTP path does (band,
            # then fair share on tokens; bounded in bytes and time: 429 when shed or too long)
            try:
                waited = await gate.wait(member, ticket, estimate, inp.size)
            except BaseException:  # the stream went away while waiting
                gate.admission.finish(ticket, 0)
                raise
            if waited is not None:
                gate.settle(ticket, model, waited.status, None)
                return refused(waited), None
        only = None
        if inp.subset is not None:
            subset = inp.subset
            only = [u for u in member.backends if in_subset(endpoint_of(u), subset)]
        p = await member.pick(inp.path, inp.headers, inp.body, only, self.fallbacks)
        if isinstance(p, web.Response):
            if gate is not None and ticket is not None:
                gate.admission.finish(ticket, 0)  # not routed: nothing used
                gate.pump(member)
            return refused(p), None
        front = None
        if member is not self.router:
            front = self.router
            front.active += 1
        return Routed(tuple(endpoint_of(u) for u in p.backends)), Held(member, p, front, ticket, model)

    def served(self, held: Held, endpoint: str) -> None:
        """`x-gateway-destination-endpoint-served`: the backend with that `ip:port`, if known."""
        url = next((u for u in held.router.backends if endpoint_of(u) == endpoint), None)
        if url is not None:
            held.router.served_pick(held.pick, url)

    def finish(self, held: Held, response: ResponseSeen | None = None) -> None:
        if held.pick.done:
            return
        held.router.finish_pick(held.pick)
        if held.front is not None:
            held.front.active -= 1
        gate = self._gate()
        if held.ticket is not None and gate is not None:
            # settled from the usage in the response body Envoy streamed through (the end of a
            # JSON answer, a stream's usage event), as on the HTTP path; none: stays charged
            status = response.status if response is not None else None
            usage = None
            if (
                response is not None
                and (prompt := _usage_field(response.tail, b'"prompt_tokens"')) is not None
            ):
                usage = (prompt, _usage_field(response.tail, b'"completion_tokens"') or 0)
            gate.settle(held.ticket, held.model, status, usage)
            gate.pump(held.router)  # its slot is free: the next waiter may go
