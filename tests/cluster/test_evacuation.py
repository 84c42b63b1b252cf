"""Issue 12's operator reaction on the real local cluster, under streaming load through the router:
an ECC burst reported by the health agent (real pynvml against the fake libnvidia-ml.so.1), and a
spot termination notice (GKE's taint), each move the replicas on that node: a replacement is Ready
on a healthy node before the router is drained away from the old pod, the old pod goes once its
engine is idle, and no request fails before it started streaming."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster.conftest import ROOT, Cluster, start_health_agent, wait_for
from tests.cluster.load import Load
from tests.cluster.operator_harness import (
    Operator,
    apply,
    events,
    get_llmd,
    running_operator,
    wait_condition,
)
from tests.cluster.test_router_cluster import ready_ips
from toposerve.dev import fakenvml
from toposerve.health.node import CONDITION_TYPE, TAINT_KEY

pytestmark = pytest.mark.cluster

H100 = {"name": "NVIDIA H100 80GB HBM3", "temp": 45, "mem.total": 85520809984, "mem.used": 1 << 30}
NOTICE = "cloud.google.com/impending-node-termination"


@pytest.fixture
def evac_operator(cluster: Cluster, tmp_path: Path) -> Iterator[Operator]:
    # Deadlines long enough that only a Ready replacement and an idle engine can explain the steps.
    config = {
        "evacuation": {
            "gpuUnhealthy": {"drainAfterSeconds": 300, "drainTimeoutSeconds": 120},
            "interruption": {"drainAfterSeconds": 120, "drainTimeoutSeconds": 90},
            "minDrainSeconds": 3,
        }
    }
    with running_operator(cluster, tmp_path, config, "--resync", "30", tail=60) as op:
        yield op


def _deploy(cluster: Cluster, namespace: str, spec: dict[str, Any]) -> tuple[str, str]:
    manifest = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    manifest["spec"].update(engine="mock", replicas=2, **spec)
    assert apply(cluster, namespace, manifest).returncode == 0
    wait_condition(cluster, namespace, "quickstart", "Ready", "True", timeout=180)
    ip = wait_for(lambda: (ips := ready_ips(cluster, namespace, "quickstart")) and ips[0], "a ready router")
    return f"http://{ip}:8080", str(manifest["spec"]["model"]["name"])


def _engines(cluster: Cluster, namespace: str) -> list[Any]:
    return list(
        cluster.core.list_namespaced_pod(
            namespace, label_selector="toposerve.io/deployment=quickstart,app.kubernetes.io/component=engine"
        ).items
    )


def _ready(pod: Any) -> bool:
    return not pod.metadata.deletion_timestamp and any(
        c.type == "Ready" and c.status == "True" for c in pod.status.conditions or []
    )


def _gone(cluster: Cluster, namespace: str, name: str) -> bool:
    return not any(p.metadata.name == name for p in cluster.core.list_namespaced_pod(namespace).items)


def _reasons(cluster: Cluster, namespace: str) -> list[tuple[str, str]]:
    """(reason, message) of the LLMDeployment's Events, oldest first (the list is in no order)."""
    got = events(cluster, namespace, "quickstart")
    got.sort(key=lambda e: e.get("firstTimestamp") or e["metadata"]["creationTimestamp"])
    return [(e["reason"], e["message"]) for e in got]


def _evacuated_while_serving(
    cluster: Cluster, namespace: str, load: Load, victim: Any, bad_node: str
) -> None:
    """What both tests require once the node is in trouble."""
    name = victim.metadata.name
    wait_for(lambda: _gone(cluster, namespace, name), f"{name} evacuated and deleted", timeout=240, every=1)

    def replaced() -> list[Any] | None:
        pods = [p for p in _engines(cluster, namespace) if _ready(p)]
        return pods if len(pods) == 2 and all(p.spec.node_name != bad_node for p in pods) else None

    wait_for(replaced, "2 ready engines, none on the troubled node", timeout=120)
    said = _reasons(cluster, namespace)
    mine = dict((r, m) for r, m in said if f"pod {name} " in m or f"pod {name}:" in m)
    assert sorted(mine) == ["Draining", "Evacuated", "Evacuating"], said
    # The order the mechanism promises: the replacement was Ready before the router was drained
    # away from the pod, and the pod went because its engine had nothing left, not at a deadline.
    assert "its replacement is Ready" in mine["Draining"], mine
    assert "its engine has no requests left" in mine["Evacuated"], mine
    ok_before = load.ok
    wait_for(lambda: load.ok > ok_before + 5 or None, "requests still served after the evacuation")
    load.stop.set()


