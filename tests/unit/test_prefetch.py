"""model.cache.prefetch (render/prefetch.py): a warm-node DaemonSet per pool that follows the
pool's own node constraints exactly, with the model cache and the Hub environment of its engines;
refused for caches it cannot warm; none for the on-demand baseline or multi-node pools."""

from __future__ import annotations

import asyncio
import shlex
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from pydantic import ValidationError

from tests.unit.conftest import make_spec
from toposerve.api.config import OperatorConfig
from toposerve.api.errors import spec_error
from toposerve.api.spec import LLMDeploymentSpec
from toposerve.mockengine.startup import Caches, StartupModel, compile_dir, hub_dir, prefetch
from toposerve.planner.plan import plan_deployment
from toposerve.render.objects import Owner, render_deployment
from toposerve.render.prefetch import HF_PATTERNS, PREFETCH_DONE, hf_download_argv

L8 = "meta-llama/Llama-3.1-8B-Instruct"
HOST = {"type": "host-path", "hostPath": "/mnt/nvme/models"}


def spec(**extra: Any) -> LLMDeploymentSpec:
    extra.setdefault("model", {"cache": {**HOST, "prefetch": True}})
    extra.setdefault("engine", "vllm")
    return make_spec(L8, 8192, ["H100"], replicas=2, **extra)


def kinds(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


def pod(o: dict[str, Any]) -> dict[str, Any]:
    return dict(o["spec"]["template"]["spec"])


def test_prefetch_is_only_for_host_path_caches_and_the_error_names_the_field() -> None:
    for cache in (
        {"type": "pvc", "claimName": "w"},
        {"type": "ephemeral"},
        {"type": "image", "image": "r/w:1"},
    ):
        with pytest.raises(ValidationError, match=r"prefetch needs type host-path"):
            make_spec(L8, 8192, ["H100"], model={"cache": {**cache, "prefetch": True}})
        with pytest.raises(ValidationError) as e:
            make_spec(L8, 8192, ["H100"], model={"cache": {**cache, "prefetch": True}})
        assert str(spec_error(e.value)).startswith("spec.model.cache.prefetch: prefetch needs type host-path")
    assert spec().model.cache.prefetch


def test_the_daemonset_follows_the_pools_nodes_and_keeps_weights_where_vllm_reads_them() -> None:
    s = spec(serving={"hfTokenSecret": "hf"}, placement={"spot": {"enabled": True, "onDemandBaseline": 1}})
    objs = render_deployment("d", "ns", s, plan_deployment("d", s), owner=Owner(name="d", uid="u"))
    (ds,) = kinds(objs, "DaemonSet")  # the spot workload's: its nodes include the baseline's
    (engine_wl,) = [w for w in kinds(objs, "Deployment") if w["metadata"]["name"] == "d-default-h100"]
    kubernetes_validate.validate(ds, "1.35", strict=True)
    assert ds["metadata"]["name"] == "d-default-h100-prefetch"
    assert ds["metadata"]["ownerReferences"] == engine_wl["metadata"]["ownerReferences"]  # pruned, collected
    p, e = pod(ds), pod(engine_wl)
    assert p["affinity"] == {"nodeAffinity": e["affinity"]["nodeAffinity"]}  # no pod (anti-)affinity
    assert p["tolerations"] == e["tolerations"] and p.get("nodeSelector") == e.get("nodeSelector")
    (c,) = p["containers"]
    (ec,) = [x for x in e["containers"] if x["name"] == "engine"]
    assert c["image"] == ec["image"]  # pulling it warms the node's image cache too
    assert "nvidia.com/gpu" not in str(c["resources"])
    assert [v for v in p["volumes"]] == [
        {"name": "models", "hostPath": {"path": "/mnt/nvme/models", "type": "DirectoryOrCreate"}}
    ]
    assert {"name": "models", "mountPath": "/models"} in c["volumeMounts"]
    env = {x["name"]: x for x in c["env"]}
    assert (
        env["HF_HOME"]["value"] == "/models/hf"
        and env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "hf"
    )
    # not a replica: the pool's label is off, so nothing counts it as one, and no Service selects it
    labels = ds["spec"]["template"]["metadata"]["labels"]
    assert "toposerve.io/pool" not in labels and labels["app.kubernetes.io/component"] == "prefetch"
    for svc in kinds(objs, "Service"):
        sel = svc["spec"].get("selector") or {}
        assert not all(labels.get(k) == v for k, v in sel.items()), svc["metadata"]["name"]
    # the download: hf download of what vLLM's loader reads, into the Hub cache, then ready
    script = c["command"][2]
    argv = shlex.split(script.split(" && ")[0])
    assert argv == hf_download_argv(L8) and "--local-dir" not in argv
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "--include"] == list(HF_PATTERNS)
    assert c["readinessProbe"]["exec"]["command"] == ["test", "-f", PREFETCH_DONE]


def test_no_prefetch_without_the_flag_nor_for_multi_node_pools() -> None:
    s = make_spec(L8, 8192, ["H100"], engine="vllm", model={"cache": HOST})
    assert not kinds(render_deployment("d", "ns", s, plan_deployment("d", s)), "DaemonSet")
    big = make_spec(
        "meta-llama/Llama-3.1-405B-Instruct",
        8192,
        ["L4"],
        engine="vllm",
        model={"cache": {**HOST, "prefetch": True}},
    )
    dplan = plan_deployment("d", big)
    if all(p.nodes_per_replica > 1 for p in dplan.pools if p.fits):
        assert not kinds(render_deployment("d", "ns", big, dplan), "DaemonSet")


def test_mock_pools_prefetch_with_the_mocks_modelled_download(tmp_path: Path) -> None:
    config = OperatorConfig.model_validate({"mockStartupScale": 0.01})
    s = spec(engine="mock")
    (ds,) = kinds(render_deployment("d", "ns", s, plan_deployment("d", s, config), config), "DaemonSet")
    (c,) = pod(ds)["containers"]
    assert c["command"] == ["toposerve", "mock-engine"] and c["args"][0] == "--prefetch-only"
    assert "--download-gib-per-s" in c["args"] and c["readinessProbe"]["httpGet"]["path"] == "/health"
    # the modelled download leaves the weights where the engine's own start finds them
    caches = Caches(hub_dir(tmp_path, "m"), compile_dir(tmp_path, "f"))
    model = StartupModel(weights_gib=2, download_gib_per_s=1, load_gib_per_s=1, compile_s=5)
    assert asyncio.run(prefetch(model, caches, 0.0)) is True
    assert caches.weights_cached() and not caches.compile_cached()  # compiling needs a GPU
    assert asyncio.run(prefetch(model, caches, 0.0)) is False
