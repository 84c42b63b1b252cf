"""toposerve's KV-cache event hashing and wire format (operator/toposerve/kvevents/) against vLLM
0.33.0's own code (hack/vllm/kv_events_judge.py in the venv from hack/vllm/venv.sh): the block
hashes a router computes must be the engines', and the mock engine's events must decode with
vLLM's classes, byte for byte."""

from __future__ import annotations

import json
import random
import subprocess
from typing import Any

import pytest

from tests.vllm_cli import ROOT, vllm_python
from toposerve.kvevents import hashing, wire
from toposerve.mockengine.kvcache import BlockManager

pytestmark = pytest.mark.vllm
JUDGE = ROOT / "hack" / "vllm" / "kv_events_judge.py"


def judge(request: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run(
        [vllm_python(), str(JUDGE)], input=json.dumps(request), capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise RuntimeError(f"kv_events_judge.py failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def _hexed(event: Any) -> dict[str, Any]:
    import msgspec

    raw = msgspec.structs.asdict(event)
    out: dict[str, Any] = {"type": type(event).__name__}
    for k, v in raw.items():
        if isinstance(v, list) and v and isinstance(v[0], bytes):
            v = [x.hex() for x in v]
        elif isinstance(v, bytes):
            v = v.hex()
        out[k] = v
    return out


def mock_events() -> list[Any]:
    """Real events from the mock's block pool: two prompts sharing a prefix, an eviction, a reset."""
    bm = BlockManager(num_blocks=4, block_size=4, kv_events=True)
    root = hashing.none_hash()
    a = list(range(1, 13))
    ha = hashing.block_hashes(a, 4)
    owned: list[int] = []
    assert bm.allocate(owned, (), len(a))
    bm.cache_blocks(owned, ha, None, a)
    bm.free(owned)
    b = [*a[:8], 99, 98, 97, 96, 95]
    hb = hashing.block_hashes(b, 4)
    hit = bm.computed_blocks(hb, len(b))
    owned_b: list[int] = []
    assert bm.allocate(owned_b, hit, len(b))  # 4 blocks: the free one, then evicts a's third block
    bm.cache_blocks(owned_b[len(hit) :], hb[len(hit) : 3], hb[len(hit) - 1], b)
    bm.free(owned_b)
    assert bm.reset_prefix_cache()
    assert root == hashing.none_hash(None)
    return bm.take_events()


def test_block_hashes_are_vllms() -> None:
    rng = random.Random(7)
    cases = [
        {"tokens": list(range(64)), "block_size": 16, "seed": None},
        {"tokens": [rng.randrange(150_000) for _ in range(203)], "block_size": 16, "seed": None},
        {"tokens": [rng.randrange(150_000) for _ in range(100)], "block_size": 32, "seed": "42"},
        {"tokens": [1, 2, 3], "block_size": 16, "seed": None},  # no full block: no hash
    ]
    lora = ["sql", "/models/adapters/sql"]
    cases.append({"tokens": list(range(64)), "block_size": 16, "seed": None, "lora": lora})
    cases.append({"tokens": list(range(64)), "block_size": 16, "seed": None, "cache_salt": "tenant-a"})
    cases.append(
        {"tokens": list(range(64)), "block_size": 16, "seed": None, "lora": lora, "cache_salt": "sql"}
    )
    got = judge({"hash_cases": cases})["hashes"]
    for case, theirs in zip(cases, got, strict=True):
        extra = hashing.lora_extra_keys(*case["lora"]) if case.get("lora") else None
        ours = hashing.block_hashes(
            case["tokens"],
            case["block_size"],
            seed=case["seed"],
            extra_keys=extra,
            cache_salt=case.get("cache_salt"),
        )
        assert [h.hex() for h in ours] == theirs
    assert got[0] and got[3] == []
    assert got[4] and got[4][0] != got[0][0]  # an adapter's blocks are not the base model's
    assert not set(got[5]) & set(got[0])  # a salted chain differs from its first block on
    assert got[6][0] != got[4][0] and got[6][0] not in got[5]  # an adapter named like a salt: apart


def test_the_mock_engines_events_are_vllms_bytes_both_ways() -> None:
    events = mock_events()
    kinds = [type(e).__name__ for e in events]
    assert kinds == ["BlockStored", "BlockRemoved", "BlockStored", "AllBlocksCleared"], kinds
    ours = wire.KVEventBatch(ts=1765100000.25, events=events, data_parallel_rank=0)
    payload = wire.encode(ours)
    answer = judge({
        "batches": [{"ts": ours.ts, "data_parallel_rank": 0, "events": [_hexed(e) for e in events]}],
        "payloads": [payload.hex()],
    })  # fmt: skip
    # vLLM encodes the same events to the same bytes ...
    assert answer["encoded"] == [payload.hex()]
    # ... and decodes ours to the events we meant.
    (decoded,) = answer["decoded"]
    assert decoded["ts"] == ours.ts and decoded["data_parallel_rank"] == 0
    assert decoded["events"] == [_hexed(e) for e in events]
