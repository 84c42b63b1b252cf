"""`--epp-port` / `--epp-health-port` on `toposerve router` and `toposerve gateway`."""

from __future__ import annotations

import argparse
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from toposerve.router import cli as router_cli
from toposerve.router import gateway_cli


def _args(mod: object, *argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    mod.add_arguments(p)  # type: ignore[attr-defined]
    return p.parse_args(list(argv))


@pytest.mark.parametrize("mod", [router_cli, gateway_cli])
def test_off_by_default_and_parsed(mod: object) -> None:
    a = _args(mod)
    assert (a.epp_port, a.epp_health_port) == (0, 0)
    assert router_cli.check_epp_ports(a) == ""
    a = _args(mod, "--epp-port", "9002", "--epp-health-port", "9003")
    assert (a.epp_port, a.epp_health_port) == (9002, 9003)
    assert router_cli.check_epp_ports(a) == ""


@pytest.mark.parametrize(
    ("argv", "names"),
    [
        (["--epp-health-port", "9003"], "--epp-health-port needs --epp-port"),
        (["--epp-port", "9002", "--epp-health-port", "9002"], "must differ"),
        (["--epp-port", "8080"], "--port (8080)"),
        (["--epp-port", "9002", "--metrics-port", "9002"], "--metrics-port (9002)"),
        (["--epp-port", "70000"], "--epp-port and --epp-health-port must be 0"),
        (["--epp-port", "-1"], "--epp-port and --epp-health-port must be 0"),
    ],
)
def test_bad_ports_are_named(argv: list[str], names: str) -> None:
    assert names in router_cli.check_epp_ports(_args(router_cli, *argv))


def test_env_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOPOSERVE_ROUTER_EPP_PORT", "9002")
    monkeypatch.setenv("TOPOSERVE_ROUTER_EPP_HEALTH_PORT", "9003")
    a = _args(router_cli)
    assert (a.epp_port, a.epp_health_port) == (9002, 9003)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _health(port: int, service: str) -> str:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        try:
            r = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=2
            )
        except grpc.RpcError as e:
            return str(e.code().name)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(r.status))


@pytest.mark.parametrize("command", ["router", "gateway"])
def test_the_command_serves_the_picker_and_stops_on_sigterm(command: str, tmp_path: Path) -> None:
    """The flags wired for real: `toposerve router|gateway --epp-port --epp-health-port` answers
    gRPC health on both ports, and exits 0 on SIGTERM (drain, then the gRPC servers stop)."""
    port, epp, hp = _free_port(), _free_port(), _free_port()
    argv = [str(Path(sys.executable).parent / "toposerve"), command, "--port", str(port)]
    if command == "router":
        argv += ["--backends", "http://127.0.0.1:9"]
    else:
        cfg = tmp_path / "gw.yaml"
        cfg.write_text("deployments: []\nbackends: {}\n")
        argv += ["--static-config", str(cfg)]
    argv += ["--epp-port", str(epp), "--epp-health-port", str(hp), "--drain-quiet", "0"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        for _ in range(300):  # start-up: imports, then listening
            if _health(hp, "readiness") == "SERVING":
                break
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            time.sleep(0.05)
        for p in (epp, hp):
            assert _health(p, "liveness") == "SERVING"
            assert _health(p, "readiness") == "SERVING"
            assert _health(p, "envoy.service.ext_proc.v3.ExternalProcessor") == "SERVING"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
