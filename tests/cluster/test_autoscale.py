"""The builtin autoscaler on the real local cluster: the real Prometheus scrapes mock engines,
concurrent long requests through the router fill their KV cache, the operator raises
spec.replicas through the scale subresource (new engines get traffic), and once the load stops it
comes back to minReplicas after the scale-down window, without flapping, saying so in
status.autoscaling and in Events. Windows are shortened through the spec; nothing is timed."""

from __future__ import annotations

import concurrent.futures as cf
import json
import random
import threading
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster.conftest import Cluster, kubectl, wait_for
from tests.cluster.operator_harness import (
    Operator,
    apply,
    condition,
    events,
    get_llmd,
    install_crd,
    wait_condition,
)

pytestmark = pytest.mark.cluster
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))
MODEL = "Qwen/Qwen2.5-0.5B-Instruct"


@pytest.fixture
def scaling_operator(cluster: Cluster, tmp_path: Path) -> Any:
    install_crd(cluster)
    config = tmp_path / "operator.yaml"
    config.write_text(yaml.safe_dump({"prometheusUrl": cluster.prometheus_url}))
    op = Operator(cluster, tmp_path / "operator.log", "--config", str(config), "--resync", "30")
    op.start()
    yield op
    op.stop()
    print(f"--- operator log (last lines)\n{op.tail(60)}")


def manifest(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "toposerve.io/v1alpha1",
        "kind": "LLMDeployment",
        "metadata": {"name": name},
        "spec": {
            "model": {"name": MODEL, "maxContextLength": 4096},
            "engine": "mock",
            "replicas": 1,
            "placement": {"gpuTypes": ["L4"]},
            # A small KV cache (about 40k tokens on an L4) that a few long requests fill.
            "serving": {"gpuMemoryUtilization": 0.15},
            "routing": {"replicas": 1},
            "autoscaling": {
                "enabled": True,
                "minReplicas": 1,
                "maxReplicas": 3,
                "targetKVCacheUtilization": 0.4,
                "syncPeriodSeconds": 2,
                "metricsWindowSeconds": 6,
                "staleAfterSeconds": 20,
                "startupGraceSeconds": 60,
                "scaleUp": {
                    "stabilizationWindowSeconds": 0,
                    "policies": [{"type": "Pods", "value": 1, "periodSeconds": 5}],
                },
                "scaleDown": {
                    "stabilizationWindowSeconds": 20,
                    "policies": [{"type": "Pods", "value": 1, "periodSeconds": 5}],
                },
            },
        },
    }


def ips(cluster: Cluster, namespace: str, service: str) -> list[str]:
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


def served(ip: str) -> float:
    """Requests an engine has taken (finished or running), from its own metrics."""
    with _NO_PROXY.open(f"http://{ip}:8000/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(("vllm:request_success_total", "vllm:num_requests_running"))
    )


class Load:
    """Concurrent long chat requests with unique prompts (no prefix-cache sharing) until stopped."""

    def __init__(self, url: str, workers: int = 16, prompt_tokens: int = 2000, max_tokens: int = 300) -> None:
        self.url, self.workers, self.prompt_tokens, self.max_tokens = url, workers, prompt_tokens, max_tokens
        self.stop = threading.Event()
        self.ok = self.failed = 0
        self._pool = cf.ThreadPoolExecutor(workers)

    def _one(self, rng: random.Random) -> None:
        words = " ".join(f"w{rng.randrange(10**9)}" for _ in range(self.prompt_tokens))
        body = json.dumps({"model": MODEL, "max_tokens": self.max_tokens,
                           "messages": [{"role": "user", "content": words}]}).encode()  # fmt: skip
        req = urllib.request.Request(
            f"{self.url}/v1/chat/completions", data=body, headers={"content-type": "application/json"}
        )
        try:
            with _NO_PROXY.open(req, timeout=300) as r:
                r.read()
            self.ok += 1
        except Exception:
            self.failed += 1

    def _worker(self, seed: int) -> None:
        rng = random.Random(seed)
        while not self.stop.is_set():
            self._one(rng)

    def __enter__(self) -> Load:
        for i in range(self.workers):
            self._pool.submit(self._worker, i)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self._pool.shutdown(wait=True)


