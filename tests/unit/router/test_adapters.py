"""LoRA adapter placement and model resolution (router/adapters.py): cases plus hypothesis
properties (no replica above its slots, an adapter of the spec always placeable while a
replica can take it, determinism)."""

from __future__ import annotations

from collections.abc import Mapping

from hypothesis import given, settings
from hypothesis import strategies as st

from toposerve.router import adapters as ad
from toposerve.router.adapters import ReplicaState

SPEC = {"a": "/lora/a", "b": "/lora/b", "c": "/lora/c", "d": "/lora/d"}


def R(i: str, reg: Mapping[str, str] | None = None, **kw: object) -> ReplicaState:
    return ReplicaState(id=i, registered=dict(reg or {}), **kw)  # type: ignore[arg-type]


def reg(*names: str) -> dict[str, str]:
    return {n: SPEC[n] for n in names}


# ------------------------------------------------------------------------------------- resolution


def test_resolve_model_adapter_base_and_removed() -> None:
    assert ad.resolve_model("a", SPEC) == ad.ADAPTER
    assert ad.resolve_model("base-model", SPEC) == ad.BASE
    assert ad.resolve_model(None, SPEC) == ad.BASE
    assert ad.resolve_model(["a"], SPEC) == ad.BASE
    assert ad.resolve_model("old", SPEC, retired={"old"}) == ad.UNKNOWN
    # registered on an engine but not (or no longer) in the spec: not served through this router
    assert ad.resolve_model("stray", SPEC, registered={"stray"}) == ad.UNKNOWN
    # re-added: served again
    assert ad.resolve_model("a", SPEC, retired={"a"}) == ad.ADAPTER


# ------------------------------------------------------------------------------------- placement


def test_routes_to_holders_preferring_running() -> None:
    rs = [R("r1", reg("a")), R("r2", reg("a"), running=frozenset({"a"})), R("r3")]
    p = ad.place("a", SPEC, rs, {})
    assert (p.action, p.reason, p.targets, p.load_on) == (ad.ROUTE, ad.P_RUNNING, ("r2",), None)
    p = ad.place("a", SPEC, [R("r1", reg("a")), R("r2", reg("a")), R("r3")], {})
    assert (p.action, p.reason, p.targets) == (ad.ROUTE, ad.P_REGISTERED, ("r1", "r2"))


def test_waiting_counts_as_active() -> None:
    p = ad.place("a", SPEC, [R("r1", reg("a")), R("r2", reg("a"), waiting=frozenset({"a"}))], {})
    assert p.targets == ("r2",)


def test_a_hot_running_holder_gives_way_to_a_cool_registered_one() -> None:
    rs = [R("r1", reg("a"), running=frozenset({"a"}), load=20), R("r2", reg("a"), load=0), R("r3")]
    p = ad.place("a", SPEC, rs, {})
    assert (p.action, p.targets, p.load_on) == (ad.ROUTE, ("r2",), None)


def test_stale_path_is_not_a_holder() -> None:
    p = ad.place("a", SPEC, [R("r1", {"a": "/old/a"}, slots=1), R("r2", slots=1)], {})
    assert (p.action, p.reason, p.load_on, p.evict) == (ad.LOAD, ad.P_FREE_SLOT, "r2", None)
    # no free slot anywhere else: replace the stale registration
    p = ad.place("a", SPEC, [R("r1", {"a": "/old/a"}, slots=1), R("r2", reg("b"), slots=1)], {})
    assert (p.action, p.reason, p.load_on, p.evict) == (ad.LOAD, ad.P_EVICT, "r1", "a")


