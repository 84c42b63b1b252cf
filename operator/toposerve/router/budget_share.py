"""Tenant budgets shared across gateway replicas: the accounting, pure (docs/tenants.md).

Why: each gateway replica keeps its own token buckets (tenants.py), so N replicas would let a
tenant use N times its budgets. Here each replica also keeps its own *usage* per tenant in
sliding windows, publishes it to its peers (peer_sync.py, about once a second), and admits a
request only when its own usage plus the peers' last reported usage leaves room for it.

The three budgets as windowed usage (a request's cost in each):
- requests: admissions in the last `requests_window(rps)` seconds (at least 10 s, and at least
  one request's worth: `1 / rps`), against `rps x window`; cost 1;
- tokens: tokens charged in the last 60 s (the reservation at admission, the settlement's
  difference when the request ends), against `tokensPerMinute`; cost the reservation;
- concurrent: requests in flight now, against `concurrentRequests`; cost 1.

Admission of `cost` for one budget `B` at time `now`, with `n` replicas known (self included):
1. global: `own(now) + sum(peers' live reports) + cost <= B`;
2. unseen growth: peers learn of this replica's admissions only at the next exchange, so
   between two exchanges a replica may grow its usage by at most its 1/n split of the headroom
   it saw at the last exchange (`sync`): `own(now) + cost <= own(sync) + max(0, B - view(sync)) / n`
   (where `view = own + peers` then). When all replicas exchange at once, their growths sum to
   at most the headroom, so the sum over replicas stays within `B`; with reports one exchange
   late, within `B` plus what was admitted during that one exchange interval;
3. degraded (a known peer has no live report: unreachable, or not answered yet): nobody can
   see its usage, so this replica keeps to `own(now) + cost <= B / n`, the same rule the
   unreachable peer applies, so the sum stays within `B` whichever side of a partition each is.
To keep small budgets usable (a budget below one request per replica would otherwise admit
nothing), rules 2 and 3 let one request through when this replica has none of that tenant's
usage since the last exchange (2) or at all (3): the overshoot is at most one request per
replica, said in docs/tenants.md.

A peer's report expires `ttl_s` after it arrived (the receiver's clock: no clocks compared
across nodes): a peer that left (its pod gone from the Service's endpoints) keeps counting
until then, after which its share is free again. Modes, for metrics and /health: `alone` (no
peer known or reporting: only the local buckets apply, exactly the behaviour without sharing),
`shared` (every known peer reported within `ttl_s`), `degraded` (some did not).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from toposerve.router.tenants import Budgets

REQUESTS, TOKENS, CONCURRENT = "requests", "tokens", "concurrent"
KINDS = (REQUESTS, TOKENS, CONCURRENT)
ALONE, SHARED, DEGRADED = "alone", "shared", "degraded"
MODES = (ALONE, SHARED, DEGRADED)
TOKENS_WINDOW_S = 60.0
MIN_REQUESTS_WINDOW_S = 10.0
PARAM = {REQUESTS: "requestsPerSecond", TOKENS: "tokensPerMinute", CONCURRENT: "concurrentRequests"}


def requests_window(rps: float) -> float:
    """The window requests per second are counted over: 10 s, or longer for less than 0.1/s so
    that the window's budget is at least one request."""
    return max(MIN_REQUESTS_WINDOW_S, 1.0 / rps) if rps > 0 else MIN_REQUESTS_WINDOW_S


def limits(b: Budgets) -> dict[str, float]:
    """Each configured budget as a windowed limit (0: none)."""
    out: dict[str, float] = {}
    if b.requests_per_second:
        out[REQUESTS] = b.requests_per_second * requests_window(b.requests_per_second)
    if b.tokens_per_minute:
        out[TOKENS] = float(b.tokens_per_minute)
    if b.concurrent:
        out[CONCURRENT] = float(b.concurrent)
    return out


@dataclass
class Window:
    """A sliding sum: amounts added at times, summed over the last `span` seconds."""

    span: float
    events: deque[tuple[float, float]] = field(default_factory=deque)
    total: float = 0.0

    def add(self, now: float, amount: float) -> None:
        self.events.append((now, amount))
        self.total += amount

    def sum(self, now: float) -> float:
        while self.events and self.events[0][0] <= now - self.span:
            self.total -= self.events.popleft()[1]
        if not self.events:
            self.total = 0.0  # no float residue
        return max(0.0, self.total)


@dataclass
class _Own:
    requests: Window
    tokens: Window = field(default_factory=lambda: Window(TOKENS_WINDOW_S))
    concurrent: int = 0
    since_sync: int = 0  # admissions since the last exchange

    def usage(self, now: float) -> dict[str, float]:
        return {
            REQUESTS: self.requests.sum(now),
            TOKENS: self.tokens.sum(now),
            CONCURRENT: float(self.concurrent),
        }


@dataclass(frozen=True)
class PeerReport:
    received_at: float
    usage: Mapping[str, Mapping[str, float]]  # tenant -> kind -> usage


@dataclass(frozen=True)
class Refusal:
    kind: str  # REQUESTS, TOKENS or CONCURRENT
    mode: str
    replicas: int
    retry_after_s: int

    @property
    def param(self) -> str:
        return PARAM[self.kind]


@dataclass(frozen=True)
class _Snapshot:
    at: float
    replicas: int
    own: Mapping[str, Mapping[str, float]]  # tenant -> kind -> own usage at the exchange
    view: Mapping[str, Mapping[str, float]]  # tenant -> kind -> own + live peers then


