"""Every vLLM command line toposerve renders is accepted by the pinned vLLM's own CLI parser.

Flags change between vLLM versions (renamed, removed, new choices), and a rejected flag only
shows when a GPU pod crash-loops. These tests plan and render every example and a set of
hand-made specs covering each flag the planner can emit, pull out each `vllm serve` argv and ask
vLLM 0.33.0 itself (hack/vllm/check_args.py in the venv from hack/vllm/venv.sh; no GPU needed).

Run: ``make test-vllm`` (builds the venv on first use: a few minutes, ~6 GB).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.vllm_cli import (
    ROOT,
    VLLM_VERSION,
    VllmResult,
    committed_facts,
    find_vllm_commands,
    live_facts,
    parse_with_vllm,
    serve_argvs_in_script,
)
from toposerve.api.config import OperatorConfig
from toposerve.api.manifest import load_manifests
from toposerve.api.spec import Dtype, LLMDeploymentSpec
from toposerve.dev import fleet
from toposerve.planner.inventory import Inventory, inventory_from_nodes
from toposerve.planner.plan import plan_deployment
from toposerve.render.objects import render_deployment

pytestmark = pytest.mark.vllm

EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def _runs_vllm(path: Path) -> bool:
    """Examples pinned to the mock engine (engine: mock, for the local cluster) render no vLLM line."""
    return any(d.spec.engine != "mock" for d in load_manifests(path.read_text()))


VLLM_EXAMPLES = [p for p in EXAMPLES if _runs_vllm(p)]
CONFIG = OperatorConfig(auto_engine="vllm")


class VllmRejected(Exception):
    """vLLM refused a rendered command line (the failure a known-bad case expects)."""


def gpu_fleet() -> Inventory:
    """The local cluster's simulated GPU fleet (hack/cluster/fleet.yaml), as the operator sees it."""
    nodes = fleet.nodes(fleet.load(ROOT / "hack" / "cluster" / "fleet.yaml"), "gpu")
    return inventory_from_nodes(nodes, CONFIG.catalog(), CONFIG.label_schemes)


def spec(model: str, **fields: Any) -> LLMDeploymentSpec:
    raw: dict[str, Any] = {"model": {"name": model}, **fields}
    raw["model"].update(fields.pop("model_fields", {}))
    raw.pop("model_fields", None)
    return LLMDeploymentSpec.model_validate(raw)