def test_hot_adapter_spreads_into_a_free_slot() -> None:
    rs = [R("r1", reg("a"), slots=2, load=10), R("r2", slots=2, load=0), R("r3", reg("b", "c"), slots=2)]
    p = ad.place("a", SPEC, rs, {})
    assert (p.action, p.reason, p.targets, p.load_on) == (ad.ROUTE, ad.P_SPREAD, ("r1",), "r2")
    # a spread already loading: no second one
    rs[1] = R("r2", slots=2, loading=frozenset({"a"}))
    p = ad.place("a", SPEC, rs, {})
    assert (p.action, p.targets, p.load_on) == (ad.ROUTE, ("r1",), None)
    # nowhere free: stays on its holder, no eviction for spreading
    p = ad.place("a", SPEC, [R("r1", reg("a"), load=10), R("r2", reg("b"), slots=1)], {})
    assert (p.action, p.targets, p.load_on) == (ad.ROUTE, ("r1",), None)


def test_low_traffic_does_not_spread() -> None:
    rs = [R("r1", reg("a"), slots=2, load=3), R("r2", slots=2)]
    assert ad.place("a", SPEC, rs, {}).load_on is None


def test_cold_adapter_loads_on_the_least_loaded_free_replica() -> None:
    rs = [R("r1", slots=2, load=5), R("r2", reg("b"), slots=2, load=1), R("r3", slots=2, load=1)]
    p = ad.place("a", SPEC, rs, {})
    assert (p.action, p.reason, p.load_on, p.evict) == (ad.LOAD, ad.P_FREE_SLOT, "r3", None)


def test_joins_a_load_in_progress() -> None:
    rs = [R("r1", slots=2, loading=frozenset({"a"}), load=9), R("r2", slots=2)]
    p = ad.place("a", SPEC, rs, {})
    assert (p.action, p.reason, p.load_on) == (ad.LOAD, ad.P_LOADING, "r1")


def test_evicts_the_least_recently_used_idle_adapter() -> None:
    rs = [R("r1", reg("b", "c"), slots=2), R("r2", reg("d", "b"), slots=2)]
    used = {("r1", "b"): 5.0, ("r1", "c"): 3.0, ("r2", "d"): 4.0, ("r2", "b"): 9.0}
    p = ad.place("a", SPEC, rs, used)
    assert (p.action, p.reason, p.load_on, p.evict) == (ad.LOAD, ad.P_EVICT, "r1", "c")
    # c has a request in flight there: the next oldest anywhere
    rs[0] = R("r1", reg("b", "c"), slots=2, in_use={"c": 1})
    p = ad.place("a", SPEC, rs, used)
    assert (p.load_on, p.evict) == ("r2", "d")


def test_eviction_prefers_removed_then_idle_on_the_engine() -> None:
    rs = [R("r1", {"b": SPEC["b"], "gone": "/lora/gone"}, slots=2)]
    p = ad.place("a", SPEC, rs, {("r1", "gone"): 100.0})
    assert p.evict == "gone"
    rs = [R("r1", reg("b", "c"), slots=2, running=frozenset({"b"}))]
    p = ad.place("a", SPEC, rs, {("r1", "b"): 1.0, ("r1", "c"): 50.0})
    assert p.evict == "c"


def test_unavailable_when_every_slot_is_pinned_or_no_replica() -> None:
    rs = [R("r1", reg("b"), slots=1, in_use={"b": 2}), R("r2", slots=1, loading=frozenset({"c"}))]
    assert ad.place("a", SPEC, rs, {}) == ad.Placement(ad.UNAVAILABLE, ad.P_NO_SLOT)
    assert ad.place("a", SPEC, [R("r1", eligible=False)], {}).reason == ad.P_NO_REPLICA
    assert ad.place("a", SPEC, [], {}).reason == ad.P_NO_REPLICA


def test_ineligible_replicas_are_neither_targets_nor_load_sites() -> None:
    rs = [R("r1", reg("a"), eligible=False), R("r2", slots=1)]
    p = ad.place("a", SPEC, rs, {})
    assert (p.action, p.load_on) == (ad.LOAD, "r2")


# ------------------------------------------------------------------------------------- upkeep


