"""`--epp-port` / `--epp-health-port` on `toposerve router` and `toposerve gateway`."""

from __future__ import annotations

import argparse

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
