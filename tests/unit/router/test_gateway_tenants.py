"""Tenants on the gateway (tenant_gate.py, tenant_watch.py) on loopback, in front of real mock
engines: keys (401), models (403), budgets (429 + Retry-After), keys rotated through the Secret
events the watch hands over, usage settled per tenant, and the flow-control queue by priority
band while the replicas are saturated."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from tests.unit.router.test_gateway import LLAMA, QWEN, engine, engine_slice, gateway, healthy, llmd, until

from toposerve.router import strategies as st
from toposerve.router import tenants as tn
from toposerve.router.gateway import Gateway
from toposerve.router.proxy import RouterConfig
from toposerve.router.tenant_gate import FlowOptions
from toposerve.router.tenant_watch import TenantSource

KEY_A = "sk-a-0123456789abcdef"
KEY_A_NEW = "sk-a-rotated-0123456789"
KEY_B = "sk-b-0123456789abcdef"
KEY_C = "sk-c-0123456789abcdef"

POLICY = {
    "tenants": {
        "team-a": {"models": [LLAMA], "budgets": {"requestsPerSecond": 0.001}},  # one request, then 429
        "team-b": {"models": ["*"], "priority": "critical"},
        "team-c": {"models": ["*"], "priority": "sheddable"},
    }
}


def key_secret(name: str, tenant: str, *keys: str, raw: str | None = None) -> dict[str, Any]:
    """A Secret as the API serves it (data base64-encoded)."""
    data = raw if raw is not None else base64.b64encode("\n".join(keys).encode()).decode()
    return {
        "metadata": {
            "name": name,
            "namespace": "toposerve-system",
            "labels": {"toposerve.io/tenant": tenant},
        },
        "data": {"api-keys": data},
    }


def client(base: str, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base + "/v1", api_key=key, max_retries=0)


@contextlib.asynccontextmanager
async def tenant_gateway(
    cfg: RouterConfig | None = None, flow: FlowOptions | None = None
) -> AsyncIterator[tuple[Gateway, str, TenantSource]]:
    llama, qwen = await engine(LLAMA, time_scale=1.0), await engine(QWEN)  # llama paced: a stream lasts
    try:
        async with gateway(cfg) as (gw, base):
            gw.tenants.admission.require_key = True
            if flow is not None:
                gw.tenants.flow = flow
            source = TenantSource(tn.parse_policies(POLICY, "policy"), gw.tenants.admission.set_table)
            source.secrets_listed([
                key_secret("team-a-keys", "team-a", KEY_A),
                key_secret("team-b-keys", "team-b", KEY_B),
                key_secret("team-c-keys", "team-c", KEY_C),
            ])  # fmt: skip
            gw.deployments_listed([llmd("llama", LLAMA), llmd("qwen", QWEN)])
            gw.slices_listed([engine_slice("l", "llama", [llama]), engine_slice("q", "qwen", [qwen])])
            await until(lambda: healthy(gw, LLAMA) and healthy(gw, QWEN), "both deployments healthy")
            yield gw, base, source
    finally:
        await llama.stop()
        await qwen.stop()


async def metrics(base: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    async with aiohttp.ClientSession() as s, s.get(base + "/metrics") as r:
        text = await r.text()
    return {
        (x.name, frozenset(x.labels.items())): x.value
        for fam in text_string_to_metric_families(text)
        for x in fam.samples
    }


async def test_keys_models_and_budgets() -> None:
    async with tenant_gateway() as (gw, base, _):
        async with aiohttp.ClientSession() as s:
            body = {"model": LLAMA, "prompt": "hi", "max_tokens": 2}
            async with s.post(base + "/v1/completions", json=body) as r:
                assert r.status == 401
                assert "API key" in (await r.json())["error"]["message"]
            async with s.post(base + "/v1/completions", json={**body, "model": "nope"}) as r:
                assert r.status == 401  # no word about models before the key
            async with s.post(base + "/v1/completions", json=body, headers={"x-api-key": KEY_B}) as r:
                assert r.status == 200  # the x-api-key header works too
        with pytest.raises(openai.AuthenticationError):
            await client(base, "sk-nobody-0123456789").completions.create(
                model=LLAMA, prompt="x", max_tokens=1
            )
        a = client(base, KEY_A)
        with pytest.raises(openai.PermissionDeniedError) as denied:
            await a.completions.create(model=QWEN, prompt="x", max_tokens=1)
        assert "team-a" in str(denied.value) and QWEN in str(denied.value)
        assert {m.id for m in (await a.models.list()).data} == {LLAMA}
        assert (await a.completions.create(model=LLAMA, prompt="x", max_tokens=2)).choices
        with pytest.raises(openai.RateLimitError) as limited:
            await a.completions.create(model=LLAMA, prompt="x", max_tokens=2)
        assert int(limited.value.response.headers["Retry-After"]) >= 1
        assert "requestsPerSecond" in str(limited.value)
        # another tenant is served while team-a is over its budget
        b = client(base, KEY_B)
        for _ in range(3):
            assert (await b.completions.create(model=QWEN, prompt="x", max_tokens=2)).choices
        m = await metrics(base)
        req = "toposerve_tenant_requests_total"
        assert m[(req, frozenset({("tenant", "team-a"), ("model", LLAMA), ("code", "429")}))] == 1
        assert m[(req, frozenset({("tenant", "team-a"), ("model", QWEN), ("code", "403")}))] == 1
        assert m[(req, frozenset({("tenant", "team-b"), ("model", QWEN), ("code", "200")}))] == 3
        assert gw.tenants.admission.in_flight("team-b") == 0


async def test_usage_is_settled_and_counted_per_tenant() -> None:
    async with tenant_gateway() as (_gw, base, _):
        b = client(base, KEY_B)
        got = await b.completions.create(model=QWEN, prompt="a b c d", max_tokens=5)
        assert got.usage is not None
        stream = await b.chat.completions.create(
            model=LLAMA,
            messages=[{"role": "user", "content": "hello"}],
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True},
        )
        usage = [c.usage async for c in stream if c.usage is not None][-1]
        m = await metrics(base)
        tok = "toposerve_tenant_tokens_total"
        assert (
            m[(tok, frozenset({("tenant", "team-b"), ("model", QWEN), ("kind", "prompt")}))]
            == got.usage.prompt_tokens
        )
        assert m[(tok, frozenset({("tenant", "team-b"), ("model", QWEN), ("kind", "completion")}))] == 5
        assert (
            m[(tok, frozenset({("tenant", "team-b"), ("model", LLAMA), ("kind", "completion")}))]
            == usage.completion_tokens
        )


async def test_keys_rotate_without_restart_and_a_bad_secret_keeps_the_last_good_keys() -> None:
    async with tenant_gateway() as (_gw, base, source):
        old, new = client(base, KEY_A), client(base, KEY_A_NEW)
        with pytest.raises(openai.AuthenticationError):
            await new.completions.create(model=LLAMA, prompt="x", max_tokens=1)
        # rotation: both keys for a while, then the new one only (as the watch hands the events)
        source.secret_event("MODIFIED", key_secret("team-a-keys", "team-a", KEY_A, KEY_A_NEW))
        assert (await new.completions.create(model=LLAMA, prompt="x", max_tokens=1)).choices
        source.secret_event("MODIFIED", key_secret("team-a-keys", "team-a", KEY_A_NEW))
        with pytest.raises(openai.AuthenticationError):
            await old.completions.create(model=LLAMA, prompt="x", max_tokens=1)
        # a broken edit: logged with the Secret's name, the keys before it stay
        source.secret_event("MODIFIED", key_secret("team-a-keys", "team-a", raw="not base64!"))
        assert (
            "Secret toposerve-system/team-a-keys: data.api-keys"
            in source.errors["toposerve-system/team-a-keys"]
        )
        with pytest.raises(openai.RateLimitError):  # known (so not 401): over team-a's budget
            await new.completions.create(model=LLAMA, prompt="x", max_tokens=1)
        source.secret_event("DELETED", key_secret("team-a-keys", "team-a"))
        with pytest.raises(openai.AuthenticationError):
            await new.completions.create(model=LLAMA, prompt="x", max_tokens=1)


def _one_slot() -> RouterConfig:
    return RouterConfig(probe_interval_s=0.05, routing=st.Config(max_in_flight=1))


async def _holder(base: str) -> tuple[aiohttp.ClientSession, aiohttp.ClientResponse]:
    """A long stream that holds the only slot until closed."""
    s = aiohttp.ClientSession()
    r = await s.post(
        base + "/v1/completions",
        json={"model": LLAMA, "prompt": "x", "max_tokens": 3000, "stream": True, "ignore_eos": True},
        headers={"Authorization": f"Bearer {KEY_B}"},
    )
    assert r.status == 200
    await r.content.readline()  # the first event: it is on the engine
    return s, r


async def test_saturated_replicas_queue_by_band_and_the_autoscaler_sees_the_queue() -> None:
    async with tenant_gateway(_one_slot()) as (gw, base, source):
        source.set_policies(tn.parse_policies(
            {"tenants": {**POLICY["tenants"], "team-a": {"priority": "standard"}}}, "policy"
        ))  # fmt: skip
        s, holder = await _holder(base)
        order: list[str] = []

        async def ask(tenant: str, key: str) -> None:
            await client(base, key).completions.create(model=LLAMA, prompt="x", max_tokens=2)
            order.append(tenant)

        member = gw.members["team-a/llama"]
        tasks = [asyncio.create_task(ask("c1", KEY_C)), asyncio.create_task(ask("c2", KEY_C))]
        await until(lambda: member.queued == 2, "two sheddable requests queued")
        tasks.append(asyncio.create_task(ask("a", KEY_A)))
        await until(lambda: member.queued == 3, "a standard one queued")
        tasks.append(asyncio.create_task(ask("b", KEY_B)))
        await until(lambda: member.queued == 4, "a critical one queued")
        m = await metrics(base)
        dep = frozenset({("llmdeployment_namespace", "team-a"), ("llmdeployment", "llama")})
        assert m[("toposerve_router_queued_requests", dep)] == 4  # what the autoscaler reads
        assert m[("toposerve_gateway_flow_queued_requests", frozenset({("band", "sheddable")}))] == 2
        holder.close()
        await s.close()
        await asyncio.gather(*tasks)
        assert order == ["b", "a", "c1", "c2"]
        assert member.queued == 0 and not gw.tenants.queues


async def test_sheddable_is_shed_first_and_a_queue_wait_is_bounded() -> None:
    flow = FlowOptions(max_bytes=400, max_wait_s=60)
    async with tenant_gateway(_one_slot(), flow) as (gw, base, _):
        s, holder = await _holder(base)
        member = gw.members["team-a/llama"]
        shed = asyncio.create_task(
            client(base, KEY_C).completions.create(model=LLAMA, prompt="x" * 200, max_tokens=2)
        )
        await until(lambda: member.queued == 1, "the sheddable request queued")
        crit = asyncio.create_task(
            client(base, KEY_B).completions.create(model=LLAMA, prompt="y" * 200, max_tokens=2)
        )
        with pytest.raises(openai.RateLimitError) as e:
            await shed  # no room for both bodies: the sheddable one goes
        assert "shed" in str(e.value) and e.value.response.headers["Retry-After"] == "60"
        gw.tenants.flow = FlowOptions(max_bytes=400, max_wait_s=0.2)
        with pytest.raises(openai.RateLimitError) as late:  # queued past the bound
            await client(base, KEY_A).completions.create(model=LLAMA, prompt="z", max_tokens=2)
        assert "waited" in str(late.value)
        holder.close()
        await s.close()
        assert (await crit).choices
        assert member.queued == 0


def test_secret_key_digest_is_what_the_table_holds() -> None:
    source = TenantSource(tn.parse_policies(POLICY, "p"), lambda _t: None)
    source.secrets_listed([key_secret("k", "team-b", KEY_B)])
    table = source.table()
    assert hashlib.sha256(KEY_B.encode()).digest() in table.tenants["team-b"].key_hashes
    assert KEY_B not in repr(source.secrets) and KEY_B not in repr(table)


def test_flags_and_the_policy_file(tmp_path: Any) -> None:
    import argparse

    from toposerve.router import gateway_cli, tenant_watch

    p = argparse.ArgumentParser()
    gateway_cli.add_arguments(p)
    assert tenant_watch.check_args(p.parse_args([])) is None  # no tenants: today's gateway
    assert tenant_watch.check_args(p.parse_args(["--require-api-key"])) == {}
    with pytest.raises(ValueError, match="--tenant-secrets needs --tenants-namespace"):
        tenant_watch.check_args(p.parse_args(["--tenant-secrets", "--tenants-namespace="]))
    bad = tmp_path / "t.yaml"
    bad.write_text("tenants:\n  search:\n    budgets: {rps: 3}\n")
    with pytest.raises(tn.TenantConfigError, match=r"t.yaml.tenants.search.budgets.rps: unknown field"):
        tenant_watch.check_args(p.parse_args(["--tenants-file", str(bad)]))
    bad.write_text("tenants: [\n")
    with pytest.raises(tn.TenantConfigError, match="not YAML"):
        tenant_watch.load_policy_file(str(bad))
    good = tmp_path / "g.yaml"
    good.write_text("tenants:\n  search: {priority: critical}\n")
    assert (
        tenant_watch.check_args(p.parse_args(["--tenants-file", str(good)]))["search"].priority == "critical"
    )


async def test_a_bad_policy_edit_keeps_the_previous_policy(tmp_path: Any) -> None:
    from toposerve.router import tenant_watch

    f = tmp_path / "t.yaml"
    f.write_text("tenants:\n  search: {models: [a]}\n")
    tables: list[tn.Table] = []
    source = TenantSource(tenant_watch.load_policy_file(str(f)), tables.append)
    follow = asyncio.create_task(tenant_watch.follow_file(source, str(f), period_s=0.01))
    try:
        import os

        await asyncio.sleep(0.05)  # the follower has read the first mtime
        f.write_text("tenants:\n  search: {models: 3}\n")
        os.utime(f, (1, 1))
        await until(lambda: str(f) in source.errors, "the bad edit seen")
        assert source.policies["search"].models == ("a",)
        f.write_text("tenants:\n  search: {models: [b]}\n")
        os.utime(f, (2, 2))
        await until(lambda: source.policies["search"].models == ("b",), "the good edit applied")
        assert tables[-1].tenants["search"].models == ("b",) and str(f) not in source.errors
    finally:
        follow.cancel()


async def test_an_inference_objective_header_lowers_a_requests_band() -> None:
    """GIE's `x-gateway-inference-objective` naming an objective mapped to `sheddable`: the
    critical tenant's request waits behind a standard one (the policy's `objectives`)."""
    async with tenant_gateway(_one_slot()) as (gw, base, source):
        source.set_policies(tn.parse_policies(
            {"tenants": {**POLICY["tenants"], "team-a": {"priority": "standard"}},
             "objectives": {"batch": "sheddable"}}, "policy"
        ))  # fmt: skip
        s, holder = await _holder(base)
        order: list[str] = []

        async def ask(name: str, key: str, headers: dict[str, str]) -> None:
            c = openai.AsyncOpenAI(base_url=base + "/v1", api_key=key, max_retries=0, default_headers=headers)
            await c.completions.create(model=LLAMA, prompt="x", max_tokens=2)
            order.append(name)

        member = gw.members["team-a/llama"]
        tasks = [asyncio.create_task(ask("b-batch", KEY_B, {"x-gateway-inference-objective": "batch"}))]
        await until(lambda: member.queued == 1, "the critical tenant's batch request queued")
        tasks.append(asyncio.create_task(ask("a", KEY_A, {})))
        await until(lambda: member.queued == 2, "a standard one queued")
        m = await metrics(base)
        assert m[("toposerve_gateway_flow_queued_requests", frozenset({("band", "sheddable")}))] == 1
        holder.close()
        await s.close()
        await asyncio.gather(*tasks)
        assert order == ["a", "b-batch"]
