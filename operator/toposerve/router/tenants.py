"""Tenants: API keys, allowed models, priority, weight and budgets; admission decisions (pure).

Why here and pure: one platform serves many teams, each with its own keys, models, priority and
budgets, and the same admission must run in the gateway (aiohttp) and in the endpoint picker
(ext_proc, no aiohttp). So this module holds plain data and decisions only: `Admission.admit`
takes the request's headers, its model and its estimated tokens, and answers allow (with a
`Ticket` to settle once the engine's usage is known) or the error to send: 401 (no key, or an
unknown one, where keys are required), 403 (the tenant may not use the model), 429 with a
`Retry-After` (a budget is spent). Time comes from an injectable clock.

Keys are kept only as SHA-256 digests: a key is hashed once as it is loaded (tenant_watch.py) and
each request's key is hashed before lookup, so plaintext is never held or logged. Lookup is a
dict on the digest, then `hmac.compare_digest` on the match: timing can reveal at most something
about a digest, which does not help to find a key (SHA-256 is preimage-resistant).

Budgets are per tenant; each gateway replica keeps its own buckets, and with `shared`
(budget_share.py: the replicas exchange their usage) a request must also fit the budget across
the replicas:
- requests per second: a token bucket of capacity max(1, rate) (one second's burst);
- concurrent requests: a count, released when the request ends;
- prompt + completion tokens per minute: a token bucket of capacity `tokens_per_minute`, refilled
  continuously. Admission reserves the estimate (prompt estimate + max_tokens, capped at the
  bucket's capacity so that a large request can still run on a full bucket); the end settles
  with the engine's real usage, refunding or charging the difference (the bucket may go into
  debt, which delays the next request: a minute's budget is a minute's budget).
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from toposerve.router.errors import error_body

if TYPE_CHECKING:
    from toposerve.router.budget_share import SharedBudgets

# Priority bands, highest first. The names follow the Gateway API Inference Extension's
# criticality (Critical / Standard / Sheddable, InferenceModel v1alpha2) and map onto
# InferenceObjective.spec.priority (an int, higher served first, unset = 0; llm-d docs,
# https://llm-d.ai/docs/api-reference/inferenceobjective): critical > 0, standard 0,
# sheddable < 0 (the band llm-d's flow control drops first under pressure).
CRITICAL, STANDARD, SHEDDABLE = "critical", "standard", "sheddable"
BANDS: tuple[str, ...] = (CRITICAL, STANDARD, SHEDDABLE)
ANONYMOUS = "anonymous"  # requests without a (known) key where keys are optional
# GIE's header naming a request's InferenceObjective (pkg/epp/metadata/consts.go ObjectiveKey, v1.6.2)
OBJECTIVE_HEADER = "x-gateway-inference-objective"
TENANT_NAME = re.compile(r"^[a-z0-9]([-a-z0-9_.]{0,61}[a-z0-9])?$")


def band_of_priority(priority: int) -> str:
    """The band of an InferenceObjective-style integer priority."""
    return CRITICAL if priority > 0 else STANDARD if priority == 0 else SHEDDABLE


class TenantConfigError(ValueError):
    """Bad tenant configuration; the message names the source and the field."""


@dataclass(frozen=True)
class Budgets:
    """0 means no limit."""

    requests_per_second: float = 0.0
    concurrent: int = 0
    tokens_per_minute: int = 0


@dataclass(frozen=True)
class Tenant:
    name: str
    models: tuple[str, ...] = ("*",)  # served names or globs (fnmatch)
    priority: str = STANDARD
    weight: float = 1.0
    budgets: Budgets = field(default_factory=Budgets)
    key_hashes: frozenset[bytes] = frozenset()  # SHA-256 digests

    def allows(self, model: str) -> bool:
        return any(fnmatch.fnmatchcase(model, pat) for pat in self.models)


def hash_key(key: str) -> bytes:
    """The digest a key is stored and looked up by."""
    return hashlib.sha256(key.encode()).digest()


def parse_hash(text: str, where: str) -> bytes:
    """A hex SHA-256 digest (64 hex digits), for keys given only as hashes."""
    t = text.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", t):
        raise TenantConfigError(f"{where}: not a SHA-256 hex digest (64 hex digits)")
    return bytes.fromhex(t)


def parse_keys(text: str, where: str) -> frozenset[bytes]:
    """Keys, one a line (blank lines and `#` comments skipped), hashed at once. Several keys:
    rotation (add the new one, move clients, remove the old one)."""
    out: set[bytes] = set()
    for n, line in enumerate(text.splitlines(), 1):
        k = line.strip()
        if not k or k.startswith("#"):
            continue
        if any(c.isspace() for c in k) or not k.isprintable():
            raise TenantConfigError(f"{where}: line {n} is not one key (spaces or control characters)")
        if len(k) < 16:
            raise TenantConfigError(f"{where}: line {n}: a key must have at least 16 characters")
        out.add(hash_key(k))
    return frozenset(out)


def _num(v: Any, where: str, integer: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
        raise TenantConfigError(f"{where}: must be a number >= 0, got {v!r}")
    if integer and v != int(v):
        raise TenantConfigError(f"{where}: must be a whole number, got {v!r}")
    return float(v)


def parse_policy(name: str, doc: Any, where: str) -> Tenant:
    """One tenant's policy (no keys) from a mapping: `models`, `priority`, `weight`, `budgets`
    {`requestsPerSecond`, `concurrentRequests`, `tokensPerMinute`}, `keySha256` (digests)."""
    if not isinstance(name, str) or not TENANT_NAME.match(name):
        raise TenantConfigError(
            f"{where}: tenant name {name!r} must be lower-case letters, digits, -_. (1-63)"
        )
    if doc is None:
        doc = {}
    if not isinstance(doc, Mapping):
        raise TenantConfigError(f"{where}: must be a mapping")
    known = {"models", "priority", "weight", "budgets", "keySha256"}
    for k in doc:
        if k not in known:
            raise TenantConfigError(f"{where}.{k}: unknown field (known: {', '.join(sorted(known))})")
    models = doc.get("models", ["*"])
    if isinstance(models, str):
        models = [models]
    if not isinstance(models, list) or not models or not all(isinstance(m, str) and m for m in models):
        raise TenantConfigError(f"{where}.models: must be a non-empty list of model names or globs")
    prio = doc.get("priority", STANDARD)
    if isinstance(prio, int) and not isinstance(prio, bool):
        prio = band_of_priority(prio)
    if prio not in BANDS:
        raise TenantConfigError(
            f"{where}.priority: must be one of {', '.join(BANDS)} or an integer, got {prio!r}"
        )
    weight = _num(doc.get("weight", 1.0), f"{where}.weight")
    if weight <= 0:
        raise TenantConfigError(f"{where}.weight: must be > 0")
    b = doc.get("budgets") or {}
    if not isinstance(b, Mapping):
        raise TenantConfigError(f"{where}.budgets: must be a mapping")
    bknown = {"requestsPerSecond", "concurrentRequests", "tokensPerMinute"}
    for k in b:
        if k not in bknown:
            raise TenantConfigError(
                f"{where}.budgets.{k}: unknown field (known: {', '.join(sorted(bknown))})"
            )
    budgets = Budgets(
        requests_per_second=_num(b.get("requestsPerSecond", 0), f"{where}.budgets.requestsPerSecond"),
        concurrent=int(_num(b.get("concurrentRequests", 0), f"{where}.budgets.concurrentRequests", True)),
        tokens_per_minute=int(_num(b.get("tokensPerMinute", 0), f"{where}.budgets.tokensPerMinute", True)),
    )
    hashes = doc.get("keySha256") or []
    if not isinstance(hashes, list):
        raise TenantConfigError(f"{where}.keySha256: must be a list of hex digests")
    digests = frozenset(
        parse_hash(h if isinstance(h, str) else "", f"{where}.keySha256[{i}]") for i, h in enumerate(hashes)
    )
    return Tenant(name, tuple(models), prio, weight, budgets, digests)


class Policies(dict[str, Tenant]):
    """The tenants by name, and the InferenceObjective names mapped to bands (`objectives`)."""

    objectives: Mapping[str, str]

    def __init__(self, tenants: Mapping[str, Tenant], objectives: Mapping[str, str] | None = None) -> None:
        super().__init__(tenants)
        self.objectives = dict(objectives or {})


def parse_objectives(doc: Any, where: str) -> dict[str, str]:
    """`objectives: {InferenceObjective name: band or integer priority}`: the band a request
    naming that objective in `x-gateway-inference-objective` asks for."""
    if doc is None:
        return {}
    if not isinstance(doc, Mapping):
        raise TenantConfigError(f"{where}: must be a mapping of InferenceObjective name to priority")
    out = {}
    for name, prio in doc.items():
        if not isinstance(name, str) or not name:
            raise TenantConfigError(f"{where}: {name!r} is not an InferenceObjective name")
        if isinstance(prio, int) and not isinstance(prio, bool):
            prio = band_of_priority(prio)
        if prio not in BANDS:
            raise TenantConfigError(
                f"{where}.{name}: must be one of {', '.join(BANDS)} or an integer, got {prio!r}"
            )
        out[name] = prio
    return out


def parse_policies(doc: Any, where: str) -> Policies:
    """The tenants file: `{tenants: {name: policy}, objectives: {name: priority}}` (see
    docs/tenants.md)."""
    if doc is None:
        return Policies({})
    if not isinstance(doc, Mapping):
        raise TenantConfigError(f"{where}: must be a mapping with `tenants`")
    for k in doc:
        if k not in ("tenants", "objectives"):
            raise TenantConfigError(f"{where}.{k}: unknown field (known: objectives, tenants)")
    tenants = doc.get("tenants") or {}
    if not isinstance(tenants, Mapping):
        raise TenantConfigError(f"{where}.tenants: must be a mapping of tenant name to policy")
    return Policies(
        {str(n): parse_policy(n, p, f"{where}.tenants.{n}") for n, p in tenants.items()},
        parse_objectives(doc.get("objectives"), f"{where}.objectives"),
    )


@dataclass(frozen=True)
class Table:
    """Tenants by name and key digests to tenant names (a key claimed by two tenants resolves to
    neither: `conflicts` names them)."""

    tenants: Mapping[str, Tenant]
    by_hash: Mapping[bytes, str]
    conflicts: tuple[str, ...] = ()
    objectives: Mapping[str, str] = field(default_factory=dict)  # InferenceObjective name -> band

    def band(self, tenant: Tenant, headers: Mapping[str, str]) -> str:
        """The band of a request: the one its `x-gateway-inference-objective` maps to, but never
        above its tenant's own (a tenant's priority is its ceiling: a batch job may mark itself
        sheddable, no one may make itself critical); an unknown or absent objective: the
        tenant's."""
        name = next((v for k, v in headers.items() if k.lower() == OBJECTIVE_HEADER), None)
        asked = self.objectives.get(name.strip()) if name else None
        if asked is None:
            return tenant.priority
        return max(asked, tenant.priority, key=BANDS.index)

    def resolve(self, key: str) -> Tenant | None:
        digest = hash_key(key)
        name = self.by_hash.get(digest)
        if name is None:
            return None
        t = self.tenants[name]
        return t if any(hmac.compare_digest(digest, h) for h in t.key_hashes) else None

    @property
    def keyed(self) -> bool:
        return bool(self.by_hash)


