"""Backend specs, EndpointSlice parsing and the pure endpoint-set update rules; the CLI frame."""

from __future__ import annotations

from typing import Any

import pytest

from toposerve.router import endpoints as ep
from toposerve.router.endpoints import BackendSpec


def slice_(
    name: str, eps: list[dict[str, Any]], labels: dict[str, str] | None = None, **kw: Any
) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": {"kubernetes.io/service-name": "svc", **(labels or {})}},
        "addressType": kw.get("family", "IPv4"),
        "ports": kw.get("ports", [{"name": "http", "port": 8000, "protocol": "TCP"}]),
        "endpoints": eps,
    }


def e(addr: str, ready: bool | None = True, terminating: bool | None = None) -> dict[str, Any]:
    cond: dict[str, Any] = {}
    if ready is not None:
        cond["ready"] = ready
    if terminating is not None:
        cond["terminating"] = terminating
    return {"addresses": [addr], "conditions": cond}


H100 = {ep.POOL_LABEL: "fast", ep.GPU_LABEL: "H100"}


def test_backend_spec_parse_tags_and_weights() -> None:
    b = BackendSpec.parse("http://127.0.0.1:8001/#gpu=H100&pool=fast&long-context=true")
    assert (b.url, b.gpu_type, b.pool, b.long_context, b.weight) == (
        "http://127.0.0.1:8001",
        "H100",
        "fast",
        True,
        1.6,
    )
    plain = BackendSpec.parse("http://10.0.0.1:8000")
    assert (plain.gpu_type, plain.pool, plain.long_context, plain.weight) == ("", "", False, 1.0)
    assert BackendSpec.parse("http://h:1#gpu=A100-40GB").pool == "a100-40gb"
    specs = ep.parse_backends("http://a:1, http://b:2#gpu=B200 ,,")
    assert [s.url for s in specs] == ["http://a:1", "http://b:2"] and specs[1].weight == 2.5
    for bad in ("a:1", "ftp://x:1", "http://x:1#colour=red"):
        with pytest.raises(ValueError):
            BackendSpec.parse(bad)


def test_endpoints_from_slice_tags_and_conditions() -> None:
    obj = slice_(
        "s1",
        [
            e("10.0.0.1"),
            e("10.0.0.2", ready=False),
            e("10.0.0.3", terminating=True, ready=False),
            e("10.0.0.4", None),
        ],
        {**H100, ep.LONG_CONTEXT_LABEL: "true"},
    )
    got = {x.spec.url: x for x in ep.endpoints_from_slice(obj)}
    assert set(got) == {f"http://10.0.0.{i}:8000" for i in range(1, 5)}
    one = got["http://10.0.0.1:8000"]
    assert (one.spec.gpu_type, one.spec.pool, one.spec.long_context, one.draining) == (
        "H100",
        "fast",
        True,
        False,
    )
    assert got["http://10.0.0.2:8000"].draining and got["http://10.0.0.3:8000"].draining
    assert not got["http://10.0.0.4:8000"].draining  # nil ready means ready
    # pool defaults to the GPU type; IPv6 gets brackets; the named port wins over others
    v6 = slice_(
        "s2",
        [e("fd00::1")],
        {ep.GPU_LABEL: "A100-40GB"},
        family="IPv6",
        ports=[{"name": "metrics", "port": 9000}, {"name": "http", "port": 8000}],
    )
    (only,) = ep.endpoints_from_slice(v6)
    assert (only.spec.url, only.spec.pool) == ("http://[fd00::1]:8000", "a100-40gb")
    # an unnamed single port is accepted; no port at all gives nothing
    assert ep.endpoints_from_slice(slice_("s3", [e("1.1.1.1")], ports=[{"port": 7000}]))[0].spec.url.endswith(
        ":7000"
    )
    assert ep.endpoints_from_slice(slice_("s4", [e("1.1.1.1")], ports=[])) == ()


def test_apply_event_add_modify_delete_is_pure() -> None:
    s0: dict[str, tuple[ep.Endpoint, ...]] = {}
    s1 = ep.apply_event(s0, "ADDED", slice_("a", [e("10.0.0.1")], H100))
    assert s0 == {} and set(s1) == {"a"}
    s2 = ep.apply_event(
        s1, "MODIFIED", slice_("a", [e("10.0.0.1", ready=False, terminating=True), e("10.0.0.2")])
    )
    assert ep.desired_backends(s2)["http://10.0.0.1:8000"][1] is True
    s3 = ep.apply_event(s2, "BOOKMARK", slice_("a", []))
    assert s3 == s2
    assert ep.apply_event(s3, "DELETED", slice_("a", [])) == {}


def test_desired_backends_merges_split_slices_ready_wins() -> None:
    slices = ep.from_list(
        [
            slice_("a", [e("10.0.0.1", ready=False)], H100),
            slice_("b", [e("10.0.0.1"), e("10.0.0.2", terminating=True)], H100),
        ]
    )
    d = ep.desired_backends(slices)
    assert d["http://10.0.0.1:8000"][1] is False
    assert d["http://10.0.0.2:8000"][1] is True