# Hand-made specs: one per flag or shape the planner can put on a vLLM command line.
SPECS: dict[str, LLMDeploymentSpec] = {
    "fp8-weights": spec("meta-llama/Llama-3.1-70B-Instruct", model_fields={"dtype": "fp8"},
                        placement={"gpuTypes": ["H100"]}),
    "fp8-kv-cache": spec("meta-llama/Llama-3.1-70B-Instruct", model_fields={"kvCacheDtype": "fp8"},
                         placement={"gpuTypes": ["H100"]}),
    "fp8-weights-and-kv": spec("meta-llama/Llama-3.1-8B-Instruct",
                               model_fields={"dtype": "fp8", "kvCacheDtype": "fp8"}),
    "fp16": spec("meta-llama/Llama-3.1-8B-Instruct", model_fields={"dtype": "fp16"},
                 placement={"gpuTypes": ["A100-80GB"]}),
    "int4-awq": spec("meta-llama/Llama-3.1-70B-Instruct",
                     model_fields={"dtype": "int4", "quantization": "awq",
                                   "checkpoint": "hugging-quants/Meta-Llama-3.1-70B-Instruct-AWQ-INT4"},
                     placement={"gpuTypes": ["A100-40GB"]}),
    "int4-gptq": spec("Qwen/Qwen2.5-72B-Instruct", model_fields={"dtype": "int4", "quantization": "gptq",
                                                                 "checkpoint": "Qwen/Qwen2.5-72B-Instruct-GPTQ-Int4"}),
    "int4-checkpoint-detected": spec("Qwen/Qwen2.5-72B-Instruct", model_fields={
        "dtype": "int4", "checkpoint": "Qwen/Qwen2.5-72B-Instruct-AWQ"}),
    "int8-default-quantization": spec("meta-llama/Llama-3.1-8B-Instruct", model_fields={"dtype": "int8"}),
    "multinode-gb200-tp8": spec("meta-llama/Llama-3.1-405B-Instruct",
                                placement={"gpuTypes": ["GB200"], "gpusPerNode": 4}),
    "model-image-cache": spec("Qwen/Qwen2.5-7B-Instruct", model_fields={
        "cache": {"type": "image", "image": "registry.example/qwen:1"}}),
    "moe-expert-parallel": spec("mistralai/Mixtral-8x7B-Instruct-v0.1", parallelism={"tensor": 2, "expert": 2},
                                placement={"gpuTypes": ["H100"]}),
    "moe-deepseek-v3": spec("deepseek-ai/DeepSeek-V3", model_fields={"dtype": "fp8"},
                            placement={"gpuTypes": ["H200"]}),
    "data-parallel": spec("meta-llama/Llama-3.1-8B-Instruct", parallelism={"tensor": 1, "data": 4},
                          placement={"gpuTypes": ["H100"]}),
    "moe-dp-ep": spec("openai/gpt-oss-120b", parallelism={"tensor": 1, "data": 2, "expert": 2},
                      placement={"gpuTypes": ["H100"]}),
    "long-context-cp": spec("meta-llama/Llama-3.1-70B-Instruct", model_fields={"maxContextLength": 131072},
                            parallelism={"context": 2}, placement={"gpuTypes": ["H100"]}),
    "long-context-tier": spec("meta-llama/Llama-3.1-70B-Instruct", model_fields={"maxContextLength": 131072},
                              placement={"tier": "long-context", "gpuTypes": ["H100"]}),
    "multinode-tp8-pp2": spec("meta-llama/Llama-3.1-405B-Instruct", parallelism={"tensor": 8, "pipeline": 2},
                              placement={"gpuTypes": ["H100"], "topologyKey": "nvidia.com/gpu.clique"}),
    "served-name-and-extra-args": spec(
        "Qwen/Qwen2.5-7B-Instruct", model_fields={"servedName": "qwen"},
        serving={"extraArgs": ["--enable-prefix-caching", "--max-num-seqs", "256",
                               "--enable-chunked-prefill", "--trust-remote-code"]},
    ),
    "gpu-memory-utilization": spec("meta-llama/Llama-3.2-3B-Instruct", serving={"gpuMemoryUtilization": 0.85},
                                   placement={"gpuTypes": ["L4"]}),
    "kv-events": spec("meta-llama/Llama-3.1-8B-Instruct", routing={"kvEvents": True}),
    "kv-events-multinode": spec("meta-llama/Llama-3.1-405B-Instruct", routing={"kvEvents": True},
                                parallelism={"tensor": 8, "pipeline": 2},
                                placement={"gpuTypes": ["H100"], "topologyKey": "nvidia.com/gpu.clique"}),
    # LoRA (docs/lora.md): --enable-lora, --max-loras, --max-lora-rank (a Literal of ranks in
    # vLLM's parser), --max-cpu-loras; aliases as more --served-model-name values.
    "lora": spec("meta-llama/Llama-3.1-8B-Instruct", lora={},
                 adapters=[{"name": "sql", "source": "org/sql-lora"}]),
    "lora-aliases": spec("meta-llama/Llama-3.1-8B-Instruct",
                         model_fields={"servedName": "llama", "aliases": ["llama-8b", "default"]},
                         lora={"maxLoras": 4, "maxLoraRank": 320, "maxCpuLoras": 16},
                         adapters=[{"name": "legal", "source": "cache://adapters/legal"}]),
    "lora-multinode": spec("meta-llama/Llama-3.1-405B-Instruct", lora={"maxLoras": 2, "maxLoraRank": 64},
                           model_fields={"aliases": ["llama-405b"]},
                           parallelism={"tensor": 8, "pipeline": 2},
                           placement={"gpuTypes": ["H100"], "topologyKey": "nvidia.com/gpu.clique"}),
}  # fmt: skip


@dataclass(frozen=True)
class Case:
    """One rendered `vllm serve` invocation."""

    id: str
    where: str
    argv: tuple[str, ...]

    def line(self) -> str:
        return "vllm serve " + shlex.join(self.argv)


def _cases(label: str, name: str, s: LLMDeploymentSpec, inventory: Inventory | None) -> list[Case]:
    plan = plan_deployment(name, s, CONFIG, inventory)
    assert plan.engine == "vllm", plan.engine_reason
    assert plan.fits, [p.reason for p in plan.pools]
    commands = find_vllm_commands(render_deployment(name, "default", s, plan, CONFIG))
    assert commands, f"{label}: no vllm serve command rendered"
    return [Case(f"{label}:{i}" if len(commands) > 1 else label, c.where, tuple(c.argv))
            for i, c in enumerate(commands)]  # fmt: skip


