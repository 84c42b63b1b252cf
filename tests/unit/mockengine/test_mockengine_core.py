"""The mock engine's pure core: tokenizer, KV blocks + prefix cache, timing model, scheduler.

Everything here runs on simulated time (the scheduler is driven with an explicit ``now``), so
the latency assertions are about the model's quantities, never about wall-clock time.
"""

from __future__ import annotations

import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from toposerve.mockengine.faults import Fate, FaultConfig, FaultInjector
from toposerve.mockengine.kvcache import BlockManager, block_hashes
from toposerve.mockengine.scheduler import Request, Scheduler, SchedulerConfig, StepStats
from toposerve.mockengine.timing import TimingModel, default_num_gpu_blocks, gpu_weight_for
from toposerve.mockengine.tokenizer import MockTokenizer, TextGenerator, render_chat

# -- helpers ----------------------------------------------------------------------------------------


def make(gpu: str = "H100", tp: int = 1, **cfg: int | bool) -> tuple[Scheduler, TextGenerator, MockTokenizer]:
    weight, _ = gpu_weight_for(gpu)
    tok = MockTokenizer()
    sched = Scheduler(SchedulerConfig(**cfg), TimingModel(gpu_weight=weight, tensor_parallel_size=tp), tok)  # type: ignore[arg-type]
    return sched, TextGenerator(seed=7), tok


def prompt(n: int, salt: str = "p") -> list[int]:
    """n token ids unique to ``salt`` (stable across processes, unlike hash())."""
    return [zlib.crc32(f"{salt}-{i}".encode()) % 32000 for i in range(n)]


def submit(
    sched: Scheduler, gen: TextGenerator, rid: str, ids: list[int], max_tokens: int, now: float = 0.0
) -> Request:
    r = sched.make_request(rid, ids, max_tokens, gen)
    sched.add(r, now)
    return r


def run_until_idle(sched: Scheduler, now: float = 0.0, limit: int = 100_000) -> tuple[float, list[StepStats]]:
    steps: list[StepStats] = []
    for _ in range(limit):
        if not sched.has_work:
            return now, steps
        s = sched.step(now)
        steps.append(s)
        now = s.end
    raise AssertionError("scheduler did not drain")


def ttft_alone(sched: Scheduler, gen: TextGenerator, ids: list[int], rid: str) -> float:
    r = submit(sched, gen, rid, ids, 1)
    run_until_idle(sched)
    assert r.first_token_time is not None
    return r.first_token_time - r.arrival_time


# -- tokenizer ----------------------------------------------------------------------------------------


def test_tokenizer_is_deterministic_and_round_trips() -> None:
    a, b = MockTokenizer(), MockTokenizer()
    text = "Hello, world!  How are you today?"
    assert a.encode(text) == b.encode(text)
    assert a.decode(a.encode(text)) == text
    assert a.pieces(text) == ["Hello", ",", " world", "!", "  How", " are", " you", " today", "?"]
    assert a.count(text) == len(a.encode(text)) == 9


def test_shared_text_prefix_gives_shared_id_prefix() -> None:
    """Prefix routing and prefix caching rely on this: same conversation start, same id prefix."""
    t = MockTokenizer()
    instructions = ("You are a helpful assistant. " * 20).rstrip()
    system = {"role": "system", "content": instructions}
    a = t.encode(render_chat([system, {"role": "user", "content": "What is a GPU?"}]))
    b = t.encode(render_chat([system, {"role": "user", "content": "Explain KV caches."}]))
    common = t.encode("<|system|>\n" + instructions)
    assert len(common) > 100
    assert a[: len(common)] == b[: len(common)] == common
    assert a != b


def test_generator_is_seeded() -> None:
    ids = MockTokenizer().encode("same prompt")
    g1, g2, g3 = TextGenerator(1), TextGenerator(1), TextGenerator(2)

    def seq(g: TextGenerator) -> list[str]:
        rng = g.rng_for(ids)
        return [TextGenerator.next_piece(rng, i) for i in range(20)]

    assert seq(g1) == seq(g2)
    assert seq(g1) != seq(g3)
    # every generated piece is exactly one token, so echoed output re-counts the same
    tok = MockTokenizer()
    assert all(len(tok.encode(p)) == 1 for p in seq(g1))


