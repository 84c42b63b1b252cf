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
