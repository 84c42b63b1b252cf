"""The worker launch script of a multi-node vLLM replica, run for real by /bin/sh.

A fake ``vllm`` on PATH records its argv; ``getent`` is the machine's own (glibc), as in the
vllm/vllm-openai image. Kubernetes' ``$(VAR)`` expansion is applied first, as the kubelet would.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.vllm_cli import expand_kubernetes
from toposerve.render.multinode import worker_script

ARGS = ["m", "--nnodes", "2", "--master-addr", "", "--master-port", "29500",
        "--node-rank", "$(LWS_WORKER_INDEX)", "--headless"]  # fmt: skip

pytestmark = pytest.mark.skipif(shutil.which("getent") is None, reason="needs glibc's getent")


def run(tmp_path: Path, leader: str, wait_s: int) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    fake = tmp_path / "vllm"
    record = tmp_path / "argv"
    fake.write_text(f'#!/bin/sh\nfor a in "$@"; do echo "$a"; done > {record}\n')
    fake.chmod(0o755)
    script = expand_kubernetes(
        worker_script(ARGS, ARGS.index("--master-addr") + 1, wait_s), {"LWS_WORKER_INDEX": "1"}
    )
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "LWS_LEADER_ADDRESS": leader}
    done = subprocess.run(["/bin/sh", "-c", script], env=env, capture_output=True, text=True, timeout=60)
    return done, record.read_text().splitlines() if record.exists() else []


def test_worker_execs_vllm_with_the_leaders_address_not_its_name(tmp_path: Path) -> None:
    done, argv = run(tmp_path, "localhost", 10)
    assert done.returncode == 0, done.stderr
    addr = argv[argv.index("--master-addr") + 1]
    assert addr in {"127.0.0.1", "::1"}, argv  # what localhost resolves to here
    # Everything else passes through untouched, the node rank expanded by Kubernetes.
    assert argv[:1] == ["serve"] and argv[1:] == [*ARGS[:4], addr, *ARGS[5:8], "1", "--headless"]
    assert "the group leader localhost is" in done.stdout


def test_worker_gives_up_after_the_bound_so_the_group_restarts(tmp_path: Path) -> None:
    done, argv = run(tmp_path, "leader.toposerve-test.invalid", 2)  # .invalid never resolves (RFC 6761)
    assert done.returncode == 1 and argv == []
    assert "waiting for the group leader leader.toposerve-test.invalid" in done.stdout
    assert "did not resolve within 2 s" in done.stderr