def collect() -> list[Case]:
    cases: list[Case] = []
    inventory = gpu_fleet()
    for path in VLLM_EXAMPLES:
        for d in load_manifests(path.read_text()):
            cases += _cases(f"example-{path.stem}-{d.name}", d.name, d.spec, None)
            cases += _cases(f"example-{path.stem}-{d.name}-on-fleet", d.name, d.spec, inventory)
    for label, s in SPECS.items():
        cases += _cases(f"spec-{label}", "llm", s, None)
    return cases


CASES = collect()

# Rendered lines vLLM 0.33.0 is known to reject, by the (flag, value) that causes it, with vLLM's
# exact message. A case that renders the pair is expected to fail with that message (strict: it
# flips to a failure if vLLM accepts it); once the renderer stops emitting the pair the mark no
# longer applies and the case must pass.
_QUANT_CHOICES = committed_facts()["quantization"]["choices"]
KNOWN_REJECTED: dict[tuple[str, str], str] = {
    ("--quantization", "bitsandbytes"): (
        f"ValueError: Unknown quantization method: bitsandbytes. Must be one of {_QUANT_CHOICES}."
    ),
}


def known_rejection(argv: tuple[str, ...]) -> str | None:
    for (flag, value), message in KNOWN_REJECTED.items():
        if any(argv[i] == flag and argv[i + 1] == value for i in range(len(argv) - 1)) or (
            f"{flag}={value}" in argv
        ):
            return message
    return None


def _param(case: Case) -> Any:
    message = known_rejection(case.argv)
    marks = [pytest.mark.xfail(strict=True, raises=VllmRejected, reason=message)] if message else []
    return pytest.param(case, id=case.id, marks=marks)


@pytest.fixture(scope="module")
def verdicts() -> dict[tuple[str, ...], VllmResult]:
    """vLLM's verdict on every distinct rendered argv, from one run of the checker."""
    argvs = sorted({c.argv for c in CASES})
    results = parse_with_vllm([list(a) for a in argvs])
    return {tuple(r["argv"]): r for r in results}


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_vllm_accepts_rendered_command_line(case: Case, verdicts: dict[tuple[str, ...], VllmResult]) -> None:
    verdict = verdicts[case.argv]
    if verdict["ok"]:
        return
    expected = known_rejection(case.argv)
    report = f"{case.where}\n  {case.line()}\n  rejected at {verdict['stage']}: {verdict['error']}"
    if expected is not None and verdict["error"] != expected:
        raise AssertionError(f"rejected, but not with the known message {expected!r}:\n{report}")
    raise VllmRejected(report)


def _vllm_images() -> set[str]:
    images: set[str] = set()
    for path in VLLM_EXAMPLES:
        for d in load_manifests(path.read_text()):
            objs = render_deployment(
                d.name, "default", d.spec, plan_deployment(d.name, d.spec, CONFIG), CONFIG
            )
            for c in find_vllm_commands(objs):
                images.add(c.image)
    return images


def test_rendered_image_is_the_checked_vllm_version() -> None:
    """Checking the lines against 0.33.0 only means something if the pods run 0.33.0."""
    assert _vllm_images() == {f"vllm/vllm-openai:v{VLLM_VERSION}"}


def test_every_example_and_spec_renders_vllm() -> None:
    assert VLLM_EXAMPLES, "no examples found"
    ids = {c.id.split(":")[0] for c in CASES}
    assert {f"spec-{k}" for k in SPECS} <= ids
    assert all(any(i.startswith(f"example-{p.stem}-") for i in ids) for p in VLLM_EXAMPLES)
    # an engine: mock example is one on purpose, with a vLLM twin among SPECS when it shows a flag
    assert len(EXAMPLES) - len(VLLM_EXAMPLES) <= 1, [p.stem for p in EXAMPLES if p not in VLLM_EXAMPLES]


