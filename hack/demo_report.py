"""Parts of `make demo` that are easier in Python: chat with the serving pods, show placement.

Usage: demo_report.py KUBECTL NAMESPACE chat NAME...   |   demo_report.py KUBECTL NAMESPACE placement
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request

NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def kc(kubectl: str, *args: str) -> dict:  # type: ignore[type-arg]
    return dict(json.loads(subprocess.check_output([kubectl, *args, "-o", "json"])))


def chat(kubectl: str, ns: str, names: list[str]) -> None:
    for name in names:
        model = kc(kubectl, "get", "llmd", name, "-n", ns)["spec"]["model"]["name"]
        slices = kc(
            kubectl, "get", "endpointslices", "-n", ns, "-l", f"kubernetes.io/service-name={name}-engine"
        )
        ips = [
            a
            for s in slices["items"]
            for e in s.get("endpoints") or []
            if (e.get("conditions") or {}).get("ready")
            for a in e["addresses"]
        ]
        for ip in ips:
            body = {"model": model, "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 12}
            req = urllib.request.Request(
                f"http://{ip}:8000/v1/chat/completions",
                data=json.dumps(body).encode(),
                headers={"content-type": "application/json"},
            )
            with NO_PROXY.open(req, timeout=30) as r:
                reply = json.loads(r.read())
            text = reply["choices"][0]["message"]["content"][:48]
            usage = reply["usage"]
            print(
                f"{name:16} {ip:13} -> {text!r}  ({usage['prompt_tokens']}+{usage['completion_tokens']} tokens)"
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
    chat(kubectl, ns, rest) if what == "chat" else placement(kubectl, ns)
