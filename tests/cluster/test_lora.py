"""LoRA adapters behind the chart's gateway on the local cluster, driven with the openai SDK: two
LLMDeployments (one with adapters on its model cache, one base model) behind one endpoint; the
gateway loads each adapter on the replicas it sends it to (vLLM's /v1/load_lora_adapter, the mock
engine answering as vLLM 0.33 does); adapters added and removed in the spec under load fail no
request for a model that stays; a replica whose engine restarts gets its adapters back."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from tests.cluster.conftest import ROOT, Cluster, kubectl, wait_for
from tests.cluster.operator_harness import condition, get_llmd, wait_condition
from tests.cluster.test_helm import helm, release, values_file
from tests.unit.chart_helpers import CHART

pytestmark = pytest.mark.cluster
__all__ = ["release"]
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def get(url: str) -> Any:
    with _NO_PROXY.open(url, timeout=10) as r:
        return json.loads(r.read())


def ready_ips(cluster: Cluster, namespace: str, service: str) -> list[str]:
    slices = cluster.discovery.list_namespaced_endpoint_slice(
        namespace, label_selector=f"kubernetes.io/service-name={service}"
    ).items
    return [a for s in slices for e in s.endpoints or [] if e.conditions and e.conditions.ready
            for a in e.addresses]  # fmt: skip


def write_adapter(cache: Path, name: str, rank: int = 8) -> None:
    """A PEFT adapter directory as vLLM reads it: adapter_config.json and a weights file (the mock
    engine checks it is there, as vLLM's LoRAModel.from_local_checkpoint does; it reads no tensor)."""
    d = cache / "adapters" / name
    d.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": ["q_proj", "v_proj"]}
    (d / "adapter_config.json").write_text(json.dumps(config))
    (d / "adapter_model.safetensors").write_bytes(b"")


def deployment(name: str, served: str, cache: Path | None, adapters: list[str]) -> dict[str, Any]:
    obj: dict[str, Any] = yaml.safe_load((ROOT / "examples/quickstart.yaml").read_text())
    obj["metadata"]["name"] = name
    obj["spec"].update({"engine": "mock", "replicas": 2, "routing": {"mode": "gateway"}})
    obj["spec"]["model"]["servedName"] = served
    if cache is not None:
        obj["spec"]["model"]["cache"] = {"type": "host-path", "hostPath": str(cache)}
        obj["spec"]["lora"] = {"maxLoras": 2, "maxCpuLoras": 3}
        obj["spec"]["adapters"] = [{"name": a, "source": f"cache://adapters/{a}"} for a in adapters]
    return obj


def engine_adapters(ip: str) -> set[str]:
    return {m["id"] for m in get(f"http://{ip}:8000/v1/models")["data"] if m.get("parent")}


def kill_engine(ip: str) -> None:
    """SIGKILL the mock engine process of the pod at ``ip`` (the runner restarts it on the same IP,
    as a kubelet restarts a crashed container)."""
    netns = "tsp-" + ip.replace(".", "-")
    pids = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True, check=True).stdout
    mine = [int(p) for p in pids.split()
            if "mock-engine" in Path(f"/proc/{p}/cmdline").read_text(errors="replace")]  # fmt: skip
    assert mine, f"no mock engine process in {netns}"
    for pid in mine:
        os.kill(pid, signal.SIGKILL)