def test_parsed_values_match_what_the_plan_meant(verdicts: dict[tuple[str, ...], VllmResult]) -> None:
    """The parser reads the values we meant (a flag vLLM maps to another dest would show here)."""
    by_id = {c.id: c for c in CASES}
    leader = verdicts[by_id["spec-multinode-tp8-pp2:0"].argv]["values"]
    worker = verdicts[by_id["spec-multinode-tp8-pp2:1"].argv]["values"]
    for multi in (leader, worker):
        assert (multi["tensor_parallel_size"], multi["pipeline_parallel_size"]) == (8, 2)
        assert multi["model"] == "meta-llama/Llama-3.1-405B-Instruct"
        assert multi["nnodes"] == 2 and multi["master_addr"] == "10.0.0.1"
    assert leader["port"] == 8000 and leader["node_rank"] == 0 and not leader["headless"]
    assert worker["node_rank"] == 1 and worker["headless"]
    gb200 = verdicts[by_id["spec-multinode-gb200-tp8:0"].argv]["values"]
    assert (gb200["tensor_parallel_size"], gb200["pipeline_parallel_size"], gb200["nnodes"]) == (8, 1, 2)
    cp = verdicts[by_id["spec-long-context-cp"].argv]["values"]
    assert cp["prefill_context_parallel_size"] == 2 and cp["max_model_len"] == 131072
    ep = verdicts[by_id["spec-moe-expert-parallel"].argv]["values"]
    assert ep["enable_expert_parallel"] is True and ep["tensor_parallel_size"] == 2
    dp = verdicts[by_id["spec-data-parallel"].argv]["values"]
    assert dp["data_parallel_size"] == 4
    fp8 = verdicts[by_id["spec-fp8-weights-and-kv"].argv]["values"]
    assert (fp8["quantization"], fp8["kv_cache_dtype"]) == ("fp8", "fp8")
    awq = verdicts[by_id["spec-int4-awq"].argv]["values"]
    assert awq["quantization"] == "awq"
    named = verdicts[by_id["spec-served-name-and-extra-args"].argv]["values"]
    assert named["served_model_name"] == ["qwen"]
    aliased = verdicts[by_id["spec-lora-aliases"].argv]["values"]
    assert aliased["served_model_name"] == ["llama", "llama-8b", "default"]  # the first labels metrics
    lora_multi = by_id["spec-lora-multinode:0"].argv, by_id["spec-lora-multinode:1"].argv
    for argv in lora_multi:  # every node of a replica builds the LoRA layers
        assert " --enable-lora --max-loras 2 --max-lora-rank 64 --max-cpu-loras 2 " in f" {' '.join(argv)} "


# --- the harness itself -------------------------------------------------------------------------


def test_harness_rejects_a_bogus_flag_and_accepts_a_plain_line() -> None:
    """Negative control: the checker can fail, at each stage, with vLLM's own messages."""
    bogus, bad_dtype, bad_kv, bad_quant, good = parse_with_vllm(
        [
            ["meta-llama/Llama-3.1-8B-Instruct", "--tensor-parallel-size", "2", "--no-such-flag", "1"],
            ["meta-llama/Llama-3.1-8B-Instruct", "--dtype", "bf16"],
            ["meta-llama/Llama-3.1-8B-Instruct", "--kv-cache-dtype", "fp9"],
            ["meta-llama/Llama-3.1-8B-Instruct", "--quantization", "no-such-method"],
            ["meta-llama/Llama-3.1-8B-Instruct", "--tensor-parallel-size", "2"],
        ]
    )
    assert not bogus["ok"] and bogus["stage"] == "parse"
    assert "unrecognized arguments: --no-such-flag 1" in (bogus["error"] or "")
    assert not bad_dtype["ok"] and "invalid choice: 'bf16'" in (bad_dtype["error"] or "")
    assert not bad_kv["ok"] and bad_kv["stage"] == "config" and "fp9" in (bad_kv["error"] or "")
    assert not bad_quant["ok"] and "Unknown quantization method: no-such-method" in (bad_quant["error"] or "")
    assert good["ok"] and good["values"]["tensor_parallel_size"] == 2


def test_committed_facts_are_what_the_installed_vllm_says() -> None:
    """hack/vllm/facts-0.33.0.json (read by other tests) is regenerated, not hand-edited."""
    assert live_facts() == committed_facts()


def test_the_planners_method_table_is_the_pinned_vllms() -> None:
    """planner/quantization.py pins vLLM's method list; a new vLLM must update both together."""
    from toposerve.planner import quantization

    assert list(quantization.VLLM_METHODS) == _QUANT_CHOICES
    assert set(_QUANT_CHOICES) >= quantization.IN_FLIGHT


