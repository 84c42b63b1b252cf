"""poolOrder cost on the real local cluster: two pools of mock engines, the real Prometheus and the
operator reading each pool's own TTFT through the pool label the scrape gives the series
(toposerve_io_pool). spec.replicas is set by hand (autoscaling off, poolOrder cost), so what is
checked is the pool choice, not the autoscaler. Nothing is timed."""

from __future__ import annotations

import json
import urllib.parse
import urllib.request
from typing import Any

import pytest

from tests.cluster.conftest import Cluster, kubectl, wait_for
from tests.cluster.operator_harness import Operator, apply, events, get_llmd, wait_condition
from tests.cluster.test_autoscale import Load, ips, manifest, pool_replicas
from tests.cluster.test_autoscale import scaling_operator as scaling_operator  # the fixture
from toposerve.api.config import OperatorConfig
from toposerve.autoscale import promql
from toposerve.planner.costorder import busy_count_query, busy_sum_query, by_pool

pytestmark = pytest.mark.cluster
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def cost_rank(cluster: Cluster, namespace: str, name: str) -> dict[str, dict[str, Any]]:
    obj = get_llmd(cluster, namespace, name)
    return {p["name"]: p.get("costRank") or {} for p in (obj.get("status") or {}).get("pools") or []}


def scale(cluster: Cluster, namespace: str, name: str, replicas: int) -> None:
    kubectl(cluster, "patch", "llmd", name, "-n", namespace, "--type=merge",
            "-p", json.dumps({"spec": {"replicas": replicas}}))  # fmt: skip


def test_cost_order_grows_the_cheapest_pool_and_skips_one_over_the_ttft_slo(
    cluster: Cluster, namespace: str, scaling_operator: Operator
) -> None:
    """Estimated figures put the L40S pool first (twice the L4's price for about three times the
    decode speed); under load its own TTFT is over an SLO no engine meets (5 ms), so the next
    replica goes to the L4 pool; idle again (no reading: no evidence against it), the way down
    removes the dearer per token, the L4 replica."""
    name = "costpools"
    m = manifest(name)
    spec = m["spec"]
    spec["placement"] = {"tier": "latency-critical"}
    spec["pools"] = [{"name": "l4", "gpuTypes": ["L4"]}, {"name": "l40s", "gpuTypes": ["L40S"]}]
    spec["autoscaling"] = {"enabled": False, "poolOrder": "cost", "ttftSLO": {"seconds": 0.005},
                           "metricsWindowSeconds": 6}  # fmt: skip
    assert apply(cluster, namespace, m).returncode == 0
    wait_condition(cluster, namespace, name, "Ready", "True", timeout=180)
    obj = get_llmd(cluster, namespace, name)
    assert obj["status"]["poolOrder"] == "cost"
    ranks = cost_rank(cluster, namespace, name)
    assert ranks["l40s"]["source"] == ranks["l4"]["source"] == "estimated", ranks
    assert ranks["l40s"]["costPerMillionTokens"] < ranks["l4"]["costPerMillionTokens"], ranks
    assert pool_replicas(cluster, namespace, name) == {"l40s": 1, "l4": 0}

    router = wait_for(lambda: (r := ips(cluster, namespace, name)) and r[0], "a ready router")
    with Load(f"http://{router}:8080", workers=4, prompt_tokens=300, max_tokens=20) as load:
        over = wait_for(
            lambda: (r := cost_rank(cluster, namespace, name)) and r["l40s"].get("meetsSLO") is False and r,
            "the l40s pool's own TTFT over the SLO in status",
            timeout=120,
            every=1,
        )
        assert over["l40s"]["ttftSeconds"] > 0.005 and over["l4"]["meetsSLO"] is True, over
        scale(cluster, namespace, name, 2)
        wait_for(lambda: pool_replicas(cluster, namespace, name) == {"l40s": 1, "l4": 1},
                 "the new replica in the l4 pool (l40s over the SLO)", timeout=60)  # fmt: skip
    assert load.ok > 0, (load.ok, load.failed)
    moved = [e["message"] for e in events(cluster, namespace, name) if e["reason"] == "PoolsScaled"]
    assert any("cost: cheapest per token meeting the SLO first" in msg and "pool l4 0 -> 1" in msg
               and "l40s (over the TTFT SLO)" in msg for msg in moved), moved  # fmt: skip

    wait_for(lambda: cost_rank(cluster, namespace, name)["l40s"].get("meetsSLO") is True,
             "idle: no reading, the l40s pool back in cost order", timeout=120, every=1)  # fmt: skip
    scale(cluster, namespace, name, 1)
    wait_for(lambda: pool_replicas(cluster, namespace, name) == {"l40s": 1, "l4": 0},
             "the dearer per token (l4) removed first", timeout=60)  # fmt: skip


def test_the_busy_throughput_query_finds_the_minutes_a_pool_queued(
    cluster: Cluster, namespace: str, scaling_operator: Operator
) -> None:
    """The observed figure's PromQL (planner/costorder.py) on the real Prometheus: long requests
    fill a small KV cache so requests wait; the per-pool busy query then counts pod-minutes with
    a positive output rate under that pool's label. (The operator switches to the observed figure
    after MIN_BUSY_MINUTES such minutes, longer than a test should hold the cluster.)"""
    name = "busypool"
    m = manifest(name)
    m["spec"]["pools"] = [{"name": "l4", "gpuTypes": ["L4"]}]
    m["spec"]["placement"] = {"tier": "throughput"}
    m["spec"]["autoscaling"] = {"enabled": False, "poolOrder": "cost"}
    assert apply(cluster, namespace, m).returncode == 0
    wait_condition(cluster, namespace, name, "Ready", "True", timeout=180)
    sel = promql.selector(OperatorConfig().prometheus_selector, namespace, name)
    router = wait_for(lambda: (r := ips(cluster, namespace, name)) and r[0], "a ready router")
    with Load(f"http://{router}:8080", workers=24, prompt_tokens=2000, max_tokens=300) as load:

        def busy() -> tuple[dict[str, float], dict[str, float]] | None:
            count = by_pool(prom(cluster, busy_count_query(sel)))
            total = by_pool(prom(cluster, busy_sum_query(sel)))
            return (count, total) if count.get("l4", 0) >= 1 and total.get("l4", 0) > 0 else None

        count, total = wait_for(busy, "a busy pod-minute of pool l4", timeout=240, every=5)
    assert load.ok > 0, (load.ok, load.failed)
    assert set(count) == {"l4"}, count
    assert total["l4"] / count["l4"] > 0  # output tokens/s of one busy replica
    print(f"busy pod-minutes {count['l4']:g}, mean output tokens/s when busy {total['l4'] / count['l4']:.1f}")


def prom(cluster: Cluster, query: str) -> list[dict[str, Any]]:
    url = f"{cluster.prometheus_url}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    with _NO_PROXY.open(url, timeout=10) as r:
        data = json.loads(r.read().decode())
    assert data["status"] == "success", data
    return list(data["data"]["result"])