@pytest.fixture
def agent_for(cluster: Cluster, tmp_path: Path) -> Iterator[Any]:
    procs: list[tuple[subprocess.Popen[bytes], str]] = []

    def start(node: str) -> Path:
        state = tmp_path / "gpu-state"
        fakenvml.write_state(state, [H100, H100])
        proc = start_health_agent(cluster, node, state, tmp_path / "agent.log")
        procs.append((proc, node))
        return state

    yield start
    for proc, node in procs:
        proc.terminate()
        proc.wait(15)
        # Leave the shared node as found: no taint, GPUs healthy.
        n = cluster.core.read_node(node)
        taints = [
            cluster.api.sanitize_for_serialization(t) for t in n.spec.taints or [] if t.key != TAINT_KEY
        ]
        cluster.core.patch_node(node, {"spec": {"taints": taints}})
        cluster.core.patch_node_status(
            node,
            {"status": {"conditions": [{"type": CONDITION_TYPE, "status": "True", "reason": "TestCleanup"}]}},
        )


def _condition(cluster: Cluster, node: str) -> dict[str, Any] | None:
    n = cluster.api.sanitize_for_serialization(cluster.core.read_node(node))
    return next((c for c in n["status"].get("conditions") or [] if c["type"] == CONDITION_TYPE), None)


def _notice(cluster: Cluster, node: str, on: bool) -> None:
    """Put the termination-notice taint on `node`, or take it off (whatever else it carries stays)."""
    n = cluster.core.read_node(node)
    rest = [cluster.api.sanitize_for_serialization(t) for t in n.spec.taints or [] if t.key != NOTICE]
    notice = [{"key": NOTICE, "value": "true", "effect": "NoSchedule"}] if on else []
    cluster.core.patch_node(node, {"spec": {"taints": [*rest, *notice]}})


def _tainted(cluster: Cluster, node: str, key: str) -> bool:
    return any(t.key == key for t in cluster.core.read_node(node).spec.taints or [])


def test_an_ecc_burst_moves_the_replica_off_the_node_without_failing_requests(
    cluster: Cluster, namespace: str, evac_operator: Operator, agent_for: Any
) -> None:
    pytest.importorskip("openai")
    url, model = _deploy(cluster, namespace, {})
    victim = _engines(cluster, namespace)[0]
    node = victim.spec.node_name
    state = agent_for(node)
    wait_for(lambda: (c := _condition(cluster, node)) and c["status"] == "True", "GPUHealthy=True")
    load = Load(url, model).run(8)
    try:
        wait_for(lambda: load.ok > 10 or None, "load flowing through the router")
        fakenvml.write_state(state, [H100, {**H100, "ecc.vol.uncorrected": 7}])
        wait_for(lambda: (c := _condition(cluster, node)) and c["status"] == "False", "GPUHealthy=False")
        wait_for(lambda: _tainted(cluster, node, TAINT_KEY) or None, "the gpu-unhealthy taint")
        _evacuated_while_serving(cluster, namespace, load, victim, node)
    finally:
        load.close()
    assert load.failed_before_stream == [], load.failed_before_stream
    assert load.failed_mid_stream == [], load.failed_mid_stream  # drained, not cut
    assert load.cut == [], load.cut
    said = [m for r, m in _reasons(cluster, namespace) if r == "Evacuating"]
    assert any("GPU 1: 7 uncorrected ECC errors" in m for m in said), said
    # Recovery: the agent lifts the taint and the condition.
    fakenvml.write_state(state, [H100, H100])
    wait_for(lambda: (c := _condition(cluster, node)) and c["status"] == "True", "GPUHealthy=True again")
    wait_for(lambda: (not _tainted(cluster, node, TAINT_KEY)) or None, "the taint removed")


