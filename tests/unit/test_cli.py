"""The offline CLI: every example plans and renders; bad input is one line naming the field, exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from toposerve.cli import main

from .conftest import EXAMPLES

MIN = """apiVersion: toposerve.io/v1alpha1
kind: LLMDeployment
metadata: {name: llama-70b}
spec:
  model: {name: meta-llama/Llama-3.1-70B-Instruct, dtype: bf16, maxContextLength: 131072}
  placement: {gpuTypes: [H100, A100-80GB]}
"""


def run(tmp_path: Path, text: str, *args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    f = tmp_path / "in.yaml"
    f.write_text(text)
    code = main([args[0], "-f", str(f), *args[1:]])
    out, err = capsys.readouterr()
    return code, out, err


def test_examples_exist() -> None:
    names = {p.stem for p in EXAMPLES}
    assert {"quickstart", "llama-70b-h100", "llama-405b-multinode", "heterogeneous", "mixtral-moe-ep",
            "long-context", "batch-spot"} <= names  # fmt: skip


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_every_example_plans_as_json_and_renders(example: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "-f", str(example), "-o", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    for d in data["deployments"]:
        assert d["pools"] and all(p["fits"] for p in d["pools"]), d
        for p in d["pools"]:
            for key in ("gpuType", "tensorParallel", "pipelineParallel", "contextParallel", "expertParallel",
                        "dataParallel", "gpusPerReplica", "nodesPerReplica", "weightsGiBPerGPU",
                        "kvCacheGiBPerGPU", "kvCacheTokensPerReplica", "fits", "costPerHour", "vllmArgs",
                        "alternatives"):  # fmt: skip
                assert key in p, key
    assert main(["render", "-f", str(example)]) == 0
    docs = [d for d in yaml.safe_load_all(capsys.readouterr().out) if d]
    assert {d["kind"] for d in docs} >= {"Service", "PodDisruptionBudget"}
    assert any(d["kind"] in ("Deployment", "LeaderWorkerSet") for d in docs)


def test_render_prints_the_autoscaler_the_operator_would_apply(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Like helm template: hpa and keda modes' HPA / ScaledObject are children the operator applies."""
    hpa = MIN + "  autoscaling: {enabled: true, mode: hpa, maxReplicas: 6}\n"
    code, out, err = run(tmp_path, hpa, "render", capsys=capsys)
    assert code == 0 and err == ""
    (h,) = [d for d in yaml.safe_load_all(out) if d and d["kind"] == "HorizontalPodAutoscaler"]
    assert h["spec"]["maxReplicas"] == 6 and h["spec"]["scaleTargetRef"]["kind"] == "LLMDeployment"
    keda = MIN + "  autoscaling: {enabled: true, mode: keda}\n"
    code, out, err = run(tmp_path, keda, "render", capsys=capsys)
    assert code == 0 and "PrometheusRequired" in err and "prometheusUrl" in err
    config = tmp_path / "config.yaml"
    config.write_text("prometheusUrl: http://prometheus.monitoring:9090\n")
    code, out, err = run(tmp_path, keda, "render", "--config", str(config), capsys=capsys)
    assert code == 0 and err == ""
    assert [d["kind"] for d in yaml.safe_load_all(out) if d and d["kind"] == "ScaledObject"] == [
        "ScaledObject"
    ]