def test_adapters_behind_the_gateway_added_removed_under_load_and_reloaded_after_a_restart(
    cluster: Cluster, namespace: str, release: str, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    for a in ("sql", "support", "legal", "medical"):
        write_adapter(cache, a)
    values = {
        "replicaCount": 1,
        "watchNamespaces": [namespace],
        "operatorConfig": {"autoEngine": "mock"},
        "gateway": {"watchNamespace": namespace, "extraArgs": ["--expose-backend", "--adapter-refresh", "1"]},
    }
    helm(cluster, "install", release, str(CHART), "-n", namespace, "-f", values_file(tmp_path, values),
         "--wait", "--timeout", "4m")  # fmt: skip
    gws = wait_for(lambda: (x := ready_ips(cluster, namespace, f"{release}-toposerve-gateway")) and len(x) == 2
                   and x, "two ready gateway replicas")  # fmt: skip
    lora = deployment("lora", "base-a", cache, ["sql", "support", "legal"])
    plain = deployment("plain", "base-b", None, [])
    for obj in (lora, plain):
        kubectl(cluster, "apply", "-n", namespace, "-f", "-", stdin=yaml.safe_dump(obj))
    for name in ("lora", "plain"):
        wait_condition(cluster, namespace, name, "Ready", "True", timeout=240)
    want = {"base-a", "sql", "support", "legal", "base-b"}
    for ip in gws:
        wait_for(lambda ip=ip: want <= {m for m, n in get(f"http://{ip}:8080/health")["models"].items() if n >= 1}
                 or None, f"gateway {ip} routes every model")  # fmt: skip

    client = openai.OpenAI(base_url=f"http://{gws[0]}:8080/v1", api_key="unused", max_retries=0, timeout=60)
    cards = {m.id: m for m in client.models.list().data}
    assert want <= set(cards)
    assert (
        getattr(cards["sql"], "parent", None) == "base-a" and getattr(cards["base-b"], "parent", None) is None
    )
    # the EndpointSlice controller marks the pods ready a moment after the pods (and so the Ready
    # condition) are: wait for the slice rather than read it once (a full-suite run saw 1 of 2)
    engines = wait_for(lambda: (x := ready_ips(cluster, namespace, "lora-engine")) and len(x) == 2 and x,
                       "both lora engines ready in the EndpointSlice")  # fmt: skip
    assert len(engines) == 2
    for model in ("sql", "support", "legal", "base-a", "base-b"):
        raw = client.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
        assert raw.parse().model == model
        if model not in ("base-a", "base-b"):  # went to a replica that now holds the adapter
            backend = raw.headers["x-toposerve-backend"].split("//", 1)[1].rsplit(":", 1)[0]
            assert backend in engines and model in engine_adapters(backend), (model, backend)

    # -- under load through both gateway replicas: add `medical`, remove `legal`.
    models = ("sql", "support", "legal", "base-a", "base-b", "medical")

    def one(i: int) -> tuple[str, int, float]:
        model = models[i % len(models)]
        c = openai.OpenAI(
            base_url=f"http://{gws[i % 2]}:8080/v1", api_key="unused", max_retries=0, timeout=120
        )
        t = time.monotonic()
        try:
            c.completions.create(model=model, prompt=f"request {i}", max_tokens=8)
            return model, 200, t
        except openai.APIStatusError as err:
            return model, err.status_code, t

    changed = deployment("lora", "base-a", cache, ["sql", "support", "medical"])
    with cf.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(one, i) for i in range(240)]
        time.sleep(2)
        kubectl(cluster, "apply", "-n", namespace, "-f", "-", stdin=yaml.safe_dump(changed))
        results = [f.result() for f in futures]
    staying = [(m, c) for m, c, _ in results if m in ("sql", "support", "base-a", "base-b")]
    assert staying and all(c == 200 for _, c in staying), [r for r in staying if r[1] != 200]
    # a removed adapter is a 404 once the gateway knows, an added one a 404 until it does
    assert {c for m, c, _ in results if m in ("legal", "medical")} <= {200, 404}
    for ip in gws:
        wait_for(lambda ip=ip: ("medical" in (h := get(f"http://{ip}:8080/health")["models"]) and "legal" not in h)
                 or None, f"gateway {ip} has the new adapter table")  # fmt: skip
    assert client.completions.create(model="medical", prompt="x", max_tokens=2).model == "medical"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="legal", prompt="x", max_tokens=2)
    wait_for(lambda: all("legal" not in engine_adapters(ip) for ip in engines) or None,
             "the removed adapter unloaded from the engines")  # fmt: skip

    # -- an adapter whose source is not there: its requests get vLLM's 404, the operator says which
    #    adapter and why (status.gateway.adapters, AdaptersLoaded False), everything else serves.
    ghost = deployment("lora", "base-a", cache, ["sql", "support", "medical", "ghost"])
    kubectl(cluster, "apply", "-n", namespace, "-f", "-", stdin=yaml.safe_dump(ghost))
    wait_for(
        lambda: "ghost" in get(f"http://{gws[0]}:8080/health")["models"] or None, "the gateway knows ghost"
    )
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="ghost", prompt="x", max_tokens=2)
    assert "No adapter found" in str(e.value)

    def ghost_reported() -> Any:
        st = get_llmd(cluster, namespace, "lora").get("status") or {}
        bad = [
            a
            for a in (st.get("gateway") or {}).get("adapters") or []
            if a["name"] == "ghost" and a.get("lastError")
        ]
        cond = condition(get_llmd(cluster, namespace, "lora"), "AdaptersLoaded")
        return bad and cond and cond["status"] == "False" and (bad[0], cond)

    try:
        bad, cond = wait_for(ghost_reported, "status.gateway and AdaptersLoaded to name ghost", timeout=120)
    except BaseException:
        print("DEBUG status", json.dumps(get_llmd(cluster, namespace, "lora").get("status"), indent=1)[:6000])
        print("DEBUG health", json.dumps([get(f"http://{ip}:8080/health") for ip in gws])[:4000])
        raise
    assert (
        "No adapter found" in bad["lastError"]
        and "ghost:" in cond["message"]
        and "sql" not in cond["message"]
    )
    assert condition(get_llmd(cluster, namespace, "lora"), "Ready")["status"] == "True"  # type: ignore[index]
    assert client.completions.create(model="sql", prompt="x", max_tokens=2).model == "sql"
    assert client.completions.create(model="base-a", prompt="x", max_tokens=2).choices

    # -- a replica's engine restarts (same pod, same IP): the gateway loads back what it held.
    victim = max(engines, key=lambda ip: len(engine_adapters(ip)))
    held = engine_adapters(victim)
    assert held, "the victim held adapters"
    kill_engine(victim)
    wait_for(lambda: not _answers(victim) or None, "the engine to go down", timeout=30, every=0.2)
    wait_for(lambda: (_answers(victim) and held <= engine_adapters(victim)) or None,
             f"the restarted engine to get back {sorted(held)}", timeout=120)  # fmt: skip


def _answers(ip: str) -> bool:
    try:
        get(f"http://{ip}:8000/v1/models")
        return True
    except Exception:
        return False