def test_a_spot_termination_notice_replaces_first_then_drains(
    cluster: Cluster, namespace: str, evac_operator: Operator
) -> None:
    pytest.importorskip("openai")
    spot = {"placement": {"tier": "throughput", "spot": {"enabled": True},
                          "nodeSelector": {"toposerve.io/capacity-type": "spot"}}}  # fmt: skip
    url, model = _deploy(cluster, namespace, spot)
    victim = _engines(cluster, namespace)[0]
    node = victim.spec.node_name
    assert cluster.core.read_node(node).metadata.labels.get("toposerve.io/capacity-type") == "spot"
    load = Load(url, model).run(8)
    try:
        wait_for(lambda: load.ok > 10 or None, "load flowing through the router")
        _notice(cluster, node, True)
        _evacuated_while_serving(cluster, namespace, load, victim, node)
    finally:
        load.close()
        _notice(cluster, node, False)
    assert load.failed_before_stream == [], load.failed_before_stream
    assert load.failed_mid_stream == [], load.failed_mid_stream
    assert load.cut == [], load.cut
    said = [m for r, m in _reasons(cluster, namespace) if r == "Evacuating"]
    assert any(f"termination notice (taint {NOTICE})" in m for m in said), said


def test_a_spot_termination_notice_pre_scales_on_demand_until_the_spot_side_is_back(
    cluster: Cluster, namespace: str, evac_operator: Operator
) -> None:
    """planner/spotcover.py on the real cluster: the notice adds an on-demand replica of the pool at
    once (its own -od workload, on a node that is not spot), status and an Event say so, and once the
    spot replacement is Ready and the noticed pod gone, the on-demand cover is removed again."""
    pytest.importorskip("openai")
    url, model = _deploy(cluster, namespace, {"placement": {"tier": "throughput", "spot": {"enabled": True}}})
    spot_pods = [p for p in _engines(cluster, namespace) if "toposerve.io/capacity" not in p.metadata.labels]
    victim = spot_pods[0]
    node = victim.spec.node_name
    load = Load(url, model).run(4)

    def cover() -> int:
        pools = (get_llmd(cluster, namespace, "quickstart").get("status") or {}).get("pools") or []
        return int(pools[0].get("onDemandCover") or 0) if pools else 0

    def on_demand() -> list[Any]:
        return [
            p
            for p in _engines(cluster, namespace)
            if p.metadata.labels.get("toposerve.io/capacity") == "on-demand"
        ]

    try:
        wait_for(lambda: load.ok > 5 or None, "load flowing through the router")
        assert on_demand() == [] and cover() == 0
        _notice(cluster, node, True)
        wait_for(lambda: cover() == 1 or None, "status.pools[0].onDemandCover 1", timeout=60)
        (od,) = wait_for(
            lambda: (ps := [p for p in on_demand() if _ready(p)]) and ps, "a ready on-demand cover"
        )
        od_node = cluster.core.read_node(od.spec.node_name).metadata.labels
        assert od.spec.node_name != node and od_node.get("toposerve.io/capacity-type") != "spot", od_node
        said = [m for r, m in _reasons(cluster, namespace) if r == "SpotCover"]
        assert said and "termination notice" in said[0], said
        # the spot side comes back (replacement Ready, noticed pod evacuated): the cover goes
        wait_for(
            lambda: _gone(cluster, namespace, victim.metadata.name), "noticed pod evacuated", timeout=240
        )
        wait_for(lambda: cover() == 0 or None, "the cover ended", timeout=120)
        wait_for(lambda: not [p for p in on_demand() if not p.metadata.deletion_timestamp] or None,
                 "no on-demand pod left", timeout=120)  # fmt: skip
        assert [r for r, _ in _reasons(cluster, namespace)].count("SpotCoverEnded") == 1
        ok_before = load.ok
        wait_for(lambda: load.ok > ok_before + 5 or None, "requests still served")
        load.stop.set()
    finally:
        load.close()
        _notice(cluster, node, False)
    assert load.failed_before_stream == [], load.failed_before_stream
    assert load.failed_mid_stream == [], load.failed_mid_stream
