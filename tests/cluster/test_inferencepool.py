"""The Gateway API Inference Extension's InferencePool on the real local cluster (kube-apiserver
v1.35), with GIE's real CRD (v1.6.2, the vendored copy in tests/unit/schemas):

* without the CRD, an LLMDeployment asking for a pool serves anyway and says why it has none
  (Degraded InferencePoolCRDMissing and an Event naming the install command); once the CRD is
  installed, the running operator creates the pool (API discovery, at most a minute old);
* the API server accepts the operator's pool unchanged (no field pruned), and its selector,
  evaluated by the API server, picks exactly the engine pods the engine EndpointSlices list as
  ready; disabling the pool prunes it, deleting the LLMDeployment deletes it (owner reference);
* pools rendered for every example, modes dedicated and gateway, are accepted by the API server
  (server-side dry run); an invalid one and a spec asking for a pool with mode none are refused.

The CRD is removed again afterwards when this test installed it.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster.conftest import ROOT, Cluster, kubectl, wait_for
from tests.cluster.operator_harness import (
    Operator,
    apply,
    condition,
    events,
    install_crd,
    running_operator,
    wait_condition,
)
from toposerve.api.config import OperatorConfig
from toposerve.api.spec import LLMDeploymentSpec
from toposerve.render.inferencepool import CRD_NAME, CRD_URL, render_inference_pool
from toposerve.render.objects import Owner

pytestmark = pytest.mark.cluster

GIE_CRD = ROOT / "tests/unit/schemas/gie-v1.6.2-inferencepools.yaml"
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
QWEN = "Qwen/Qwen2.5-0.5B-Instruct"


def served(cluster: Cluster) -> bool:
    res = kubectl(cluster, "get", "--raw", "/apis/inference.networking.k8s.io/v1", check=False)
    return res.returncode == 0 and any(
        r["name"] == "inferencepools" for r in json.loads(res.stdout)["resources"]
    )


def install_gie(cluster: Cluster) -> None:
    kubectl(cluster, "apply", "--server-side", "-f", str(GIE_CRD))
    kubectl(cluster, "wait", "--for=condition=Established", f"crd/{CRD_NAME}", "--timeout=60s")


@pytest.fixture
def gie_crd(cluster: Cluster) -> Iterator[bool]:
    """Yields whether the CRD was absent before (and removes it afterwards if so)."""
    absent = not served(cluster)
    yield absent
    if absent:
        kubectl(cluster, "delete", "crd", CRD_NAME, "--wait=false", check=False)


@pytest.fixture
def scoped_operator(
    cluster: Cluster, namespace: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Operator]:
    """The operator watching only this test's namespace, resyncing every 5 s."""
    monkeypatch.setenv("PYTHONUNBUFFERED", "1")
    with running_operator(
        cluster,
        tmp_path,
        {"autoEngine": "mock", "gpuNodeProvisioning": "on-demand"},
        "-n",
        namespace,
        "--resync",
        "5",
    ) as op:
        yield op


def manifest(name: str, pool: bool = True) -> dict[str, Any]:
    return {
        "apiVersion": "toposerve.io/v1alpha1",
        "kind": "LLMDeployment",
        "metadata": {"name": name},
        "spec": {"model": {"name": QWEN, "maxContextLength": 4096}, "engine": "mock", "replicas": 2,
                 "routing": {"mode": "dedicated", "replicas": 1,
                             "inferencePool": {"enabled": pool, "failureMode": "FailOpen"}}},
    }  # fmt: skip


def get_pool(cluster: Cluster, namespace: str, name: str) -> dict[str, Any] | None:
    res = kubectl(cluster, "get", "inferencepools.inference.networking.k8s.io", name, "-n", namespace,
                  "-o", "json", check=False)  # fmt: skip
    return json.loads(res.stdout) if res.returncode == 0 else None


def pod_ips(cluster: Cluster, namespace: str, selector: dict[str, str]) -> set[str]:
    """Ready pods' IPs, the API server evaluating the selector."""
    query = ",".join(f"{k}={v}" for k, v in selector.items())
    items = json.loads(kubectl(cluster, "get", "pods", "-n", namespace, "-l", query, "-o", "json").stdout)[
        "items"
    ]
    return {
        p["status"]["podIP"]
        for p in items
        if not p["metadata"].get("deletionTimestamp")
        and any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions") or [])
    }


def slice_ips(cluster: Cluster, namespace: str, service: str) -> set[str]:
    slices = cluster.discovery.list_namespaced_endpoint_slice(
        namespace, label_selector=f"kubernetes.io/service-name={service}"
    ).items
    return {
        a
        for s in slices
        for e in s.endpoints or []
        if e.conditions and e.conditions.ready
        for a in e.addresses
    }


