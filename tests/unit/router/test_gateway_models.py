"""The gateway's model table (router/models.py): names, modes, conflicts, the /v1/models cards."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as hs

from toposerve.router import models as md


def dep(
    name: str,
    ns: str = "team-a",
    model: str = "meta-llama/Llama-3.1-8B-Instruct",
    created: str = "2026-12-01T00:00:00Z",
    **spec: Any,
) -> dict[str, Any]:
    m: dict[str, Any] = {"name": model}
    for k in ("servedName", "aliases"):
        if k in spec:
            m[k] = spec.pop(k)
    return {
        "apiVersion": "toposerve.io/v1alpha1",
        "kind": "LLMDeployment",
        "metadata": {"name": name, "namespace": ns, "creationTimestamp": created},
        "spec": {"model": m, **spec},
    }


def test_served_name_aliases_and_adapters_route_to_their_deployment() -> None:
    t = md.build([
        dep("llama", servedName="llama-8b", aliases=["llama", "default"],
            adapters=[{"name": "sql-lora", "source": "hf://org/sql"}]),
        dep("qwen", model="Qwen/Qwen2.5-7B-Instruct"),
    ])  # fmt: skip
    assert t.resolve("llama-8b") == md.Route("team-a/llama")
    assert t.resolve("default") == md.Route("team-a/llama")
    assert t.resolve("sql-lora") == md.Route("team-a/llama", "sql-lora")
    assert t.resolve("Qwen/Qwen2.5-7B-Instruct") == md.Route("team-a/qwen")
    assert t.resolve("meta-llama/Llama-3.1-8B-Instruct") is None  # servedName replaces model.name
    assert t.resolve("nope") is None


def test_modes_none_and_disabled_are_not_routed_gateway_and_dedicated_are() -> None:
    t = md.build([
        dep("a", model="a/a", routing={"mode": "none"}),
        dep("b", model="b/b", routing={"enabled": False}),
        dep("c", model="c/c", routing={"mode": "gateway"}),
        dep("d", model="d/d"),
    ])  # fmt: skip
    assert sorted(t.routes) == ["c/c", "d/d"]
    assert t.entries["team-a/c"].mode == "gateway"
    assert t.entries["team-a/d"].mode == "dedicated"


def test_a_deployment_being_deleted_is_not_routed_and_scope_filters_namespaces() -> None:
    gone = dep("a", model="a/a")
    gone["metadata"]["deletionTimestamp"] = "2026-12-07T00:00:00Z"
    assert md.build([gone]).routes == {}
    both = [dep("x", ns="team-a", model="x/x"), dep("y", ns="team-b", model="y/y")]
    assert sorted(md.build(both, namespace="team-b").routes) == ["y/y"]


def test_the_elder_keeps_a_contested_name_in_any_order_and_the_other_keeps_its_other_names() -> None:
    old = dep("old", model="m/m", created="2026-01-01T00:00:00Z")
    new = dep("new", ns="team-b", model="m/m", created="2026-06-01T00:00:00Z", aliases=["m-new"])
    for objs in ([old, new], [new, old]):
        t = md.build(objs)
        assert t.resolve("m/m") == md.Route("team-a/old")
        assert t.resolve("m-new") == md.Route("team-b/new")
        assert t.conflicts == (md.Conflict("m/m", "team-a/old", "team-b/new"),)


def test_adapter_sources_are_passed_on_as_the_engines_load_them() -> None:
    t = md.build([dep("a", model="a/a", adapters=[
        {"name": "c", "source": "cache://adapters/c"}, {"name": "h", "source": "hf://org/h", "revision": "v2"},
        {"name": "p", "source": "org/p"}, {"name": "bad name", "source": "org/x"},
    ])])  # fmt: skip
    assert dict(t.entries["team-a/a"].adapters) == {
        "c": "/models/adapters/c",
        "h": "hf://org/h@v2",
        "p": "org/p",
    }


def test_an_adapter_named_like_a_served_name_is_not_an_adapter() -> None:
    t = md.build(
        [
            dep(
                "a",
                model="a/a",
                adapters=[{"name": "a/a", "source": "org/x"}, {"name": "ok", "source": "org/y"}],
            )
        ]
    )
    assert t.resolve("a/a") == md.Route("team-a/a")
    assert t.resolve("ok") == md.Route("team-a/a", "ok")


def test_malformed_objects_are_skipped_not_fatal() -> None:
    bad: list[Any] = [
        {},
        {"metadata": {"name": "x"}},
        {"metadata": {"name": "x", "namespace": "n"}, "spec": {"model": "str"}},
        {"metadata": {"name": "x", "namespace": "n"}, "spec": {"model": {"name": 5}}},
        {"metadata": {"name": "x", "namespace": "n"}, "spec": {"model": {"name": "m"}, "routing": "x"}},
    ]
    assert md.build(bad).routes == {}


def test_closest_names_for_the_404() -> None:
    t = md.build([dep("a", model="meta-llama/Llama-3.1-8B-Instruct"), dep("b", model="Qwen/Qwen2.5-7B")])
    assert t.closest("meta-llama/Llama-3.1-8B-instruct")[0] == "meta-llama/Llama-3.1-8B-Instruct"
    assert t.closest("zzzz") == []


def test_model_cards_are_shaped_like_vllms_with_parent_for_adapters() -> None:
    t = md.build([dep("a", model="m/m", aliases=["m"], adapters=[{"name": "lora1", "source": "hf://o/l"}])])
    cards = md.model_cards(t, created=123)
    assert cards["object"] == "list"
    by_id = {c["id"]: c for c in cards["data"]}
    assert set(by_id) == {"m/m", "m", "lora1"}
    assert by_id["lora1"]["parent"] == "m/m" and by_id["lora1"]["root"] == "o/l"  # as the engines load it
    assert by_id["m"]["parent"] is None
    assert all(c["object"] == "model" and c["created"] == 123 for c in cards["data"])


names = hs.text(alphabet="abc/-", min_size=1, max_size=4)


@given(
    hs.lists(
        hs.tuples(names, hs.lists(names, max_size=3), hs.lists(names, max_size=3), hs.integers(0, 5)),
        max_size=6,
    ),
    hs.randoms(use_true_random=False),
)
def test_every_name_routes_to_exactly_one_claimant_whatever_the_order(specs: Any, rnd: Any) -> None:
    objs = [
        dep(f"d{i}", model=m, aliases=al, adapters=[{"name": a, "source": "org/s"} for a in ad],
            created=f"2026-01-0{day + 1}T00:00:00Z")
        for i, (m, al, ad, day) in enumerate(specs)
    ]  # fmt: skip
    t = md.build(objs)
    shuffled = list(objs)
    rnd.shuffle(shuffled)
    assert md.build(shuffled).routes == t.routes  # every gateway replica agrees
    claimed = {n for o in objs for n in md.entry_from_object(o).names()}  # type: ignore[union-attr]
    assert set(t.routes) == claimed  # no name is lost
    for name, route in t.routes.items():
        assert name in t.entries[route.key].names()
