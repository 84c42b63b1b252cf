"""The chart's gateway on the local cluster: one endpoint for several LLMDeployments, driven with
the openai SDK. `helm install` runs the operator and two gateway replicas as pods under their
own ServiceAccounts (the gateway's RBAC is the chart's: it reads LLMDeployments and EndpointSlices
and nothing else); deployments in gateway mode get no router of their own; a dedicated one keeps
its router and is reachable through the gateway too; a deployment deleted under load takes no
other model's request with it."""

from __future__ import annotations

import concurrent.futures as cf
import json
import urllib.request
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from tests.cluster.conftest import ROOT, Cluster, kubectl, wait_for
from tests.cluster.operator_harness import events, get_llmd, wait_condition
from tests.cluster.test_helm import helm, release, values_file
from tests.unit.chart_helpers import CHART

pytestmark = pytest.mark.cluster
__all__ = ["release"]
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))
BASE = "Qwen/Qwen2.5-0.5B-Instruct"


def deployment(name: str, served: str, mode: str, aliases: list[str] | None = None) -> dict[str, Any]:
    obj: dict[str, Any] = yaml.safe_load((ROOT / "examples/quickstart.yaml").read_text())
    obj["metadata"]["name"] = name
    obj["spec"]["replicas"] = 1
    obj["spec"]["model"]["servedName"] = served
    if aliases:
        obj["spec"]["model"]["aliases"] = aliases
    obj["spec"]["routing"] = {"mode": mode}
    return obj


def ready_ips(cluster: Cluster, namespace: str, service: str) -> list[str]:
    slices = cluster.discovery.list_namespaced_endpoint_slice(
        namespace, label_selector=f"kubernetes.io/service-name={service}"
    ).items
    return [a for s in slices for e in s.endpoints or [] if e.conditions and e.conditions.ready
            for a in e.addresses]  # fmt: skip


def health(ip: str) -> dict[str, Any]:
    with _NO_PROXY.open(f"http://{ip}:8080/health", timeout=10) as r:
        body: dict[str, Any] = json.loads(r.read())
        return body


def routers_of(cluster: Cluster, namespace: str, name: str) -> list[Any]:
    sel = f"toposerve.io/deployment={name},app.kubernetes.io/component=router"
    return list(cluster.core.list_namespaced_pod(namespace, label_selector=sel).items)


def test_one_gateway_endpoint_for_several_deployments(
    cluster: Cluster, namespace: str, release: str, tmp_path: Path
) -> None:
    values = {
        "replicaCount": 1,
        "watchNamespaces": [namespace],
        "operatorConfig": {"autoEngine": "mock"},
        "gateway": {"watchNamespace": namespace, "extraArgs": ["--expose-backend"]},
    }
    helm(cluster, "install", release, str(CHART), "-n", namespace, "-f", values_file(tmp_path, values),
         "--wait", "--timeout", "4m")  # fmt: skip
    gateway_svc = f"{release}-toposerve-gateway"
    ips = wait_for(lambda: (x := ready_ips(cluster, namespace, gateway_svc)) and len(x) == 2 and x,
                   "two ready gateway replicas")  # fmt: skip

    chat_a = deployment("chat-a", "small-a", "gateway", aliases=["a"])
    chat_b = deployment("chat-b", "small-b", "gateway")
    chat_c = deployment("chat-c", "small-c", "dedicated")
    for obj in (chat_a, chat_b, chat_c):
        kubectl(cluster, "apply", "-n", namespace, "-f", "-", stdin=yaml.safe_dump(obj))
    for name in ("chat-a", "chat-b", "chat-c"):
        wait_condition(cluster, namespace, name, "Ready", "True", timeout=240)
    assert not routers_of(cluster, namespace, "chat-a") and not routers_of(cluster, namespace, "chat-b")
    assert routers_of(cluster, namespace, "chat-c"), "a dedicated deployment keeps its router"

    want = {"small-a", "a", "small-b", "small-c"}
    for ip in ips:  # every gateway replica has the whole table and a replica behind each name
        wait_for(lambda ip=ip: (set(h := health(ip)["models"]) >= want and all(h[m] >= 1 for m in want)) or None,
                 f"gateway {ip} routes every model")  # fmt: skip

    client = openai.OpenAI(base_url=f"http://{ips[0]}:8080/v1", api_key="unused", max_retries=0)
    engines = {
        name: {a for a in ready_ips(cluster, namespace, f"{name}-engine")}
        for name in ("chat-a", "chat-b", "chat-c")
    }
    for model, name in (("small-a", "chat-a"), ("a", "chat-a"), ("small-b", "chat-b"), ("small-c", "chat-c")):
        raw = client.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
        backend = raw.headers["x-toposerve-backend"].split("//", 1)[1].rsplit(":", 1)[0]
        assert backend in engines[name], f"{model} went to {backend}, not to {name}'s engines"
        assert raw.parse().model == model
    assert {m.id for m in client.models.list().data} == want
    # status.gateway, written by the in-cluster operator from the gateway's /health
    for name, names in (("chat-a", ["small-a", "a"]), ("chat-c", ["small-c"])):
        st = wait_for(lambda name=name: (get_llmd(cluster, namespace, name).get("status") or {}).get("gateway"),
                      f"status.gateway of {name}")  # fmt: skip
        assert st == {"routed": True, "models": names, "readyReplicas": 1}, st
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="small-x", prompt="x", max_tokens=1)
    assert "does not exist" in str(e.value)

    # Deleting one deployment under load through both gateway replicas: its model becomes a 404,
    # every request for the other models succeeds.
    def one(i: int) -> tuple[str, int]:
        model = ("small-a", "small-c", "small-b")[i % 3]
        c = openai.OpenAI(base_url=f"http://{ips[i % 2]}:8080/v1", api_key="unused", max_retries=0)
        try:
            c.completions.create(model=model, prompt=f"request {i}", max_tokens=8)
            return model, 200
        except openai.APIStatusError as err:
            return model, err.status_code

    with cf.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(one, i) for i in range(120)]
        kubectl(cluster, "delete", "llmdeployment", "chat-b", "-n", namespace, "--wait=false")
        results = [f.result() for f in futures]
    assert all(code == 200 for model, code in results if model != "small-b"), results
    assert {code for model, code in results if model == "small-b"} <= {200, 404, 503}
    for ip in ips:
        wait_for(lambda ip=ip: "small-b" not in health(ip)["models"] or None, f"gateway {ip} drops small-b")
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="small-b", prompt="x", max_tokens=1)


