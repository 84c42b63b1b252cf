"""Rendered objects are the same whether template values are parsed back from YAML or slotted in.

``render/objects.py`` renders every ``tojson`` value as a placeholder and puts the value in after
parsing the templates' own YAML (a third of the CPU). This checks the shortcut against the plain
way (the values as JSON text inside the YAML, parsed by YAML) on every example, on every fleet
profile, for both engines, with the router on.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest

from toposerve.api.config import OperatorConfig
from toposerve.api.manifest import load_manifests
from toposerve.dev import fleet
from toposerve.planner.inventory import inventory_from_nodes
from toposerve.planner.plan import plan_deployment
from toposerve.render import objects
from toposerve.render.objects import Owner, render_deployment

from .conftest import EXAMPLES, ROOT

FLEET = fleet.load(ROOT / "hack" / "cluster" / "fleet.yaml")


def render_all(engine: str, profile: str) -> list[dict[str, Any]]:
    config = OperatorConfig(auto_engine=engine)
    inventory = inventory_from_nodes(fleet.nodes(FLEET, profile), config.catalog(), config.label_schemes)
    out: list[dict[str, Any]] = []
    for path in EXAMPLES:
        for dep in load_manifests(path.read_text()):
            routing = dep.spec.routing.model_copy(update={"enabled": True})
            spec = dep.spec.model_copy(update={"engine": "auto", "routing": routing})
            plan = plan_deployment(dep.name, spec, config, inventory)
            out += render_deployment(dep.name, "ns", spec, plan, config, Owner(dep.name, "uid-1"))
    return out


@pytest.mark.parametrize("profile", sorted(FLEET["profiles"]))
@pytest.mark.parametrize("engine", ["vllm", "mock"])
def test_slotted_values_equal_values_parsed_from_yaml(
    engine: str, profile: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    fast = render_all(engine, profile)
    assert fast and not any("__toposerve_value_" in json.dumps(o) for o in fast)
    monkeypatch.setitem(objects._ENV.filters, "tojson", json.dumps)  # the plain way
    plain = render_all(engine, profile)
    assert fast == plain


def test_values_are_copies_and_json_typed() -> None:
    text, slots = objects._render_text("service.yaml.j2", _ctx())
    assert len(slots) >= 3 and all(token in text for token in slots)
    one = objects._fill({"a": next(iter(slots)), "b": next(iter(slots))}, slots)
    assert one["a"] == one["b"] and (not isinstance(one["a"], dict | list) or one["a"] is not one["b"])
    # JSON's types, not YAML 1.1's guesses: a float without a dot stays a float
    assert objects._fill(["t"], {"t": json.dumps(1e-05)}) == [1e-05]


def test_rendering_in_threads_keeps_each_render_its_own_values() -> None:
    config = OperatorConfig(auto_engine="mock")
    docs = [(d, p) for p in EXAMPLES for d in load_manifests(p.read_text())]
    want = {d.name: render_deployment(d.name, "ns", d.spec, plan_deployment(d.name, d.spec, config), config)
            for d, _ in docs}  # fmt: skip
    errors: list[str] = []

    def work() -> None:
        for _ in range(20):
            for d, _ in docs:
                got = render_deployment(d.name, "ns", d.spec, plan_deployment(d.name, d.spec, config), config)
                if got != want[d.name]:
                    errors.append(d.name)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def _ctx() -> Any:
    return objects._Ctx(object_name="svc", namespace="ns", labels={"a": "b"}, selector={"a": "b"})
