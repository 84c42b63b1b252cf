"""Mock-engine pods with a modelled start-up (operatorConfig.mockStartupScale): the flags the
renderer gives them are what the mock's own parser reads, scaled from the same estimate that
sizes vLLM's start-up probe, and the pods keep weights and compiled graphs where vLLM does."""

from __future__ import annotations

import argparse
from typing import Any

import pytest

from tests.unit.conftest import make_spec
from toposerve.api.config import OperatorConfig
from toposerve.mockengine.cli import add_arguments, config_from_args
from toposerve.mockengine.server import EngineConfig
from toposerve.mockengine.startup import plan as startup_plan
from toposerve.planner.plan import plan_deployment
from toposerve.render.objects import render_pool, startup_seconds

L8 = "meta-llama/Llama-3.1-8B-Instruct"


def engine_pod(config: OperatorConfig, **spec_extra: Any) -> tuple[dict[str, Any], Any, Any]:
    spec = make_spec(L8, 8192, ["H100"], engine="mock", **spec_extra)
    dplan = plan_deployment("d", spec, config)
    (pool,) = dplan.pools
    (workload,) = [o for o in render_pool("d", "ns", spec, dplan, pool, config) if o["kind"] == "Deployment"]
    return workload["spec"]["template"]["spec"], pool, spec


def mock_config(args: list[str]) -> EngineConfig:
    p = argparse.ArgumentParser()
    add_arguments(p)
    cfg = config_from_args(p.parse_args(args))
    assert isinstance(cfg, EngineConfig)
    return cfg


def test_by_default_mock_pods_start_at_once_and_mount_no_cache() -> None:
    pod, _, _ = engine_pod(OperatorConfig())
    (c,) = pod["containers"]
    assert not [a for a in c["args"] if a.startswith(("--startup", "--compile", "--graph"))]
    assert "models" not in {v["name"] for v in pod["volumes"]}
    assert not mock_config(c["args"]).startup.modelled


@pytest.mark.parametrize("scale", [0.01, 0.1])
def test_a_startup_scale_models_vllms_phases_at_that_fraction_of_the_probe_estimate(scale: float) -> None:
    config = OperatorConfig.model_validate({"mockStartupScale": scale})
    pod, pool, spec = engine_pod(
        config, model={"cache": {"type": "host-path", "hostPath": "/var/lib/models"}}
    )
    (c,) = pod["containers"]
    cfg = mock_config(c["args"])
    cold = sum(p.seconds for p in startup_plan(cfg.startup, False, False))
    warm = sum(p.seconds for p in startup_plan(cfg.startup, True, True))
    # the probe's estimate is (download + load + compile and graphs) x 1.5 margin
    assert cold == pytest.approx(startup_seconds(pool, spec, config) / 1.5 * scale, rel=0.01)
    assert warm < cold / 2  # a kept cache skips the download and most of the compile
    # where vLLM keeps them, on the model cache the pod mounts (a host path here)
    env = {e["name"]: e.get("value") for e in c.get("env", [])}
    assert (env["HF_HOME"], env["VLLM_CACHE_ROOT"]) == ("/models/hf", "/models/vllm")
    assert "HF_TOKEN" not in env
    (models,) = [v for v in pod["volumes"] if v["name"] == "models"]
    assert models["hostPath"]["path"] == "/var/lib/models"
    assert {"name": "models", "mountPath": "/models"} in c["volumeMounts"]
