"""Parts of `make demo` that are easier in Python: chat through the gateway, show placement.

Usage: demo_report.py KUBECTL NAMESPACE chat GATEWAY_NS/SERVICE NAME...   |   demo_report.py KUBECTL NAMESPACE placement
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request

NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def kc(kubectl: str, *args: str) -> dict:  # type: ignore[type-arg]
    return dict(json.loads(subprocess.check_output([kubectl, *args, "-o", "json"])))


def _ready_ips(kubectl: str, ns: str, service: str) -> list[str]:
    slices = kc(kubectl, "get", "endpointslices", "-n", ns, "-l", f"kubernetes.io/service-name={service}")
    return [
        a
        for s in slices["items"]
        for e in s.get("endpoints") or []
        if (e.get("conditions") or {}).get("ready")
        for a in e["addresses"]
    ]


def chat(kubectl: str, ns: str, gateway: str, names: list[str]) -> None:
    """Chat completions through the gateway (one endpoint, `model` picks the deployment): which
    replica each request reached and why (the gateway runs with --expose-backend for the demo)."""
    gw_ns, gw_svc = gateway.split("/", 1)
    (ip, *_) = _ready_ips(kubectl, gw_ns, gw_svc) or ["-"]
    base = f"http://{ip}:8080"
    with NO_PROXY.open(base + "/v1/models", timeout=30) as r:
        models = [m["id"] for m in json.loads(r.read())["data"]]
    print(f"gateway {gateway} ({ip}:8080) serves: {', '.join(models)}")
    pods = {
        (p.get("status") or {}).get("podIP"): p["metadata"]["name"]
        for p in kc(kubectl, "get", "pods", "-n", ns, "-l", "app.kubernetes.io/component=engine")["items"]
    }
    system = "You are the demo assistant of toposerve. " * 8  # a shared prefix: prefix affinity shows
    for name in names:
        spec = kc(kubectl, "get", "llmd", name, "-n", ns)["spec"]
        model = spec["model"].get("servedName") or spec["model"]["name"]
        for i in range(4):
            body = {
                "model": model,
                "messages": [
                    {"role": "system", "content": system},
                    {"role": "user", "content": f"Say hello {i}"},
                ],
                "max_tokens": 12,
            }
            req = urllib.request.Request(
                base + "/v1/chat/completions",
                data=json.dumps(body).encode(),
                headers={"content-type": "application/json"},
            )
            with NO_PROXY.open(req, timeout=60) as r:
                reply = json.loads(r.read())
                backend = r.headers.get("x-toposerve-backend", "")
                reason = r.headers.get("x-toposerve-route-reason", "")
            host = backend.split("//", 1)[-1].rsplit(":", 1)[0]
            text = reply["choices"][0]["message"]["content"][:32]
            usage = reply["usage"]
            print(
                f"{name:16} -> {pods.get(host, host)[:40]:40} {reason:14} {text!r} "
                f"({usage['prompt_tokens']}+{usage['completion_tokens']} tokens)"
            )


def placement(kubectl: str, ns: str) -> None:
    nodes = {n["metadata"]["name"]: n["metadata"]["labels"] for n in kc(kubectl, "get", "nodes")["items"]}
    pods = kc(kubectl, "get", "pods", "-n", ns, "-l", "app.kubernetes.io/component=engine")["items"]
    print(f"{'POD':40} {'POOL':8} {'PLANNED':10} {'NODE':12} {'NODE GPU':24} {'ZONE':7} ENGINE")
    for p in sorted(pods, key=lambda p: p["metadata"]["name"]):
        labels = p["metadata"]["labels"]
        node = p["spec"].get("nodeName", "-")
        nl = nodes.get(node, {})
        print(
            f"{p['metadata']['name'][:40]:40} {labels['toposerve.io/pool']:8} {labels['toposerve.io/gpu-type']:10} "
            f"{node:12} {nl.get('nvidia.com/gpu.product', '-'):24} {nl.get('topology.kubernetes.io/zone', '-'):7} "
            f"{labels['toposerve.io/engine']}"
        )
    print()
    for d in kc(kubectl, "get", "llmd", "-n", ns)["items"]:
        st = d.get("status") or {}
        pools = ", ".join(
            f"{p['name']}={p.get('gpuType')} TP{p.get('tensorParallel')}/PP{p.get('pipelineParallel')}"
            for p in st.get("pools") or []
        )
        print(
            f"{d['metadata']['name']}: {st.get('engine')} ({st.get('engineReason')}); {pools}; ${st.get('costPerHour')}/h"
        )


if __name__ == "__main__":
    kubectl, ns, what, *rest = sys.argv[1:]
    chat(kubectl, ns, rest[0], rest[1:]) if what == "chat" else placement(kubectl, ns)