def test_the_operator_creates_a_pool_the_api_server_accepts_selecting_the_ready_engines(
    cluster: Cluster, namespace: str, gie_crd: bool, scoped_operator: Operator
) -> None:
    name = "pooled"
    obj = manifest(name)
    assert apply(cluster, namespace, obj).returncode == 0
    if gie_crd:
        # No CRD: everything else is applied and serves; the deployment says why there is no pool.
        wait_condition(cluster, namespace, name, "Ready", "True", timeout=240)
        llmd = wait_condition(cluster, namespace, name, "Degraded", "True", timeout=60)
        degraded = condition(llmd, "Degraded")
        assert degraded is not None and degraded["reason"] == "InferencePoolCRDMissing"
        assert CRD_URL in degraded["message"]
        said = [e for e in events(cluster, namespace, name) if e["reason"] == "InferencePoolCRDMissing"]
        assert said and said[0]["type"] == "Warning" and CRD_URL in said[0]["message"]
        assert condition(llmd, "Progressing")["reason"] != "ApplyFailed"  # type: ignore[index]
        install_gie(cluster)
    else:
        print("the InferencePool CRD was already installed: the without-CRD half is skipped")
    # The running operator finds the kind by API discovery (at most a minute old) and its resync.
    pool = wait_for(lambda: get_pool(cluster, namespace, name), "the InferencePool", timeout=180)
    llmd = wait_condition(cluster, namespace, name, "Ready", "True", timeout=240)
    # Accepted as rendered: the API server pruned and defaulted nothing of ours.
    spec = LLMDeploymentSpec.model_validate(obj["spec"])
    owner = Owner(name=name, uid=llmd["metadata"]["uid"])
    (expected,), _ = render_inference_pool(name, namespace, spec, OperatorConfig(), owner)
    assert pool["spec"] == expected["spec"]
    (ref,) = pool["metadata"]["ownerReferences"]
    assert (ref["kind"], ref["name"], ref["controller"]) == ("LLMDeployment", name, True)
    # The picker it names is the router Service, with the grpc-epp port it names.
    svc = json.loads(kubectl(cluster, "get", "service", name, "-n", namespace, "-o", "json").stdout)
    svc_ports = {p["name"]: p["port"] for p in svc["spec"]["ports"]}
    assert svc_ports["grpc-epp"] == pool["spec"]["endpointPickerRef"]["port"]["number"]

    # Members: exactly the engine pods the engine EndpointSlices list as ready (asked until two
    # reads agree: a pod may turn ready between them).
    def agree() -> set[str] | None:
        members = pod_ips(cluster, namespace, pool["spec"]["selector"]["matchLabels"])
        return (
            members
            if len(members) == 2 and members == slice_ips(cluster, namespace, f"{name}-engine")
            else None
        )

    members = wait_for(agree, "the pool's members = the engine EndpointSlices' ready endpoints", timeout=120)
    # and none of the router's
    assert not members & pod_ips(cluster, namespace, {"toposerve.io/deployment": name,
                                                      "app.kubernetes.io/component": "router"})  # fmt: skip

    # Disabled: pruned. Enabled again, then the LLMDeployment deleted: the pool goes with it.
    assert apply(cluster, namespace, manifest(name, pool=False)).returncode == 0
    wait_for(lambda: get_pool(cluster, namespace, name) is None, "the InferencePool pruned", timeout=120)
    assert apply(cluster, namespace, manifest(name)).returncode == 0
    wait_for(lambda: get_pool(cluster, namespace, name), "the InferencePool again", timeout=120)
    kubectl(cluster, "delete", "llmdeployment", name, "-n", namespace, "--wait=false")
    wait_for(
        lambda: get_pool(cluster, namespace, name) is None, "the InferencePool garbage-collected", timeout=120
    )


def test_pools_for_every_example_are_accepted_by_the_api_server(
    cluster: Cluster, namespace: str, gie_crd: bool
) -> None:
    install_crd(cluster)
    if gie_crd:
        install_gie(cluster)
    config = OperatorConfig(gateway_namespace=namespace)
    owner = Owner(name="x", uid="00000000-0000-0000-0000-000000000000")
    pools = []
    for path in EXAMPLES:
        (doc,) = [d for d in yaml.safe_load_all(path.read_text()) if d and d.get("kind") == "LLMDeployment"]
        for mode in ("dedicated", "gateway"):
            raw = copy.deepcopy(doc["spec"])
            raw.setdefault("routing", {}).update(mode=mode, inferencePool={"enabled": True})
            spec = LLMDeploymentSpec.model_validate(raw)
            (pool,), notices = render_inference_pool(doc["metadata"]["name"], namespace, spec, config, owner)
            assert notices == []
            pool["metadata"].pop("ownerReferences")  # the owner does not exist; the pool is what is judged
            pool["metadata"]["name"] = f"{doc['metadata']['name']}-{mode}"
            pools.append(pool)
    out = kubectl(cluster, "apply", "--dry-run=server", "-n", namespace, "-o", "json", "-f", "-",
                  stdin=yaml.safe_dump_all(pools))  # fmt: skip
    got = json.loads(out.stdout)
    items = got["items"] if got.get("kind") == "List" else [got]
    assert len(items) == len(pools) == 2 * len(EXAMPLES)
    for sent, back in zip(pools, items, strict=True):
        assert back["spec"] == sent["spec"], back["metadata"]["name"]  # nothing pruned or defaulted
    # The judge can refuse: GIE's CEL rule on duplicate target ports, and our own CRD's rule on a
    # pool without a picker (mode none), naming the field.
    bad = copy.deepcopy(pools[0])
    bad["spec"]["targetPorts"] = [{"number": 8000}, {"number": 8000}]
    res = kubectl(cluster, "apply", "--dry-run=server", "-n", namespace, "-f", "-", stdin=yaml.safe_dump(bad),
                  check=False)  # fmt: skip
    assert res.returncode != 0 and "port number must be unique" in res.stderr, res.stderr
    none = manifest("no-picker")
    none["spec"]["routing"] = {"mode": "none", "inferencePool": {"enabled": True}}
    res = kubectl(cluster, "apply", "--dry-run=server", "-n", namespace, "-f", "-", stdin=yaml.safe_dump(none),
                  check=False)  # fmt: skip
    assert res.returncode != 0 and "spec.routing.inferencePool.enabled" in res.stderr, res.stderr
    assert "needs an endpoint picker" in res.stderr
