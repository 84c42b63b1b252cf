"""The planner's decisions: worked examples, fallback, explicit values, tiers, inventory, cost."""

from __future__ import annotations

from typing import Any

import pytest

from toposerve.api.config import OperatorConfig
from toposerve.api.errors import SpecError
from toposerve.api.gpus import DEFAULT_CATALOG
from toposerve.planner.inventory import inventory_from_nodes
from toposerve.planner.plan import plan_deployment
from toposerve.planner.tiers import tier_order

from .conftest import make_spec

L8 = "meta-llama/Llama-3.1-8B-Instruct"
L70 = "meta-llama/Llama-3.1-70B-Instruct"
L405 = "meta-llama/Llama-3.1-405B-Instruct"
MIXTRAL = "mistralai/Mixtral-8x7B-Instruct-v0.1"


def pool(spec: Any, **kw: Any) -> Any:
    return plan_deployment("x", spec, **kw).pools[0]


# --- the worked examples of the issue -------------------------------------------------------------


def test_llama_70b_bf16_128k_on_h100_is_tp4_pp1() -> None:
    p = pool(make_spec(L70, 131072, ["H100"]))
    assert (p.gpu_type, p.tensor_parallel, p.pipeline_parallel, p.nodes_per_replica) == ("H100", 4, 1, 1)
    assert p.kv_cache_tokens_per_replica >= 131072


def test_llama_8b_bf16_128k_on_l4_is_tp2() -> None:
    p = pool(make_spec(L8, 131072, ["L4"]))
    assert (p.gpu_type, p.tensor_parallel, p.pipeline_parallel) == ("L4", 2, 1)


def test_llama_405b_bf16_128k_on_h100_is_tp8_pp2_on_two_nodes() -> None:
    p = pool(make_spec(L405, 131072, ["H100"]))
    assert (p.tensor_parallel, p.pipeline_parallel, p.nodes_per_replica, p.gpus_per_pod) == (8, 2, 2, 8)
    assert not p.nvlink_across_nodes  # TP inside each node, PP across the two
    # No node inventory: the first rack/NVLink label is assumed; the renderer adds the launch flags.
    assert p.topology_key == "nvidia.com/gpu.clique"


# --- fallback order and reasons ------------------------------------------------------------------


def test_first_fitting_type_wins_and_rejected_ones_say_why() -> None:
    p = pool(make_spec(L70, 131072, ["L4", "H100", "A100-80GB"], parallelism={"pipeline": 1}))
    assert p.gpu_type == "H100"
    assert [r.gpu_type for r in p.alternatives] == ["L4"]
    assert "short by" in p.alternatives[0].reason or "KV cache holds" in p.alternatives[0].reason


def test_nothing_fits_gives_fits_false_with_reason_per_type() -> None:
    spec = make_spec(L405, 131072, ["L4"], parallelism={"tensor": 1, "pipeline": 1})
    p = pool(spec)
    assert not p.fits and p.gpu_type is None and p.replicas == 0
    assert p.reason and "L4" in p.reason and "weights need" in p.reason


def test_explicit_values_are_kept_not_changed() -> None:
    p = pool(make_spec(L70, 8192, ["H100"], parallelism={"tensor": 8}))
    assert p.tensor_parallel == 8 and p.pipeline_parallel == 1


# --- explicit values that can never work are errors naming the field ---------------------------------


@pytest.mark.parametrize(
    ("model", "par", "field", "words"),
    [
        (L70, {"tensor": 3}, "spec.parallelism.tensor", "does not divide"),
        (L70, {"pipeline": 81}, "spec.parallelism.pipeline", "exceed"),
        (L70, {"expert": 2}, "spec.parallelism.expert", "dense"),
        (MIXTRAL, {"tensor": 2, "expert": 4}, "spec.parallelism.expert", "tensor x data"),
    ],
)
def test_impossible_parallelism_is_a_spec_error(
    model: str, par: dict[str, int], field: str, words: str
) -> None:
    with pytest.raises(SpecError) as e:
        plan_deployment("x", make_spec(model, 8192, ["H100"], parallelism=par))
    assert e.value.field == field and words in e.value.message


def test_unknown_model_needs_architecture() -> None:
    with pytest.raises(SpecError) as e:
        plan_deployment("x", make_spec("acme/secret-model", 4096, ["H100"]))
    assert e.value.field == "spec.model.architecture"
    arch = {"parameters": 13, "layers": 40, "attentionHeads": 40, "kvHeads": 40, "headDim": 128}
    spec = make_spec("acme/secret-model", 4096, ["H100"], model={"architecture": arch})
    assert pool(spec).fits


def test_unknown_gpu_type_names_the_list_entry() -> None:
    with pytest.raises(SpecError) as e:
        plan_deployment("x", make_spec(L8, 8192, ["H100", "TPU-v5"]))
    assert e.value.field == "spec.placement.gpuTypes[1]"


def test_context_beyond_native_is_rejected() -> None:
    with pytest.raises(SpecError) as e:
        plan_deployment("x", make_spec("Qwen/Qwen2.5-7B-Instruct", 65536, ["H100"]))
    assert e.value.field == "spec.model.maxContextLength"


def test_default_context_is_the_models_native_length() -> None:
    assert pool(make_spec(L8, None, ["H100"])).max_context_length == 131072


# --- MoE, long context, dtype --------------------------------------------------------------------


def test_moe_gets_expert_parallel_automatically() -> None:
    p = pool(make_spec(MIXTRAL, 32768, ["H100"]))
    assert p.tensor_parallel == 2 and p.expert_parallel == 2 and "--enable-expert-parallel" in p.vllm_args
    dense = pool(make_spec(L70, 32768, ["H100"]))
    assert dense.expert_parallel == 1 and "--enable-expert-parallel" not in dense.vllm_args


def test_long_context_tier_prefers_context_parallel_over_pipeline() -> None:
    spec = make_spec(
        L70, 131072, ["H100"], placement={"tier": "long-context"}, serving={"minConcurrentSequences": 16}
    )
    p = pool(spec)
    assert (p.tensor_parallel, p.context_parallel, p.pipeline_parallel) == (8, 2, 1)
    assert "--prefill-context-parallel-size" in p.vllm_args
    latency = pool(make_spec(L70, 131072, ["H100"], serving={"minConcurrentSequences": 16}))
    assert latency.context_parallel == 1 and latency.pipeline_parallel > 1


def test_quantised_dtype_shrinks_the_layout_and_sets_vllm_flags() -> None:
    bf16 = pool(make_spec(L70, 32768, ["A100-40GB"]))
    awq = "hugging-quants/Meta-Llama-3.1-70B-Instruct-AWQ-INT4"
    int4 = pool(
        make_spec(
            L70, 32768, ["A100-40GB"], model={"dtype": "int4", "quantization": "awq", "checkpoint": awq}
        )
    )
    assert int4.gpus_per_replica < bf16.gpus_per_replica
    assert int4.vllm_args[int4.vllm_args.index("--quantization") + 1] == "awq"
    assert int4.vllm_args[0] == awq and int4.checkpoint == awq
    # The served name stays the model's, whatever build is loaded.
    assert int4.vllm_args[int4.vllm_args.index("--served-model-name") + 1] == L70
    fp8 = pool(make_spec(L70, 32768, ["H100"], model={"dtype": "fp8", "kvCacheDtype": "fp8"}))
    assert (
        "--kv-cache-dtype" in fp8.vllm_args
        and fp8.vllm_args[fp8.vllm_args.index("--quantization") + 1] == "fp8"
    )


# --- pools, replicas, cost -----------------------------------------------------------------------


