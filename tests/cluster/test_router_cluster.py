"""The router the operator deploys, on the real cluster: two pools of mock engines (H100 and
A100-40GB) serve through it, scaling adds endpoints without a restart, and deleting an engine pod
under traffic loses no request that had not started streaming."""

from __future__ import annotations

import concurrent.futures as cf
import json
import subprocess
import sys
import urllib.request
from typing import Any

import pytest
import yaml

from tests.cluster.conftest import ROOT, Cluster, kubectl, wait_for
from tests.cluster.operator_harness import Operator, apply, operator, wait_condition

pytestmark = pytest.mark.cluster
__all__ = ["operator"]
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def ready_ips(cluster: Cluster, namespace: str, service: str) -> list[str]:
    slices = cluster.discovery.list_namespaced_endpoint_slice(
        namespace, label_selector=f"kubernetes.io/service-name={service}"
    ).items
    return [
        a
        for s in slices
        for e in s.endpoints or []
        if e.conditions and e.conditions.ready
        for a in e.addresses
    ]


def chat(url: str, i: int, max_tokens: int = 4) -> tuple[int, str]:
    body = json.dumps({"model": "meta-llama/Llama-3.1-70B-Instruct", "max_tokens": max_tokens,
                       "messages": [{"role": "user", "content": f"request {i}"}]}).encode()  # fmt: skip
    req = urllib.request.Request(
        f"{url}/v1/chat/completions", data=body, headers={"content-type": "application/json"}
    )
    with _NO_PROXY.open(req, timeout=60) as r:
        r.read()
        return int(r.status), ""


def served(ip: str) -> float:
    """Requests an engine has finished, from its own vllm:request_success_total counters (the
    router does not reveal backend addresses to clients unless told to)."""
    with _NO_PROXY.open(f"http://{ip}:8000/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("vllm:request_success_total")
    )


def backends_used(url: str, n: int, engines: set[str]) -> set[str]:
    before = {ip: served(ip) for ip in engines}
    with cf.ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda i: chat(url, i, 48), range(n)))
    return {ip for ip in engines if served(ip) > before[ip]}


def test_two_pools_serve_through_the_router(cluster: Cluster, namespace: str, operator: Operator) -> None:
    openai = pytest.importorskip("openai")
    manifest: dict[str, Any] = yaml.safe_load((ROOT / "examples" / "heterogeneous.yaml").read_text())
    manifest["spec"]["engine"] = "mock"
    manifest["spec"]["replicas"] = 2
    name = manifest["metadata"]["name"]
    assert apply(cluster, namespace, manifest).returncode == 0
    obj = wait_condition(cluster, namespace, name, "Ready", "True", timeout=180)
    assert obj["status"]["endpoint"] == f"http://{name}.{namespace}.svc:8000/v1"
    router_ip = wait_for(lambda: (ips := ready_ips(cluster, namespace, name)) and ips[0], "a ready router")
    url = f"http://{router_ip}:8080"
    # The router listens on every interface of its pod, so `kubectl port-forward` (which connects to
    # the pod's loopback) works: ask from inside the pod's own network namespace.
    inside = subprocess.run(
        ["ip", "netns", "exec", "tsp-" + router_ip.replace(".", "-"), sys.executable, "-c",
         "import urllib.request as u; print(u.urlopen('http://127.0.0.1:8080/health', timeout=5).status)"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert inside.stdout.strip() == "200", inside.stderr
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)
    stream = client.chat.completions.create(
        model=obj["spec"]["model"]["name"],
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=6,
        stream=True,
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text
    # Both pools take traffic (the router tags them by pool and GPU type from the EndpointSlices).
    # Ready and a first answer can come before the second pool's engine is in the EndpointSlice
    # (seen in a fresh-clone make test on the 2-core machine): wait for both rather than assert.
    engines = set(
        wait_for(
            lambda: (ips := ready_ips(cluster, namespace, f"{name}-engine")) and len(ips) == 2 and ips,
            "2 ready engine endpoints (one per pool)",
        )
    )
    # Under concurrent load both pools take traffic; sequential requests would all go to the faster
    # H100 replica (GPU-weighted, it is idle each time), which is the point of weighting.
    wait_for(
        lambda: backends_used(url, 48, engines) == engines,
        "the router to use both pools' engines",
        timeout=60,
        every=1,
    )
    # Scale up: new endpoints join the router without a restart.
    router_pod = cluster.core.list_namespaced_pod(
        namespace, label_selector="app.kubernetes.io/component=router"
    ).items[0]
    kubectl(cluster, "scale", f"llmd/{name}", "-n", namespace, "--replicas=4")
    wait_condition(cluster, namespace, name, "Ready", "True", timeout=180)
    engines = set(
        wait_for(
            lambda: (ips := ready_ips(cluster, namespace, f"{name}-engine")) and len(ips) == 4 and ips,
            "4 ready engine endpoints",
        )
    )

    def all_used() -> bool:
        return backends_used(url, 64, engines) == engines

    wait_for(all_used, "the router to use all 4 engines", timeout=60, every=1)
    same = cluster.core.list_namespaced_pod(
        namespace, label_selector="app.kubernetes.io/component=router"
    ).items[0]
    assert same.metadata.uid == router_pod.metadata.uid  # the same router pod: no restart was needed
    # Delete an engine pod under traffic: non-streaming requests are retried on another backend.
    victim = cluster.core.list_namespaced_pod(
        namespace, label_selector="app.kubernetes.io/component=engine"
    ).items[0]
    with cf.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(chat, url, i) for i in range(60)]
        cluster.core.delete_namespaced_pod(victim.metadata.name, namespace)
        results = [f.result() for f in futures]
    assert all(code == 200 for code, _ in results), results


def metric_sum(url: str, name: str) -> float:
    with _NO_PROXY.open(f"{url}/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") or line.startswith(name + " ")
    )