# -- blocks and prefix cache ------------------------------------------------------------------------


def test_block_hashes_are_chained() -> None:
    a = block_hashes(list(range(64)), 16)
    b = block_hashes([999, *range(1, 64)], 16)
    assert len(a) == 4
    assert all(x != y for x, y in zip(a, b, strict=True)), "a change in block 0 must change every later hash"
    assert block_hashes(list(range(70)), 16)[:4] == a
    assert block_hashes(list(range(64)), 16, known=a[:2]) == a


def test_allocate_is_all_or_nothing_and_usage_counts_referenced_blocks() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    mine: list[int] = []
    assert bm.allocate(mine, (), 17)  # 5 blocks
    assert len(mine) == 5 and bm.usage == pytest.approx(5 / 8)
    other: list[int] = []
    assert not bm.allocate(other, (), 16)
    assert other == [] and bm.num_free == 3
    bm.free(mine)
    assert bm.usage == 0.0


def test_freed_prefix_blocks_are_revived_then_evicted_lru() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    ids = list(range(12))
    hashes = block_hashes(ids, 4)
    owned: list[int] = []
    assert bm.allocate(owned, (), 12)
    bm.cache_blocks(owned, hashes)
    bm.free(owned)
    assert bm.usage == 0.0 and bm.num_cached == 3

    # A request with the same 12 tokens (+1) hits all three blocks: the last token stays to compute.
    hit = bm.computed_blocks(block_hashes([*ids, 5], 4), 13)
    assert hit == owned
    # A block-aligned identical prompt must recompute its last block.
    assert bm.computed_blocks(hashes, 12) == owned[:2]

    # Filling the pool with unrelated work evicts the cached blocks, tail first.
    filler: list[int] = []
    assert bm.allocate(filler, (), 8)  # takes the never-hashed block, then the LRU (tail) cached block
    assert bm.computed_blocks(block_hashes([*ids, 5], 4), 13) == owned[:2]
    assert bm.allocate(filler, (), 16)
    assert bm.computed_blocks(block_hashes([*ids, 5], 4), 13) == []


def test_prefix_caching_can_be_disabled() -> None:
    bm = BlockManager(num_blocks=4, block_size=4, enable_prefix_caching=False)
    owned: list[int] = []
    bm.allocate(owned, (), 8)
    bm.cache_blocks(owned, block_hashes(list(range(8)), 4))
    assert bm.computed_blocks(block_hashes(list(range(9)), 4), 9) == []


# -- timing model --------------------------------------------------------------------------------------


def test_timing_model_shape() -> None:
    t = TimingModel(gpu_weight=1.0)
    assert t.step_time(0, 0, 0) == 0.0
    assert t.prefill_time(2000) > t.prefill_time(1000) > t.prefill_time(10)
    assert t.decode_step_time(64) > t.decode_step_time(8) > t.decode_step_time(1)
    assert t.decode_step_time(8, 100_000) > t.decode_step_time(8, 0)
    h100, a100 = TimingModel(gpu_weight=1.6), TimingModel(gpu_weight=1.0)
    assert a100.decode_step_time(32) / h100.decode_step_time(32) == pytest.approx(1.6)
    tp2 = TimingModel(gpu_weight=1.0, tensor_parallel_size=2)
    assert a100.prefill_time(4096) / tp2.prefill_time(4096) == pytest.approx(1.75)


def test_gpu_lookup_and_block_defaults() -> None:
    assert gpu_weight_for("H100") == (1.6, True)
    assert gpu_weight_for("A100-80GB") == (1.0, True)
    assert gpu_weight_for("TPU-v9") == (1.0, False)
    assert gpu_weight_for("NVIDIA-H100-80GB-HBM3") == (1.6, True)  # a GFD product label works too
    h100 = default_num_gpu_blocks("H100")
    assert 20_000 < h100 < 40_000  # ~55 GiB of KV for an 8B bf16 model: ~450k tokens
    assert default_num_gpu_blocks("A100-40GB") < h100 < default_num_gpu_blocks("H200")
    assert default_num_gpu_blocks("H100", tensor_parallel_size=2) > 2 * h100
    assert default_num_gpu_blocks("L4", params_b=70) == 64  # does not fit: floor, not negative


