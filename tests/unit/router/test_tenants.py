"""Tenants (router/tenants.py): key resolution, policy parsing, admission decisions and budgets,
with an injected clock; cases plus hypothesis properties."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs

from toposerve.router import tenants as tn

KEY_A = "sk-team-a-0123456789abcdef"
KEY_A2 = "sk-team-a-rotated-0123456789"
KEY_B = "sk-team-b-0123456789abcdef"


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def table(**policies: dict) -> tn.Table:
    return tn.build_table(tn.parse_policy(n, p, f"t.{n}") for n, p in policies.items())


def with_keys(t: tn.Tenant, *keys: str) -> tn.Tenant:
    return tn.Tenant(t.name, t.models, t.priority, t.weight, t.budgets, frozenset(map(tn.hash_key, keys)))


def keyed(budgets: dict | None = None, models: list[str] | None = None, **extra: object) -> tn.Table:
    a = tn.parse_policy("team-a", {"budgets": budgets or {}, "models": models or ["*"], **extra}, "a")
    b = tn.parse_policy("team-b", {}, "b")
    return tn.build_table([with_keys(a, KEY_A, KEY_A2), with_keys(b, KEY_B)])


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# ------------------------------------------------------------------------------ keys


def test_key_from_headers() -> None:
    assert tn.key_from_headers({"authorization": "Bearer  abc "}) == "abc"
    assert tn.key_from_headers({"Authorization": "bearer abc"}) == "abc"
    assert tn.key_from_headers({"X-Api-Key": "xyz"}) == "xyz"
    assert tn.key_from_headers({"Authorization": "Basic Zm9v", "x-api-key": "xyz"}) == "xyz"
    assert tn.key_from_headers({"Authorization": "Bearer "}) is None
    assert tn.key_from_headers({}) is None


def test_keys_are_kept_only_as_digests() -> None:
    t = keyed()
    assert t.resolve(KEY_A).name == "team-a"  # type: ignore[union-attr]
    assert t.resolve(KEY_A2).name == "team-a"  # type: ignore[union-attr]
    assert t.resolve(KEY_B).name == "team-b"  # type: ignore[union-attr]
    assert t.resolve("sk-nobody-0123456789abcdef") is None
    held = repr(t)
    for k in (KEY_A, KEY_A2, KEY_B):
        assert k not in held
        assert hashlib.sha256(k.encode()).digest() in t.by_hash


def test_parse_keys_lines_comments_and_rotation() -> None:
    got = tn.parse_keys(f"# old one, until Friday\n{KEY_A}\n\n  {KEY_A2}  \n", "Secret x/y api-keys")
    assert got == {tn.hash_key(KEY_A), tn.hash_key(KEY_A2)}
    with pytest.raises(tn.TenantConfigError, match=r"Secret x/y api-keys: line 1 is not one key"):
        tn.parse_keys("two keys-on-one-line-here", "Secret x/y api-keys")
    with pytest.raises(tn.TenantConfigError, match=r"line 2: a key must have at least 16"):
        tn.parse_keys(f"{KEY_A}\nshort", "Secret x/y api-keys")


def test_key_claimed_by_two_tenants_resolves_to_neither() -> None:
    a = with_keys(tn.Tenant("a"), KEY_A)
    b = with_keys(tn.Tenant("b"), KEY_A, KEY_B)
    t = tn.build_table([a, b])
    assert t.resolve(KEY_A) is None
    assert t.resolve(KEY_B).name == "b"  # type: ignore[union-attr]
    assert t.conflicts == ("a/b",)


# ------------------------------------------------------------------------------ policy


def test_policy_defaults_and_fields() -> None:
    t = tn.parse_policy(
        "team-a",
        {"models": ["meta-llama/*", "qwen"], "priority": "critical", "weight": 2,
         "budgets": {"requestsPerSecond": 2.5, "concurrentRequests": 4, "tokensPerMinute": 1000}},
        "f",
    )  # fmt: skip
    assert t.models == ("meta-llama/*", "qwen")
    assert (t.priority, t.weight) == ("critical", 2.0)
    assert t.budgets == tn.Budgets(2.5, 4, 1000)
    assert tn.parse_policy("x", None, "f") == tn.Tenant("x")
    assert tn.parse_policy("x", {"priority": 5}, "f").priority == "critical"
    assert tn.parse_policy("x", {"priority": -1}, "f").priority == "sheddable"
    assert tn.parse_policy("x", {"priority": 0}, "f").priority == "standard"


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        ({"models": []}, "f.tenants.a.models"),
        ({"models": [3]}, "f.tenants.a.models"),
        ({"priority": "urgent"}, "f.tenants.a.priority"),
        ({"weight": 0}, "f.tenants.a.weight"),
        ({"weight": "heavy"}, "f.tenants.a.weight"),
        ({"budgets": {"tokensPerMinute": -1}}, "f.tenants.a.budgets.tokensPerMinute"),
        ({"budgets": {"concurrentRequests": 1.5}}, "f.tenants.a.budgets.concurrentRequests"),
        ({"budgets": {"rps": 1}}, "f.tenants.a.budgets.rps"),
        ({"budgets": {"requestsPerSecond": float("nan")}}, "f.tenants.a.budgets.requestsPerSecond"),
        ({"keySha256": ["abc"]}, r"f.tenants.a.keySha256\[0\]"),
        ({"colour": "red"}, "f.tenants.a.colour"),
    ],
)
def test_bad_policy_names_the_field(doc: dict, field: str) -> None:
    with pytest.raises(tn.TenantConfigError, match=rf"^{field}:"):
        tn.parse_policies({"tenants": {"a": doc}}, "f")


def test_bad_tenant_name() -> None:
    with pytest.raises(tn.TenantConfigError, match="tenant name 'Team A'"):
        tn.parse_policies({"tenants": {"Team A": {}}}, "f")


def test_key_hashes_in_the_policy() -> None:
    digest = hashlib.sha256(KEY_A.encode()).hexdigest()
    pol = tn.parse_policies({"tenants": {"a": {"keySha256": [digest.upper()]}}}, "f")
    assert tn.build_table(pol.values()).resolve(KEY_A).name == "a"  # type: ignore[union-attr]


# ------------------------------------------------------------------------------ admission


def test_no_tenants_is_todays_behaviour() -> None:
    adm = tn.Admission()
    assert not adm.active
    d = adm.admit(bearer("unused"), "any", 10**9)
    assert d.allowed and d.tenant == tn.ANONYMOUS
    assert adm.admit({}, "any", 1).allowed


def test_401_without_a_key_and_with_an_unknown_key() -> None:
    adm = tn.Admission(keyed(), require_key=True)
    d = adm.admit({}, "m", 1)
    assert d.status == 401 and d.param == "authorization"
    assert d.headers()["WWW-Authenticate"].startswith("Bearer")
    assert d.body()["error"]["code"] == 401 and d.body()["error"]["param"] == "authorization"
    bad = adm.admit(bearer("sk-nobody-0123456789abcdef"), "m", 1)
    assert bad.status == 401 and "Incorrect API key" in bad.message
    assert adm.admit({"x-api-key": KEY_B}, "m", 1).tenant == "team-b"


def test_keys_optional_unknown_key_is_anonymous() -> None:
    anon = tn.parse_policy(tn.ANONYMOUS, {"models": ["small"]}, "f")
    adm = tn.Admission(tn.build_table([*keyed().tenants.values(), anon]))
    assert adm.admit(bearer("unused"), "small", 1).tenant == tn.ANONYMOUS
    assert adm.admit({}, "big", 1).status == 403
    assert adm.admit(bearer(KEY_A), "big", 1).tenant == "team-a"


def test_403_model_not_allowed_names_tenant_and_model() -> None:
    adm = tn.Admission(keyed(models=["meta-llama/*"]), require_key=True)
    assert adm.admit(bearer(KEY_A), "meta-llama/Llama-3.1-8B", 1).allowed
    d = adm.admit(bearer(KEY_A), "Qwen/Qwen2.5-7B", 1)
    assert d.status == 403 and d.param == "model"
    assert "team-a" in d.message and "Qwen/Qwen2.5-7B" in d.message
    assert d.body()["error"]["param"] == "model"


def test_requests_per_second_429_with_retry_after() -> None:
    clock = Clock()
    adm = tn.Admission(keyed({"requestsPerSecond": 2}), True, clock)
    assert [adm.admit(bearer(KEY_A), "m", 1).status for _ in range(3)] == [200, 200, 429]
    d = adm.admit(bearer(KEY_A), "m", 1)
    assert d.param == "requestsPerSecond" and d.headers()["Retry-After"] == "1"
    assert "requestsPerSecond" in d.body()["error"]["message"]
    assert adm.admit(bearer(KEY_B), "m", 1).allowed  # another tenant is not affected
    clock.t += 0.5
    assert adm.admit(bearer(KEY_A), "m", 1).allowed


def test_concurrency_released_on_finish() -> None:
    adm = tn.Admission(keyed({"concurrentRequests": 2}), True, Clock())
    d1, d2 = adm.admit(bearer(KEY_A), "m", 1), adm.admit(bearer(KEY_A), "m", 1)
    d3 = adm.admit(bearer(KEY_A), "m", 1)
    assert d3.status == 429 and d3.param == "concurrentRequests" and d3.retry_after_s == 1
    assert d1.ticket is not None and d2.ticket is not None
    adm.finish(d1.ticket, None)
    assert adm.admit(bearer(KEY_A), "m", 1).allowed
    assert adm.in_flight("team-a") == 2


def test_tokens_per_minute_reserve_then_settle() -> None:
    clock = Clock()
    adm = tn.Admission(keyed({"tokensPerMinute": 600}), True, clock)
    d = adm.admit(bearer(KEY_A), "m", 500)
    assert d.allowed and d.ticket is not None and d.ticket.reserved == 500
    refused = adm.admit(bearer(KEY_A), "m", 200)
    assert refused.status == 429 and refused.param == "tokensPerMinute"
    assert refused.retry_after_s == 10  # 100 tokens short at 10 tokens/s
    adm.finish(d.ticket, 120)  # the engine used far less: the rest comes back
    assert adm.admit(bearer(KEY_A), "m", 400).allowed


def test_usage_above_the_estimate_is_debt() -> None:
    clock = Clock()
    adm = tn.Admission(keyed({"tokensPerMinute": 600}), True, clock)
    d = adm.admit(bearer(KEY_A), "m", 100)
    assert d.ticket is not None
    adm.finish(d.ticket, 1200)  # 600 over the bucket: a minute to pay back before 1 token is left
    r = adm.admit(bearer(KEY_A), "m", 60)
    assert r.status == 429 and r.retry_after_s == 66
    clock.t += 66
    assert adm.admit(bearer(KEY_A), "m", 60).allowed


def test_a_request_larger_than_the_budget_runs_on_a_full_bucket() -> None:
    adm = tn.Admission(keyed({"tokensPerMinute": 100}), True, Clock())
    d = adm.admit(bearer(KEY_A), "m", 10_000)
    assert d.allowed and d.ticket is not None and d.ticket.reserved == 100


def test_refused_requests_charge_nothing() -> None:
    clock = Clock()
    adm = tn.Admission(keyed({"requestsPerSecond": 1, "tokensPerMinute": 60}), True, clock)
    assert adm.admit(bearer(KEY_A), "m", 60).allowed
    for _ in range(5):
        assert adm.admit(bearer(KEY_A), "m", 1).status == 429
    clock.t += 60
    assert adm.admit(bearer(KEY_A), "m", 60).allowed


def test_rotation_keeps_counts_and_new_budgets_start_full() -> None:
    clock = Clock()
    adm = tn.Admission(keyed({"concurrentRequests": 1, "requestsPerSecond": 1}), True, clock)
    d = adm.admit(bearer(KEY_A), "m", 1)
    assert d.ticket is not None
    a = adm.table.tenants["team-a"]
    rotated = tn.build_table([with_keys(a, KEY_A2), adm.table.tenants["team-b"]])
    adm.set_table(rotated)
    assert adm.admit(bearer(KEY_A), "m", 1).status == 401  # the old key is gone
    assert adm.admit(bearer(KEY_A2), "m", 1).param == "concurrentRequests"  # still one in flight
    adm.finish(d.ticket, 1)
    assert adm.admit(bearer(KEY_A2), "m", 1).param == "requestsPerSecond"  # same budgets: same bucket


# ------------------------------------------------------------------------------ properties


@settings(max_examples=200, deadline=None)
@given(
    rate=hs.floats(0.5, 50),
    gaps=hs.lists(hs.floats(0, 2), min_size=1, max_size=60),
)
def test_admitted_requests_never_exceed_the_rate(rate: float, gaps: list[float]) -> None:
    """Over any run, admitted <= burst + rate * elapsed (token bucket bound)."""
    clock = Clock()
    adm = tn.Admission(keyed({"requestsPerSecond": rate}), True, clock)
    start, admitted = clock.t, 0
    for g in gaps:
        clock.t += g
        for _ in range(3):
            admitted += adm.admit(bearer(KEY_A), "m", 1).allowed
    assert admitted <= max(1.0, rate) + rate * (clock.t - start) + 1e-6


@settings(max_examples=200, deadline=None)
@given(
    tpm=hs.integers(1, 10_000),
    steps=hs.lists(hs.tuples(hs.integers(1, 3000), hs.integers(0, 3000), hs.floats(0, 30)), max_size=40),
)
def test_settled_tokens_never_exceed_the_budget(tpm: int, steps: list[tuple[int, int, float]]) -> None:
    """Tokens admitted (settled at real usage) stay within capacity + refill, plus at most the
    overrun of the last request admitted (usage beyond its estimate is only known at the end)."""
    clock = Clock()
    adm = tn.Admission(keyed({"tokensPerMinute": tpm}), True, clock)
    start, used, last_over = clock.t, 0, 0
    for est, real, gap in steps:
        clock.t += gap
        d = adm.admit(bearer(KEY_A), "m", est)
        if d.allowed:
            assert d.ticket is not None
            adm.finish(d.ticket, real)
            used += real
            last_over = max(0, real - d.ticket.reserved)
        else:
            assert d.status == 429 and d.retry_after_s is not None and d.retry_after_s >= 1
    assert used <= tpm + tpm / 60 * (clock.t - start) + last_over + 1e-6


@settings(max_examples=200, deadline=None)
@given(
    hs.text(min_size=16, max_size=40).filter(lambda s: s.strip() == s and s.isprintable() and " " not in s)
)
def test_only_the_right_key_resolves(key: str) -> None:
    t = tn.build_table([with_keys(tn.Tenant("a"), key)])
    assert t.resolve(key).name == "a"  # type: ignore[union-attr]
    assert t.resolve(key + "x") is None
    assert t.resolve(key[:-1]) is None


# ------------------------------------------------------------------------------ objectives


def test_objective_header_maps_to_a_band_never_above_the_tenants() -> None:
    """`x-gateway-inference-objective` (GIE's InferenceObjective name) picks the band through
    the policy's `objectives`; the tenant's own priority is the ceiling."""
    pol = tn.parse_policies(
        {
            "tenants": {"team-a": {"priority": "standard", "keySha256": [tn.hash_key(KEY_A).hex()]}},
            "objectives": {"batch": "sheddable", "chat": 10, "default": 0},
        },
        "f",
    )
    assert pol.objectives == {"batch": "sheddable", "chat": "critical", "default": "standard"}
    adm = tn.Admission(tn.build_table(pol.values(), pol.objectives), True)

    def band(objective: str | None) -> str:
        h = {**bearer(KEY_A), **({"X-Gateway-Inference-Objective": objective} if objective else {})}
        d = adm.admit(h, "m", 1)
        assert d.ticket is not None
        adm.finish(d.ticket, 0)
        return d.ticket.band

    assert band(None) == "standard"
    assert band("batch") == "sheddable"  # asks for less: granted
    assert band("chat") == "standard"  # asks for more than its tenant's: the tenant's
    assert band("nope") == "standard"  # an objective the policy does not name: the tenant's


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        ({"objectives": {"batch": "low"}}, "f.objectives.batch"),
        ({"objectives": ["batch"]}, "f.objectives"),
        ({"objective": {}}, "f.objective"),
    ],
)
def test_bad_objectives_name_the_field(doc: dict, field: str) -> None:
    with pytest.raises(tn.TenantConfigError, match=field.replace(".", r"\.")):
        tn.parse_policies(doc, "f")