def test_kv_events_reach_every_router_over_the_pod_network(
    cluster: Cluster, namespace: str, operator: Operator
) -> None:
    """routing.kvEvents as rendered: the engines publish vLLM-format KV events on their pod's port
    5557 (replay 5558), every router replica subscribes to every engine and indexes what they
    cache; a shared prefix then goes to the engine that holds it."""
    name = "kvevents"
    manifest: dict[str, Any] = {
        "apiVersion": "toposerve.io/v1alpha1",
        "kind": "LLMDeployment",
        "metadata": {"name": name},
        "spec": {
            "model": {"name": "Qwen/Qwen2.5-0.5B-Instruct", "maxContextLength": 4096},
            "engine": "mock",
            "replicas": 2,
            "placement": {"gpuTypes": ["L4"]},
            "routing": {"kvEvents": True, "strategy": "prefix-aware", "replicas": 2},
        },
    }
    assert apply(cluster, namespace, manifest).returncode == 0
    wait_condition(cluster, namespace, name, "Ready", "True", timeout=180)
    engines = set(
        wait_for(
            lambda: (ips := ready_ips(cluster, namespace, f"{name}-engine")) and len(ips) == 2 and ips,
            "2 ready engines",
        )
    )
    routers = wait_for(
        lambda: (ips := ready_ips(cluster, namespace, name)) and len(ips) == 2 and ips, "2 ready routers"
    )
    system = "You are the assistant of a long-running conversation about KV caches. " * 12

    def ask(url: str, i: int) -> None:
        body = json.dumps({"model": "Qwen/Qwen2.5-0.5B-Instruct", "max_tokens": 4,
                           "messages": [{"role": "system", "content": system},
                                        {"role": "user", "content": f"question {i}"}]}).encode()  # fmt: skip
        req = urllib.request.Request(
            f"{url}/v1/chat/completions", data=body, headers={"content-type": "application/json"}
        )
        with _NO_PROXY.open(req, timeout=60) as r:
            assert r.status == 200

    first = {ip: served(ip) for ip in engines}
    ask(f"http://{routers[0]}:8080", 0)  # one engine now caches the system prompt
    (holder,) = [ip for ip in engines if served(ip) > first[ip]]
    # Both routers learn it from the engines' events (not from having routed it themselves), and
    # no engine's index is stale.
    for ip in routers:
        url = f"http://{ip}:8080"
        wait_for(lambda url=url: metric_sum(url, "toposerve_router_kv_index_blocks") > 0,
                 f"router {ip} indexed the engines' blocks", timeout=60)  # fmt: skip
        wait_for(lambda url=url: metric_sum(url, "toposerve_router_kv_index_stale") == 0,
                 f"router {ip} has no stale engine", timeout=60)  # fmt: skip
    # The other router sends the same prefix to the engine that holds it.
    before = {ip: served(ip) for ip in engines}
    for i in range(1, 7):
        ask(f"http://{routers[1]}:8080", i)
    took = {ip for ip in engines if served(ip) > before[ip]}
    # All to the holder, from the first one on: router 1 never routed this prefix itself, so only
    # the engines' events can have told it (its own approximate index had nothing on it).
    assert took == {holder}, (holder, before, {ip: served(ip) for ip in engines})
    assert metric_sum(f"http://{routers[1]}:8080", "toposerve_router_kv_index_fallbacks_total") == 0
