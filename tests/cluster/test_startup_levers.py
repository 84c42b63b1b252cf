"""Issue 25's start-up levers on the real local cluster: mock engines going through vLLM's start-up
phases (operatorConfig.mockStartupScale, docs/mock-engine.md "Start-up") with a host-path model
cache. The first replica downloads and compiles; its replacement, on the same cache, neither
downloads nor compiles (the cached graphs instead), as vLLM does with HF_HOME and VLLM_CACHE_ROOT
on a kept cache; the operator measures both start-ups (status.pools[].startup)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster.conftest import ROOT, STATE, Cluster, wait_for
from tests.cluster.operator_harness import (
    Operator,
    apply,
    get_llmd,
    running_operator,
    wait_condition,
)
from tests.unit.test_mock_startup_render import mock_config
from toposerve.mockengine.startup import StartupModel
from toposerve.mockengine.startup import plan as startup_plan

pytestmark = pytest.mark.cluster
SCALE = 0.02  # an 8B model: ~7 s cold (download 32 s + load 8 s + compile 240 s + graphs 60 s, x 0.02)


@pytest.fixture
def startup_operator(cluster: Cluster, tmp_path: Path) -> Iterator[Operator]:
    with running_operator(cluster, tmp_path, {"mockStartupScale": SCALE}, "--resync", "10") as op:
        yield op


def _engines(cluster: Cluster, namespace: str) -> list[Any]:
    pods = cluster.core.list_namespaced_pod(
        namespace, label_selector="toposerve.io/deployment=quickstart,app.kubernetes.io/component=engine"
    ).items
    return [p for p in pods if not p.metadata.deletion_timestamp]


def _ready(pod: Any) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])


def _modelled(pod: Any) -> StartupModel:
    """The start-up the renderer gave this pod's mock (its args, read by the mock's own parser)."""
    (c,) = [c for c in pod.spec.containers if c.args and "--model" in c.args]
    return mock_config(c.args).startup


def _log(namespace: str, pod: str) -> str:
    """The engine's output as the pod runner keeps it (STATE/pods/<ns>_<pod>_<container>.log)."""
    return "".join(p.read_text(errors="replace") for p in (STATE / "pods").glob(f"{namespace}_{pod}_*.log"))


def test_a_kept_model_cache_skips_the_download_and_the_compile_on_the_next_start(
    cluster: Cluster, namespace: str, startup_operator: Operator, tmp_path: Path
) -> None:
    cache = tmp_path / "models"
    cache.mkdir()
    manifest = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    manifest["spec"].update(engine="mock", replicas=1)
    manifest["spec"]["model"]["cache"] = {"type": "host-path", "hostPath": str(cache)}
    assert apply(cluster, namespace, manifest).returncode == 0
    wait_condition(cluster, namespace, "quickstart", "Ready", "True", timeout=180)
    (first,) = _engines(cluster, namespace)
    cold = _log(namespace, first.metadata.name)
    assert "Downloaded" in cold and "torch.compile took" in cold and "Graph capturing finished" in cold, cold[
        -2000:
    ]
    assert "from the cache" not in cold
    # the caches are where vLLM keeps them, on the model cache the pod mounted
    assert list(cache.glob("hf/hub/models--*")) and list(cache.glob("vllm/torch_compile_cache/*"))

    cluster.core.delete_namespaced_pod(first.metadata.name, namespace, grace_period_seconds=5)
    second = wait_for(
        lambda: (
            (
                ps := [
                    p
                    for p in _engines(cluster, namespace)
                    if p.metadata.name != first.metadata.name and _ready(p)
                ]
            )
            and ps[0]
        ),
        "the replacement Ready",
        timeout=180,
    )
    warm = _log(namespace, second.metadata.name)
    assert "Directly load the compiled graph(s)" in warm and "Loading weights took" in warm, warm[-2000:]
    assert "Downloaded" not in warm and "torch.compile took" not in warm

    def measured() -> dict[str, Any] | None:
        pools = (get_llmd(cluster, namespace, "quickstart").get("status") or {}).get("pools") or []
        st = (pools[0].get("startup") or {}) if pools else {}
        return st if st.get("samples", 0) >= 2 else None

    st = wait_for(measured, "two start-ups measured in status.pools[0].startup", timeout=60)
    # a replica cannot be Ready before its phases are over: the cold one took at least the modelled
    # download + load + compile + graphs (a lower bound, not a timing race)
    cold_s = sum(ph.seconds for ph in startup_plan(_modelled(first), False, False))
    assert cold_s > 1.0
    assert max(r["loadingSeconds"] for r in st["recent"]) >= cold_s * 0.9, st
    print("measured start-ups (cold, warm):", [r["loadingSeconds"] for r in st["recent"]])


def test_prefetch_warms_the_pools_nodes_so_the_first_replica_downloads_nothing(
    cluster: Cluster, namespace: str, startup_operator: Operator, tmp_path: Path
) -> None:
    """model.cache.prefetch: the DaemonSet's pods (one per node the pool may use: a mock pool may use
    any) download the weights into the host-path cache before any replica exists; the first replica
    then only loads, compiles (nothing compiled them yet) and captures graphs."""
    cache = tmp_path / "models"
    cache.mkdir()
    manifest = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    manifest["spec"].update(engine="mock", replicas=0)
    manifest["spec"]["model"]["cache"] = {"type": "host-path", "hostPath": str(cache), "prefetch": True}
    assert apply(cluster, namespace, manifest).returncode == 0

    def warm() -> Any:
        for ds in cluster.apps.list_namespaced_daemon_set(namespace).items:
            st = ds.status
            if st and st.desired_number_scheduled and st.number_ready == st.desired_number_scheduled:
                return ds
        return None

    ds = wait_for(warm, "every prefetch pod Ready", timeout=240)
    assert ds.metadata.name.endswith("-prefetch") and ds.status.desired_number_scheduled >= 1
    assert list(cache.glob("hf/hub/models--*/.toposerve-mock-weights"))
    assert not list(cache.glob("vllm/torch_compile_cache/*"))  # compiling needs the engine
    assert _engines(cluster, namespace) == []  # no replica did it

    manifest["spec"]["replicas"] = 1
    assert apply(cluster, namespace, manifest).returncode == 0
    wait_condition(cluster, namespace, "quickstart", "Ready", "True", timeout=180)
    (first,) = _engines(cluster, namespace)
    log = _log(namespace, first.metadata.name)
    assert "Loading weights took" in log and "torch.compile took" in log, log[-2000:]
    assert "Downloaded" not in log
