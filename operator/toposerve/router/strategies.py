"""Routing strategies: pure decisions over plain data.

Why pure: the proxy is an I/O shell that snapshots backend load into `BackendState` records,
asks `choose()` for a `Decision`, then calls `commit()` to update the small amount of routing
memory (round-robin counter, prefix index, session table). Every rule here can therefore be
tested exhaustively, with hypothesis, without sockets or clocks (`now` is always an argument).

Strategies (names are what `--strategy`, `spec.routing` and the `x-toposerve-strategy` header take):

- ``round-robin`` and ``least-request``: the naive baselines (no weights, no pool rules).
- ``token-aware``: lowest pending token load; the ledger removes exactly what it added.
- ``gpu-weighted``: token load divided by the GPU's throughput weight (H100 gets ~1.6x an A100).
- ``prefix-aware``: longest cached-prefix match over chained block hashes (an approximate radix
  tree), limited by a bounded-load rule so that a hot prefix cannot overload one replica.
- ``session``: sticky by session id with a TTL; fails over when the bound backend is unhealthy,
  draining or saturated.
- ``auto`` (default): weighted score of prefix affinity, token load, KV-cache usage, engine
  queue length and session stickiness, under the same bounded-load rule.

Homes (opt-in, ``Config.w_home``): a weighted rendezvous hash of the conversation's root names the
same backend in every router replica, so replicas that each see part of a conversation agree.

All LLM-aware strategies (everything except the two baselines) apply the long-context rule first:
prompts at or above ``long_context_threshold`` tokens go to the long-context pool when one is up.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

ROUND_ROBIN = "round-robin"
LEAST_REQUEST = "least-request"
TOKEN_AWARE = "token-aware"
GPU_WEIGHTED = "gpu-weighted"
PREFIX_AWARE = "prefix-aware"
SESSION = "session"
AUTO = "auto"
STRATEGIES: tuple[str, ...] = (
    ROUND_ROBIN,
    LEAST_REQUEST,
    TOKEN_AWARE,
    GPU_WEIGHTED,
    PREFIX_AWARE,
    SESSION,
    AUTO,
)

# Decision reasons (a metrics label, so a small closed set).
R_ROUND_ROBIN = "round_robin"
R_LEAST_LOAD = "least_load"
R_PREFIX_HIT = "prefix_hit"
R_PREFIX_MISS = "prefix_miss"
R_PREFIX_OVERLOADED = "prefix_overloaded"
R_SESSION_HIT = "session_hit"
R_SESSION_NEW = "session_new"
R_SESSION_FAILOVER = "session_failover"
R_AUTO_PREFIX = "auto_prefix"
R_AUTO_SESSION = "auto_session"
R_AUTO_LOAD = "auto_load"
R_AUTO_HOME = "auto_home"

DEFAULT_BLOCK_CHARS = 128  # ~25-30 tokens: fine enough for routing, cheap to hash on the hot path


@dataclass(frozen=True, slots=True)
class BackendState:
    """A snapshot of one backend as the router sees it at decision time."""

    id: str
    weight: float = 1.0  # relative decode throughput (toposerve.api.gpus.throughput_weight)
    in_flight: int = 0  # requests this router has open on it
    pending_tokens: int = 0  # estimated tokens of work still outstanding (ledger)
    kv_usage: float = 0.0  # vllm:kv_cache_usage_perc, 0..1, scraped
    waiting: int = 0  # vllm:num_requests_waiting, scraped
    healthy: bool = True  # probes pass and not ejected
    draining: bool = False  # terminating / not ready: finish in-flight, take nothing new
    long_context: bool = False  # belongs to the pool planned for long context
    pool: str = ""
    gpu_type: str = ""


@dataclass(frozen=True, slots=True)
class KVMatch:
    """What the engines' own KV-cache events say (router/kvindex.py): of the prompt's ``blocks``
    full engine blocks, how many leading ones each backend with a fresh index caches. Backends
    not in ``matched`` (stale index) are scored on the approximate index, scaled to these blocks."""

    blocks: int
    matched: Mapping[str, int]


@dataclass(frozen=True, slots=True)
class Request:
    """What routing needs to know about one request (extracted by the proxy)."""

    prompt_tokens: int
    max_tokens: int
    block_hashes: tuple[int, ...] = ()
    session_id: str | None = None
    # stable digest of the conversation's root (`affinity_key`): the same in every router replica
    affinity: int | None = None
    affinity_blocks: int = 0  # full blocks of that root: what the home is presumed to hold
    kv: KVMatch | None = None  # set only when routing on KV-cache events

    @property
    def cost(self) -> int:
        """Estimated tokens of work: the seed's prompt + max_tokens."""
        return self.prompt_tokens + self.max_tokens


@dataclass(frozen=True, slots=True)
class Config:
    """Tunables; defaults are what `toposerve router` runs with."""

    bounded_load_factor: float = 1.25  # c in "consistent hashing with bounded loads"
    bounded_load_min: int = 4  # a backend may always hold this many requests, so low traffic keeps affinity
    min_prefix_blocks: int = 1
    long_context_threshold: int = 16384  # prompt tokens
    max_in_flight: int = 512  # per backend, before it counts as saturated
    max_waiting: int = 256  # engine queue length at which a backend counts as saturated
    session_ttl_s: float = 300.0
    # auto scorer weights
    w_prefix: float = 3.0
    w_load: float = 2.0
    w_kv: float = 1.0
    w_queue: float = 1.0
    w_session: float = 2.0
    # home backend (weighted rendezvous hash of `Request.affinity`): what makes independent
    # router replicas agree on a prefix neither of them has routed yet. Off (0) by default: on
    # the mock fleet it raised two routers' hit rate by ~0.02 but not their TTFT (docs/router.md)
    w_home: float = 0.0
    home_load_factor: float = 1.0  # a home takes new work up to its fair share ...
    home_load_min: int = 2  # ... or this many requests, so low traffic keeps its homes


@dataclass(frozen=True, slots=True)
class Decision:
    backend: str
    reason: str
    matched_blocks: int = 0
    long_context: bool = False  # the long-context rule narrowed the candidates


# --------------------------------------------------------------------------------------------- helpers


