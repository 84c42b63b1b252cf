"""cache_salt and multi-modal requests under KV-event routing (issue 28).

vLLM 0.33.0 salts a request's first block (``generate_block_hash_extra_keys``: lora keys, then
``cache_salt`` when ``start_token_idx == 0``), so a salted prompt's whole chain of block hashes
differs from the same prompt unsalted; multi-modal and prompt-embeds requests carry keys only the
engine can compute. The router hashes salted requests as the engine does and scores the others on
its approximation, counted. The hashes themselves are judged against vLLM's own code in
tests/vllm/test_kv_events.py; here real mock engines publish the events over loopback."""

from __future__ import annotations

import aiohttp
import pytest
from tests.unit.router.test_router_kv_events import (
    BLOCK,
    MODEL,
    engine,
    engine_keys,
    fresh,
    index_keys,
    prompt,
    router_for,
    until,
)

from toposerve.kvevents import hashing
from toposerve.kvevents.index import key
from toposerve.router.kvindex import hashed_apart


def test_the_salt_changes_the_first_block_and_so_every_block_after_it() -> None:
    tokens = list(range(40))
    plain = hashing.block_hashes(tokens, BLOCK)
    salted = hashing.block_hashes(tokens, BLOCK, cache_salt="tenant-a")
    other = hashing.block_hashes(tokens, BLOCK, cache_salt="tenant-b")
    assert len(plain) == len(salted) == 10
    assert not set(plain) & set(salted) and not set(salted) & set(other)
    root = hashing.none_hash()
    # only block 0 carries the salt; block 1 is chained on block 0 with no extra keys
    assert salted[0] == hashing.hash_block(None, tokens[:BLOCK], root, (("cache_salt", "tenant-a"),))
    assert salted[1] == hashing.hash_block(salted[0], tokens[BLOCK : 2 * BLOCK], root, None)
    lora = hashing.lora_extra_keys("sql", "/a/sql")
    both = hashing.block_hashes(tokens, BLOCK, extra_keys=lora, cache_salt="s")
    assert both[0] == hashing.hash_block(None, tokens[:BLOCK], root, (*lora, ("cache_salt", "s")))
    assert both[1] == hashing.hash_block(both[0], tokens[BLOCK : 2 * BLOCK], root, lora)
    assert hashing.block_hashes(tokens, BLOCK, cache_salt="") == plain  # empty: no salt


@pytest.mark.parametrize(
    ("path", "body", "apart"),
    [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, False),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}]},
            False,
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            True,
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
            True,
        ),
        ("/v1/completions", {"prompt": "hi"}, False),
        ("/v1/completions", {"prompt_embeds": "base64"}, True),
    ],
)
def test_which_requests_carry_keys_the_router_cannot_compute(path: str, body: dict, apart: bool) -> None:
    assert hashed_apart(path, body) is apart


async def salted(s: aiohttp.ClientSession, base: str, text: str, salt: str | None) -> tuple[str, int]:
    body: dict = {"model": MODEL, "prompt": text, "max_tokens": 2}
    if salt is not None:
        body["cache_salt"] = salt
    async with s.post(base + "/v1/completions", json=body) as r:
        assert r.status == 200, await r.text()
        doc = await r.json()
        cached = (doc["usage"].get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        return r.headers.get("x-toposerve-backend", ""), cached


async def test_a_salted_prefix_is_routed_to_where_that_salt_cached_it_and_the_mock_isolates_salts() -> None:
    a, b = await engine(), await engine()
    try:
        async with router_for([a, b]) as (router, base), aiohttp.ClientSession() as s:
            await until(lambda: fresh(router, a) and fresh(router, b), "both fresh")
            long = prompt(3, words=120)
            await salted(s, a.url, long, "tenant-a")  # a caches the prefix under tenant-a's salt
            await salted(s, b.url, long, None)  # b caches the same text unsalted
            await until(lambda: index_keys(router, a) == engine_keys(a) != set(), "index of a")
            await until(lambda: index_keys(router, b) == engine_keys(b) != set(), "index of b")
            ids = a.engine.tokenizer.encode(long)
            salted_keys = {key(h) for h in hashing.block_hashes(ids, BLOCK, cache_salt="tenant-a")}
            assert salted_keys <= engine_keys(a) and not salted_keys & engine_keys(b)
            # the mock engine itself keeps salts apart: tenant-b's salt finds nothing cached on a
            _, cached = await salted(s, a.url, long, "tenant-b")
            assert cached == 0
            await until(lambda: index_keys(router, a) == engine_keys(a), "index of a after tenant-b")
            # through the router: tenant-a's salted prefix goes to a, the unsalted one to b
            chosen_a, hit_a = await salted(s, base, long + " more", "tenant-a")
            chosen_b, hit_b = await salted(s, base, long + " more", None)
            assert (chosen_a, chosen_b) == (a.url, b.url)
            assert hit_a > 0 and hit_b > 0
            assert router.kvindex is not None and router.kvindex.fallbacks["tokenize"] == 0
    finally:
        await a.stop()
        await b.stop()


async def test_a_multimodal_request_is_scored_on_the_approximation_and_counted() -> None:
    a = await engine()
    try:
        async with router_for([a]) as (router, base), aiohttp.ClientSession() as s:
            await until(lambda: fresh(router, a), "fresh")
            body = {
                "model": MODEL,
                "max_tokens": 2,
                "messages": [{"role": "user", "content": [{"type": "text", "text": "look"},
                                                          {"type": "image_url", "image_url": {"url": "data:x"}}]}],
            }  # fmt: skip
            async with s.post(base + "/v1/chat/completions", json=body) as r:
                await r.read()  # the mock may refuse the image; the routing decision came first
            assert router.kvindex is not None and router.kvindex.fallbacks["multimodal"] == 1
            assert router.kvindex.fallbacks["tokenize"] == 0
    finally:
        await a.stop()


async def test_the_mock_refuses_an_empty_or_non_string_salt_as_vllm_does() -> None:
    a = await engine()
    try:
        async with aiohttp.ClientSession() as s:
            for bad in ("", 7):
                async with s.post(
                    a.url + "/v1/completions", json={"model": MODEL, "prompt": "x", "cache_salt": bad}
                ) as r:
                    doc = await r.json()
                    assert r.status == 400 and doc["error"]["param"] == "cache_salt", doc
                    assert "non-empty string" in doc["error"]["message"]
    finally:
        await a.stop()


def test_an_adapter_name_equal_to_the_salt_hashes_as_in_the_engine_where_they_are_two_objects() -> None:
    """Pickle back-references a string object it already wrote: one object used as both the
    adapter's name and the salt would hash differently from the engine's two (vLLM's own hasher
    found it: tests/vllm/test_kv_events.py)."""
    tokens = list(range(32))
    same = "".join(["tenant", "-x"])
    one_object = hashing.block_hashes(
        tokens, BLOCK, extra_keys=hashing.lora_extra_keys(same, "/a"), cache_salt=same
    )
    a, b = "".join(["tenant", "-x"]), "".join(["tenant-", "x"])
    assert a is not b
    two_objects = hashing.block_hashes(
        tokens, BLOCK, extra_keys=hashing.lora_extra_keys(a, "/a"), cache_salt=b
    )
    assert one_object == two_objects
