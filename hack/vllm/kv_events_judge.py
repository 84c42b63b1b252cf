"""vLLM's own answer for KV-cache event hashing and encoding (run inside hack/vllm/venv.sh's venv).

Why: the router will name the engines' cached blocks by hash and read their events; toposerve's
copies (operator/toposerve/kvevents/) must match vLLM 0.33.0 exactly. Only vLLM's code can say so.

Input (stdin), JSON: {"hash_cases": [{"tokens": [...], "block_size": 16, "seed": null | "...",
"lora": [name, path] (optional: hashed as that adapter's request),
"cache_salt": "..." (optional: the request's cache_salt)}],
"batches": [{"ts": 1.5, "events": [<event as {"type": "BlockStored", ...}, bytes as hex>]}],
"payloads": ["<hex of a toposerve-encoded batch>"]}.
Output (stdout), JSON: {"hashes": [[hex, ...] per case], "encoded": [hex per batch],
"decoded": [<vLLM's decoding of each payload, bytes as hex>]}.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")


def _unhex(event: dict[str, Any]) -> dict[str, Any]:
    out = dict(event)
    for key in ("block_hashes",):
        if key in out:
            out[key] = [bytes.fromhex(h) for h in out[key]]
    if out.get("parent_block_hash") is not None:
        out["parent_block_hash"] = bytes.fromhex(out["parent_block_hash"])
    return out


def _hex(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, list | tuple):
        return [_hex(v) for v in value]
    if isinstance(value, dict):
        return {k: _hex(v) for k, v in value.items()}
    return value


def main() -> int:
    data = json.load(sys.stdin)
    import msgspec
    from vllm.distributed import kv_events as ke
    from vllm.utils.hashing import sha256
    from vllm.v1.core import kv_cache_utils as kcu

    hashes = []
    for case in data.get("hash_cases", []):
        if case.get("seed") is None:
            os.environ.pop("PYTHONHASHSEED", None)
        else:
            os.environ["PYTHONHASHSEED"] = case["seed"]
        kcu.init_none_hash(sha256)
        tokens, bs = case["tokens"], case["block_size"]
        out: list[bytes] = []
        if case.get("lora") or case.get("cache_salt"):
            # a LoRA or salted request's hashes as the scheduler computes them: vLLM's own Request
            # and block hasher (generate_block_hash_extra_keys adds the adapter's name and path to
            # every block, the cache_salt to the first)
            from vllm.lora.request import LoRARequest
            from vllm.sampling_params import SamplingParams
            from vllm.v1.request import Request

            lora = None
            if case.get("lora"):
                name, path = case["lora"]
                lora = LoRARequest(lora_name=name, lora_int_id=1, lora_path=path)
            req = Request(
                "r", tokens, SamplingParams(max_tokens=1), None, lora_request=lora,
                cache_salt=case.get("cache_salt"), block_hasher=kcu.get_request_block_hasher(bs, sha256),
            )  # fmt: skip
            out = list(req.block_hashes)
        else:
            for i in range(len(tokens) // bs):
                out.append(
                    kcu.hash_block_tokens(sha256, out[-1] if out else None, tokens[i * bs : (i + 1) * bs])
                )
        hashes.append([h.hex() for h in out])
    kinds = {
        "BlockStored": ke.BlockStored,
        "BlockRemoved": ke.BlockRemoved,
        "AllBlocksCleared": ke.AllBlocksCleared,
    }
    encoder = msgspec.msgpack.Encoder()
    encoded = []
    for batch in data.get("batches", []):
        events = []
        for e in batch["events"]:
            fields = _unhex({k: v for k, v in e.items() if k != "type"})
            events.append(kinds[e["type"]](**fields))
        b = ke.KVEventBatch(ts=batch["ts"], events=events, data_parallel_rank=batch.get("data_parallel_rank"))
        encoded.append(encoder.encode(b).hex())
    decoder = msgspec.msgpack.Decoder(ke.KVEventBatch)
    decoded = []
    for payload in data.get("payloads", []):
        b = decoder.decode(bytes.fromhex(payload))
        decoded.append(
            {
                "ts": b.ts,
                "data_parallel_rank": b.data_parallel_rank,
                "events": [{"type": type(e).__name__, **_hex(msgspec.structs.asdict(e))} for e in b.events],
            }
        )
    json.dump({"hashes": hashes, "encoded": encoded, "decoded": decoded}, sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
