"""toposerve's Endpoint Picker side by side with GIE's reference lightweight picker (`cmd/lwepp`
of sigs.k8s.io/gateway-api-inference-extension v1.6.2, built from the module by
hack/gie/build-lwepp.sh), both driven by the same client playing Envoy's side of ext_proc with
the real protos (tests/unit/router/epp_client.py).

A cluster test because lwepp needs a Kubernetes API server: it reads its InferencePool and the
pods the pool selects (controller-runtime watches). Here: GIE's InferencePool CRD from the
module, two mock-engine pods, a pool selecting them; lwepp on the host with the cluster's
kubeconfig; `toposerve router --epp-port` on the host with the same pods as static backends.

Same answers where the protocol (docs/proposals/004-endpoint-picker-protocol) fixes them:
a route for headers then body, for a body streamed in chunks and for a bodiless request, with
the same value in the `x-gateway-destination-endpoint` header and the `envoy.lb` metadata, the
body echoed whole in pieces of at most 62,000 bytes; the subset hint obeyed (ip:port and a
bare IP); the response path answered and its body echoed; the ext_proc service's gRPC health.
Where lwepp departs from the proposal, the test pins what each does (so a change on either
side shows): no eligible endpoint is 503 for toposerve and a gRPC INTERNAL error for lwepp
(handlers/server.go returns the picker's error); health `liveness`/`readiness` are served by
toposerve and unknown to lwepp (which names its health service `inference-extension`).
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from tests.cluster.conftest import ROOT, Cluster, kubectl, wait_for
from tests.cluster.mock import PORT, deploy_mock_engine, ready_pods
from tests.unit.router.epp_client import Answer, Stream, chat, health
from toposerve.router.epp import protocol as pr

pytestmark = pytest.mark.cluster

GIE = "v1.6.2"
POOL_CRD = "config/crd/bases/inference.networking.k8s.io_inferencepools.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def lwepp() -> Path:
    res = subprocess.run(["bash", str(ROOT / "hack/gie/build-lwepp.sh")], capture_output=True, text=True)
    assert res.returncode == 0, f"hack/gie/build-lwepp.sh failed:\n{res.stderr[-3000:]}"
    return Path(res.stdout.strip().splitlines()[-1])


def module_dir() -> Path:
    """The module's source in Go's module cache (the build script's `go install` put it there)."""
    cache = subprocess.run(
        ["go", "env", "GOMODCACHE"], capture_output=True, text=True, check=True
    ).stdout.strip()
    return Path(cache) / f"sigs.k8s.io/gateway-api-inference-extension@{GIE}"


@pytest.fixture
def pool(cluster: Cluster, namespace: str, lwepp: Path) -> Iterator[list[str]]:
    """GIE's CRD (kept if it was there), two ready mock-engine pods and an InferencePool over
    them; yields the pods' `ip:port`."""
    crd = module_dir() / POOL_CRD
    name = yaml.safe_load(crd.read_text())["metadata"]["name"]
    had = kubectl(cluster, "get", "crd", name, check=False).returncode == 0
    kubectl(cluster, "apply", "--server-side", "-f", str(crd))
    kubectl(cluster, "wait", "--for=condition=Established", f"crd/{name}", "--timeout=60s")
    deploy_mock_engine(cluster, namespace, replicas=2)
    pods = ready_pods(cluster, namespace, count=2)
    cluster.custom.create_namespaced_custom_object(
        "inference.networking.k8s.io",
        "v1",
        namespace,
        "inferencepools",
        {
            "apiVersion": "inference.networking.k8s.io/v1",
            "kind": "InferencePool",
            "metadata": {"name": "mock-pool"},
            "spec": {
                "selector": {"matchLabels": {"app": "mock"}},
                "targetPorts": [{"number": PORT}],
                "endpointPickerRef": {"name": "epp", "port": {"number": 9002}},
            },
        },
    )
    yield sorted(f"{p.status.pod_ip}:{PORT}" for p in pods)
    if not had:
        kubectl(cluster, "delete", "crd", name, "--wait=false", check=False)


def start(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as f:
        return subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=env)


async def case(port: int, fn: Any) -> Any:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        return await fn(ch)


async def route(ch: grpc.aio.Channel, body: bytes | None, chunks: int = 1, subset: Any = None) -> Answer:
    s = Stream(ch)
    a = await s.request(body, chunks=chunks, subset=subset)
    if a.kind == "route":
        a.messages += await s.respond(a.endpoints[0], b"data: [DONE]\n\n")
        await s.close()
    return a


def run(port: int, fn: Any) -> Any:
    return asyncio.run(case(port, fn))


def test_same_answers_as_gie_reference_picker(
    cluster: Cluster, namespace: str, pool: list[str], lwepp: Path, tmp_path: Path
) -> None:
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig)}
    lw_port, lw_health, lw_metrics = free_port(), free_port(), free_port()
    ts_port, ts_epp, ts_health = free_port(), free_port(), free_port()
    procs = [
        start(
            [str(lwepp), "--kubeconfig", str(cluster.kubeconfig), "--pool-name", "mock-pool",
             "--pool-namespace", namespace, "--grpc-port", str(lw_port), "--grpc-health-port", str(lw_health),
             "--metrics-port", str(lw_metrics), "--secure-serving=false", "--health-checking"],
            env, tmp_path / "lwepp.log",
        ),
        start(
            [str(Path(sys.executable).parent / "toposerve"), "router", "--port", str(ts_port),
             "--backends", ",".join(f"http://{ep}" for ep in pool), "--epp-port", str(ts_epp),
             "--epp-health-port", str(ts_health), "--probe-interval", "0.5"],
            env, tmp_path / "toposerve.log",
        ),
    ]  # fmt: skip
    try:
        ext = pr.EXT_PROC_SERVICE

        def both_ready() -> bool:
            lw = run(lw_health, lambda ch: health(ch, pr.LWEPP_HEALTH)) == "SERVING"
            ts = run(ts_health, lambda ch: health(ch, pr.READINESS)) == "SERVING"
            # lwepp learns its pods after its pool: ready once it routes
            routes = lw and run(lw_port, lambda ch: route(ch, chat())).kind == "route"
            return bool(lw and ts and routes)

        wait_for(both_ready, "both pickers ready and lwepp routing", timeout=120, every=1.0)
        pickers = {"toposerve": ts_epp, "lwepp": lw_port}

        def each(fn: Any) -> dict[str, Any]:
            return {name: run(port, fn) for name, port in pickers.items()}

        body, big = chat(text="hello"), chat(text="y" * 150_000)
        for label, answers in {
            "headers then body": each(lambda ch: route(ch, body)),
            "body in 7 chunks": each(lambda ch: route(ch, big, chunks=7)),
        }.items():
            for who, a in answers.items():
                sent = big if "chunks" in label else body
                assert a.kind == "route", (label, who, a)
                assert a.header == a.metadata and a.endpoints[0] in pool, (label, who, a.header)
                assert set(a.endpoints) <= set(pool), (label, who)
                assert a.body == sent and a.eos, (label, who)
                pieces = [
                    m.request_body.response.body_mutation.streamed_response.body
                    for m in a.messages
                    if m.WhichOneof("response") == "request_body"
                ]
                assert all(len(p) <= pr.BODY_CHUNK for p in pieces), (label, who)
                # the response path: headers answered, the body echoed to its end
                kinds = [m.WhichOneof("response") for m in a.messages]
                assert kinds[-2:] == ["response_headers", "response_body"], (label, who, kinds)
                echoed = a.messages[-1].response_body.response.body_mutation.streamed_response
                assert (echoed.body, echoed.end_of_stream) == (b"data: [DONE]\n\n", True), (label, who)

        for who, a in each(lambda ch: route(ch, None)).items():  # bodiless
            assert a.kind == "route" and a.header == a.metadata and a.endpoints[0] in pool, (who, a)

        for target in pool:  # the subset hint, as ip:port and as a bare IP
            for subset in ([target], target.rsplit(":", 1)[0]):
                for who, a in each(lambda ch, s=subset: route(ch, body, subset=s)).items():
                    assert a.kind == "route" and a.endpoints == [target], (who, subset, a.endpoints)

        # No eligible endpoint: the proposal's 503 (toposerve); lwepp ends the stream with the
        # picker's error instead (pkg/lwepp/handlers/server.go: codes.Internal).
        none = each(lambda ch: route(ch, body, subset=["10.255.255.1:8000"]))
        assert none["toposerve"].kind == "immediate" and none["toposerve"].status == 503
        assert none["lwepp"].kind == "error" and "INTERNAL" in none["lwepp"].body.decode()

        # gRPC health: the ext_proc service name is served on both ext_proc ports.
        for who, port in pickers.items():
            assert run(port, lambda ch: health(ch, ext)) == "SERVING", who
        assert run(ts_health, lambda ch: health(ch, pr.LIVENESS)) == "SERVING"
        assert run(ts_health, lambda ch: health(ch, pr.LWEPP_HEALTH)) == "SERVING"
        assert run(lw_health, lambda ch: health(ch, pr.LIVENESS)) == "NOT_FOUND"  # lwepp: not served
        assert run(lw_health, lambda ch: health(ch, pr.READINESS)) == "NOT_FOUND"
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        for log in ("lwepp.log", "toposerve.log"):
            print(f"--- {log}\n" + (tmp_path / log).read_text(errors="replace")[-3000:])
