"""LoRA adapter placement: which replicas serve an adapter (pure decisions over plain data).

An adapter need not be on every replica. The router loads adapters at run time through vLLM's
``POST /v1/load_lora_adapter`` {"lora_name", "lora_path"} and removes them with
``POST /v1/unload_lora_adapter`` {"lora_name"} (vLLM 0.33.0 with
``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``). Placement per replica is the router's job, so the
engines run with no static ``--lora-modules`` and no resolver plugin. The I/O is in `lora.py`
(HTTP calls, the per-engine state, loads in flight) and `proxy.py` (routing); this module only
decides, on snapshots, so every rule is tested with hypothesis without sockets or clocks.

What a replica holds, in vLLM's terms: loading an adapter registers it in the API server
(``/v1/models`` then lists it with ``parent`` = the base model and ``root`` = its path) and
preloads it into the engine's CPU cache, which keeps at most ``max_cpu_loras`` adapters (LRU);
at most ``max_loras`` of those sit in GPU slots at a time, swapped LRU by the engine itself per
batch. An adapter that is registered but fell out of the CPU cache is read from disk again on
its next request. So the router's **slots** per replica = how many adapters it keeps registered
there = ``max_cpu_loras`` (the router's ``--adapter-slots``; vLLM's default is ``max_loras``,
which the engine's ``vllm:lora_requests_info`` gauge reports as its ``max_lora`` label, the
fallback when the flag is not given). Keeping registrations within the CPU cache means every
registered adapter is served without a disk read, and the engine's GPU LRU does the rest.

The rules (`place`):

- route to a replica that holds the adapter (registered under the path the spec names),
  preferring those where it is running or waiting (on a GPU slot now, per the gauge), among
  holders under the bounded-load limit; the routing strategy then picks among them;
- when every holder is above the bound, the adapter is hot: it is also loaded, in the
  background, on a replica with a free slot (one such spread load at a time per adapter);
- no holder: join a load already in progress, else load on the least loaded replica with a
  free slot, else evict the least recently used adapter (by this router's record of use; an
  adapter it has no record of counts as unused) of some replica and load there. An adapter with
  requests of this router in flight on that replica is never evicted; adapters no longer in the
  spec go first, those the engine reports running or waiting last.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# Placement actions
ROUTE = "route"  # send to one of `targets` (and maybe start a spread load on `load_on`)
LOAD = "load"  # load on `load_on` (after unloading `evict` there), then send there
UNAVAILABLE = "unavailable"  # nowhere to put it now

# Reasons (a small closed set)
P_RUNNING = "running"  # a holder where the engine runs or queues the adapter
P_REGISTERED = "registered"  # a holder where it is registered only
P_SPREAD = "spread"  # holders all above the bound: routed to them, and loading one more
P_LOADING = "loading"  # no holder yet; a load is in progress: wait for it
P_FREE_SLOT = "free_slot"
P_EVICT = "evict"
P_NO_REPLICA = "no_replica"
P_NO_SLOT = "no_slot"  # every slot of every replica pinned by requests in flight or loads

# Model resolution
BASE = "base"  # not an adapter: forwarded as is (the engine judges the name)
ADAPTER = "adapter"
UNKNOWN = "unknown"  # a name the router knows is not served (a removed adapter): 404


@dataclass(frozen=True, slots=True)
class ReplicaState:
    """One replica as placement sees it."""

    id: str
    registered: Mapping[str, str] = field(default_factory=dict)  # adapter -> path, as listed
    slots: int = 1  # adapters the router keeps registered there (see the module docstring)
    running: frozenset[str] = frozenset()  # vllm:lora_requests_info running_lora_adapters
    waiting: frozenset[str] = frozenset()  # ... waiting_lora_adapters
    loading: frozenset[str] = frozenset()  # loads by this router in progress there
    in_use: Mapping[str, int] = field(default_factory=dict)  # this router's requests in flight
    load: float = 0.0  # requests in flight / GPU weight
    eligible: bool = True  # healthy and not draining

    def occupied(self) -> int:
        return len(set(self.registered) | self.loading)

    def free(self) -> int:
        return max(0, max(self.slots, 1) - self.occupied())

    def holds(self, name: str, path: str) -> bool:
        return name not in self.loading and self.registered.get(name) == path

    def busy(self, name: str) -> bool:
        """This router has a request on `name` there, or is loading it."""
        return self.in_use.get(name, 0) > 0 or name in self.loading


@dataclass(frozen=True, slots=True)
class Config:
    spread_factor: float = 1.25  # a holder is hot above factor x the mean load of the replicas
    spread_min: float = 4.0  # ... and above this many requests, so low traffic stays put


@dataclass(frozen=True, slots=True)
class Placement:
    action: str
    reason: str
    targets: tuple[str, ...] = ()  # ROUTE: the replicas to choose among
    load_on: str | None = None  # LOAD: where; ROUTE: a spread load to start in the background
    evict: str | None = None  # the adapter to unload on `load_on` first


def resolve_model(
    model: object, spec: Mapping[str, str], retired: Iterable[str] = (), registered: Iterable[str] = ()
) -> str:
    """What a request's ``model`` names: an adapter of the spec, a name known not to be served
    (removed from the spec, or registered on an engine but not in the spec), or anything else,
    which is the engines' to judge (the base model, or their 404)."""
    if not isinstance(model, str):
        return BASE
    if model in spec:
        return ADAPTER
    if model in set(retired) or model in set(registered):
        return UNKNOWN
    return BASE


