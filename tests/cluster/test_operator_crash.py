"""Kill the operator at random points while 50 LLMDeployments are created and edited: after a
restart every one converges, with no duplicate or orphaned children and no spec writes."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster.conftest import Cluster, kubectl, wait_for
from tests.cluster.operator_harness import Operator, install_crd
from toposerve.render.objects import workload_name

pytestmark = pytest.mark.cluster
N = 50
TYPES = ["H100", "A100-80GB", "L4", "B200"]


def manifest(i: int, gpus: list[str]) -> dict[str, Any]:
    # replicas 0: the workloads exist (scaled to zero) without occupying the simulated GPUs
    return {
        "apiVersion": "toposerve.io/v1alpha1",
        "kind": "LLMDeployment",
        "metadata": {"name": f"m{i:02d}"},
        "spec": {"model": {"name": "Qwen/Qwen2.5-7B-Instruct", "maxContextLength": 8192},
                 "engine": "vllm", "replicas": 0, "placement": {"gpuTypes": gpus},
                 "routing": {"enabled": False}},
    }  # fmt: skip


def apply_all(cluster: Cluster, namespace: str, docs: list[dict[str, Any]]) -> None:
    kubectl(cluster, "apply", "-n", namespace, "-f", "-", stdin=yaml.safe_dump_all(docs))


def test_operator_killed_mid_reconcile_converges(cluster: Cluster, namespace: str, tmp_path: Path) -> None:
    install_crd(cluster)
    rng = random.Random(7)
    op = Operator(cluster, tmp_path / "operator.log", "--resync", "3", "--workers", "4")
    wanted = {i: [TYPES[i % len(TYPES)]] for i in range(N)}
    try:
        op.start()
        apply_all(cluster, namespace, [manifest(i, g) for i, g in wanted.items()])
        for _round in range(4):
            time.sleep(rng.uniform(0.5, 3.0))
            op.kill()
            # Edits land while the operator is down or restarting: GPU order changes rename workloads.
            for i in rng.sample(range(N), 12):
                wanted[i] = [rng.choice(TYPES)]
            apply_all(cluster, namespace, [manifest(i, g) for i, g in wanted.items()])
            op.start()
        final = {i: workload_name(f"m{i:02d}", "default", g[0]) for i, g in wanted.items()}

        def converged() -> bool:
            deps = json.loads(kubectl(cluster, "get", "deployments", "-n", namespace, "-o", "json").stdout)[
                "items"
            ]
            names = sorted(d["metadata"]["name"] for d in deps)
            llmds = json.loads(kubectl(cluster, "get", "llmd", "-n", namespace, "-o", "json").stdout)["items"]
            observed = all(
                (o.get("status") or {}).get("observedGeneration") == o["metadata"]["generation"]
                for o in llmds
            )
            return observed and names == sorted(final.values())

        wait_for(
            converged,
            "every LLMDeployment to converge with exactly its planned workload",
            timeout=300,
            every=2,
        )
    finally:
        op.stop()
        print(op.tail())
    # Exactly one Service and one PDB per deployment, each owned by its LLMDeployment.
    out = kubectl(cluster, "get", "llmd", "-n", namespace, "-o", "json", "--show-managed-fields").stdout
    llmds = {o["metadata"]["name"]: o for o in json.loads(out)["items"]}
    for kind in ("services", "poddisruptionbudgets", "deployments"):
        items = json.loads(kubectl(cluster, "get", kind, "-n", namespace, "-o", "json").stdout)["items"]
        owners = [i["metadata"]["ownerReferences"][0] for i in items]
        # Services: <name>-engine + the workload's; PDBs: the workload's + <name>-evacuating (the
        # budget that covers pods the operator is moving, render/disruption.py)
        per_owner = 1 if kind == "deployments" else 2
        assert sorted(o["name"] for o in owners) == sorted(list(llmds) * per_owner), kind
        assert all(o["uid"] == llmds[o["name"]]["metadata"]["uid"] for o in owners), kind
    # The operator never wrote any LLMDeployment's spec (GitOps sees no drift): its field manager
    # only ever touched the status subresource.
    for obj in llmds.values():
        managers = obj["metadata"].get("managedFields") or []
        spec_writers = {m["manager"] for m in managers if "f:spec" in json.dumps(m.get("fieldsV1", {}))}
        assert spec_writers <= {"kubectl-client-side-apply", "kubectl", "kubectl-scale"}, spec_writers
        ours = [m for m in managers if m["manager"] == "toposerve"]
        assert ours and all(m.get("subresource") == "status" for m in ours), ours