def build_table(tenants: Iterable[Tenant], objectives: Mapping[str, str] | None = None) -> Table:
    by_name = {t.name: t for t in tenants}
    owners: dict[bytes, set[str]] = {}
    for t in by_name.values():
        for h in t.key_hashes:
            owners.setdefault(h, set()).add(t.name)
    by_hash = {h: next(iter(n)) for h, n in owners.items() if len(n) == 1}
    conflicts = tuple(sorted({"/".join(sorted(n)) for n in owners.values() if len(n) > 1}))
    return Table(by_name, by_hash, conflicts, dict(objectives or {}))


EMPTY = build_table([])


def key_from_headers(headers: Mapping[str, str]) -> str | None:
    """`Authorization: Bearer <key>` (OpenAI clients), else `x-api-key` (Anthropic-style
    clients and gateways that pass the key on). Header names are matched case-insensitively."""
    auth = x_api_key = None
    for k, v in headers.items():
        lk = k.lower()
        if lk == "authorization":
            auth = v
        elif lk == "x-api-key":
            x_api_key = v
    if auth:
        scheme, _, token = auth.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    if x_api_key and x_api_key.strip():
        return x_api_key.strip()
    return None


# ------------------------------------------------------------------------------ budgets


@dataclass
class Bucket:
    """A token bucket: `level` refills at `rate`/s up to `capacity`; may go below 0 (debt)."""

    capacity: float
    rate: float
    level: float
    at: float

    def refill(self, now: float) -> None:
        if now > self.at:
            self.level = min(self.capacity, self.level + (now - self.at) * self.rate)
        self.at = max(self.at, now)

    def wait_for(self, need: float) -> float:
        """Seconds until `need` is available (after refill)."""
        if self.level >= need:
            return 0.0
        return (need - self.level) / self.rate if self.rate > 0 else math.inf