def _mean_load(replicas: Sequence[ReplicaState]) -> float:
    return sum(r.load for r in replicas) / len(replicas) if replicas else 0.0


def hot_bound(replicas: Sequence[ReplicaState], cfg: Config) -> float:
    """Load above which a holder counts as hot (bounded loads over the eligible replicas)."""
    return max(cfg.spread_min, cfg.spread_factor * _mean_load(replicas))


def _least_loaded(rs: Iterable[ReplicaState]) -> ReplicaState:
    return min(rs, key=lambda r: (r.load, r.occupied(), r.id))


def _victims(
    r: ReplicaState, name: str, spec: Mapping[str, str], last_used: Mapping[tuple[str, str], float]
) -> list[tuple[tuple[Any, ...], str]]:
    """(rank, adapter) of what may be unloaded on `r` to make room for `name`, best first."""
    out = []
    for a, path in r.registered.items():
        if r.busy(a) or (a == name and path == spec.get(name)):
            continue
        current = spec.get(a) == path
        active = a in r.running or a in r.waiting
        out.append(((current, active, last_used.get((r.id, a), float("-inf")), a), a))
    out.sort()
    return out


def place(
    name: str,
    spec: Mapping[str, str],
    replicas: Sequence[ReplicaState],
    last_used: Mapping[tuple[str, str], float],
    cfg: Config = Config(),
) -> Placement:
    """Where a request for adapter `name` (a key of `spec`) goes. Deterministic in its inputs."""
    path = spec[name]
    elig = sorted((r for r in replicas if r.eligible), key=lambda r: r.id)
    if not elig:
        return Placement(UNAVAILABLE, P_NO_REPLICA)
    holders = [r for r in elig if r.holds(name, path)]
    if holders:
        bound = hot_bound(elig, cfg)
        cool = [r for r in holders if r.load < bound]
        active = [r for r in cool if name in r.running or name in r.waiting]
        targets = active or cool or holders
        reason = P_RUNNING if active else P_REGISTERED
        spread = None
        if not cool and not any(name in r.loading for r in elig):
            room = [r for r in elig if name not in r.registered and r.free() > 0]
            if room:
                spread = _least_loaded(room).id
                reason = P_SPREAD
        return Placement(ROUTE, reason, tuple(r.id for r in targets), load_on=spread)
    loading = [r for r in elig if name in r.loading]
    if loading:
        return Placement(LOAD, P_LOADING, load_on=_least_loaded(loading).id)
    room = [r for r in elig if name not in r.registered and r.free() > 0]
    if room:
        return Placement(LOAD, P_FREE_SLOT, load_on=_least_loaded(room).id)
    best: tuple[tuple[Any, ...], str, str] | None = None
    for r in elig:
        if name in r.registered:  # under another path: only replacing it makes room there
            if r.busy(name):
                continue
            rank: tuple[Any, ...] = ((False, False, float("-inf"), name), r.load, r.id)
            victim = name
        else:
            victims = _victims(r, name, spec, last_used)
            if not victims:
                continue
            rank = (victims[0][0], r.load, r.id)
            victim = victims[0][1]
        if best is None or rank < best[0]:
            best = (rank, r.id, victim)
    if best is None:
        return Placement(UNAVAILABLE, P_NO_SLOT)
    return Placement(LOAD, P_EVICT, load_on=best[1], evict=best[2])