def block_hashes(
    text: str, block_chars: int = DEFAULT_BLOCK_CHARS, max_blocks: int = 8192
) -> tuple[int, ...]:
    """Chained hashes of fixed-size blocks: block i's hash covers the whole prefix up to it.

    Chaining is what makes a flat set of hashes behave like a radix tree: a match on hash i
    implies a match on the entire prefix, so "longest match" is a scan from the front. Only full
    blocks are hashed, like vLLM's prefix cache. Hashes are process-local (Python's salted hash).
    """
    out: list[int] = []
    prev = 0
    n = min(len(text) // block_chars, max_blocks)
    for i in range(n):
        prev = hash((prev, text[i * block_chars : (i + 1) * block_chars]))
        out.append(prev)
    return tuple(out)


def affinity_key(root: str) -> int:
    """A 64-bit digest of a prompt's root that every router process computes alike.

    `block_hashes` uses Python's salted `hash`, so two router replicas disagree on it; the home
    backend must be the same in every replica, hence blake2b. The proxy passes the conversation's
    root (system prompt + first user turn), which every later turn of that conversation repeats.
    """
    digest = hashlib.blake2b(root.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def home_order(key: int, cands: Sequence[BackendState]) -> list[str]:
    """Backend ids by weighted rendezvous (highest random weight) score for `key`, best first.

    Score -w / ln(u) with u uniform in (0, 1) from blake2b(key, id): every replica that sees the
    same backend ids ranks them alike, each backend is first for a share of keys proportional to
    its throughput weight, and removing a backend moves only the keys it was first for.
    """
    kb = key.to_bytes(8, "big")
    scored = []
    for b in cands:
        h = hashlib.blake2b(kb + b.id.encode("utf-8", "surrogatepass"), digest_size=8).digest()
        u = (int.from_bytes(h, "big") + 0.5) / 2.0**64  # strictly inside (0, 1)
        scored.append((-max(b.weight, 1e-9) / math.log(u), b.id))
    scored.sort(key=lambda x: (-x[0], x[1]))
    return [i for _, i in scored]


def _home(req: Request, cands: Sequence[BackendState], cfg: Config) -> str | None:
    """The request's home among `cands`: the first backend in its rendezvous order that is within
    its fair share (c = `home_load_factor`, at least `home_load_min`), else the first one.

    Consistent hashing with bounded loads, walked in rendezvous order: a hot or unlucky backend
    passes new conversations on in the same order in every replica, instead of queueing them.
    """
    if req.affinity is None or cfg.w_home <= 0 or not cands:
        return None
    order = home_order(req.affinity, cands)
    total = sum(b.in_flight for b in cands)
    wsum = sum(max(b.weight, 1e-9) for b in cands)
    by_id = {b.id: b for b in cands}
    for i in order:
        b = by_id[i]
        fair = max(
            cfg.home_load_min, math.ceil(cfg.home_load_factor * (total + 1) * max(b.weight, 1e-9) / wsum)
        )
        if b.in_flight + 1 <= fair:
            return i
    return order[0]


def _presume_home(matches: dict[str, int], home: str | None, req: Request) -> dict[str, int]:
    """Credit the home with the conversation's root: every replica sends roots there.

    This is what lets a replica that never saw a conversation's earlier turns prefer the backend
    that holds them over one it merely knows holds the (shared) system prompt.
    """
    if home is not None and home in matches:
        matches[home] = max(matches[home], min(req.affinity_blocks, len(req.block_hashes)))
    return matches


def prefix_matches(req: Request, mem: RoutingMemory, ids: Sequence[str]) -> tuple[dict[str, int], int]:
    """Leading blocks each backend caches, and how many blocks the prompt has.

    Without ``req.kv``: the approximate index, in the router's character blocks (what `prefix-aware`
    and `auto` always did). With it: the engines' real caches in engine blocks, and for a backend
    whose index is stale the approximation scaled to engine blocks (rounded down)."""
    approx = mem.prefix.match(req.block_hashes, ids) if req.block_hashes else {}
    if req.kv is None:
        return approx, len(req.block_hashes)
    n, m, approx_n = req.kv.blocks, req.kv.matched, len(req.block_hashes)
    out = {}
    for i in ids:
        exact = m.get(i)
        out[i] = exact if exact is not None else (approx.get(i, 0) * n // approx_n if approx_n else 0)
    return out, n


def is_saturated(b: BackendState, cfg: Config) -> bool:
    return b.in_flight >= cfg.max_in_flight or b.waiting >= cfg.max_waiting


def is_eligible(b: BackendState) -> bool:
    return b.healthy and not b.draining


def available(backends: Sequence[BackendState], cfg: Config) -> list[BackendState]:
    """Backends that may take a new request now: healthy, not draining, not saturated."""
    return [b for b in backends if is_eligible(b) and not is_saturated(b, cfg)]


def long_context_filter(
    req: Request, cands: Sequence[BackendState], cfg: Config
) -> tuple[list[BackendState], bool]:
    """Long prompts go to the long-context pool when any member is available."""
    if req.prompt_tokens >= cfg.long_context_threshold:
        lc = [b for b in cands if b.long_context]
        if lc:
            return lc, True
    return list(cands), False


def bounded_caps(cands: Sequence[BackendState], cfg: Config) -> dict[str, int]:
    """Per-backend in-flight caps for the next request (weighted bounded loads).

    cap_i = max(min, ceil(c * (total + 1) * w_i / sum(w))). Because every cap is rounded up and
    c >= 1, the caps add up to at least total + 1, so some backend is always under its cap.
    """
    total = sum(b.in_flight for b in cands)
    wsum = sum(max(b.weight, 1e-9) for b in cands)
    c = max(cfg.bounded_load_factor, 1.0)
    return {
        b.id: max(cfg.bounded_load_min, math.ceil(c * (total + 1) * max(b.weight, 1e-9) / wsum))
        for b in cands
    }


def _weighted_token_load(b: BackendState, req: Request) -> float:
    return (b.pending_tokens + req.cost) / max(b.weight, 1e-9)


def _rotate_pick(ties: Sequence[BackendState], counter: int) -> BackendState:
    """Deterministic tie-break that spreads ties instead of always taking the first."""
    return ties[counter % len(ties)]


def _argmin(cands: Sequence[BackendState], key: dict[str, float], counter: int) -> BackendState:
    best = min(key[b.id] for b in cands)
    ties = [b for b in cands if key[b.id] <= best + 1e-12]
    return _rotate_pick(ties, counter)


# --------------------------------------------------------------------------------------------- memory


class PrefixIndex:
    """Approximate radix tree: chained block hash -> {backend: last use}, LRU-bounded.

    It approximates what each engine holds in its prefix cache from what this router sent there.
    Two bounds stand in for the engines' cache eviction: a global LRU bound on the index, and,
    where a backend's KV capacity is known (`insert`'s `backend_capacity`, from the engine's
    `vllm:cache_config_info`), a per-backend one: blocks beyond what its cache can hold are taken
    as evicted, least recently sent first and, within one prompt, its tail before its front (as
    vLLM frees them), so a prefix every request repeats stays while one-off histories go. Without
    it a router under KV pressure keeps believing in prefixes the engine evicted long ago.
    """

    def __init__(self, capacity: int = 200_000) -> None:
        self.capacity = capacity
        self._map: OrderedDict[int, dict[str, float]] = OrderedDict()
        # per backend, the blocks it is believed to hold, least recently sent first
        self._held: dict[str, OrderedDict[int, None]] = {}

    def __len__(self) -> int:
        return len(self._map)

    def held(self, backend: str) -> int:
        """How many blocks `backend` is believed to hold."""
        return len(self._held.get(backend, ()))

    def insert(self, hashes: Sequence[int], backend: str, now: float, backend_capacity: int = 0) -> None:
        """Remember that `backend` now holds `hashes`; `backend_capacity` > 0 bounds what it holds."""
        m = self._map
        held = self._held.setdefault(backend, OrderedDict())
        for h in reversed(hashes):  # the front is used last, so it is evicted last
            entry = m.get(h)
            if entry is None:
                entry = {}
                m[h] = entry
            else:
                m.move_to_end(h)
            entry[backend] = now
            held[h] = None
            held.move_to_end(h)
        if backend_capacity > 0:
            while len(held) > backend_capacity:
                old, _ = held.popitem(last=False)
                e = m.get(old)
                if e is not None:
                    e.pop(backend, None)
                    if not e:
                        del m[old]
        while len(m) > self.capacity:
            old, entry = m.popitem(last=False)
            for b in entry:
                self._held[b].pop(old, None)

    def match(self, hashes: Sequence[int], backends: Sequence[str]) -> dict[str, int]:
        """Number of leading blocks of `hashes` each backend is believed to hold."""
        result = dict.fromkeys(backends, 0)
        alive = set(backends)
        m = self._map
        for i, h in enumerate(hashes):
            entry = m.get(h)
            if entry is None:
                for b in alive:
                    result[b] = i
                return result
            if not entry.keys() >= alive:  # the common case (nobody drops out) stays in C
                for b in alive - entry.keys():
                    result[b] = i
                alive &= entry.keys()
                if not alive:
                    return result
        for b in alive:
            result[b] = len(hashes)
        return result

    def retract(self, hashes: Sequence[int], backend: str) -> None:
        """Take back an `insert` of `hashes` on `backend` that did not happen (the request was
        served elsewhere: an Endpoint Picker's fallback). Pass only the blocks that insert added."""
        held = self._held.get(backend)
        for h in hashes:
            entry = self._map.get(h)
            if entry is not None and entry.pop(backend, None) is not None:
                if held is not None:
                    held.pop(h, None)
                if not entry:
                    del self._map[h]

    def forget(self, backend: str) -> None:
        """Drop a backend (removed or restarted: its cache is gone)."""
        for h in self._held.pop(backend, {}):
            entry = self._map.get(h)
            if entry is not None:
                entry.pop(backend, None)
                if not entry:
                    del self._map[h]


def session_key(session_id: str) -> str:
    """A fixed-size key for a client-chosen session id (a header or the `user` field).

    Clients choose these strings, so their length is theirs too: the table keeps a 128-bit
    digest instead, which bounds every entry's size. `surrogatepass` because JSON may carry lone
    UTF-16 surrogates that plain UTF-8 encoding rejects.
    """
    return hashlib.blake2b(session_id.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


class SessionTable:
    """session id -> (backend, expiry), bounded by entries, by bytes and by time.

    Keys are digests (`session_key`), so an entry has a fixed size and the byte bound is an
    entry bound (`ENTRY_BYTES` is a measured CPython figure, with the backend string shared).
    Expired entries are dropped from the old end as new ones arrive, and the least recently
    bound entry goes when the table is full, so unbounded user ids cannot exhaust memory.
    """

    ENTRY_BYTES = 300  # 32-char key str, (backend, expiry) tuple, float, OrderedDict node

    def __init__(self, max_sessions: int = 100_000, max_bytes: int = 64 * 1024 * 1024) -> None:
        self.max_sessions = max(1, min(max_sessions, max_bytes // self.ENTRY_BYTES))
        self._map: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._map)

    def get(self, session_id: str, now: float) -> str | None:
        """The live binding, if any (a pure read)."""
        item = self._map.get(session_key(session_id))
        if item is None or item[1] <= now:
            return None
        return item[0]

    def bind(self, session_id: str, backend: str, now: float, ttl: float) -> None:
        key = session_key(session_id)
        self._map[key] = (backend, now + ttl)
        self._map.move_to_end(key)
        self.expire(now)
        while len(self._map) > self.max_sessions:
            self._map.popitem(last=False)

    def expire(self, now: float) -> int:
        """Drop expired entries from the least recently bound end; returns how many.

        With one TTL per table (the router's case) bind order is expiry order, so this stops at
        the first live entry and costs only what it removes.
        """
        n = 0
        m = self._map
        while m:
            key, (_, expiry) = next(iter(m.items()))
            if expiry > now:
                break
            del m[key]
            n += 1
        return n


@dataclass
class RoutingMemory:
    """All state a strategy reads; only `commit` writes it."""

    counter: int = 0
    prefix: PrefixIndex = field(default_factory=PrefixIndex)
    sessions: SessionTable = field(default_factory=SessionTable)


# --------------------------------------------------------------------------------------------- strategies


def _round_robin(cands: Sequence[BackendState], mem: RoutingMemory) -> Decision:
    return Decision(cands[mem.counter % len(cands)].id, R_ROUND_ROBIN)


def _least_request(cands: Sequence[BackendState], mem: RoutingMemory) -> Decision:
    key = {b.id: float(b.in_flight) for b in cands}
    return Decision(_argmin(cands, key, mem.counter).id, R_LEAST_LOAD)


def _token(cands: Sequence[BackendState], req: Request, mem: RoutingMemory, weighted: bool) -> Decision:
    if weighted:
        key = {b.id: _weighted_token_load(b, req) for b in cands}
    else:
        key = {b.id: float(b.pending_tokens) for b in cands}
    return Decision(_argmin(cands, key, mem.counter).id, R_LEAST_LOAD)


def _prefix(cands: Sequence[BackendState], req: Request, mem: RoutingMemory, cfg: Config) -> Decision:
    caps = bounded_caps(cands, cfg)
    under = [b for b in cands if b.in_flight + 1 <= caps[b.id]]
    home = _home(req, under, cfg)
    if req.kv is None:
        seen = mem.prefix.match(req.block_hashes, [b.id for b in cands])
        matches = _presume_home(dict(seen), home, req)
    else:  # the engines say what they hold: nothing to presume
        seen, _ = prefix_matches(req, mem, [b.id for b in cands])
        matches = seen
    best_match = max(matches.values(), default=0)
    if best_match >= cfg.min_prefix_blocks:
        hits = sorted(
            (b for b in under if matches[b.id] >= cfg.min_prefix_blocks),
            key=lambda b: (-matches[b.id], b.id != home, _weighted_token_load(b, req)),
        )
        if hits:
            return Decision(hits[0].id, R_PREFIX_HIT, seen[hits[0].id])
    if home is not None:  # a miss goes where every other replica would send it too
        reason = R_PREFIX_OVERLOADED if best_match >= cfg.min_prefix_blocks else R_PREFIX_MISS
        return Decision(home, reason, seen[home])
    key = {b.id: _weighted_token_load(b, req) for b in under}
    chosen = _argmin(under, key, mem.counter)
    reason = R_PREFIX_OVERLOADED if best_match >= cfg.min_prefix_blocks else R_PREFIX_MISS
    return Decision(chosen.id, reason, matches[chosen.id])


def _session(cands: Sequence[BackendState], req: Request, mem: RoutingMemory, now: float) -> Decision:
    fallback = _token(cands, req, mem, weighted=True)
    if req.session_id is None:
        return fallback
    bound = mem.sessions.get(req.session_id, now)
    if bound is None:
        return Decision(fallback.backend, R_SESSION_NEW)
    if any(b.id == bound for b in cands):
        return Decision(bound, R_SESSION_HIT)
    return Decision(fallback.backend, R_SESSION_FAILOVER)


def auto_scores(
    cands: Sequence[BackendState],
    req: Request,
    mem: RoutingMemory,
    cfg: Config,
    now: float,
    matches: Mapping[str, int] | None = None,
    home: str | None = None,
    n_blocks: int | None = None,
) -> dict[str, float]:
    """The `auto` scorer: each signal normalised to [0, 1] across candidates, then weighted.

    Prefix affinity is scored by the prefill work it saves (prompt tokens a backend would not
    have to recompute, relative to the worst candidate), not by the matched fraction: with a
    shared system prompt every backend matches most of the prompt, and what matters is the
    conversation history only one of them holds. The same uncached estimate feeds the load term.
    `home` (the rendezvous choice for the conversation's root) gets `w_home`: another router
    replica that routed this conversation's earlier turns sent them there too. `n_blocks`: what
    `matches` counts out of (default: the router's blocks of the prompt).
    """
    if n_blocks is None:
        n_blocks = len(req.block_hashes)
    if matches is None:
        matches = mem.prefix.match(req.block_hashes, [b.id for b in cands]) if n_blocks else {}
    uncached = {
        b.id: req.prompt_tokens * (1.0 - matches.get(b.id, 0) / n_blocks)
        if n_blocks
        else float(req.prompt_tokens)
        for b in cands
    }
    worst = max(uncached.values(), default=0.0)
    loads = {b.id: (b.pending_tokens + uncached[b.id] + req.max_tokens) / max(b.weight, 1e-9) for b in cands}
    max_load = max(loads.values(), default=0.0)
    max_wait = max((b.waiting for b in cands), default=0)
    bound = mem.sessions.get(req.session_id, now) if req.session_id else None
    scores: dict[str, float] = {}
    for b in cands:
        prefix = (worst - uncached[b.id]) / worst if worst > 0 else 0.0
        load = 1.0 - loads[b.id] / max_load if max_load > 0 else 1.0
        kv = 1.0 - min(max(b.kv_usage, 0.0), 1.0)
        queue = 1.0 - b.waiting / max_wait if max_wait > 0 else 1.0
        sess = 1.0 if bound == b.id else 0.0
        scores[b.id] = (
            cfg.w_prefix * prefix
            + cfg.w_load * load
            + cfg.w_kv * kv
            + cfg.w_queue * queue
            + cfg.w_session * sess
            + (cfg.w_home if b.id == home else 0.0)
        )
    return scores


def _auto(
    cands: Sequence[BackendState], req: Request, mem: RoutingMemory, cfg: Config, now: float
) -> Decision:
    caps = bounded_caps(cands, cfg)
    under = [b for b in cands if b.in_flight + 1 <= caps[b.id]]
    home = _home(req, under, cfg)
    if req.kv is None:
        seen = mem.prefix.match(req.block_hashes, [b.id for b in under]) if req.block_hashes else {}
        matches = _presume_home(dict(seen), home, req) if seen else seen
        n_blocks = len(req.block_hashes)
    else:  # the engines say what they hold: nothing to presume
        seen, n_blocks = prefix_matches(req, mem, [b.id for b in under])
        matches = seen
    scores = auto_scores(under, req, mem, cfg, now, matches, home, n_blocks)
    chosen = _argmin(under, {k: -v for k, v in scores.items()}, mem.counter)
    matched = seen.get(chosen.id, 0)
    bound = mem.sessions.get(req.session_id, now) if req.session_id else None
    if bound == chosen.id:
        reason = R_AUTO_SESSION
    elif matched >= cfg.min_prefix_blocks:
        reason = R_AUTO_PREFIX
    elif chosen.id == home:
        reason = R_AUTO_HOME
    else:
        reason = R_AUTO_LOAD
    return Decision(chosen.id, reason, matched)


def choose(
    strategy: str,
    req: Request,
    backends: Sequence[BackendState],
    mem: RoutingMemory,
    cfg: Config,
    now: float,
) -> Decision | None:
    """Pick a backend for `req`, or None when no backend is available. Reads, never writes, `mem`."""
    cands = available(backends, cfg)
    if not cands:
        return None
    if strategy == ROUND_ROBIN:
        return _round_robin(cands, mem)
    if strategy == LEAST_REQUEST:
        return _least_request(cands, mem)
    narrowed, lc = long_context_filter(req, cands, cfg)
    if strategy == TOKEN_AWARE:
        d = _token(narrowed, req, mem, weighted=False)
    elif strategy == GPU_WEIGHTED:
        d = _token(narrowed, req, mem, weighted=True)
    elif strategy == PREFIX_AWARE:
        d = _prefix(narrowed, req, mem, cfg)
    elif strategy == SESSION:
        d = _session(narrowed, req, mem, now)
    elif strategy == AUTO:
        d = _auto(narrowed, req, mem, cfg, now)
    else:
        raise ValueError(f"unknown strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
    return Decision(d.backend, d.reason, d.matched_blocks, lc)


def commit(
    mem: RoutingMemory,
    strategy: str,
    req: Request,
    decision: Decision,
    cfg: Config,
    now: float,
    capacity_blocks: int = 0,
) -> None:
    """Record a decision: advance the tie-break counter, remember the prefix and the session.

    `capacity_blocks`: how many of the router's blocks the chosen backend's KV cache holds (0:
    unknown); see `PrefixIndex`."""
    mem.counter += 1
    if strategy in (PREFIX_AWARE, AUTO) and req.block_hashes:
        mem.prefix.insert(req.block_hashes, decision.backend, now, capacity_blocks)
    if strategy in (SESSION, AUTO) and req.session_id is not None:
        mem.sessions.bind(req.session_id, decision.backend, now, cfg.session_ttl_s)


# --------------------------------------------------------------------------------------------- accounting


@dataclass
class Ticket:
    """One request's charge on a backend: what was added, and what is still outstanding."""

    id: int
    backend: str
    prompt_left: int
    output_left: int
    released: bool = False

    @property
    def outstanding(self) -> int:
        return self.prompt_left + self.output_left


class LoadLedger:
    """In-flight requests and pending tokens per backend, with exact accounting.

    The seed's balancer subtracted *actual* tokens from a load it had increased by an *estimate*,
    so the load drifted. Here each request holds a ticket; progress and release only ever remove
    what that ticket still holds, so after every request ends (success, error or cancellation)
    the load is exactly zero again, and it is never negative.
    """

    def __init__(self) -> None:
        self._next = 0
        self._in_flight: dict[str, int] = {}
        self._pending: dict[str, int] = {}

    def in_flight(self, backend: str) -> int:
        return self._in_flight.get(backend, 0)

    def pending(self, backend: str) -> int:
        return self._pending.get(backend, 0)

    def backends(self) -> list[str]:
        return list(self._in_flight)

    def acquire(self, backend: str, prompt_tokens: int, max_tokens: int) -> Ticket:
        self._next += 1
        t = Ticket(self._next, backend, max(prompt_tokens, 0), max(max_tokens, 0))
        self._in_flight[backend] = self._in_flight.get(backend, 0) + 1
        self._pending[backend] = self._pending.get(backend, 0) + t.outstanding
        return t

    def first_token(self, t: Ticket) -> None:
        """Prefill is done: the prompt part of the work is no longer pending."""
        if t.released or not t.prompt_left:
            return
        self._pending[t.backend] -= t.prompt_left
        t.prompt_left = 0

    def output_tokens(self, t: Ticket, n: int) -> None:
        """`n` more output tokens were produced; never removes more than the ticket holds."""
        if t.released or n <= 0:
            return
        self.first_token(t)
        d = min(n, t.output_left)
        t.output_left -= d
        self._pending[t.backend] -= d

    def release(self, t: Ticket) -> None:
        """End of request, however it ended. Idempotent."""
        if t.released:
            return
        t.released = True
        self._pending[t.backend] -= t.outstanding
        t.prompt_left = t.output_left = 0
        self._in_flight[t.backend] -= 1
        if self._in_flight[t.backend] == 0 and self._pending[t.backend] == 0:
            del self._in_flight[t.backend]
            del self._pending[t.backend]


class TokenEstimator:
    """Characters-per-token estimate, corrected by the `usage` the engines report.

    The router cannot run the model's tokenizer (no downloads, and it would cost CPU on the hot
    path), so it divides text length by a ratio learnt from actual prompt token counts.
    """

    def __init__(self, chars_per_token: float = 4.0, alpha: float = 0.1) -> None:
        self.chars_per_token = chars_per_token
        self.alpha = alpha

    def estimate(self, chars: int) -> int:
        return math.ceil(chars / self.chars_per_token) if chars > 0 else 0

    def observe(self, chars: int, actual_tokens: int) -> None:
        if chars <= 0 or actual_tokens <= 0:
            return
        ratio = min(max(chars / actual_tokens, 1.0), 16.0)
        self.chars_per_token += self.alpha * (ratio - self.chars_per_token)


def snapshot(base: Mapping[str, BackendState], ledger: LoadLedger) -> list[BackendState]:
    """Overlay the ledger's live counts on static backend records."""
    return [
        replace(b, in_flight=ledger.in_flight(k), pending_tokens=ledger.pending(k)) for k, b in base.items()
    ]