@dataclass
class _State:
    rps: Bucket | None = None
    tpm: Bucket | None = None
    concurrent: int = 0


@dataclass(frozen=True)
class Ticket:
    """What an admitted request holds until it ends (`Admission.finish`)."""

    tenant: str
    reserved: int  # tokens reserved against tokens-per-minute (0: no such budget)
    band: str
    weight: float


@dataclass(frozen=True)
class Decision:
    status: int  # 200: admitted
    tenant: str = ""
    message: str = ""
    param: str | None = None  # what was refused or exceeded (the error's `param`)
    retry_after_s: int | None = None
    ticket: Ticket | None = None

    @property
    def allowed(self) -> bool:
        return self.status == 200

    def body(self) -> dict[str, Any]:
        """The OpenAI / vLLM error envelope (errors.error_body)."""
        return error_body(self.status, self.message, self.param)

    def headers(self) -> dict[str, str]:
        out = {"Retry-After": str(self.retry_after_s)} if self.retry_after_s is not None else {}
        if self.status == 401:
            out["WWW-Authenticate"] = 'Bearer realm="toposerve"'
        return out


def _retry(seconds: float) -> int:
    return max(1, math.ceil(seconds)) if math.isfinite(seconds) else 60


class Admission:
    """Keys -> tenant, then model, then budgets. `require_key` False: keyless requests (and
    unknown keys) run as the `anonymous` tenant (its policy if the table has one, else no
    limits), which with an empty table is exactly the behaviour without tenants."""

    def __init__(
        self,
        table: Table = EMPTY,
        require_key: bool = False,
        clock: Callable[[], float] = time.monotonic,
        shared: SharedBudgets | None = None,
    ) -> None:
        self.table = table
        self.require_key = require_key
        self.clock = clock
        self.shared = shared  # budgets across gateway replicas (budget_share.py), when configured
        self._state: dict[str, _State] = {}

    def set_table(self, table: Table) -> None:
        """A new table (keys rotated, policy changed): counts of requests in flight are kept;
        buckets of tenants whose budgets changed start again from full."""
        old = self.table
        self.table = table
        for name in list(self._state):
            t, was = table.tenants.get(name), old.tenants.get(name)
            if t is None or was is None or t.budgets != was.budgets:
                st = self._state[name]
                st.rps = st.tpm = None
                if st.concurrent == 0:
                    del self._state[name]

    @property
    def active(self) -> bool:
        """Anything to decide: keys required or a tenant configured."""
        return self.require_key or bool(self.table.tenants)

    def tenant_for(self, headers: Mapping[str, str]) -> Tenant | Decision:
        key = key_from_headers(headers)
        if key is not None:
            t = self.table.resolve(key)
            if t is not None:
                return t
            if self.require_key:
                return Decision(401, message="Incorrect API key provided.", param="authorization")
        elif self.require_key:
            msg = "You didn't provide an API key: send `Authorization: Bearer <key>` or `x-api-key`."
            return Decision(401, message=msg, param="authorization")
        return self.table.tenants.get(ANONYMOUS) or Tenant(ANONYMOUS)

    def admit(self, headers: Mapping[str, str], model: str, tokens: int) -> Decision:
        """Admit one request for `model` with `tokens` estimated (prompt + max completion)."""
        t = self.tenant_for(headers)
        if isinstance(t, Decision):
            return t
        if not t.allows(model):
            msg = f"tenant `{t.name}` may not use the model `{model[:256]}`."
            return Decision(403, t.name, msg, "model")
        now = self.clock()
        b = t.budgets
        st = self._state.setdefault(t.name, _State())
        if b.concurrent and st.concurrent >= b.concurrent:
            msg = f"tenant `{t.name}` has {st.concurrent} requests in flight, its limit (concurrentRequests)."
            return Decision(429, t.name, msg, "concurrentRequests", 1)
        if b.requests_per_second:
            if st.rps is None:
                cap = max(1.0, b.requests_per_second)
                st.rps = Bucket(cap, b.requests_per_second, cap, now)
            st.rps.refill(now)
            if st.rps.level < 1:
                msg = f"tenant `{t.name}` is over its {b.requests_per_second:g} requests per second (requestsPerSecond)."
                return Decision(429, t.name, msg, "requestsPerSecond", _retry(st.rps.wait_for(1)))
        reserve = 0
        if b.tokens_per_minute:
            if st.tpm is None:
                st.tpm = Bucket(b.tokens_per_minute, b.tokens_per_minute / 60.0, b.tokens_per_minute, now)
            st.tpm.refill(now)
            reserve = max(1, min(tokens, b.tokens_per_minute))
            if st.tpm.level < reserve:
                msg = (
                    f"tenant `{t.name}` is over its {b.tokens_per_minute} tokens per minute (tokensPerMinute): "
                    f"this request needs about {reserve}, {max(0, int(st.tpm.level))} are left."
                )
                return Decision(429, t.name, msg, "tokensPerMinute", _retry(st.tpm.wait_for(reserve)))
        if self.shared is not None and (r := self.shared.check(t.name, b, reserve, now)) is not None:
            msg = (
                f"tenant `{t.name}` is over its {r.param} across the {r.replicas} gateway replicas "
                f"(budgets shared, {r.mode})."
            )
            return Decision(429, t.name, msg, r.param, r.retry_after_s)
        if st.tpm is not None:
            st.tpm.level -= reserve
        if self.shared is not None:
            self.shared.charge(t.name, b, reserve, now)
        if st.rps is not None:
            st.rps.level -= 1
        st.concurrent += 1
        band = self.table.band(t, headers)
        return Decision(200, t.name, ticket=Ticket(t.name, reserve, band, t.weight))

    def finish(self, ticket: Ticket, used_tokens: int | None) -> None:
        """The request ended: release its concurrency slot and settle its tokens with the real
        usage (None: unknown, e.g. a stream without usage: the reservation stays charged)."""
        if self.shared is not None:
            delta = used_tokens - ticket.reserved if ticket.reserved and used_tokens is not None else 0
            self.shared.finish(ticket.tenant, delta, self.clock())
        st = self._state.get(ticket.tenant)
        if st is None:
            return
        st.concurrent = max(0, st.concurrent - 1)
        if st.tpm is not None and ticket.reserved and used_tokens is not None:
            st.tpm.refill(self.clock())
            st.tpm.level = min(st.tpm.capacity, st.tpm.level + ticket.reserved - used_tokens)
        elif st.tpm is None and self.table.tenants.get(ticket.tenant) is None and st.concurrent == 0:
            del self._state[ticket.tenant]

    def in_flight(self, tenant: str) -> int:
        st = self._state.get(tenant)
        return st.concurrent if st else 0