def test_surplus_unloads_removed_and_stale_when_idle_and_trims_overflow() -> None:
    r = R("r1", {"a": SPEC["a"], "old": "/x", "b": "/stale/b"}, slots=4)
    assert ad.surplus(r, SPEC, {"old"}, {}) == ["b", "old"]
    r = R("r1", {"a": SPEC["a"], "old": "/x"}, slots=4, in_use={"old": 1})
    assert ad.surplus(r, SPEC, {"old"}, {}) == []
    # names never in this router's spec are someone else's unless the slots overflow
    r = R("r1", {"a": SPEC["a"], "theirs": "/t"}, slots=2)
    assert ad.surplus(r, SPEC, set(), {}) == []
    r = R("r1", reg("a", "b", "c"), slots=2)
    assert ad.surplus(r, SPEC, set(), {("r1", "a"): 3.0, ("r1", "b"): 1.0, ("r1", "c"): 2.0}) == ["b"]


def test_reloads_what_a_restarted_replica_lost() -> None:
    r = R("r1", reg("b"), slots=3)
    assert ad.reloads(r, {"a", "b", "c", "gone"}, SPEC) == ["a", "c"]
    assert ad.reloads(R("r1", reg("b"), slots=2), {"a", "b", "c"}, SPEC) == ["a"]


# ------------------------------------------------------------------------------------- parsing


def test_parse_lora_info_takes_the_newest_label_set() -> None:
    text = (
        "# HELP vllm:lora_requests_info Running stats on lora requests.\n"
        "# TYPE vllm:lora_requests_info gauge\n"
        'vllm:lora_requests_info{max_lora="2",running_lora_adapters="a,b",waiting_lora_adapters=""} '
        "1.7e9\n"
        'vllm:lora_requests_info{max_lora="2",running_lora_adapters="",waiting_lora_adapters="c"} '
        "1.700000001e9\n"
        'vllm:num_requests_running{model_name="m"} 1.0\n'
    )
    info = ad.parse_lora_info(text)
    assert info == ad.LoraInfo(2, frozenset(), frozenset({"c"}))
    assert ad.parse_lora_info('vllm:num_requests_running{model_name="m"} 1.0\n') is None
    escaped = (
        'vllm:lora_requests_info{max_lora="1",running_lora_adapters="x\\"y,z",waiting_lora_adapters=""} 5\n'
    )
    assert ad.parse_lora_info(escaped) == ad.LoraInfo(1, frozenset({'x"y', "z"}), frozenset())


def test_parse_models_splits_adapters_from_base() -> None:
    doc = {
        "object": "list",
        "data": [
            {"id": "base", "object": "model", "root": "/models/base", "parent": None},
            {"id": "a", "object": "model", "root": "/lora/a", "parent": "base"},
            {"id": 3},
            "junk",
        ],
    }
    assert ad.parse_models(doc) == ({"a": "/lora/a"}, ["base"])
    assert ad.parse_models({"data": "x"}) is None
    assert ad.parse_models([]) is None


# ------------------------------------------------------------------------------------- properties

NAMES = [*sorted(SPEC), "gone"]
PATHS = {**SPEC, "gone": "/lora/gone"}


@st.composite
def replica(draw: st.DrawFn, i: int) -> ReplicaState:
    slots = draw(st.integers(1, 4))
    held = draw(st.lists(st.sampled_from(NAMES), unique=True, max_size=slots))
    stale = draw(st.sets(st.sampled_from(held))) if held else set()
    registered = {n: (f"/stale/{n}" if n in stale else PATHS[n]) for n in held}
    free_names = [n for n in NAMES if n not in registered]
    loading = draw(st.sets(st.sampled_from(free_names), max_size=slots - len(held))) if free_names else set()
    in_use = {n: draw(st.integers(0, 2)) for n in held}
    return ReplicaState(
        id=f"r{i}",
        registered=registered,
        slots=slots,
        running=frozenset(draw(st.sets(st.sampled_from(NAMES)))),
        waiting=frozenset(draw(st.sets(st.sampled_from(NAMES)))),
        loading=frozenset(loading),
        in_use=in_use,
        load=draw(st.integers(0, 30)),
        eligible=draw(st.booleans()),
    )