# -- scheduler ------------------------------------------------------------------------------------------


def test_generates_exactly_max_tokens_with_length_reason() -> None:
    sched, gen, _ = make()
    r = submit(sched, gen, "a", prompt(40), 25)
    run_until_idle(sched)
    assert len(r.output_ids) == 25 and r.finish_reason == "length"
    assert r.blocks == [] and sched.blocks.usage == 0.0


def test_without_max_tokens_the_model_stops_by_itself() -> None:
    sched, gen, _ = make()
    r = sched.make_request("a", prompt(40), None, gen, default_range=(5, 9))
    sched.add(r, 0.0)
    run_until_idle(sched)
    assert 5 <= len(r.output_ids) <= 9 and r.finish_reason == "stop"


def test_waiting_queue_grows_past_max_num_seqs() -> None:
    sched, gen, _ = make(max_num_seqs=4)
    for i in range(10):
        submit(sched, gen, f"r{i}", prompt(32, f"s{i}"), 50)
    sched.step(0.0)
    assert len(sched.running) == 4 and len(sched.waiting) == 6
    _, steps = run_until_idle(sched)
    assert max(len(s.updated) for s in steps) <= 4
    assert not sched.running and not sched.waiting


def test_ttft_grows_with_uncached_prompt_and_shrinks_on_cache_hit() -> None:
    sched, gen, _ = make()
    short = ttft_alone(sched, gen, prompt(100, "x"), "short")
    long_prompt = prompt(2000, "y")
    cold = ttft_alone(sched, gen, long_prompt, "long")
    warm = ttft_alone(sched, gen, [*long_prompt[:-5], 1, 2, 3, 4, 5], "long-again")
    assert cold > short
    assert warm < cold
    # The cold TTFT is exactly the model's prefill of 2000 tokens (one step, empty engine).
    assert cold == pytest.approx(sched.timing.prefill_time(2000))


def test_prefix_cache_hit_is_reported_in_tokens() -> None:
    sched, gen, _ = make(block_size=16)
    ids = prompt(100)
    first = submit(sched, gen, "a", ids, 4)
    _, s1 = run_until_idle(sched)
    second = submit(sched, gen, "b", ids, 4)
    _, s2 = run_until_idle(sched)
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens == 96  # 6 full blocks of 16; the partial 7th is recomputed
    assert sum(s.prefix_queries for s in s1) == 100 and sum(s.prefix_hits for s in s1) == 0
    assert sum(s.prefix_hits for s in s2) == 96


def test_generated_blocks_are_cached_too_for_multi_turn() -> None:
    sched, gen, _ = make(block_size=16)
    ids = prompt(40)
    first = submit(sched, gen, "a", ids, 40)
    run_until_idle(sched)
    follow_up = ids + first.output_ids + prompt(10, "next")
    second = submit(sched, gen, "b", follow_up, 4)
    run_until_idle(sched)
    # Turn one fed 40 + 39 tokens through the model (the last sampled token never is): 4 full blocks.
    assert second.num_cached_tokens == 64


def test_kv_usage_rises_with_concurrent_long_requests_and_falls_back() -> None:
    sched, gen, _ = make(num_gpu_blocks=2000, block_size=16)
    usages = []
    for i in range(8):
        submit(sched, gen, f"r{i}", prompt(1500, f"u{i}"), 200)
    now = 0.0
    while sched.has_work:
        s = sched.step(now)
        now = s.end
        usages.append(sched.blocks.usage)
    peak = max(usages)
    assert peak > 0.35  # 8 x ~1700 tokens / 16 = ~850 of 2000 blocks
    assert usages.index(peak) > 0 and usages[-1] == 0.0


