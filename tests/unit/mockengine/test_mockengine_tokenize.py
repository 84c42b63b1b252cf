"""The mock engine's ``POST /tokenize`` (vLLM 0.33.0, entrypoints/serve/tokenize/): the ids it
answers are exactly those a completion or chat request is served with, so a router that hashes
them into blocks (kvevents/hashing.py) names the blocks the engine caches."""

from __future__ import annotations

import aiohttp
from test_mockengine_server import MODEL, post, serve

from toposerve.kvevents import hashing

SYSTEM = "You are a careful assistant who answers in full sentences. " * 6


def cached(srv: object) -> set[bytes]:
    return set(srv.engine.scheduler.blocks._cached)  # type: ignore[attr-defined]


async def test_completion_ids_hash_to_the_blocks_the_engine_caches() -> None:
    async with serve(block_size=16) as srv, aiohttp.ClientSession() as s:
        prompt = SYSTEM + "What is a KV cache?"
        st, tok = await post(s, srv.url + "/tokenize", {"model": MODEL, "prompt": prompt})
        assert st == 200 and tok["count"] == len(tok["tokens"]) and tok["max_model_len"] == 8192
        assert tok["token_strs"] is None
        st, done = await post(
            s, srv.url + "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 1}
        )
        assert st == 200 and done["usage"]["prompt_tokens"] == tok["count"]
        want = hashing.block_hashes(tok["tokens"], 16)
        assert want and set(want) <= cached(srv)


async def test_chat_ids_follow_the_generation_prompt_options_as_the_chat_endpoint_does() -> None:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hello there"}]
    async with serve(block_size=4) as srv, aiohttp.ClientSession() as s:
        st, default = await post(s, srv.url + "/tokenize", {"messages": messages})
        st2, bare = await post(
            s, srv.url + "/tokenize", {"messages": messages, "add_generation_prompt": False}
        )
        st3, cont = await post(
            s,
            srv.url + "/tokenize",
            {"messages": messages, "add_generation_prompt": False, "continue_final_message": True},
        )
        assert (st, st2, st3) == (200, 200, 200)
        # the mock's tokens carry their leading whitespace, so the template's last newline joins
        # the generation prompt's first token: compare the ids before it
        assert (
            default["tokens"][: bare["count"] - 1] == bare["tokens"][:-1] and default["count"] > bare["count"]
        )
        assert cont["tokens"] != bare["tokens"] and cont["count"] <= bare["count"]
        st, both = await post(
            s,
            srv.url + "/tokenize",
            {"messages": messages, "add_generation_prompt": True, "continue_final_message": True},
        )
        assert st == 400 and both["error"]["code"] == 400
        # a chat request with the same fields is served with those very ids (its blocks cached)
        for ask, tok in (({}, default), ({"add_generation_prompt": False}, bare)):
            st, done = await post(
                s,
                srv.url + "/v1/chat/completions",
                {"model": MODEL, "messages": messages, "max_tokens": 1, **ask},
            )
            assert st == 200 and done["usage"]["prompt_tokens"] == tok["count"]
            assert set(hashing.block_hashes(tok["tokens"], 4)) <= cached(srv)


async def test_token_strs_and_refusals() -> None:
    async with serve() as srv, aiohttp.ClientSession() as s:
        st, tok = await post(s, srv.url + "/tokenize", {"prompt": "Hello, world", "return_token_strs": True})
        assert st == 200 and "".join(tok["token_strs"]) == "Hello, world"
        assert len(tok["token_strs"]) == tok["count"]
        st, _ = await post(s, srv.url + "/tokenize", {"prompt": "x", "add_special_tokens": False})
        assert st == 200
        for bad in (
            {"prompt": [1, 2]},
            {"prompt": "x", "return_token_strs": "yes"},
            {"messages": []},
            {"prompt": "x", "model": "other"},
        ):
            st, err = await post(s, srv.url + "/tokenize", bad)
            assert st in (400, 404) and "error" in err, bad