def held_chat(router: str, timeout: float) -> None:
    """One chat request that the router holds at zero replicas; it must be answered 200 with text."""
    body = json.dumps({"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "wake up"}]})
    req = urllib.request.Request(
        f"http://{router}:8080/v1/chat/completions",
        data=body.encode(),
        headers={"content-type": "application/json"},
    )
    with _NO_PROXY.open(req, timeout=timeout) as r:
        assert r.status == 200
        assert json.loads(r.read())["choices"][0]["message"]["content"]


def scale_writers(obj: dict[str, Any]) -> list[tuple[str, str]]:
    """(manager, subresource) of every managedFields entry that owns spec.replicas."""
    out = []
    for m in obj["metadata"].get("managedFields") or []:
        if "f:replicas" in ((m.get("fieldsV1") or {}).get("f:spec") or {}):
            out.append((m.get("manager", ""), m.get("subresource", "")))
    return out


def test_builtin_autoscaler_scales_on_kv_cache_through_prometheus(
    cluster: Cluster, namespace: str, scaling_operator: Operator
) -> None:
    name = "kvscale"
    assert apply(cluster, namespace, manifest(name)).returncode == 0
    wait_condition(cluster, namespace, name, "Ready", "True", timeout=180)

    def autoscaling() -> dict[str, Any] | None:
        st = (get_llmd(cluster, namespace, name).get("status") or {}).get("autoscaling")
        return st if st and st.get("metricsAvailable") else None

    st = wait_for(autoscaling, "status.autoscaling with fresh metrics from Prometheus", timeout=120)
    assert st["source"] == f"prometheus {cluster.prometheus_url}"
    assert st["mode"] == "builtin" and st["desiredReplicas"] == 1 and st["floorSource"] == "minReplicas"
    # The flag's flip reached the reconcile, which says it as a condition (kubectl get / Argo CD).
    active = condition(
        wait_condition(cluster, namespace, name, "ScalingActive", "True", timeout=60), "ScalingActive"
    )
    assert active["reason"] == "MetricsAvailable" and cluster.prometheus_url in active["message"]

    router = wait_for(lambda: (r := ips(cluster, namespace, name)) and r[0], "a ready router")
    with Load(f"http://{router}:8080") as load:

        def scaled_up() -> dict[str, Any] | None:
            obj = get_llmd(cluster, namespace, name)
            return obj if obj["spec"]["replicas"] >= 2 else None

        obj = wait_for(scaled_up, "spec.replicas raised by the autoscaler", timeout=240, every=1)
        # The operator dies mid scale-up and comes back: the loop resumes from status.autoscaling.
        scaling_operator.kill()
        scaling_operator.start()
        # Written through the scale subresource by the autoscaler's field manager, nothing else.
        assert ("toposerve-autoscaler", "scale") in scale_writers(obj), scale_writers(obj)
        st = obj["status"]["autoscaling"]
        assert st["source"] == f"prometheus {cluster.prometheus_url}"
        up = [e for e in events(cluster, namespace, name) if e["reason"] == "ScaledUp"]
        assert up and "kv-cache" in up[0]["message"], up
        # The new engines become ready and the router sends them traffic.
        engines = wait_for(
            lambda: (e := ips(cluster, namespace, f"{name}-engine")) and len(e) >= 2 and e,
            "two ready engines",
            timeout=180,
        )
        wait_for(
            lambda: all(served(ip) > 0 for ip in engines), "traffic on every engine", timeout=120, every=1
        )

        # Each replica's start-up, read off its pod by the reconcile, is in the pool's status.
        def measured() -> dict[str, Any] | None:
            pools = (get_llmd(cluster, namespace, name).get("status") or {}).get("pools") or []
            su = pools[0].get("startup") if pools else None
            return su if su and su["samples"] >= 2 else None

        su = wait_for(measured, "two measured start-ups in status.pools[].startup", timeout=90)
        assert 0 < su["p50Seconds"] <= su["p90Seconds"], su
        assert all(r["totalSeconds"] > 0 and "loadingSeconds" in r for r in su["recent"]), su
        peak = get_llmd(cluster, namespace, name)["spec"]["replicas"]
    assert load.ok > 0, (load.ok, load.failed)

    def back_to_min() -> dict[str, Any] | None:
        obj = get_llmd(cluster, namespace, name)
        return obj if obj["spec"]["replicas"] == 1 else None

    obj = wait_for(back_to_min, "spec.replicas back to minReplicas after the load", timeout=300, every=1)
    st = obj["status"]["autoscaling"]
    assert st["reason"] in ("ScaleDown", "AtFloor"), st
    # No flapping: every scale-up came before every scale-down, one pod per step (the policies).
    scales = sorted(
        (e for e in events(cluster, namespace, name) if e["reason"] in ("ScaledUp", "ScaledDown")),
        key=lambda e: (e.get("firstTimestamp") or "", e["metadata"]["creationTimestamp"]),
    )
    reasons = [e["reason"] for e in scales]
    assert reasons == sorted(reasons, key=lambda r: r == "ScaledDown"), reasons
    assert reasons.count("ScaledUp") == peak - 1 and reasons.count("ScaledDown") == peak - 1, reasons
    assert not [e for e in events(cluster, namespace, name) if e["reason"] == "ReplicasOverridden"]
    # The workloads followed spec.replicas (the reconcile resizes them like for any writer).
    deploy = json.loads(
        kubectl(cluster, "get", "deployments", "-n", namespace, "-l",
                f"toposerve.io/deployment={name},app.kubernetes.io/component!=router", "-o", "json").stdout
    )["items"]  # fmt: skip
    assert sum(d["spec"]["replicas"] for d in deploy) == 1
    # kubectl scale while builtin autoscaling is on: overridden, and a Warning Event says why.
    kubectl(cluster, "scale", f"llmd/{name}", "-n", namespace, "--replicas=3")

    def overridden() -> list[dict[str, Any]] | None:
        return [e for e in events(cluster, namespace, name) if e["reason"] == "ReplicasOverridden"] or None

    e = wait_for(overridden, "a ReplicasOverridden Event", timeout=60)[0]
    assert e["type"] == "Warning" and "set to 3 outside the autoscaler" in e["message"]
    wait_for(back_to_min, "spec.replicas back to minReplicas after kubectl scale", timeout=180, every=1)


def test_hpa_and_keda_modes_render_children_the_real_cluster_accepts(
    cluster: Cluster, namespace: str, scaling_operator: Operator
) -> None:
    """hpa: the real HPA controller (kube-controller-manager) reads the LLMDeployment's scale
    subresource through the rendered HPA; keda: the ScaledObject is accepted by KEDA v2.21.0's CRD
    (installed from the vendored file; KEDA's operator itself is not run here); switching modes
    prunes the previous autoscaler."""
    crd = Path(__file__).resolve().parents[1] / "unit" / "schemas" / "keda-v2.21.0-scaledobjects.yaml"
    kubectl(cluster, "apply", "--server-side", "-f", str(crd))
    kubectl(cluster, "wait", "--for=condition=Established", "crd/scaledobjects.keda.sh", "--timeout=60s")
    try:
        name = "hpamode"
        m = manifest(name)
        m["spec"]["autoscaling"]["mode"] = "hpa"
        assert apply(cluster, namespace, m).returncode == 0

        def hpa_condition() -> dict[str, Any] | None:
            res = kubectl(cluster, "get", "hpa", name, "-n", namespace, "-o", "json", check=False)
            if res.returncode != 0:
                return None
            conds = {c["type"]: c for c in json.loads(res.stdout).get("status", {}).get("conditions") or []}
            return conds if "AbleToScale" in conds else None

        conds = wait_for(hpa_condition, "the HPA controller's conditions on the rendered HPA", timeout=180)
        assert conds["AbleToScale"]["status"] == "True", conds  # it read .../llmdeployments/<name>/scale
        assert conds["AbleToScale"]["reason"] == "SucceededGetScale", conds
        # No custom metrics adapter runs here: the controller says so instead of scaling.
        assert conds["ScalingActive"]["status"] == "False", conds
        m["spec"]["autoscaling"]["mode"] = "keda"
        assert apply(cluster, namespace, m).returncode == 0

        def switched() -> dict[str, Any] | None:
            so = kubectl(
                cluster, "get", "scaledobjects.keda.sh", name, "-n", namespace, "-o", "json", check=False
            )
            hpa = kubectl(cluster, "get", "hpa", name, "-n", namespace, check=False)
            return json.loads(so.stdout) if so.returncode == 0 and hpa.returncode != 0 else None

        so = wait_for(switched, "the ScaledObject applied and the HPA pruned", timeout=120)
        assert so["spec"]["scaleTargetRef"]["kind"] == "LLMDeployment"
        assert so["spec"]["triggers"][0]["metadata"]["serverAddress"] == cluster.prometheus_url
        m["spec"]["autoscaling"]["mode"] = "builtin"
        assert apply(cluster, namespace, m).returncode == 0

        def pruned() -> bool:
            res = kubectl(cluster, "get", "scaledobjects.keda.sh", "-n", namespace, "-o", "json")
            return not json.loads(res.stdout)["items"]

        wait_for(pruned, "the ScaledObject pruned in builtin mode", timeout=120)
        wait_for(lambda: (get_llmd(cluster, namespace, name).get("status") or {}).get("autoscaling"),
                 "status.autoscaling from the builtin loop", timeout=120)  # fmt: skip
    finally:
        kubectl(cluster, "delete", "-f", str(crd), "--wait=false", check=False)


def test_scale_from_zero_holds_the_first_request_then_serves_it(
    cluster: Cluster, namespace: str, scaling_operator: Operator
) -> None:
    """minReplicas 0: the router holds a request at zero replicas, the autoscaler sees the held
    count in Prometheus and scales 0 -> 1, and the held request is served by the new replica."""
    name = "fromzero"
    m = manifest(name)
    m["spec"]["replicas"] = 0
    m["spec"]["autoscaling"].update({"minReplicas": 0, "maxReplicas": 1, "startupGraceSeconds": 90})
    assert apply(cluster, namespace, m).returncode == 0
    wait_condition(cluster, namespace, name, "Ready", "True", timeout=180)  # ScaledToZero
    router = wait_for(lambda: (r := ips(cluster, namespace, name)) and r[0], "a ready router", timeout=120)
    assert get_llmd(cluster, namespace, name)["spec"]["replicas"] == 0
    held_chat(router, timeout=150)  # held by the router until a replica serves it
    obj = get_llmd(cluster, namespace, name)
    assert obj["spec"]["replicas"] == 1
    assert ("toposerve-autoscaler", "scale") in scale_writers(obj)
    (up,) = [e for e in events(cluster, namespace, name) if e["reason"] == "ScaledUp"]
    assert "spec.replicas 0 -> 1 (ScaleFromZero)" in up["message"], up["message"]


def components(cluster: Cluster, namespace: str, name: str) -> dict[str, str]:
    """Serving pods (not terminating) -> their component label (engine or standby)."""
    pods = cluster.core.list_namespaced_pod(
        namespace,
        label_selector=f"toposerve.io/deployment={name},app.kubernetes.io/component in (engine,standby)",
    ).items
    return {p.metadata.name: p.metadata.labels["app.kubernetes.io/component"] for p in pods
            if not p.metadata.deletion_timestamp}  # fmt: skip


def test_warm_standby_is_out_of_rotation_and_promoted_on_scale_up(
    cluster: Cluster, namespace: str, scaling_operator: Operator
) -> None:
    name = "standby"
    m = manifest(name)
    m["spec"]["autoscaling"].update({"maxReplicas": 2, "warmStandby": 1})
    assert apply(cluster, namespace, m).returncode == 0

    def one_of_each() -> dict[str, str] | None:
        c = components(cluster, namespace, name)
        return c if sorted(c.values()) == ["engine", "standby"] else None

    spare = next(p for p, c in wait_for(one_of_each, "one engine and one standby pod", timeout=180).items()
                 if c == "standby")  # fmt: skip
    # Only the engine is in rotation: the engines' Service has one ready endpoint.
    wait_for(lambda: len(ips(cluster, namespace, f"{name}-engine")) == 1, "one engine endpoint", timeout=120)
    router = wait_for(lambda: (r := ips(cluster, namespace, name)) and r[0], "a ready router")
    with Load(f"http://{router}:8080"):
        wait_for(
            lambda: get_llmd(cluster, namespace, name)["spec"]["replicas"] == 2, "a scale-up", timeout=240
        )

        def promoted() -> dict[str, str] | None:
            c = components(cluster, namespace, name)
            return (
                c
                if c.get(spare) == "engine" and sorted(c.values()) == ["engine", "engine", "standby"]
                else None
            )

        final = wait_for(promoted, "the standby promoted and a new standby behind it", timeout=180)
    assert final[spare] == "engine"
    reasons = [e["reason"] for e in events(cluster, namespace, name)]
    assert "StandbyPromoted" in reasons, reasons
    promo = next(e for e in events(cluster, namespace, name) if e["reason"] == "StandbyPromoted")
    assert spare in promo["message"]


def pool_replicas(cluster: Cluster, namespace: str, name: str) -> dict[str, int]:
    deploy = json.loads(
        kubectl(cluster, "get", "deployments", "-n", namespace, "-l",
                f"toposerve.io/deployment={name},app.kubernetes.io/component!=router", "-o", "json").stdout
    )["items"]  # fmt: skip
    out: dict[str, int] = {}
    for d in deploy:
        pool = d["metadata"]["labels"]["toposerve.io/pool"]
        out[pool] = out.get(pool, 0) + d["spec"]["replicas"]
    return out


def test_ttft_slo_scales_up_into_pools_in_tier_order_and_back(
    cluster: Cluster, namespace: str, scaling_operator: Operator
) -> None:
    """A TTFT SLO no engine can meet (KV and waiting targets out of reach) scales up through the
    real Prometheus's histogram_quantile; the new replica goes to the next pool in the
    latency-critical order (the faster L40S pool is at its maxReplicas), and once the load stops
    (idle: TTFT says nothing) the count comes back down, removing from the end of the order."""
    name = "ttftpools"
    m = manifest(name)
    spec = m["spec"]
    spec["placement"] = {"tier": "latency-critical"}
    spec["pools"] = [
        {"name": "l4", "gpuTypes": ["L4"]},
        {"name": "l40s", "gpuTypes": ["L40S"], "maxReplicas": 1},
    ]
    spec["autoscaling"].update(
        {"maxReplicas": 2, "targetKVCacheUtilization": 1.0, "targetWaitingRequests": 10000,
         "ttftSLO": {"seconds": 0.005}}
    )  # fmt: skip
    assert apply(cluster, namespace, m).returncode == 0
    wait_condition(cluster, namespace, name, "Ready", "True", timeout=180)
    obj = get_llmd(cluster, namespace, name)
    pools = {p["name"]: p for p in obj["status"]["pools"]}
    assert obj["status"]["poolOrder"] == "tier"
    assert (pools["l40s"]["order"], pools["l4"]["order"]) == (1, 2), pools
    assert pool_replicas(cluster, namespace, name) == {"l40s": 1, "l4": 0}

    router = wait_for(lambda: (r := ips(cluster, namespace, name)) and r[0], "a ready router")
    with Load(f"http://{router}:8080", workers=4, prompt_tokens=300, max_tokens=20) as load:
        wait_for(lambda: get_llmd(cluster, namespace, name)["spec"]["replicas"] == 2, "a scale-up on TTFT",
                 timeout=240, every=1)  # fmt: skip
        up = [e for e in events(cluster, namespace, name) if e["reason"] == "ScaledUp"]
        assert up and "TTFT p95 above target" in up[0]["message"], up
        inputs = get_llmd(cluster, namespace, name)["status"]["autoscaling"]["inputs"]
        assert inputs["ttftSLOSeconds"] == 0.005 and inputs["ttftSeconds"] > 0.005, inputs
        wait_for(lambda: pool_replicas(cluster, namespace, name) == {"l40s": 1, "l4": 1},
                 "the new replica in the l4 pool (l40s at its maxReplicas)", timeout=60)  # fmt: skip
    assert load.ok > 0, (load.ok, load.failed)
    wait_for(lambda: get_llmd(cluster, namespace, name)["spec"]["replicas"] == 1, "back to minReplicas",
             timeout=300, every=1)  # fmt: skip
    wait_for(lambda: pool_replicas(cluster, namespace, name) == {"l40s": 1, "l4": 0},
             "the l4 replica removed first (end of the order)", timeout=60)  # fmt: skip
    moved = [e["message"] for e in events(cluster, namespace, name) if e["reason"] == "PoolsScaled"]
    assert any("pool l4 0 -> 1" in msg for msg in moved), moved
    assert any("pool l4 1 -> 0" in msg for msg in moved), moved


def test_the_routers_arrivals_scale_up_before_kv_usage_rises(
    cluster: Cluster, namespace: str, scaling_operator: Operator
) -> None:
    """leadingSignal: long streams (2,000 tokens each) arrive through the router. The router counts
    each one's whole reservation at once, while the engine's KV usage grows token by token and
    Prometheus averages it over a minute: the first scale-up is decided on the routers' arrivals,
    with the KV metric still below its target."""
    name = "leading"
    m = manifest(name)
    m["spec"]["model"]["maxContextLength"] = 8192  # the KV cache is still about 40k tokens (manifest)
    m["spec"]["autoscaling"].update(
        {
            "leadingSignal": True,
            "targetKVCacheUtilization": 0.9,
            "metricsWindowSeconds": 60,
            "syncPeriodSeconds": 15,
        }
    )
    assert apply(cluster, namespace, m).returncode == 0
    wait_condition(cluster, namespace, name, "Ready", "True", timeout=180)
    wait_for(
        lambda: ((get_llmd(cluster, namespace, name).get("status") or {}).get("autoscaling") or {}).get(
            "mode"
        ),
        "a first decision",
        timeout=120,
    )
    router = wait_for(lambda: (r := ips(cluster, namespace, name)) and r[0], "a ready router")
    # 24 streams x ~2,100 reserved tokens: ~50k tokens, 1.4 replicas at the 0.9 target
    with Load(f"http://{router}:8080", workers=24, prompt_tokens=100, max_tokens=2000):

        def scaled_up() -> dict[str, Any] | None:
            obj = get_llmd(cluster, namespace, name)
            return obj if obj["spec"]["replicas"] >= 2 else None

        obj = wait_for(scaled_up, "spec.replicas raised", timeout=180, every=1)
    st = obj["status"]["autoscaling"]
    up = sorted(
        (e for e in events(cluster, namespace, name) if e["reason"] == "ScaledUp"),
        key=lambda e: e["metadata"]["creationTimestamp"],
    )
    assert up and "router arrivals" in up[0]["message"], up
    assert st["signal"] == "router arrivals", st
    assert st["inputs"]["demandReplicas"] >= 2 and "router arrivals" in st["inputs"]["demandExplanation"]
    kv = st["inputs"].get("kvCacheUtilization")
    assert kv is None or kv < 0.9, st  # the engines' metric had not asked for it