def test_facts_the_code_relies_on_hold() -> None:
    facts = committed_facts()
    assert facts["vllm"] == "0.33.0"
    has = facts["has"]
    for flag in ("--tensor-parallel-size", "--pipeline-parallel-size", "--data-parallel-size",
                 "--enable-expert-parallel", "--prefill-context-parallel-size", "--max-model-len",
                 "--gpu-memory-utilization", "--kv-cache-dtype", "--quantization", "--served-model-name",
                 "--distributed-executor-backend", "--dtype", "--port"):  # fmt: skip
        assert has[flag], flag
    # Multi-node launch without Ray (used by the renderer's next shape) exists in 0.33.0.
    assert all(has[f] for f in ("--nnodes", "--node-rank", "--master-addr", "--master-port", "--headless"))
    assert "ray" in facts["distributed_executor_backend"]["choices"]
    assert {"bfloat16", "float16", "auto"} <= set(facts["dtype"]["choices"])
    assert "fp8" in facts["kv_cache_dtype"]["choices"]


def _planned_quantization(dtype: Dtype, explicit: str | None = None) -> str | None:
    model: dict[str, Any] = {"dtype": dtype} | ({"quantization": explicit} if explicit else {})
    s = spec("meta-llama/Llama-3.1-8B-Instruct", model_fields=model)
    (pool,) = plan_deployment("q", s, CONFIG).pools
    return pool.quantization


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp8", "int8"])
def test_default_quantization_of_each_dtype_exists_in_vllm(dtype: Dtype) -> None:
    """The planner's default --quantization for each weight dtype is a method vLLM 0.33.0 has."""
    quant = _planned_quantization(dtype)
    if quant is not None and quant not in _QUANT_CHOICES:
        raise AssertionError(f"Unknown quantization method: {quant}. Must be one of {_QUANT_CHOICES}.")


# --- extraction (no vLLM needed, but kept with the code it serves) ------------------------------


def test_extraction_of_shell_scripts_and_kubernetes_references() -> None:
    env = {"LWS_LEADER_ADDRESS": "10.0.0.1", "LWS_WORKER_INDEX": "1"}
    script = (
        "ray start --head --port=6379 && exec vllm serve m --tensor-parallel-size 8 "
        "--served-model-name 'a b' --node-rank ${LWS_WORKER_INDEX} --master-addr $LWS_LEADER_ADDRESS; echo done"
    )
    assert serve_argvs_in_script(script, env) == [
        ["m", "--tensor-parallel-size", "8", "--served-model-name", "a b", "--node-rank", "1",
         "--master-addr", "10.0.0.1"],
    ]  # fmt: skip
    objs: list[dict[str, Any]] = [
        {
            "kind": "LeaderWorkerSet",
            "metadata": {"name": "x"},
            "spec": {
                "leaderWorkerTemplate": {
                    "leaderTemplate": {"spec": {"containers": [{
                        "name": "vllm", "command": ["/bin/sh", "-c"],
                        "args": ["vllm serve m --node-rank $(LWS_WORKER_INDEX) --host $(POD_IP) | tee log"],
                        "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
                    }]}},
                    "workerTemplate": {"spec": {"containers": [{
                        "name": "vllm", "command": ["vllm", "serve"],
                        "args": ["m", "--headless", "--node-rank", "$(LWS_WORKER_INDEX)",
                                 "--master-addr", "$(LWS_LEADER_ADDRESS)", "--port", "$(PORT)"],
                        "env": [{"name": "PORT", "value": "8000"}],
                    }]}},
                }
            },
        },
        {"kind": "Deployment", "metadata": {"name": "r"}, "spec": {"template": {"spec": {"containers": [
            {"name": "router", "command": ["toposerve", "router"], "args": ["--port", "8080"]},
        ]}}}},
    ]  # fmt: skip
    commands = find_vllm_commands(objs)
    assert [c.argv for c in commands] == [
        ["m", "--node-rank", "0", "--host", "10.0.0.1"],  # the leader's pod IP is the leader address
        ["m", "--headless", "--node-rank", "1", "--master-addr", "10.0.0.1", "--port", "8000"],
    ]
    assert "leaderTemplate" in commands[0].where and "workerTemplate" in commands[1].where