def test_preemption_under_kv_pressure_and_everything_still_completes() -> None:
    sched, gen, _ = make(num_gpu_blocks=64, block_size=16, max_num_seqs=16)
    reqs = [submit(sched, gen, f"r{i}", prompt(100, f"q{i}"), 150) for i in range(8)]
    _, steps = run_until_idle(sched)
    assert sum(s.preemptions for s in steps) > 0
    assert sum(r.num_preemptions for r in reqs) == sum(s.preemptions for s in steps)
    assert all(len(r.output_ids) == 150 and r.finish_reason == "length" for r in reqs)
    assert sched.blocks.usage == 0.0


def test_preempted_output_is_identical_to_unpreempted_output() -> None:
    """Recompute preemption must not change the text a client sees."""
    tight, gen1, _ = make(num_gpu_blocks=64, block_size=16)
    roomy, gen2, _ = make(num_gpu_blocks=4096, block_size=16)
    a = [submit(tight, gen1, f"r{i}", prompt(100, f"q{i}"), 150) for i in range(8)]
    b = [submit(roomy, gen2, f"r{i}", prompt(100, f"q{i}"), 150) for i in range(8)]
    run_until_idle(tight)
    run_until_idle(roomy)
    assert [r.output_pieces for r in a] == [r.output_pieces for r in b]


def test_chunked_prefill_splits_long_prompts_over_steps() -> None:
    sched, gen, _ = make(max_num_batched_tokens=512)
    r = submit(sched, gen, "a", prompt(2000), 2)
    _, steps = run_until_idle(sched)
    assert [s.prefill_tokens for s in steps[:4]] == [512, 512, 512, 464]
    assert r.first_token_time == steps[3].end


def test_h100_decodes_faster_than_a100_with_same_settings() -> None:
    def workload(gpu: str, tp: int = 1) -> float:
        sched, gen, _ = make(gpu, tp)
        for i in range(16):
            submit(sched, gen, f"r{i}", prompt(200, f"w{i}"), 128)
        end, _ = run_until_idle(sched)
        return end

    h100, a100 = workload("H100"), workload("A100-80GB")
    assert a100 / h100 == pytest.approx(1.6)
    assert workload("A100-80GB", tp=2) < a100
    assert workload("no-such-gpu") == pytest.approx(a100)


def test_abort_frees_blocks_and_queue_slot() -> None:
    sched, gen, _ = make(max_num_seqs=1)
    a = submit(sched, gen, "a", prompt(64), 100)
    b = submit(sched, gen, "b", prompt(64, "b"), 100)
    sched.step(0.0)
    assert sched.blocks.usage > 0
    assert sched.abort("a", 1.0) is a and a.finish_reason == "abort"
    assert sched.abort("a", 1.0) is None
    sched.step(1.0)
    assert sched.running == [b]


def test_slowdown_multiplies_step_time() -> None:
    sched, gen, _ = make()
    submit(sched, gen, "a", prompt(64), 3)
    base = sched.step(0.0).duration
    sched2, gen2, _ = make()
    sched2.slowdown = 2.5
    submit(sched2, gen2, "a", prompt(64), 3)
    assert sched2.step(0.0).duration == pytest.approx(2.5 * base)


