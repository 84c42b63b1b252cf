"""Two operator replicas with --leader-elect: exactly one holds the Lease and reconciles; when it is
killed, the other takes over. Also checks the operator's own Prometheus metrics."""

from __future__ import annotations

import re
import socket
import urllib.request
from pathlib import Path

import pytest

from tests.cluster.conftest import Cluster, wait_for
from tests.cluster.operator_harness import Operator, apply, install_crd, wait_observed

pytestmark = pytest.mark.cluster
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def metric(port: int, name: str) -> float | None:
    try:
        with _NO_PROXY.open(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return None
    total = None
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})? ([0-9.e+-]+)$", line)
        if m:
            total = (total or 0.0) + float(m.group(2))
    return total


def manifest(name: str) -> dict[str, object]:
    return {
        "apiVersion": "toposerve.io/v1alpha1",
        "kind": "LLMDeployment",
        "metadata": {"name": name},
        "spec": {"model": {"name": "Qwen/Qwen2.5-7B-Instruct", "maxContextLength": 8192}, "engine": "vllm",
                 "replicas": 0, "placement": {"gpuTypes": ["A100-80GB"]}, "routing": {"enabled": False}},
    }  # fmt: skip


def test_one_leader_reconciles_and_a_standby_takes_over(
    cluster: Cluster, namespace: str, tmp_path: Path
) -> None:
    install_crd(cluster)
    ports = [free_port(), free_port()]
    # Watch only this test's namespace: the write counters below are per process, and a cluster-wide
    # operator would also count writes for objects other tests leave in namespaces being deleted.
    flags = ["--leader-elect", "--lease-namespace", namespace, "--resync", "5", "-n", namespace]
    ops = [
        Operator(cluster, tmp_path / f"op{i}.log", *flags, "--metrics-port", str(ports[i])) for i in range(2)
    ]
    try:
        for op in ops:
            op.start()

        def one_leader() -> int | None:
            leaders = [metric(p, "toposerve_leader") for p in ports]
            if None in leaders:
                return None
            return leaders.index(1.0) if sorted(leaders) == [0.0, 1.0] else None  # type: ignore[arg-type]

        leader = wait_for(lambda: (i := one_leader()) is not None and (i,), "exactly one leader")[0]
        standby = 1 - leader
        assert apply(cluster, namespace, manifest("first")).returncode == 0
        wait_observed(cluster, namespace, "first")
        assert (metric(ports[leader], "toposerve_reconcile_total") or 0) > 0
        assert not metric(ports[standby], "toposerve_reconcile_total")
        # An idle, converged object costs no writes: resyncs (every 5 s here) reconcile it again, but
        # the status they compute equals the stored one, so nothing is patched.
        reconciles = metric(ports[leader], "toposerve_reconcile_total") or 0
        writes = metric(ports[leader], "toposerve_status_writes_total")
        wait_for(
            lambda: (metric(ports[leader], "toposerve_reconcile_total") or 0) >= reconciles + 2, "two resyncs"
        )
        assert metric(ports[leader], "toposerve_status_writes_total") == writes
        ops[leader].kill()
        assert apply(cluster, namespace, manifest("second")).returncode == 0
        # The Lease expires (15 s) and the standby takes over, resyncs and reconciles.
        wait_observed(cluster, namespace, "second", timeout=90)
        assert metric(ports[standby], "toposerve_leader") == 1.0
        assert (metric(ports[standby], "toposerve_reconcile_total") or 0) > 0
        assert (metric(ports[standby], "toposerve_children_applied_total") or 0) > 0
    finally:
        for op in ops:
            op.stop()
