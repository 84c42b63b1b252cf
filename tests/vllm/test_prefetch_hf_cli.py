"""The warm-node prefetch's download command (render/prefetch.py) is accepted by the `hf` CLI of
the huggingface_hub that the pinned vLLM image ships (2.4.0 beside vLLM 0.33.0 in its venv): its
own click command parses every rendered argv, and the same parser refuses a misspelt option (so
this test can fail). No network: parsing only."""

from __future__ import annotations

import json
import shlex
import subprocess
from typing import Any

import pytest

from tests.unit.conftest import make_spec
from tests.vllm_cli import vllm_python
from toposerve.planner.plan import plan_deployment
from toposerve.render.objects import render_deployment

pytestmark = pytest.mark.vllm

PARSE = r"""
import json, sys
import click
from huggingface_hub.cli import hf
out = []
for argv in json.load(sys.stdin):
    assert argv[0] == "hf", argv
    ctx = hf.app.make_context("hf", argv[1:2])
    name, sub, _ = hf.app.resolve_command(ctx, argv[1:2])
    try:
        params = sub.make_context(name, argv[2:], parent=ctx).params
        out.append({"ok": True, "params": {k: list(v) if isinstance(v, tuple) else v for k, v in params.items()}})
    except click.UsageError as e:
        out.append({"ok": False, "error": str(e)})
print(json.dumps(out))
"""


def parse_with_hf(argvs: list[list[str]]) -> list[dict[str, Any]]:
    proc = subprocess.run(
        [vllm_python(), "-c", PARSE], input=json.dumps(argvs), capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result: list[dict[str, Any]] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def rendered_argv(model: str) -> list[str]:
    spec = make_spec(model, 8192, ["H100"], engine="vllm",
                     model={"cache": {"type": "host-path", "hostPath": "/mnt/models", "prefetch": True}})  # fmt: skip
    (ds,) = [
        o for o in render_deployment("d", "ns", spec, plan_deployment("d", spec)) if o["kind"] == "DaemonSet"
    ]
    (c,) = ds["spec"]["template"]["spec"]["containers"]
    assert c["command"][:2] == ["/bin/sh", "-c"]
    return shlex.split(c["command"][2].split(" && ")[0])


def test_the_rendered_hf_download_parses_with_the_images_hf_cli() -> None:
    argvs = [rendered_argv(m) for m in ("meta-llama/Llama-3.1-8B-Instruct", "Qwen/Qwen2.5-0.5B-Instruct")]
    bad = [*argvs[0][:3], "--includ", "*.json"]
    *good, refused = parse_with_hf([*argvs, bad])
    for argv, got in zip(argvs, good, strict=True):
        assert got["ok"], got
        assert got["params"]["repo_id"] == argv[2] and got["params"]["local_dir"] is None
        assert "*.safetensors" in got["params"]["include"]
    assert not refused["ok"] and "--includ" in refused["error"]
