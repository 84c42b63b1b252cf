"""GitOps without Argo CD's binaries: apply LLMDeployments the way Argo CD does with
ServerSideApply=true (server-side apply, field manager `argocd-controller`), let the operator
reconcile, scale through the scale subresource and fall back to another GPU type; then
`kubectl diff --server-side` with the same manager shows no drift (or only /spec/replicas, the
one field docs/gitops.md says to ignore under an autoscaler), managedFields show no other writer
of spec fields, and the Argo CD health check reads the live status as it should."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest
import yaml

from tests.cluster.conftest import ROOT, Cluster, kubectl, wait_for
from tests.cluster.operator_harness import Operator, get_llmd, operator, wait_condition
from tests.cluster.test_operator import delete_and_wait_gone, filler
from tests.unit.test_argocd_health import run_health

pytestmark = pytest.mark.cluster
__all__ = ["operator"]  # the fixture, imported
ARGOCD = "argocd-controller"


# Argo CD's ServerSideApply=true applies with --force-conflicts: Git wins over other managers.
def ssa(cluster: Cluster, namespace: str, manifest: dict[str, Any]) -> None:
    kubectl(cluster, "apply", "--server-side", "--force-conflicts", f"--field-manager={ARGOCD}", "-n", namespace, "-f", "-",
            stdin=yaml.safe_dump(manifest))  # fmt: skip


def diff(cluster: Cluster, namespace: str, manifest: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    out = kubectl(cluster, "diff", "--server-side", "--force-conflicts", f"--field-manager={ARGOCD}", "-n", namespace, "-f", "-",
                  stdin=yaml.safe_dump(manifest), check=False)  # fmt: skip
    assert out.returncode in (0, 1), out.stderr  # 1: differences found; anything else is an error
    return out


def changed_lines(out: subprocess.CompletedProcess[str]) -> list[str]:
    return [
        line
        for line in out.stdout.splitlines()
        if line[:1] in "+-" and not line.startswith(("+++", "---")) and "generation:" not in line
    ]


def spec_writers(obj: dict[str, Any]) -> dict[tuple[str, str], set[str]]:
    """(manager, subresource) -> the top-level spec fields it owns."""
    out: dict[tuple[str, str], set[str]] = {}
    for mf in obj["metadata"].get("managedFields") or []:
        spec = (mf.get("fieldsV1") or {}).get("f:spec")
        if spec:
            out[(mf["manager"], mf.get("subresource", ""))] = {k for k in spec if k.startswith("f:")}
    return out


def quickstart() -> dict[str, Any]:
    m: dict[str, Any] = yaml.safe_load((ROOT / "examples/quickstart.yaml").read_text())
    m["spec"]["engine"] = "mock"
    del m["spec"]["replicas"]  # left to the autoscaler: nothing to ignore at all
    return m


def llama(replicas: int) -> dict[str, Any]:
    m: dict[str, Any] = yaml.safe_load((ROOT / "examples/llama-70b-h100.yaml").read_text())
    m["spec"]["model"]["maxContextLength"] = 8192
    m["spec"]["replicas"] = replicas
    return m


def test_argocd_style_apply_shows_no_drift(cluster: Cluster, namespace: str, operator: Operator) -> None:
    # Fill the on-demand H100 nodes, so the 70B falls back to A100-80GB.
    nodes = json.loads(kubectl(cluster, "get", "nodes", "-l",
                               "nvidia.com/gpu.product=NVIDIA-H100-80GB-HBM3,toposerve.io/capacity-type!=spot",
                               "-o", "json").stdout)["items"]  # fmt: skip
    kubectl(cluster, "apply", "-f", "-", stdin=yaml.safe_dump(filler(namespace, len(nodes))))
    wait_for(lambda: len([p for p in cluster.core.list_namespaced_pod(namespace, label_selector="app=filler").items
                          if p.spec.node_name]) == len(nodes), "filler pods on every on-demand H100 node")  # fmt: skip

    qs, big = quickstart(), llama(2)
    ssa(cluster, namespace, qs)
    ssa(cluster, namespace, big)
    wait_condition(cluster, namespace, "quickstart", "Ready", "True", timeout=180)
    # The autoscaler's move: the scale subresource (as toposerve's autoscaler, an HPA or KEDA do).
    kubectl(cluster, "scale", "llmdeployment", "quickstart", "-n", namespace, "--replicas=3")
    kubectl(cluster, "scale", "llmdeployment", "llama-70b", "-n", namespace, "--replicas=3")

    def fell_back() -> dict[str, Any] | None:
        obj = get_llmd(cluster, namespace, "llama-70b")
        pools = (obj.get("status") or {}).get("pools") or [{}]
        placed = {p["gpuType"]: p["replicas"] for p in pools[0].get("placements", [])}
        ok = (
            placed.get("A100-80GB") == 3
            and obj["status"].get("observedGeneration") == obj["metadata"]["generation"]
        )
        return obj if ok else None

    big_live = wait_for(fell_back, "the 70B's three replicas on A100-80GB (fallback)", timeout=240)
    qs_live = wait_condition(cluster, namespace, "quickstart", "Ready", "True", timeout=180)
    assert qs_live["status"]["replicas"] == 3

    # No drift where Git leaves replicas out; only /spec/replicas where Git sets it.
    assert diff(cluster, namespace, qs).returncode == 0, diff(cluster, namespace, qs).stdout
    lines = changed_lines(diff(cluster, namespace, big))
    assert sorted(lines) == ["+  replicas: 2", "-  replicas: 3"], lines

    # Writers of spec: Argo CD (its fields), the scale subresource (replicas only); never the operator.
    for live in (get_llmd(cluster, namespace, "quickstart"), get_llmd(cluster, namespace, "llama-70b")):
        writers = spec_writers(live)
        assert (ARGOCD, "") in writers, writers
        for (manager, sub), fields in writers.items():
            assert manager == ARGOCD or (sub == "scale" and fields == {"f:replicas"}), (manager, sub, fields)
        operator_entries = [mf for mf in live["metadata"]["managedFields"] if mf["manager"] == "toposerve"]
        assert operator_entries and all(mf.get("subresource") == "status" for mf in operator_entries)
        assert not [k for k in live["metadata"].get("annotations") or {} if "kopf" in k]
        assert not live["metadata"].get("finalizers")

    # Argo CD's view of the live objects (deploy/argocd/.../health.lua).
    assert run_health(get_llmd(cluster, namespace, "quickstart"))["status"] == "Healthy"
    health = run_health(big_live)
    assert health["status"] == "Degraded" and "FallbackActive" in health["message"], health

    # Leave the GPUs free for the next test (deleting the namespace alone does not wait).
    for name in ("llama-70b", "quickstart"):
        delete_and_wait_gone(cluster, namespace, name)
    kubectl(cluster, "delete", "deployment", "h100-filler", "-n", namespace, "--wait=true")
    wait_for(lambda: not cluster.core.list_namespaced_pod(namespace).items, "every pod of the test gone",
             timeout=120)  # fmt: skip
