"""One OpenAI endpoint for every LLMDeployment in scope: the gateway mode of the router.

Why a router of routers: each LLMDeployment in the gateway's table gets a *member* `Router`, the
same code a dedicated router runs (strategies, probes, ejection, hold-at-zero, KV events,
adapters), fed by the same EndpointSlice rules; the gateway adds only what one endpoint for many
models needs: reading the body once (its front door and body budget are the gateway's own),
looking the request's `model` up in the table (models.py), and answering `/v1/models`,
`/health` and unknown models itself. So a request through the gateway is routed exactly as its
deployment's own router would route it.

Discovery is two watches (gateway_watch.py): LLMDeployments (the table) and engine
EndpointSlices (each member's backends), partitioned by namespace and the
``toposerve.io/deployment`` label. No polling: a new deployment is routable once both have
answered.

Metrics: the gateway's own ``toposerve_gateway_requests{model,code}`` (every name the table
knows, adapters included; anything else counts as ``model="unknown"`` so a client cannot grow
the series), ``toposerve_gateway_ttft_seconds{model}`` and ``toposerve_gateway_tokens{model,kind}``
(from the engines' usage), plus every member's public series with ``llmdeployment_namespace`` and ``llmdeployment``
labels added (TTFT, latency, errors, decisions, demand), which is what the autoscaler reads for
gateway-mode deployments. Not ``namespace``: Prometheus puts its target's namespace there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from toposerve.router import endpoints as ep
from toposerve.router import models as md
from toposerve.router.proxy import _LATENCY_BUCKETS, TTFT_KEY, USAGE_KEY, Router, RouterConfig
from toposerve.router.tenant_gate import TenantGate

log = logging.getLogger("toposerve.router.gateway")

UNKNOWN_MODEL = "unknown"


def slice_owner(obj: Mapping[str, Any]) -> str | None:
    """`namespace/deployment` of an engine EndpointSlice (from the label the renderer puts on the
    engine Services, which Kubernetes copies to their slices); None for any other slice."""
    meta = obj.get("metadata") or {}
    labels = meta.get("labels") or {}
    dep = labels.get(ep.DEPLOYMENT_LABEL)
    if not dep or labels.get(ep.COMPONENT_LABEL) != "engine":
        return None
    return f"{meta.get('namespace', '')}/{dep}"


class _Members(Collector):
    """Each member router's public series, labelled with its deployment, merged by family (one
    family may appear once per exposition: Prometheus refuses a second TYPE line)."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    def collect(self) -> Iterator[Metric]:
        fams: dict[str, Metric] = {}
        for key, member in sorted(self.gateway.members.items()):
            ns, name = key.split("/", 1)
            for fam in member.metrics.public.collect():
                out = fams.get(fam.name)
                if out is None:
                    out = fams[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
                for s in fam.samples:
                    labels = {**s.labels, "llmdeployment_namespace": ns, "llmdeployment": name}
                    out.add_sample(s.name, labels, s.value, s.timestamp, s.exemplar)
        yield from fams.values()


class Gateway(Router):
    """The gateway: a front door (this Router's) and one member Router per LLMDeployment."""

    def __init__(
        self, template: RouterConfig | None = None, namespace: str | None = None, reap_period_s: float = 1.0
    ) -> None:
        super().__init__([], template, discovering=True)
        self.template = self.cfg
        self.namespace = namespace  # None: every namespace
        self.members: dict[str, Router] = {}
        self.table = md.build([])
        self.created = int(time.time())
        self._objects: dict[str, Mapping[str, Any]] = {}
        self._slices: dict[str, dict[str, tuple[ep.Endpoint, ...]]] = {}
        self._deployments_known = False
        self._slices_known = False
        self._running = False
        self._retired: dict[str, Router] = {}  # left the table: stopped once idle
        self._toggles: set[asyncio.Task[None]] = set()  # members turning KV events on or off
        self._in_flight: dict[int, int] = {}  # id(member) -> requests the gateway has on it
        self._reaper: asyncio.Task[None] | None = None
        self.reap_period_s = reap_period_s
        self._starting: dict[int, asyncio.Task[None]] = {}  # id(member) -> its start, until done
        self.gw_registry = CollectorRegistry(auto_describe=True)
        self.gw_requests = Counter(
            "toposerve_gateway_requests",
            "Requests through the gateway by requested model (served name, alias or adapter) and code.",
            ["model", "code"],
            registry=self.gw_registry,
        )
        self.gw_ttft = Histogram(
            "toposerve_gateway_ttft_seconds",
            "Time to the first response bytes, by requested model.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=self.gw_registry,
        )
        self.gw_tokens = Counter(
            "toposerve_gateway_tokens",
            "Tokens by requested model and kind (prompt, completion), as the engines report them in "
            "their usage (every non-streaming answer; streams with stream_options.include_usage).",
            ["model", "kind"],
            registry=self.gw_registry,
        )
        self.gw_registry.register(_Members(self))
        # Tenants (docs/tenants.md): admission and flow control; inactive until configured
        self.tenants = TenantGate(self.gw_registry, lambda m: self._in_flight.get(id(m), 0))

    # ------------------------------------------------------------------------------ discovery

    def _key_ok(self, key: str) -> bool:
        return self.namespace is None or key.split("/", 1)[0] == self.namespace

    def deployments_listed(self, items: Sequence[Mapping[str, Any]]) -> None:
        """A full list of LLMDeployments (the first answer, and every re-list after a watch ends)."""
        self._objects = {k: o for o in items if self._key_ok(k := _obj_key(o))}
        self._deployments_known = True
        self._rebuild()

    def deployment_event(self, kind: str, obj: Mapping[str, Any]) -> None:
        key = _obj_key(obj)
        if not self._key_ok(key):
            return
        if kind == "DELETED":
            self._objects.pop(key, None)
        elif kind in ("ADDED", "MODIFIED"):
            self._objects[key] = obj
        self._rebuild()

    def slices_listed(self, items: Sequence[Mapping[str, Any]]) -> None:
        fresh: dict[str, dict[str, tuple[ep.Endpoint, ...]]] = {}
        for o in items:
            key = slice_owner(o)
            if key is not None and self._key_ok(key):
                fresh.setdefault(key, {}).update(ep.from_list([o]))
        stale = set(self._slices) - set(fresh)
        self._slices = fresh
        self._slices_known = True
        for key in set(fresh) | stale:
            self._feed(key)
        self._settle_discovery()

    def slice_event(self, kind: str, obj: Mapping[str, Any]) -> None:
        key = slice_owner(obj)
        if key is None or not self._key_ok(key):
            return
        self._slices[key] = ep.apply_event(self._slices.get(key, {}), kind, obj)
        if not self._slices[key]:
            del self._slices[key]
        self._feed(key)

    def _settle_discovery(self) -> None:
        if self._deployments_known and self._slices_known and self.discovering:
            self.discovering = False
            log.info("gateway ready: %d models of %d deployments", len(self.table.routes), len(self.members))

    def _member_config(self, entry: md.Entry) -> RouterConfig:
        cfg = self.template
        return replace(
            cfg,
            strategy=entry.strategy or cfg.strategy,
            session_header=entry.session_header or cfg.session_header,
            # as the dedicated router's --adapter-slots: the engines keep maxCpuLoras registered
            adapters=replace(cfg.adapters, slots=entry.adapter_slots)
            if entry.adapter_slots
            else cfg.adapters,
            # the deployment's engines publish KV events only with spec.routing.kvEvents (render);
            # the gateway's own --kv-events turns it on for every deployment (static configs)
            kv_events=replace(cfg.kv_events, enabled=cfg.kv_events.enabled or entry.kv_events),
        )

    def _rebuild(self) -> None:
        table = md.build(self._objects.values(), self.namespace)
        for c in table.conflicts:
            if c not in self.table.conflicts:
                log.warning(
                    "model name %r is claimed by %s and %s: %s keeps it", c.model, c.winner, c.loser, c.winner
                )
        self.table = table
        for key, entry in table.entries.items():
            member = self.members.get(key)
            if member is None:
                member = self._retired.pop(key, None) or Router([], self._member_config(entry))
                self.members[key] = member
                if self._running:
                    self._start_member(member)
                self._feed(key)
                log.info("routing %s as %s", key, ", ".join(entry.names()))
            else:
                cfg = self._member_config(entry)
                if cfg.kv_events.enabled != member.cfg.kv_events.enabled and self._running:
                    task = asyncio.get_running_loop().create_task(member.set_kv_events(cfg.kv_events.enabled))
                    self._toggles.add(task)
                    task.add_done_callback(self._toggles.discard)
                member.cfg = cfg
                member.lora.opts = member.cfg.adapters  # a changed spec.lora.maxCpuLoras: its slots
            set_adapters = getattr(member, "set_adapters", None)
            if set_adapters is not None:
                set_adapters(dict(entry.adapters))
        for key in [k for k in self.members if k not in table.entries]:
            self._retired[key] = self.members.pop(key)
            log.info("no longer routing %s (stopped once its requests finish)", key)
        self._settle_discovery()

    def _feed(self, key: str) -> None:
        member = self.members.get(key)
        if member is not None:
            member.reconcile(ep.desired_backends(self._slices.get(key, {})))

    # ------------------------------------------------------------------------------ lifecycle

    def _start_member(self, member: Router) -> None:
        task = asyncio.get_running_loop().create_task(member.start())
        self._starting[id(member)] = task
        task.add_done_callback(lambda _t: self._starting.pop(id(member), None))

    async def start(self, probe: bool = True) -> None:
        await super().start(probe=False)  # the front has no backends of its own
        self._running = True
        await asyncio.gather(*(m.start(probe) for m in self.members.values()))
        self._reaper = asyncio.create_task(self._reap())

    async def stop(self) -> None:
        self._running = False
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        await asyncio.gather(*(m.stop() for m in [*self.members.values(), *self._retired.values()]))
        await super().stop()

    async def _reap(self) -> None:
        """Stop the member routers of deployments that left the table, once idle (never cut a
        request that was routed before its deployment was deleted or its mode changed)."""
        while True:
            await asyncio.sleep(self.reap_period_s)
            for key, member in list(self._retired.items()):
                if self._in_flight.get(id(member), 0) == 0 and key not in self.members:
                    del self._retired[key]
                    await member.stop()

    # ------------------------------------------------------------------------------ handlers

    async def _dispatch(
        self, request: web.Request, raw: bytes, body: dict[str, Any], t0: float
    ) -> web.StreamResponse:
        """The body is read and parsed by the front door (Router._completion): its `model` picks
        the member router."""
        if self.tenants.active and (unauthenticated := self.tenants.authenticate(request.headers)):
            return self._count(UNKNOWN_MODEL, unauthenticated)  # 401 before a word about models
        model = body.get("model")
        member = self.member_for(model)
        if isinstance(member, web.Response):
            return self._count(UNKNOWN_MODEL, member)
        assert isinstance(model, str)
        if self.tenants.active:  # admission, then the flow-control queue while replicas are saturated
            resp = await self.tenants.serve(
                request,
                model,
                member,
                body,
                len(raw),
                lambda: self._on_member(request, raw, body, t0, model, member),
            )
            return self._count(model, resp)
        return self._count(model, await self._on_member(request, raw, body, t0, model, member))

    async def _on_member(
        self, request: web.Request, raw: bytes, body: dict[str, Any], t0: float, model: str, member: Router
    ) -> web.StreamResponse:
        """Route on the member router, counting what the gateway has on it (for the reaper and
        for flow control) and the TTFT and tokens per requested model."""
        self._in_flight[id(member)] = self._in_flight.get(id(member), 0) + 1
        try:
            starting = self._starting.get(id(member))
            if starting is not None:  # its deployment appeared a moment ago
                await asyncio.shield(starting)
            resp = await member.route(request, raw, body, t0)
            if (ttft := request.get(TTFT_KEY)) is not None:
                self.gw_ttft.labels(model).observe(ttft)
            if (usage := request.get(USAGE_KEY)) is not None:
                self.gw_tokens.labels(model, "prompt").inc(usage[0])
                self.gw_tokens.labels(model, "completion").inc(usage[1])
            return resp
        finally:
            self._in_flight[id(member)] -= 1

    def member_for(self, model: object) -> Router | web.Response:
        """The member router a request's `model` names (served name, alias or adapter), or the
        400 (no model) / 404 (unknown, with the closest names) to answer. The HTTP path and the
        Endpoint Picker (router/epp/) both pick through this."""
        if not isinstance(model, str) or not model:
            msg = "the `model` field is required: this endpoint serves several models (GET /v1/models)"
            return self._error(400, msg, "bad_request")
        route = self.table.resolve(model)
        member = self.members.get(route.key) if route is not None else None
        if route is None or member is None:
            msg = f"The model `{model[:256]}` does not exist."
            near = self.table.closest(model)
            if near:
                msg += " Did you mean " + ", ".join(f"`{n}`" for n in near) + "?"
            return self._error(404, msg, "unknown_model")
        return member

    def _count(self, model: str, resp: web.StreamResponse) -> web.StreamResponse:
        self.gw_requests.labels(model, str(resp.status)).inc()
        return resp

    def _ready(self, member: Router) -> int:
        return sum(1 for b in member.backends.values() if b.health.probe_ok and not b.draining)

    def routable(self) -> dict[str, int]:
        """model name -> ready replicas behind it (0: known, but nothing to route to now)."""
        out: dict[str, int] = {}
        for name, route in self.table.routes.items():
            member = self.members.get(route.key)
            if member is not None:
                out[name] = self._ready(member)
        return out

    def by_deployment(self) -> dict[str, dict[str, Any]]:
        """`namespace/name` -> the names routed to it and its ready replicas (the operator writes
        status.gateway from this: a name kept by an elder deployment is not listed here)."""
        out: dict[str, dict[str, Any]] = {
            key: {"models": [], "readyReplicas": self._ready(m), "adapters": m.lora.report()}
            for key, m in self.members.items()
        }
        for name, route in self.table.routes.items():
            if route.key in out:
                out[route.key]["models"].append(name)
        return out

    async def handle_health(self, request: web.Request) -> web.Response:
        """Ready once both watches answered; the body says which models have a replica to go to,
        and per deployment which names route to it. A model at zero replicas stays listed (its
        requests are held for a replica to appear)."""
        if self.discovering:
            return web.json_response({"status": "discovering", "models": {}, "deployments": {}}, status=503)
        body = {
            "status": "draining" if self.draining else "ok",
            "models": self.routable(),
            "deployments": self.by_deployment(),
            "conflicts": [c.model for c in self.table.conflicts],
        }
        if self.tenants.sharing is not None:  # tenant budgets across replicas (docs/tenants.md)
            body["budgets"] = self.tenants.sharing.status()
        return web.json_response(body, status=503 if self.draining else 200)

    async def handle_models(self, request: web.Request) -> web.StreamResponse:
        """Every model in scope; with tenants, those the caller's tenant may use (401 without a
        key where keys are required)."""
        if not self.tenants.active:
            return web.json_response(md.model_cards(self.table, self.created))
        if (unauthenticated := self.tenants.authenticate(request.headers)) is not None:
            return unauthenticated
        allows = self.tenants.allowed_models(request.headers)
        names = [n for n in self.table.routes if allows(n)]
        return web.json_response(md.model_cards(self.table, self.created, names))

    async def handle_metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.gw_registry), content_type="text/plain")


def _obj_key(obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    return f"{meta.get('namespace', '')}/{meta.get('name', '')}"
