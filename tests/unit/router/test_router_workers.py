"""`toposerve router --workers N`: N processes on one port (SO_REUSEPORT) under one supervisor.

Real processes (the workers are forked); the backend is an address nobody listens on, since
only the processes and the port are under test (`/health` answers whatever the backends do).
Waits poll for a state, bounded; no assertion depends on timing.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _wait(cond: object, what: str, limit_s: float = 60.0) -> None:
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        if cond():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError(f"not within {limit_s:g}s: {what}")


def _health(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
            return int(r.status)
    except OSError:
        return 0


@pytest.fixture
def router() -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    if not hasattr(socket, "SO_REUSEPORT"):
        pytest.skip("no SO_REUSEPORT on this platform")
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    p = subprocess.Popen(
        [sys.executable, "-m", "toposerve.cli", "router", "--backends", "http://127.0.0.1:1",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "2", "--log-level", "WARNING"],
        env=env, start_new_session=True,
    )  # fmt: skip
    try:
        yield p, port
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait(10)


def test_two_workers_serve_one_port_and_sigterm_stops_them_all(
    router: tuple[subprocess.Popen[bytes], int],
) -> None:
    p, port = router
    _wait(lambda: len(_children(p.pid)) == 2, "two worker processes")
    _wait(lambda: _health(port) == 200, "the port answers")
    workers = _children(p.pid)
    # each worker listens on its own SO_REUSEPORT socket: the kernel spreads connections
    listening = subprocess.run(["ss", "-Htlnp", f"sport = :{port}"], capture_output=True, text=True)
    if listening.returncode == 0 and listening.stdout:
        assert all(f"pid={w}," in listening.stdout for w in workers), listening.stdout
    p.send_signal(signal.SIGTERM)
    assert p.wait(30) == 0
    assert all(not Path(f"/proc/{w}").exists() or "Z" in Path(f"/proc/{w}/stat").read_text() for w in workers)


def test_a_dead_worker_takes_the_others_down_and_the_exit_code_says_so(
    router: tuple[subprocess.Popen[bytes], int],
) -> None:
    p, port = router
    _wait(lambda: len(_children(p.pid)) == 2, "two worker processes")
    _wait(lambda: _health(port) == 200, "the port answers")
    first, second = _children(p.pid)
    os.kill(first, signal.SIGKILL)
    assert p.wait(30) == 1  # the supervisor stopped the other worker and failed
    assert not Path(f"/proc/{second}").exists() or "Z" in Path(f"/proc/{second}/stat").read_text()


def test_workers_must_be_positive() -> None:
    bad = subprocess.run(
        [sys.executable, "-m", "toposerve.cli", "router", "--backends", "http://127.0.0.1:1", "--workers", "0"],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )  # fmt: skip
    assert bad.returncode != 0 and "--workers must be at least 1" in bad.stderr
