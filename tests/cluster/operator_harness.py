"""Run the real operator (`toposerve run`) as a process against the local cluster, for the tests."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster.conftest import ROOT, Cluster, kubectl, wait_for

API = ("toposerve.io", "v1alpha1", "llmdeployments")


class Operator:
    """A `toposerve run` subprocess that can be killed and restarted (crash tests)."""

    def __init__(self, cluster: Cluster, log: Path, *args: str) -> None:
        self.cluster = cluster
        self.log = log
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, "KUBECONFIG": str(self.cluster.kubeconfig)}
        out = self.log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "toposerve.cli", "run", "--metrics-port", "0", *self.args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )

    def kill(self) -> None:
        """SIGKILL: no cleanup, like a node dying or an OOM kill."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def install_crd(cluster: Cluster) -> None:
    kubectl(cluster, "apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
    kubectl(
        cluster, "wait", "--for=condition=Established", "crd/llmdeployments.toposerve.io", "--timeout=60s"
    )


@contextlib.contextmanager
def running_operator(
    cluster: Cluster, tmp_path: Path, config: dict[str, Any] | None, *args: str, tail: int = 40
) -> Iterator[Operator]:
    """The CRD installed, then `toposerve run` with `config` (the operator config, written to a
    file) and `args`; stopped at the end, with the last `tail` lines of its log printed."""
    install_crd(cluster)
    if config is not None:
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        args = (*args, "--config", str(path))
    op = Operator(cluster, tmp_path / "operator.log", *args)
    op.start()
    try:
        yield op
    finally:
        op.stop()
        print(f"--- operator log (last lines)\n{op.tail(tail)}")


@pytest.fixture
def operator(cluster: Cluster, tmp_path: Path) -> Iterator[Operator]:
    install_crd(cluster)
    op = Operator(
        cluster,
        tmp_path / "operator.log",
        "--fallback-after",
        "5",
        "--resync",
        "5",
        "--return-cooldown",
        "10",
    )
    op.start()
    yield op
    op.stop()
    print(f"--- operator log (last lines)\n{op.tail()}")


def apply(
    cluster: Cluster, namespace: str, manifest: dict[str, Any] | str
) -> subprocess.CompletedProcess[str]:
    text = manifest if isinstance(manifest, str) else yaml.safe_dump(manifest)
    return kubectl(cluster, "apply", "-n", namespace, "-f", "-", stdin=text, check=False)


def get_llmd(cluster: Cluster, namespace: str, name: str) -> dict[str, Any]:
    obj: dict[str, Any] = cluster.custom.get_namespaced_custom_object(*API[:2], namespace, API[2], name)
    return obj if isinstance(obj, dict) else json.loads(json.dumps(obj))


def condition(obj: dict[str, Any], kind: str) -> dict[str, Any] | None:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == kind:
            return dict(c)
    return None


def wait_observed(cluster: Cluster, namespace: str, name: str, timeout: float = 90) -> dict[str, Any]:
    """Wait until the operator has written status for the current generation."""

    def done() -> dict[str, Any] | None:
        obj = get_llmd(cluster, namespace, name)
        st = obj.get("status") or {}
        return obj if st.get("observedGeneration") == obj["metadata"]["generation"] else None

    return wait_for(done, f"status of {namespace}/{name} for its generation", timeout=timeout)


def wait_condition(
    cluster: Cluster, namespace: str, name: str, kind: str, status: str, timeout: float = 120
) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        obj = get_llmd(cluster, namespace, name)
        c = condition(obj, kind)
        gen_ok = (obj.get("status") or {}).get("observedGeneration") == obj["metadata"]["generation"]
        return obj if gen_ok and c and c["status"] == status else None

    return wait_for(done, f"{kind}={status} on {namespace}/{name}", timeout=timeout)


def _component(obj: dict[str, Any]) -> str:
    return str((obj["metadata"].get("labels") or {}).get("app.kubernetes.io/component", ""))


def children(cluster: Cluster, namespace: str, name: str) -> dict[str, list[dict[str, Any]]]:
    sel = f"toposerve.io/deployment={name}"
    out = {}
    for kind in ("deployments", "services", "poddisruptionbudgets", "pods"):
        res = kubectl(cluster, "get", kind, "-n", namespace, "-l", sel, "-o", "json")
        out[kind] = json.loads(res.stdout)["items"]
    # The router's Deployment is listed apart, so "deployments" are the serving workloads only.
    out["routers"] = [d for d in out["deployments"] if _component(d) == "router"]
    out["deployments"] = [d for d in out["deployments"] if _component(d) != "router"]
    lws = kubectl(cluster, "get", "leaderworkersets", "-n", namespace, "-l", sel, "-o", "json", check=False)
    out["leaderworkersets"] = json.loads(lws.stdout)["items"] if lws.returncode == 0 else []
    return out


def events(cluster: Cluster, namespace: str, name: str) -> list[dict[str, Any]]:
    res = kubectl(cluster, "get", "events", "-n", namespace, "--field-selector",
                  f"involvedObject.name={name},involvedObject.kind=LLMDeployment", "-o", "json")  # fmt: skip
    return list(json.loads(res.stdout)["items"])