def test_pools_plan_independently_and_share_replicas_by_weight() -> None:
    spec = make_spec(
        L70, 32768, replicas=3,
        pools=[
            {"name": "h100", "gpuTypes": ["H100"], "weight": 2},
            {"name": "a100", "gpuTypes": ["A100-40GB"], "dtype": "int4", "weight": 1,
                "checkpoint": "hugging-quants/Meta-Llama-3.1-70B-Instruct-AWQ-INT4"},
        ],
    )  # fmt: skip
    d = plan_deployment("x", spec)
    by = {p.name: p for p in d.pools}
    assert (by["h100"].replicas, by["a100"].replicas) == (2, 1)
    assert by["h100"].dtype == "bf16" and by["a100"].dtype == "int4"
    assert d.cost_per_hour == pytest.approx(by["h100"].cost_per_hour + by["a100"].cost_per_hour)


def test_cost_uses_spec_then_config_then_catalog_prices() -> None:
    p = pool(make_spec(L70, 131072, ["H100"], replicas=2))
    assert p.cost_per_hour == pytest.approx(2 * 4 * DEFAULT_CATALOG.get("H100").hourly_price)
    cfg = OperatorConfig.model_validate({"hourlyPerGPU": {"H100": 3.0}})
    assert pool(make_spec(L70, 131072, ["H100"]), config=cfg).cost_per_hour_per_replica == pytest.approx(12.0)
    spec = make_spec(L70, 131072, ["H100"], cost={"hourlyPerGPU": {"H100": 1.0}})
    assert pool(spec, config=cfg).cost_per_hour_per_replica == pytest.approx(4.0)
    spot = make_spec(L70, 131072, ["H100"], placement={"spot": {"enabled": True}})
    assert pool(spot).cost_per_hour_per_replica == pytest.approx(
        4 * DEFAULT_CATALOG.get("H100").spot_hourly_price
    )


# --- tiers ---------------------------------------------------------------------------------------


def test_tier_orders_follow_the_placement_matrix() -> None:
    def never(_: Any) -> bool:
        return False

    assert tier_order("latency-critical", DEFAULT_CATALOG, 70, never)[:3] == ["B200", "H200", "H100"]
    assert "A100-40GB" not in tier_order("latency-critical", DEFAULT_CATALOG, 70, never)
    assert tier_order("throughput", DEFAULT_CATALOG, 70, never)[0] == "A100-80GB"
    assert tier_order("long-context", DEFAULT_CATALOG, 70, never)[:2] == ["B200", "H200"]
    batch = tier_order("batch", DEFAULT_CATALOG, 70, never)
    ratio = [DEFAULT_CATALOG.get(n).hourly_price / DEFAULT_CATALOG.get(n).throughput_weight for n in batch]
    assert ratio == sorted(ratio)


def test_small_models_prefer_the_smallest_gpu_that_holds_a_replica() -> None:
    p = pool(make_spec(L8, 8192, None, placement={"tier": "throughput"}))
    assert p.gpu_type == "L4" and p.tensor_parallel == 1
    big = pool(make_spec(L70, 8192, None, placement={"tier": "throughput"}))
    assert big.gpu_type == "A100-80GB"


# --- inventory and engine ------------------------------------------------------------------------


def node(name: str, product: str | None, count: int, spot: bool = False) -> dict[str, Any]:
    labels = {"kubernetes.io/hostname": name, "topology.kubernetes.io/zone": "zone-a"}
    if product:
        labels |= {"nvidia.com/gpu.product": product, "nvidia.com/gpu.count": str(count)}
    if spot:
        labels["toposerve.io/capacity-type"] = "spot"
    alloc = {"nvidia.com/gpu": str(count)} if product else {}
    return {"metadata": {"name": name, "labels": labels}, "status": {"allocatable": alloc}}


def test_inventory_skips_types_the_cluster_lacks() -> None:
    inv = inventory_from_nodes([node("a", "NVIDIA-A100-SXM4-80GB", 8)], DEFAULT_CATALOG)
    p = pool(make_spec(L70, 131072, ["H100", "A100-80GB"]), inventory=inv)
    assert p.gpu_type == "A100-80GB" and "no H100 nodes" in p.alternatives[0].reason