@st.composite
def fleet(draw: st.DrawFn) -> list[ReplicaState]:
    n = draw(st.integers(0, 5))
    return [draw(replica(i)) for i in range(n)]


USED = st.dictionaries(
    st.tuples(st.sampled_from([f"r{i}" for i in range(5)]), st.sampled_from(NAMES)), st.floats(0, 100)
)


def _after(p: ad.Placement, r: ReplicaState, name: str) -> int:
    """Occupied slots of `r` once the placement's load (and eviction) is done."""
    names = set(r.registered) | set(r.loading)
    if p.load_on == r.id:
        names.discard(p.evict or "")
        names.add(name)
    return len(names)


@settings(max_examples=400, deadline=None)
@given(fleet(), st.sampled_from(sorted(SPEC)), USED)
def test_property_no_replica_above_its_slots(rs: list[ReplicaState], name: str, used: dict) -> None:
    p = ad.place(name, SPEC, rs, used)
    by_id = {r.id: r for r in rs}
    for r in rs:
        assert _after(p, r, name) <= max(r.slots, 1)
    if p.load_on is not None:
        r = by_id[p.load_on]
        assert r.eligible
        if p.evict is not None:
            assert p.evict in r.registered
            assert r.in_use.get(p.evict, 0) == 0 and p.evict not in r.loading  # never in use
    for t in p.targets:
        assert by_id[t].eligible and by_id[t].holds(name, SPEC[name])


@settings(max_examples=400, deadline=None)
@given(fleet(), st.sampled_from(sorted(SPEC)), USED)
def test_property_an_adapter_of_the_spec_is_always_placeable(
    rs: list[ReplicaState], name: str, used: dict
) -> None:
    p = ad.place(name, SPEC, rs, used)
    elig = [r for r in rs if r.eligible]

    # it can only be refused when no eligible replica has room: a free slot, or an adapter
    # with nothing of this router in flight on it (where the adapter is registered under a stale
    # path, only that registration can make room: a second one of the name is refused)
    def room(r: ReplicaState) -> bool:
        if name in r.registered and not r.holds(name, SPEC[name]):
            return not r.busy(name)
        return r.free() > 0 or any(not r.busy(a) for a in r.registered)

    can = any(name in r.loading or r.holds(name, SPEC[name]) or room(r) for r in elig)
    assert (p.action == ad.UNAVAILABLE) == (not can)
    if p.action == ad.UNAVAILABLE:
        assert p.reason == (ad.P_NO_REPLICA if not elig else ad.P_NO_SLOT)
    # with no request in flight and no load in progress, any healthy replica will do
    idle = [
        ReplicaState(r.id, r.registered, r.slots, r.running, r.waiting, eligible=r.eligible, load=r.load)
        for r in rs
    ]
    q = ad.place(name, SPEC, idle, used)
    assert (q.action == ad.UNAVAILABLE) == (not elig)


@settings(max_examples=200, deadline=None)
@given(fleet(), st.sampled_from(sorted(SPEC)), USED, st.randoms(use_true_random=False))
def test_property_deterministic_whatever_the_order(
    rs: list[ReplicaState], name: str, used: dict, rnd: object
) -> None:
    shuffled = list(rs)
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]
    assert ad.place(name, SPEC, rs, used) == ad.place(name, SPEC, shuffled, used)


@settings(max_examples=200, deadline=None)
@given(fleet(), USED)
def test_property_upkeep_within_slots_and_never_in_use(rs: list[ReplicaState], used: dict) -> None:
    for r in rs:
        out = ad.surplus(r, SPEC, {"gone"}, used)
        assert len(set(out)) == len(out)
        assert all(a in r.registered and not r.busy(a) for a in out)
        back = ad.reloads(r, NAMES, SPEC)
        assert r.occupied() + len(back) <= max(r.slots, r.occupied())
        assert all(a in SPEC for a in back)
