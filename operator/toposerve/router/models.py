"""The gateway's model table: which LLMDeployment (and which adapter) a request's `model` names.

Pure: built from LLMDeployment objects as the API serves them (camelCase JSON), so the rules are
unit-tested on plain dicts and the watch (gateway_watch.py) only passes objects through.

Rules (docs/gateway.md):

- A deployment is routed by the gateway unless ``spec.routing.mode`` is ``none`` (or the older
  ``routing.enabled: false``): ``gateway`` deployments have no router of their own, ``dedicated``
  ones keep theirs and are reachable through the gateway as well.
- Its names: the served name (``model.servedName``, else ``model.name``), then
  ``model.aliases``, then each ``adapters[].name`` (an adapter's parent is the served name; its
  source is passed on as the engines load it, ``AdapterSpec.engine_source``, as the renderer
  passes it to a dedicated router).
- Two deployments claiming one name: the older one (creationTimestamp, then namespace/name)
  keeps it, deterministically in every gateway replica; the other is reported as a conflict and
  keeps its other names. A deployment being deleted is not routed.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from toposerve.api.spec import AdapterSpec, LoraSpec

MODE_DEDICATED = "dedicated"
MODE_GATEWAY = "gateway"
MODE_NONE = "none"


@dataclass(frozen=True)
class Entry:
    """One routable LLMDeployment as the gateway needs it."""

    namespace: str
    name: str
    served: tuple[str, ...]  # the served name first, then the aliases
    adapters: Mapping[str, str] = field(default_factory=dict)  # adapter name -> source
    mode: str = MODE_DEDICATED
    strategy: str = ""  # "" : the gateway's default
    session_header: str = ""
    created: str = ""  # RFC 3339: sorts in time order
    adapter_slots: int = (
        0  # spec.lora's maxCpuLoras (its default: maxLoras): adapters an engine keeps; 0: no lora
    )
    kv_events: bool = False  # spec.routing.kvEvents: the engines publish KV-cache events

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def primary(self) -> str:
        return self.served[0]

    def names(self) -> list[str]:
        return [*self.served, *self.adapters]


@dataclass(frozen=True)
class Route:
    """Where a model name goes: a deployment (its key) and, for an adapter, the adapter's name."""

    key: str
    adapter: str | None = None


@dataclass(frozen=True)
class Conflict:
    model: str
    winner: str  # deployment key that keeps the name
    loser: str


@dataclass(frozen=True)
class Table:
    entries: Mapping[str, Entry]  # key -> entry
    routes: Mapping[str, Route]  # model name -> route
    conflicts: tuple[Conflict, ...] = ()

    def resolve(self, model: str) -> Route | None:
        return self.routes.get(model)

    def closest(self, model: str, n: int = 3) -> list[str]:
        """Names that look like `model` (for the 404's message), best first."""
        return difflib.get_close_matches(model, list(self.routes), n=n, cutoff=0.5)


def _strs(v: object) -> list[str]:
    return [x for x in v if isinstance(x, str) and x] if isinstance(v, list) else []


def _engine_source(a: object) -> str | None:
    """The adapter's source as the engines load it (AdapterSpec.engine_source: a cache source is
    a path in the engine pod); None for an entry the API server would not have admitted."""
    if not isinstance(a, Mapping) or not isinstance(a.get("name"), str):
        return None
    try:
        return AdapterSpec.model_validate(a).engine_source
    except ValidationError:
        return None


def _mode(routing: Mapping[str, Any]) -> str:
    mode = routing.get("mode")
    if mode in (MODE_DEDICATED, MODE_GATEWAY, MODE_NONE):
        return str(mode)
    return MODE_NONE if routing.get("enabled") is False else MODE_DEDICATED


def entry_from_object(obj: Mapping[str, Any]) -> Entry | None:
    """The gateway's view of one LLMDeployment; None when it is not routed by the gateway."""
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    if not isinstance(meta, Mapping) or not isinstance(spec, Mapping) or meta.get("deletionTimestamp"):
        return None
    routing = spec.get("routing") or {}
    model = spec.get("model") or {}
    if not isinstance(routing, Mapping) or not isinstance(model, Mapping):
        return None
    mode = _mode(routing)
    primary = model.get("servedName") or model.get("name")
    if mode == MODE_NONE or not isinstance(primary, str) or not primary:
        return None
    served = tuple(dict.fromkeys([primary, *_strs(model.get("aliases"))]))
    adapters: dict[str, str] = {}
    for a in spec.get("adapters") or ():
        source = _engine_source(a)
        if source is not None and a["name"] not in served:
            adapters.setdefault(a["name"], source)
    return Entry(
        namespace=str(meta.get("namespace") or ""),
        name=str(meta.get("name") or ""),
        served=served,
        adapters=adapters,
        mode=mode,
        strategy=str(routing.get("strategy") or ""),
        session_header=str(routing.get("sessionHeader") or "").lower(),
        created=str(meta.get("creationTimestamp") or ""),
        adapter_slots=_adapter_slots(spec.get("lora")),
        kv_events=routing.get("kvEvents") is True,
    )


def _adapter_slots(lora: object) -> int:
    """What a dedicated router gets as --adapter-slots (render: the engines' --max-cpu-loras)."""
    if not isinstance(lora, Mapping):
        return 0
    try:
        return LoraSpec.model_validate(lora).effective_max_cpu_loras
    except ValidationError:
        return 0


def build(objects: Iterable[Mapping[str, Any]], namespace: str | None = None) -> Table:
    """The table over every LLMDeployment in scope (`namespace` None: every namespace)."""
    entries = [
        e
        for o in objects
        if (e := entry_from_object(o)) is not None and (namespace is None or e.namespace == namespace)
    ]
    entries.sort(key=lambda e: (e.created, e.namespace, e.name))  # the elder first: it keeps a name
    routes: dict[str, Route] = {}
    conflicts: list[Conflict] = []
    for e in entries:
        claims = [(n, Route(e.key)) for n in e.served] + [(a, Route(e.key, a)) for a in e.adapters]
        for name, route in claims:
            held = routes.get(name)
            if held is None:
                routes[name] = route
            elif held.key != e.key:
                conflicts.append(Conflict(name, held.key, e.key))
    return Table({e.key: e for e in entries}, routes, tuple(conflicts))


def model_cards(table: Table, created: int, routable: Sequence[str] | None = None) -> dict[str, Any]:
    """The /v1/models answer, shaped as vLLM's (entrypoints/openai/models/protocol.py ModelCard:
    id, object, created, owned_by, root, parent); adapters have their base model as `parent`.
    `routable`: only these names (None: all)."""
    wanted = None if routable is None else set(routable)
    data: list[dict[str, Any]] = []
    for name in sorted(table.routes):
        if wanted is not None and name not in wanted:
            continue
        route = table.routes[name]
        entry = table.entries[route.key]
        card: dict[str, Any] = {
            "id": name,
            "object": "model",
            "created": created,
            "owned_by": "vllm",
            "root": entry.adapters.get(route.adapter, name) if route.adapter else name,
            "parent": entry.primary if route.adapter else None,
        }
        data.append(card)
    return {"object": "list", "data": data}
