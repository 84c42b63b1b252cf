"""Fixtures for tests against the real local cluster (hack/cluster, docs/local-cluster.md).

The session fixture reuses a running cluster or starts one with hack/cluster/up.sh (and then
stops it at the end); each test gets its own namespace, deleted afterwards. Every test here is
marked ``cluster`` (``pytestmark`` in each module); TOPOSERVE_SKIP_CLUSTER=1 skips them, and nothing else does.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from toposerve.dev import fakenvml

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "hack" / "cluster"
STATE = Path(os.environ.get("CLUSTER_STATE", ROOT / ".cluster"))
T = TypeVar("T")


def wait_for(fn: Callable[[], T | None], what: str, timeout: float = 120.0, every: float = 0.5) -> T:
    """Poll ``fn`` until it returns something truthy; fail naming ``what`` if it never does.

    The timeout only bounds a hang: it is generous and never part of what a test asserts.
    """
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(every)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


@dataclass
class Cluster:
    """Handles to the running local cluster."""

    kubeconfig: Path
    prometheus_url: str
    profile: str  # fleet profile (hack/cluster/fleet.yaml): gpu, nogpu, gke, eks, onprem, gb200
    api: Any  # kubernetes.client.ApiClient
    core: Any  # CoreV1Api
    apps: Any  # AppsV1Api
    custom: Any  # CustomObjectsApi
    discovery: Any  # DiscoveryV1Api
    extensions: Any  # ApiextensionsV1Api


def _healthy() -> bool:
    return (
        subprocess.run(["bash", str(SCRIPTS / "status.sh")], capture_output=True, check=False).returncode == 0
    )


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    if os.environ.get("TOPOSERVE_SKIP_CLUSTER") == "1":
        pytest.skip("TOPOSERVE_SKIP_CLUSTER=1: cluster tests skipped on request")
    started = False
    if not _healthy():
        subprocess.run(["bash", str(SCRIPTS / "up.sh")], check=True)
        started = True
    kube: Any = importlib.import_module("kubernetes")
    kubeconfig = STATE / "kubeconfig"
    api = kube.config.new_client_from_config(config_file=str(kubeconfig))
    yield Cluster(
        kubeconfig=kubeconfig,
        prometheus_url=(STATE / "prometheus-url").read_text().strip(),
        profile=(STATE / "profile").read_text().strip() if (STATE / "profile").exists() else "gpu",
        api=api,
        core=kube.client.CoreV1Api(api),
        apps=kube.client.AppsV1Api(api),
        custom=kube.client.CustomObjectsApi(api),
        discovery=kube.client.DiscoveryV1Api(api),
        extensions=kube.client.ApiextensionsV1Api(api),
    )
    api.close()
    if started and os.environ.get("TOPOSERVE_KEEP_CLUSTER") != "1":
        subprocess.run(["bash", str(SCRIPTS / "down.sh")], check=True)


@pytest.fixture
def namespace(cluster: Cluster, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace for one test (the ServiceAccount admission needs its default SA first)."""
    base = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower().replace("_", "-"))[:40].strip("-")
    name = f"{base}-{uuid.uuid4().hex[:6]}"
    cluster.core.create_namespace({"metadata": {"name": name, "labels": {"toposerve.dev/test": "true"}}})

    def has_default_sa() -> bool:
        return any(
            sa.metadata.name == "default" for sa in cluster.core.list_namespaced_service_account(name).items
        )

    wait_for(has_default_sa, f"default ServiceAccount in {name}")
    yield name
    cluster.core.delete_namespace(name)


def kubectl(
    cluster: Cluster, *args: str, stdin: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run the cluster's own kubectl (built with the binaries) against the cluster."""
    kc = subprocess.run(
        ["bash", "-c", f'source "{SCRIPTS}/versions.sh"; echo "$CLUSTER_BIN/kubectl"'],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    return subprocess.run(
        [kc, "--kubeconfig", str(cluster.kubeconfig), *args],
        input=stdin,
        capture_output=True,
        text=True,
        check=check,
    )


@pytest.fixture
def gpu_cluster(cluster: Cluster) -> Cluster:
    """The cluster, for tests that need the GPU fleet (skipped, saying why, on the nogpu profile)."""
    if cluster.profile != "gpu":
        pytest.skip(f"needs the gpu fleet profile; the running cluster has {cluster.profile!r}")
    return cluster


def start_health_agent(cluster: Cluster, node: str, state: Path, log: Path) -> subprocess.Popen[bytes]:
    """``toposerve health-agent`` for ``node`` as a local process, reading the GPUs described in
    ``state`` through the fake libnvidia-ml.so.1 (sampling every 0.2 s, no metrics port)."""
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig), "LD_LIBRARY_PATH": str(fakenvml.build()),
           fakenvml.STATE_ENV: str(state)}  # fmt: skip
    return subprocess.Popen(
        [sys.executable, "-m", "toposerve.cli", "health-agent", f"--node-name={node}", "--interval=0.2",
         "--metrics-port=0"],
        env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip
