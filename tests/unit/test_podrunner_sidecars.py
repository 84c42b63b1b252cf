"""The local pod runner runs native sidecars as the kubelet does (kubernetes.io/docs "Sidecar
Containers"): start order gated on each sidecar's startup, pod readiness over all containers,
main containers stopped before sidecars. The rule is pure (`startable`); the runner is then
checked with real processes on loopback (no cluster: no network namespace, no API server)."""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from toposerve.dev.podrunner import PodRunner, runner_containers, startable

IMAGE = "ghcr.io/toposerve/toposerve:dev"


def test_sidecars_start_one_after_another_then_the_main_containers() -> None:
    order = [("s1", True), ("s2", True), ("engine", False), ("other", False)]
    assert startable(order, {}, []) == ["s1"]
    assert startable(order, {"s1": False}, ["s1"]) == []  # launched, not started yet
    assert startable(order, {"s1": True}, ["s1"]) == ["s2"]
    assert startable(order, {"s1": True, "s2": True}, ["s1", "s2"]) == ["engine", "other"]
    assert startable(order, {"s1": True, "s2": True}, ["s1", "s2", "engine", "other"]) == []
    assert startable([("engine", False)], {}, []) == ["engine"]  # no sidecars: as before


@given(st.lists(st.booleans(), min_size=1, max_size=6), st.data())
def test_no_main_container_starts_before_every_sidecar_has_started(
    kinds: list[bool], data: st.DataObject
) -> None:
    order = [(f"c{i}", k) for i, k in enumerate(sorted(kinds, key=lambda k: not k))]
    started = {n: data.draw(st.booleans()) for n, sc in order if sc}
    running = [n for n, _ in order if data.draw(st.booleans())]
    for name in startable(order, started, running):
        before = order[: [n for n, _ in order].index(name)]
        assert all(started.get(n, False) and n in running for n, sc in before if sc)
        assert name not in running


def test_only_restart_always_init_containers_of_the_project_image_are_run() -> None:
    spec = {
        "initContainers": [
            {"name": "stage", "image": IMAGE, "restartPolicy": "Always"},
            {"name": "once", "image": IMAGE},  # a run-to-completion init container: not simulated
            {"name": "other", "image": "busybox", "restartPolicy": "Always"},
        ],
        "containers": [{"name": "engine", "image": IMAGE}, {"name": "vllm", "image": "vllm/vllm-openai"}],
    }
    assert [(c["name"], sc) for c, sc in runner_containers(spec)] == [("stage", True), ("engine", False)]


class FakeApi:
    """The CoreV1Api calls the runner makes for a pod without in-cluster config."""

    def __init__(self) -> None:
        self.annotations: dict[str, str] = {}

    def patch_namespaced_pod(self, name: str, namespace: str, body: dict[str, Any]) -> None:
        self.annotations.update(body["metadata"]["annotations"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_engine_starts_after_its_sidecar_answers_and_the_pod_is_ready_with_both(tmp_path: Path) -> None:
    port = _free_port()
    flag = tmp_path / "engine-saw-the-sidecar"
    # the main container fails (and would be restarted) if the sidecar is not serving yet
    engine = (
        "import urllib.request, time; "
        f"urllib.request.urlopen('http://127.0.0.1:{port}/', timeout=2); "
        f"open({str(flag)!r}, 'w').write('ok'); time.sleep(600)"
    )
    probe = {"httpGet": {"path": "/", "port": "stage"}, "periodSeconds": 1}
    pod = {
        "metadata": {"uid": "u1", "name": "p", "namespace": "ns"},
        "spec": {
            "nodeName": "n1",
            "terminationGracePeriodSeconds": 2,
            "initContainers": [
                {
                    "name": "stage",
                    "image": IMAGE,
                    "restartPolicy": "Always",
                    # slow to come up, as the stager (imports aiohttp) is
                    "command": [
                        sys.executable,
                        "-c",
                        f"import time, runpy, sys; time.sleep(1); sys.argv = ['x', '{port}', '--bind', '127.0.0.1']; runpy.run_module('http.server', run_name='__main__')",
                    ],
                    "ports": [{"name": "stage", "containerPort": port}],
                    "startupProbe": probe,
                    "readinessProbe": probe,
                }
            ],
            "containers": [{"name": "engine", "image": IMAGE, "command": [sys.executable, "-c", engine]}],
        },
        "status": {"podIP": "127.0.0.1", "phase": "Running"},
    }
    api = FakeApi()
    runner = PodRunner(api, None, tmp_path, Path(sys.executable).parent, None)
    try:
        runner.handle("ADDED", pod)
        assert runner.procs[("u1", "engine")].waiting  # not launched before the sidecar started
        for _ in range(300):  # bounded: each tick probes; no timing is asserted
            runner.tick()
            if flag.exists() and api.annotations.get("toposerve.dev/runner-ready") == "true":
                break
            time.sleep(0.05)
        assert flag.read_text() == "ok"
        assert api.annotations["toposerve.dev/runner-ready"] == "true"
        assert api.annotations["toposerve.dev/runner-restarts"] == "0"  # the engine never failed
        assert runner.procs[("u1", "stage")].started_ok
    finally:
        runner.stop_all()