def test_latency_stats_are_consistent() -> None:
    sched, gen, _ = make(max_num_seqs=2)
    reqs = [submit(sched, gen, f"r{i}", prompt(64, f"l{i}"), 10) for i in range(4)]
    _, steps = run_until_idle(sched)
    ttft = [v for s in steps for v in s.ttft]
    queue = [v for s in steps for v in s.queue_time]
    e2e = [v for s in steps for v in s.e2e]
    assert len(ttft) == len(queue) == len(e2e) == 4
    assert sum(len(s.itl) for s in steps) == 4 * 9
    assert sorted(queue)[:2] == [0.0, 0.0] and sorted(queue)[2] > 0  # the last two waited for slots
    for r in reqs:
        assert r.finish_time is not None and r.first_token_time is not None
        assert r.finish_time - r.arrival_time >= r.first_token_time - r.arrival_time


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(1, 120), st.integers(1, 40), st.integers(0, 3), st.booleans()),
        min_size=1,
        max_size=12,
    ),
    st.integers(12, 40),
)
def test_block_accounting_invariants(reqs: list[tuple[int, int, int, bool]], num_blocks: int) -> None:
    """Under any arrivals, aborts and preemptions: blocks held == referenced, all finish exactly."""
    sched, gen, _ = make(
        num_gpu_blocks=num_blocks, block_size=8, max_num_seqs=4, max_model_len=num_blocks * 8
    )
    live: list[Request] = []
    now = 0.0
    for i, (plen, out, family, abort) in enumerate(reqs):
        ids = prompt(min(plen, num_blocks * 8 - out - 1), f"f{family}")
        if len(ids) < 1:
            continue
        r = submit(sched, gen, f"r{i}", ids, out, now)
        live.append(r)
        s = sched.step(now)
        now = s.end
        if abort and i % 3 == 0:
            sched.abort(r.req_id, now)
        held = {b for q in sched.running for b in q.blocks}
        assert sched.blocks.num_used == len(held)
        assert all(not q.blocks for q in sched.waiting)
    run_until_idle(sched, now)
    assert sched.blocks.num_used == 0
    for r in live:
        if r.finish_reason != "abort":
            assert len(r.output_ids) == r.target_len


# -- faults ---------------------------------------------------------------------------------------------


def test_fault_injector_is_seeded_and_rates_hold() -> None:
    cfg = FaultConfig(fail_rate=0.25)
    a = [FaultInjector(cfg, seed=3).fate() for _ in range(1)]
    inj1, inj2 = FaultInjector(cfg, seed=3), FaultInjector(cfg, seed=3)
    seq1 = [inj1.fate() for _ in range(400)]
    assert seq1 == [inj2.fate() for _ in range(400)]
    assert 60 < seq1.count(Fate.FAIL) < 140 and a
    assert {FaultInjector(FaultConfig(hang_rate=1.0)).fate() for _ in range(5)} == {Fate.HANG}
    assert {FaultInjector(FaultConfig()).fate() for _ in range(5)} == {Fate.OK}


def test_fault_config_updates_validate() -> None:
    cfg = FaultConfig().updated({"fail_rate": 0.5, "unready": True, "slowdown": 2})
    assert cfg.fail_rate == 0.5 and cfg.unready and cfg.slowdown == 2.0
    for bad in ({"fail_rate": 2}, {"nope": 1}, {"unready": "yes"}, {"fail_status": 200}, {"slowdown": 0}):
        with pytest.raises(ValueError):
            FaultConfig().updated(bad)


def test_incremental_hashes_match_batch_hashes() -> None:
    """The scheduler hashes blocks as they fill; that must equal hashing the whole sequence."""
    sched, gen, _ = make(block_size=16)
    r = submit(sched, gen, "a", prompt(37), 60)
    run_until_idle(sched)
    r.extend_hashes(16, sched.root)
    assert r.hashes == block_hashes(r.all_ids(), 16)
    assert r.tokens(30, 50) == r.all_ids()[30:50]
    assert r.tokens(0, 10) == r.prompt_ids[:10] and r.tokens(40, 45) == r.output_ids[3:8]


def test_core_modules_do_no_io_imports() -> None:
    """The core stays pure: importing it must not pull in the HTTP stack."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import toposerve.mockengine.scheduler, toposerve.mockengine.kvcache, toposerve.mockengine.timing\n"
        "import toposerve.mockengine.tokenizer, toposerve.mockengine.faults, toposerve.mockengine.protocol\n"
        "import toposerve.mockengine.metrics, toposerve.mockengine.cli\n"
        "bad = [m for m in ('aiohttp', 'kopf', 'kubernetes', 'httpx') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_blocks_are_published_during_chunked_prefill() -> None:
    """A second request with the same long prefix hits blocks the first is still prefilling."""
    sched, gen, _ = make(max_num_batched_tokens=512, block_size=16)
    ids = prompt(2000)
    first = submit(sched, gen, "a", ids, 2)
    sched.step(0.0)  # 512 tokens of the first prompt computed
    second = submit(sched, gen, "b", ids, 2)
    run_until_idle(sched)
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens >= 512
