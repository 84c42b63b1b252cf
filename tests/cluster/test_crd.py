"""The LLMDeployment CRD from crds/ is served by the real API server, which enforces its OpenAPI
schema and CEL rules (the operator never sees an invalid spec)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster.conftest import ROOT, Cluster, kubectl, wait_for

pytestmark = pytest.mark.cluster

CRD_FILE = ROOT / "crds" / "toposerve.io_llmdeployments.yaml"
GROUP, VERSION, PLURAL = "toposerve.io", "v1alpha1", "llmdeployments"


def llmd(name: str, **spec: Any) -> dict[str, Any]:
    body = {"model": {"name": "Qwen/Qwen2.5-0.5B-Instruct"}, "replicas": 1} | spec
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "LLMDeployment",
        "metadata": {"name": name},
        "spec": body,
    }


@pytest.fixture(scope="module")
def crd(cluster: Cluster) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(Path(CRD_FILE).read_text())
    kubectl(cluster, "apply", "--server-side", "--force-conflicts", "-f", str(CRD_FILE))

    def established() -> bool:
        c = cluster.extensions.read_custom_resource_definition(doc["metadata"]["name"])
        return any(x.type == "Established" and x.status == "True" for x in c.status.conditions or [])

    wait_for(established, "the LLMDeployment CRD to be Established")
    return doc


def create(cluster: Cluster, namespace: str, body: dict[str, Any]) -> Any:
    return cluster.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)


def rejection(cluster: Cluster, namespace: str, body: dict[str, Any]) -> str:
    """The API server's 422 for ``body``, as "field: message" lines of its causes."""
    from kubernetes.client.exceptions import ApiException

    with pytest.raises(ApiException) as e:
        create(cluster, namespace, body)
    assert e.value.status == 422, e.value.body
    status = json.loads(e.value.body)
    causes = status.get("details", {}).get("causes", [])
    return "\n".join(f"{c.get('field')}: {c.get('message')}" for c in causes) or status["message"]


def test_valid_llmdeployment_is_accepted_with_defaults(cluster: Cluster, crd: Any, namespace: str) -> None:
    obj = create(cluster, namespace, llmd("ok"))
    assert obj["spec"]["model"]["dtype"] == "bf16"  # schema default applied by the server


def test_cel_rule_rejects_min_replicas_above_max(cluster: Cluster, crd: Any, namespace: str) -> None:
    body = llmd("bad-autoscaling", autoscaling={"enabled": True, "minReplicas": 5, "maxReplicas": 2})
    assert "spec.autoscaling.minReplicas: Invalid value: minReplicas must be <= maxReplicas" in rejection(
        cluster, namespace, body
    )


def test_schema_rejects_unknown_dtype(cluster: Cluster, crd: Any, namespace: str) -> None:
    body = llmd("bad-dtype", model={"name": "Qwen/Qwen2.5-0.5B-Instruct", "dtype": "fp64"})
    message = rejection(cluster, namespace, body)
    assert 'spec.model.dtype: Unsupported value: "fp64"' in message


def test_cel_rule_refuses_burst_headroom_outside_builtin_mode(
    cluster: Cluster, crd: Any, namespace: str
) -> None:
    for mode in ("hpa", "keda"):
        body = llmd(f"headroom-{mode}", autoscaling={"enabled": True, "mode": mode, "burstHeadroom": 1})
        assert "spec.autoscaling.burstHeadroom: Invalid value: burstHeadroom needs mode builtin" in rejection(
            cluster, namespace, body
        )
    ok = create(cluster, namespace, llmd("headroom", autoscaling={"enabled": True, "burstHeadroom": 1.5}))
    assert ok["spec"]["autoscaling"]["burstHeadroom"] == 1.5
    zero = llmd("headroom-hpa-zero", autoscaling={"enabled": True, "mode": "hpa", "burstHeadroom": 0})
    assert create(cluster, namespace, zero)["spec"]["autoscaling"]["burstHeadroom"] == 0