def surplus(
    r: ReplicaState,
    spec: Mapping[str, str],
    retired: Iterable[str],
    last_used: Mapping[tuple[str, str], float],
) -> list[str]:
    """Adapters to unload from `r` now: those removed from the spec (`retired`) or registered
    under a path the spec no longer names, once no request of this router uses them; then,
    while the replica holds more than its slots, the least recently used idle ones. Names this
    router never had in its spec are left to whoever registered them (another router may serve
    a newer spec) unless the slots overflow."""
    gone = set(retired)
    out = [
        a
        for a, path in sorted(r.registered.items())
        if not r.busy(a) and (a in gone or (a in spec and spec[a] != path))
    ]
    left = r.occupied() - len(out)
    if left > max(r.slots, 1):
        for _, a in _victims(r, "", spec, last_used):
            if left <= max(r.slots, 1):
                break
            if a not in out:
                out.append(a)
                left -= 1
    return out


def reloads(r: ReplicaState, placed: Iterable[str], spec: Mapping[str, str]) -> list[str]:
    """Adapters this router registered on `r` that it no longer lists (it restarted, or another
    router evicted them) and that are still in the spec: registered again, as slots allow."""
    missing = sorted(a for a in set(placed) if a in spec and a not in r.registered and a not in r.loading)
    return missing[: r.free()]


# --------------------------------------------------------------------------------------------- parsing


def _parse_labels(s: str) -> dict[str, str]:
    """Prometheus exposition labels ``a="x",b="y,z"`` (values may hold commas and escapes)."""
    out: dict[str, str] = {}
    i, n = 0, len(s)
    while i < n:
        eq = s.find("=", i)
        if eq < 0 or eq + 1 >= n or s[eq + 1] != '"':
            break
        key = s[i:eq].strip().lstrip(",").strip()
        k = eq + 2
        val: list[str] = []
        while k < n and s[k] != '"':
            if s[k] == "\\" and k + 1 < n:
                val.append("\n" if s[k + 1] == "n" else s[k + 1])
                k += 2
            else:
                val.append(s[k])
                k += 1
        out[key] = "".join(val)
        i = k + 1
        while i < n and s[i] in ", ":
            i += 1
    return out


@dataclass(frozen=True, slots=True)
class LoraInfo:
    """The engine's newest ``vllm:lora_requests_info`` sample."""

    max_lora: int
    running: frozenset[str]
    waiting: frozenset[str]


def _names(v: str) -> frozenset[str]:
    return frozenset(x for x in v.split(",") if x)


def parse_lora_info(text: str) -> LoraInfo | None:
    """From a vLLM ``/metrics`` page. vLLM sets the gauge to the current time under the label set
    of the moment and never removes an old label set, so the newest sample is the one with the
    largest value. None when the page has none (LoRA off, or no step logged yet)."""
    best: tuple[float, dict[str, str]] | None = None
    prefix = "vllm:lora_requests_info{"
    if prefix not in text:
        return None
    for line in text.splitlines():
        if not line.startswith(prefix):
            continue
        end = line.rfind("}")
        if end < 0:
            continue
        try:
            value = float(line[end + 1 :].split()[0])
        except (ValueError, IndexError):
            continue
        if best is None or value > best[0]:
            best = (value, _parse_labels(line[len(prefix) : end]))
    if best is None:
        return None
    labels = best[1]
    try:
        max_lora = int(float(labels.get("max_lora", "0")))
    except ValueError:
        max_lora = 0
    return LoraInfo(
        max_lora,
        _names(labels.get("running_lora_adapters", "")),
        _names(labels.get("waiting_lora_adapters", "")),
    )


def parse_models(doc: object) -> tuple[dict[str, str], list[str]] | None:
    """(registered adapters name -> path, base model ids) from a ``/v1/models`` answer: vLLM
    lists an adapter with ``parent`` (its base model) and ``root`` (the path it was loaded
    from), a base model without a parent. None when the document is not such a list."""
    if not isinstance(doc, Mapping) or not isinstance(doc.get("data"), list):
        return None
    adapters: dict[str, str] = {}
    base: list[str] = []
    for card in doc["data"]:
        if not isinstance(card, Mapping) or not isinstance(card.get("id"), str):
            continue
        if card.get("parent"):
            root = card.get("root")
            adapters[card["id"]] = root if isinstance(root, str) else ""
        else:
            base.append(card["id"])
    return adapters, base