def test_a_gateway_mode_deployment_scales_from_zero_on_what_the_gateway_holds(
    cluster: Cluster, namespace: str, release: str, tmp_path: Path
) -> None:
    """No router of its own: the gateway holds the first request, the in-cluster operator's builtin
    autoscaler reads the gateway pods' held count for this deployment and scales 0 -> 1, and the
    held request is served by the new replica."""
    values = {
        "replicaCount": 1,
        "watchNamespaces": [namespace],
        "operatorConfig": {"autoEngine": "mock"},
        "gateway": {"watchNamespace": namespace, "replicas": 1},
    }
    helm(cluster, "install", release, str(CHART), "-n", namespace, "-f", values_file(tmp_path, values),
         "--wait", "--timeout", "4m")  # fmt: skip
    (ip,) = wait_for(
        lambda: ready_ips(cluster, namespace, f"{release}-toposerve-gateway") or None, "the gateway"
    )
    obj = deployment("zero", "small-z", "gateway")
    obj["spec"]["replicas"] = 0
    obj["spec"]["autoscaling"] = {
        "enabled": True, "minReplicas": 0, "maxReplicas": 1, "syncPeriodSeconds": 2, "startupGraceSeconds": 90,
        "scaleUp": {"stabilizationWindowSeconds": 0}, "scaleDown": {"stabilizationWindowSeconds": 600},
    }  # fmt: skip
    kubectl(cluster, "apply", "-n", namespace, "-f", "-", stdin=yaml.safe_dump(obj))
    wait_condition(cluster, namespace, "zero", "Ready", "True", timeout=180)
    wait_for(lambda: health(ip)["models"].get("small-z") == 0 or None, "the gateway knows small-z, at zero")
    client = openai.OpenAI(base_url=f"http://{ip}:8080/v1", api_key="unused", max_retries=0, timeout=200)
    reply = client.chat.completions.create(
        model="small-z", messages=[{"role": "user", "content": "hi"}], max_tokens=4
    )
    assert reply.choices[0].message.content
    llmd = cluster.custom.get_namespaced_custom_object(
        "toposerve.io", "v1alpha1", namespace, "llmdeployments", "zero"
    )
    assert llmd["spec"]["replicas"] == 1
    (up,) = [e for e in events(cluster, namespace, "zero") if e["reason"] == "ScaledUp"]
    assert "spec.replicas 0 -> 1 (ScaleFromZero)" in up["message"], up["message"]