def test_minimal_manifest_plans_tp4_on_h100(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(tmp_path, MIN, "plan", "-o", "json", capsys=capsys)
    assert code == 0
    (pool,) = json.loads(out)["deployments"][0]["pools"]
    assert (pool["gpuType"], pool["tensorParallel"], pool["pipelineParallel"]) == ("H100", 4, 1)


def test_table_explains_rejected_types(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = MIN.replace("[H100, A100-80GB]", "[L4, H100]").replace(
        "placement:", "parallelism: {pipeline: 1}\n  placement:"
    )
    code, out, _ = run(tmp_path, text, "plan", capsys=capsys)
    assert code == 0
    assert "H100" in out.splitlines()[1] and "skipped L4" in out


BAD = [
    ("model: {name: x, dtype: bf17}", "spec.model.dtype"),
    ("model: {name: meta-llama/Llama-3.1-8B-Instruct}\n  replicas: -1", "spec.replicas"),
    ("model: {name: meta-llama/Llama-3.1-8B-Instruct}\n  replicas: '3'", "spec.replicas"),
    ("model: {name: meta-llama/Llama-3.1-8B-Instruct}\n  colour: blue", "spec.colour"),
    ("model: {name: acme/unknown}", "spec.model.architecture"),
    (
        "model: {name: meta-llama/Llama-3.1-8B-Instruct}\n  parallelism: {tensor: 3}",
        "spec.parallelism.tensor",
    ),
    (
        "model: {name: meta-llama/Llama-3.1-8B-Instruct}\n  parallelism: {tensor: 0}",
        "spec.parallelism.tensor",
    ),
    (
        "model: {name: meta-llama/Llama-3.1-8B-Instruct}\n  parallelism: {expert: 2}",
        "spec.parallelism.expert",
    ),
    (
        "model: {name: meta-llama/Llama-3.1-8B-Instruct}\n  autoscaling: {minReplicas: 5, maxReplicas: 2}",
        "spec.autoscaling.minReplicas",  # where the API server's CEL rule names it (fieldPath)
    ),
    (
        "model: {name: meta-llama/Llama-3.1-8B-Instruct}\n  autoscaling: {enabled: true, mode: keda, warmStandby: 1}",
        "spec.autoscaling.warmStandby",
    ),
    (
        "model: {name: meta-llama/Llama-3.1-8B-Instruct, cache: {type: pvc}}",
        "spec.model.cache.claimName",
    ),
    (
        "model: {name: meta-llama/Llama-3.1-8B-Instruct}\n  placement: {gpuTypes: [H100]}\n"
        "  pools: [{name: a, gpuTypes: [H100]}]",
        "spec.pools",
    ),
    (
        "model: {name: meta-llama/Llama-3.1-8B-Instruct}\n  pools: [{name: a, gpuTypes: [H100]}, {name: a, gpuTypes: [L4]}]",
        "spec.pools",
    ),
    (
        "model: {name: meta-llama/Llama-3.1-8B-Instruct}\n  placement: {gpuTypes: [H100, H1OO]}",
        "spec.placement.gpuTypes[1]",
    ),
    ("placement: {gpuTypes: [H100]}", "spec.model"),
]


@pytest.mark.parametrize(("body", "field"), BAD)
def test_bad_input_is_one_line_naming_the_field(
    body: str, field: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = (
        f"apiVersion: toposerve.io/v1alpha1\nkind: LLMDeployment\nmetadata: {{name: bad}}\nspec:\n  {body}\n"
    )
    code, out, err = run(tmp_path, text, "plan", capsys=capsys)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert f"{field}: " in err and "Traceback" not in err, err


def test_malformed_yaml_and_impossible_fit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(tmp_path, "spec: [unclosed", "plan", capsys=capsys)
    assert code == 2 and "malformed YAML" in err and "line" in err
    huge = MIN.replace("Llama-3.1-70B", "Llama-3.1-405B").replace("[H100, A100-80GB]", "[L4]")
    huge = huge.replace("placement:", "parallelism: {pipeline: 1}\n  placement:")
    code, _, err = run(tmp_path, huge, "render", capsys=capsys)
    assert code == 2 and "spec.placement.gpuTypes" in err and "no acceptable GPU type fits" in err


def test_console_script_exit_codes() -> None:
    ok = subprocess.run([sys.executable, "-m", "toposerve.cli", "--version"], capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.startswith("toposerve ")
    crd = subprocess.run([sys.executable, "-m", "toposerve.cli", "crd"], capture_output=True, text=True)
    assert crd.returncode == 0 and "kind: CustomResourceDefinition" in crd.stdout
    bad = subprocess.run([sys.executable, "-m", "toposerve.cli", "plan", "-f", "/nonexistent.yaml"],
                         capture_output=True, text=True)  # fmt: skip
    assert bad.returncode == 2 and "/nonexistent.yaml" in bad.stderr and "Traceback" not in bad.stderr