def test_spot_only_nodes_do_not_count_unless_spot_is_allowed() -> None:
    inv = inventory_from_nodes([node("s", "NVIDIA-H100-80GB-HBM3", 8, spot=True)], DEFAULT_CATALOG)
    assert not pool(make_spec(L70, 8192, ["H100"]), inventory=inv).fits
    assert pool(make_spec(L70, 8192, ["H100"], placement={"spot": {"enabled": True}}), inventory=inv).fits


def test_inventory_gpus_per_node_bounds_tensor_parallel() -> None:
    inv = inventory_from_nodes([node(f"l{i}", "NVIDIA-L4", 2) for i in range(8)], DEFAULT_CATALOG)
    p = pool(make_spec(L70, 8192, ["L4"]), inventory=inv)
    assert (p.tensor_parallel, p.gpus_per_pod) == (2, 2)
    assert p.nodes_per_replica == p.pipeline_parallel > 1


def test_multi_node_plan_needs_enough_nodes() -> None:
    inv = inventory_from_nodes([node("h", "NVIDIA-H100-80GB-HBM3", 8)], DEFAULT_CATALOG)
    p = pool(make_spec(L405, 131072, ["H100"]), inventory=inv)
    assert not p.fits and "no topology label groups 2 H100 nodes" in (p.reason or "")


def test_engine_auto_uses_mock_without_gpu_nodes() -> None:
    spec = make_spec(L8, 8192, ["H100"])
    cpu_only = inventory_from_nodes([node("c", None, 0)], DEFAULT_CATALOG)
    d = plan_deployment("x", spec, inventory=cpu_only)
    assert d.engine == "mock" and "no GPU nodes" in d.engine_reason
    assert d.pools[0].fits and d.pools[0].gpu_type == "H100"  # mock still times itself as the planned GPU
    gpu = inventory_from_nodes([node("h", "NVIDIA-H100-80GB-HBM3", 8)], DEFAULT_CATALOG)
    assert plan_deployment("x", spec, inventory=gpu).engine == "vllm"
    assert plan_deployment("x", make_spec(L8, 8192, ["H100"], engine="mock"), inventory=gpu).engine == "mock"
    simulated = OperatorConfig(auto_engine="mock")
    d = plan_deployment("x", spec, config=simulated, inventory=gpu)
    assert d.engine == "mock" and "autoEngine" in d.engine_reason


def test_pool_override_replans_on_the_fallback_type() -> None:
    spec = make_spec(L70, 131072, ["H100", "A100-80GB"])
    d = plan_deployment("x", spec, pool_overrides={"default": ["A100-80GB"]})
    assert d.pools[0].gpu_type == "A100-80GB"


def test_capacity_respects_taints_and_node_selectors() -> None:
    n = node("h", "NVIDIA-H100-80GB-HBM3", 8)
    tainted = {**n, "spec": {"taints": [{"key": "maintenance", "value": "x", "effect": "NoSchedule"}]}}
    inv = inventory_from_nodes([n, {**tainted, "metadata": {**n["metadata"], "name": "t"}}], DEFAULT_CATALOG)
    gpu_tol = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert inv.placeable_replicas("H100", 4, 1, False, {}, gpu_tol) == 2  # only the untainted node
    assert (
        inv.placeable_replicas(
            "H100", 4, 1, False, {}, [*gpu_tol, {"key": "maintenance", "operator": "Exists"}]
        )
        == 4
    )
    assert inv.placeable_replicas("H100", 4, 1, False, {"zone": "nowhere"}, gpu_tol) == 0
    soft = {**n, "spec": {"taints": [{"key": "k", "effect": "PreferNoSchedule"}]}}
    assert inventory_from_nodes([soft], DEFAULT_CATALOG).placeable_replicas("H100", 8, 1, False) == 1