def parse_usage(doc: object) -> dict[str, dict[str, float]]:
    """A peer's report body (`report()` of another replica), validated: anything odd dropped."""
    out: dict[str, dict[str, float]] = {}
    if not isinstance(doc, Mapping):
        return out
    for tenant, kinds in doc.items():
        if not isinstance(tenant, str) or not isinstance(kinds, Mapping):
            continue
        vals = {}
        for k in KINDS:
            v = kinds.get(k, 0)
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v >= 0:
                vals[k] = float(v)
        out[tenant] = vals
    return out


class SharedBudgets:
    """One replica's view: its own usage, its peers' last reports and the last exchange."""

    def __init__(self, ttl_s: float = 3.0, interval_s: float = 1.0) -> None:
        self.ttl_s = ttl_s
        self.interval_s = interval_s
        self.known: frozenset[str] = frozenset()  # peers (not self), as addresses
        self.reports: dict[str, PeerReport] = {}
        self._own: dict[str, _Own] = {}
        self._snap: _Snapshot | None = None

    # ------------------------------------------------------------------ peers

    def set_known(self, peers: Iterable[str]) -> None:
        """The other replicas, as discovery lists them now. A peer that left keeps its last
        report until it expires."""
        self.known = frozenset(peers)

    def receive(self, peer: str, usage: Mapping[str, Mapping[str, float]], now: float) -> None:
        self.reports[peer] = PeerReport(now, usage)

    def live(self, now: float) -> dict[str, PeerReport]:
        for p in [p for p, r in self.reports.items() if now - r.received_at >= self.ttl_s]:
            del self.reports[p]  # expired: its share is free again
        return self.reports

    def replicas(self) -> int:
        return 1 + len(self.known)

    def mode(self, now: float) -> str:
        live = self.live(now)
        if not self.known and not live:
            return ALONE
        return DEGRADED if any(p not in live for p in self.known) else SHARED

    def _peers(self, tenant: str, now: float) -> dict[str, float]:
        out = dict.fromkeys(KINDS, 0.0)
        for r in self.live(now).values():
            for k, v in (r.usage.get(tenant) or {}).items():
                if k in out:
                    out[k] += v
        return out

    def sync(self, now: float) -> None:
        """An exchange has just happened: the headroom each replica may take until the next."""
        own: dict[str, dict[str, float]] = {}
        view: dict[str, dict[str, float]] = {}
        for tenant, o in list(self._own.items()):
            u = o.usage(now)
            o.since_sync = 0
            if not any(u.values()):
                if o.concurrent == 0:
                    del self._own[tenant]
                continue
            own[tenant] = u
        tenants = set(own) | {t for r in self.live(now).values() for t in r.usage}
        for t in tenants:
            peers = self._peers(t, now)
            mine = own.get(t) or dict.fromkeys(KINDS, 0.0)
            view[t] = {k: mine[k] + peers[k] for k in KINDS}
        self._snap = _Snapshot(now, self.replicas(), own, view)

    # ------------------------------------------------------------------ own usage

    def _state(self, tenant: str, budgets: Budgets) -> _Own:
        span = requests_window(budgets.requests_per_second)
        o = self._own.get(tenant)
        if o is None:
            o = self._own[tenant] = _Own(Window(span))
        elif o.requests.span != span:
            o.requests.span = span  # the policy changed: count over the new window
        return o

    def check(self, tenant: str, budgets: Budgets, tokens: float, now: float) -> Refusal | None:
        """Whether one request reserving `tokens` fits `budgets` across the replicas (None: yes).
        Alone: always (the local buckets decide)."""
        mode = self.mode(now)
        lim = limits(budgets)
        if mode == ALONE or not lim:
            return None
        o = self._state(tenant, budgets)
        own = o.usage(now)
        peers = self._peers(tenant, now)
        snap = self._snap
        n = self.replicas()
        cost = {REQUESTS: 1.0, TOKENS: float(tokens), CONCURRENT: 1.0}
        for k, b in lim.items():
            c = cost[k]
            if c <= 0:
                continue
            refuse = own[k] + peers[k] + c > b  # 1: global
            if not refuse and o.since_sync:  # 2: this replica's split of the headroom
                s_own = snap.own.get(tenant, {}).get(k, 0.0) if snap else 0.0
                s_view = snap.view.get(tenant, {}).get(k, 0.0) if snap else 0.0
                s_n = snap.replicas if snap else n
                refuse = own[k] + c > s_own + max(0.0, b - s_view) / s_n
            if not refuse and mode == DEGRADED and own[k] > 0:  # 3: peers unseen: B / n
                refuse = own[k] + c > b / n
            if refuse:
                return Refusal(k, mode, n, max(1, math.ceil(self.interval_s)))
        return None

    def charge(self, tenant: str, budgets: Budgets, tokens: float, now: float) -> None:
        """An admitted request: one request, its reserved tokens, one in flight."""
        if not limits(budgets):
            return  # nothing to share: not reported
        o = self._state(tenant, budgets)
        o.requests.add(now, 1.0)
        if tokens:
            o.tokens.add(now, float(tokens))
        o.concurrent += 1
        o.since_sync += 1

    def finish(self, tenant: str, token_delta: float, now: float) -> None:
        """The request ended: no longer in flight; its tokens settled by `token_delta`
        (used - reserved)."""
        o = self._own.get(tenant)
        if o is None:
            return
        o.concurrent = max(0, o.concurrent - 1)
        if token_delta:
            o.tokens.add(now, token_delta)

    def report(self, now: float) -> dict[str, dict[str, float]]:
        """This replica's own usage per tenant, what its peers fetch."""
        out = {}
        for t, o in self._own.items():
            u = o.usage(now)
            if any(u.values()):
                out[t] = u
        return out

    def own_usage(self, tenant: str, now: float) -> dict[str, float]:
        o = self._own.get(tenant)
        return o.usage(now) if o else dict.fromkeys(KINDS, 0.0)
