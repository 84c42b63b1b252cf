"""`toposerve cost --by tenant` (commands/cost.py): the gateway's per-tenant token counters from
Prometheus, priced at each model's deployment's observed $ per output token."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.unit.fake_prometheus import FakePrometheus, serve
from tests.unit.test_cost import _node, pod
from toposerve.api.config import OperatorConfig
from toposerve.commands import cost as cost_cmd

LLAMA = "meta-llama/Llama-3.1-70B-Instruct"
DEPLOYMENT = {
    "metadata": {"namespace": "ns", "name": "llama", "creationTimestamp": "2026-12-01T00:00:00Z"},
    "spec": {"model": {"name": LLAMA, "aliases": ["llama"]}, "placement": {"gpuTypes": ["H100"]},
             "cost": {"hourlyPerGPU": {"H100": 2.5}}},
    "status": {"costPerHour": 10.0, "pools": [{"name": "default", "costPerHour": 10.0}]},
}  # fmt: skip
RESULT = [  # sum by (tenant, model, kind) (increase(toposerve_tenant_tokens_total[1h]))
    {"metric": {"tenant": "search", "model": LLAMA, "kind": "prompt"}, "value": [1.7e9, "5000000"]},
    {"metric": {"tenant": "search", "model": LLAMA, "kind": "completion"}, "value": [1.7e9, "2000000"]},
    {"metric": {"tenant": "search", "model": "llama", "kind": "completion"}, "value": [1.7e9, "1000000"]},
    {"metric": {"tenant": "batch", "model": "gone-model", "kind": "completion"}, "value": [1.7e9, "7"]},
    {"metric": {"tenant": "batch", "model": LLAMA, "kind": "completion"}, "value": [1.7e9, "NaN"]},
    {"metric": {"model": LLAMA, "kind": "completion"}, "value": [1.7e9, "3"]},
]


@pytest.fixture
def prometheus() -> Iterator[FakePrometheus]:
    with serve(RESULT) as fake:
        yield fake


def lister(api_version: str, kind: str, ns: str | None, selector: str | None) -> list[dict[str, Any]]:
    objects = {
        ("Node", None): [_node("od-1", False)],
        ("LLMDeployment", "ns"): [DEPLOYMENT],
        ("LLMDeployment", None): [DEPLOYMENT],
        ("Pod", "ns"): [pod("llama-0", "od-1")],
    }
    return objects.get((kind, ns), [])


def test_tenant_costs_price_completion_tokens_at_the_deployments_figure() -> None:
    rows = cost_cmd.collect(lister, OperatorConfig(), lambda ns: {"llama-0": 2000.0}, "ns")
    per_m = rows[0][0].total.cost_per_million_output_tokens
    assert per_m == pytest.approx(1.3889, abs=1e-4)  # $10/h at 2000 tok/s
    costs = cost_cmd.tenant_costs(RESULT, [DEPLOYMENT], rows)
    by = {(c.tenant, c.model): c for c in costs}
    assert set(by) == {("search", LLAMA), ("search", "llama"), ("batch", "gone-model")}  # NaN: nothing
    s = by[("search", LLAMA)]
    assert (s.deployment, s.prompt_tokens, s.completion_tokens) == ("ns/llama", 5e6, 2e6)
    assert s.cost == pytest.approx(2 * per_m)
    assert by[("search", "llama")].deployment == "ns/llama"  # an alias is the same deployment
    gone = by[("batch", "gone-model")]
    assert gone.deployment == "" and gone.cost is None  # unknown, not zero
    text = cost_cmd.tenant_table(costs)
    assert any(line.startswith("search") and "(total)" in line for line in text.splitlines())
    assert f"{3 * per_m:.4f}" in text  # search's total over both names


def test_cost_by_tenant_through_prometheus(
    prometheus: FakePrometheus, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = cost_cmd.collect(lister, OperatorConfig(), lambda ns: {"llama-0": 2000.0}, "ns")
    args = argparse.Namespace(output="json")
    assert cost_cmd._run_by_tenant(args, prometheus.url, "1h", rows, lister) == 0
    assert prometheus.queries == [cost_cmd.tenant_query("1h")]
    assert cost_cmd.tenant_query("1h") == (
        "sum by (tenant, model, kind) (increase(toposerve_tenant_tokens_total[1h]))"
    )
    doc = json.loads(capsys.readouterr().out)
    assert doc["window"] == "1h"
    search = next(t for t in doc["tenants"] if t["tenant"] == "search" and t["model"] == LLAMA)
    assert search["cost"] == pytest.approx(2.7778, abs=1e-3)
    assert cost_cmd._run_by_tenant(args, None, "1h", rows, lister) == 2


def test_by_flag_parses() -> None:
    p = argparse.ArgumentParser()
    cost_cmd.add_arguments(p)
    assert p.parse_args(["--by", "tenant"]).by == "tenant"
    assert p.parse_args([]).by == "deployment"