def test_diff_reports_added_drained_restored_removed() -> None:
    cur = {"u1": False, "u2": False, "u3": True, "u4": False}
    desired = {
        "u1": (BackendSpec("u1"), False),
        "u2": (BackendSpec("u2"), True),
        "u3": (BackendSpec("u3"), False),
        "u5": (BackendSpec("u5"), False),
    }
    assert ep.diff(cur, desired) == ep.Update(
        added=("u5",), drained=("u2",), restored=("u3",), removed=("u4",)
    )


def test_cli_parser_and_argument_errors() -> None:
    from toposerve.cli import build_parser
    from toposerve.router import cli

    args = build_parser().parse_args(["router", "--backends", "http://a:1", "--strategy", "prefix-aware"])
    assert (args.strategy, args.port, args.host) == ("prefix-aware", 8080, "127.0.0.1")
    with pytest.raises(SystemExit, match="expected http"):
        cli.run(build_parser().parse_args(["router", "--backends", "nope"]))
    with pytest.raises(SystemExit, match="discovery"):
        cli.run(build_parser().parse_args(["router", "--backends", ""]))
    assert args.gc_gen0_threshold == 10_000
    with pytest.raises(SystemExit, match="--gc-gen0-threshold must be 0"):
        cli.run(
            build_parser().parse_args(["router", "--backends", "http://a:1", "--gc-gen0-threshold", "-1"])
        )
    assert args.write_timeout == 60.0
    with pytest.raises(SystemExit, match="--write-timeout must be 0"):
        cli.run(build_parser().parse_args(["router", "--backends", "http://a:1", "--write-timeout", "-1"]))
    from toposerve.router import strategies

    assert cli.STRATEGY_NAMES == strategies.STRATEGIES


async def test_slice_watcher_hands_desired_backends_to_the_loop() -> None:
    import asyncio

    from toposerve.router.discovery import SliceWatcher

    got: list[dict[str, tuple[BackendSpec, bool]]] = []
    w = SliceWatcher(
        "ns", "toposerve.io/llmdeployment=x", lambda d: got.append(dict(d)), asyncio.get_running_loop()
    )
    raw = slice_("a", [e("10.0.0.1"), e("10.0.0.2", ready=False)], H100)
    slices = ep.apply_event({}, "ADDED", raw)
    w._listed([raw])  # what the watch thread hands the loop after a list
    for _ in range(100):
        if got:
            break
        await asyncio.sleep(0.01)
    assert got == [ep.desired_backends(slices)]
    assert {u: d for u, (_, d) in got[0].items()} == {
        "http://10.0.0.1:8000": False,
        "http://10.0.0.2:8000": True,
    }


def test_untagged_all_engines_slice_does_not_erase_pool_tags() -> None:
    """A pod behind the all-engines Service and its pool Service keeps the pool's GPU tags."""
    slices = ep.from_list(
        [
            slice_("all-engines-abc", [e("10.0.0.1"), e("10.0.0.9", ready=False)]),
            slice_("pool-h100-xyz", [e("10.0.0.1", ready=False)], H100),
        ]
    )
    d = ep.desired_backends(slices)
    spec, draining = d["http://10.0.0.1:8000"]
    assert (spec.gpu_type, spec.pool, draining) == ("H100", "fast", False)
    assert d["http://10.0.0.9:8000"][1] is True


def test_cli_routing_spec_flags() -> None:
    from toposerve.cli import build_parser

    args = build_parser().parse_args(
        [
            "router",
            "--llmdeployment",
            "x",
            "--session-header",
            "X-Conv",
            "--no-gpu-weighting",
            "--session-ttl",
            "600",
        ]
    )
    assert (args.session_header, args.gpu_weighting, args.session_ttl) == ("X-Conv", False, 600.0)
    assert build_parser().parse_args(["router"]).gpu_weighting is True


def test_engine_selector_excludes_the_router_service() -> None:
    assert ep.engine_selector("llama") == "toposerve.io/deployment=llama,app.kubernetes.io/component=engine"


@pytest.mark.parametrize(
    ("module", "allowed"),
    [
        ("strategies", set()),
        ("endpoints", {"toposerve"}),
        ("cli", set()),  # toposerve.cli imports it eagerly: module level must stay stdlib-only
    ],
)
def test_pure_modules_import_no_io_libraries(module: str, allowed: set[str]) -> None:
    """The decision code never imports aiohttp, kubernetes or prometheus (design rule)."""
    import ast
    import sys
    from pathlib import Path

    import toposerve.router as pkg

    tree = ast.parse(Path(pkg.__path__[0], f"{module}.py").read_text())
    top = set()
    for node in tree.body:  # module level only: run() may import heavy things lazily
        if isinstance(node, ast.Import):
            top |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            top.add(node.module.split(".")[0])
    assert top - {"__future__"} <= set(sys.stdlib_module_names) | allowed, top
