"""TLS on the Endpoint Picker's ext_proc port (router/epp/tls.py) over loopback gRPC: a client
with a TLS channel (the real ext_proc protos, epp_client.py) gets its pick; a plaintext client
gets none; a renewed certificate on disk is served without a restart; the flags."""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from tests.unit.router.epp_client import Stream, chat, health

from toposerve.mockengine.server import EngineConfig, MockServer
from toposerve.router import cli as router_cli
from toposerve.router import gateway_cli
from toposerve.router.endpoints import BackendSpec
from toposerve.router.epp import tls
from toposerve.router.epp.server import EndpointPicker
from toposerve.router.proxy import Router, RouterConfig


@contextlib.asynccontextmanager
async def tls_picker(creds: grpc.ServerCredentials) -> AsyncIterator[tuple[EndpointPicker, MockServer]]:
    eng = await MockServer(EngineConfig(model="m", time_scale=0.0)).start()
    r = Router([BackendSpec(eng.url)], RouterConfig(probe_interval_s=0.05))
    await r.start()
    epp = EndpointPicker(r)
    await epp.start("127.0.0.1", 0, 0, period_s=0.02, tls=creds)
    try:
        yield epp, eng
    finally:
        await epp.stop(0)
        await r.stop()
        await eng.shutdown(0)


def secure(port: int, cert: bytes) -> grpc.aio.Channel:
    return grpc.aio.secure_channel(f"127.0.0.1:{port}", grpc.ssl_channel_credentials(root_certificates=cert))


async def test_a_tls_client_gets_its_pick_and_a_plaintext_one_does_not() -> None:
    creds, cert = tls.server_credentials(self_signed_hosts=["127.0.0.1"])
    async with tls_picker(creds) as (epp, eng):
        async with secure(epp.ports[0], cert) as ch:
            a = await Stream(ch).request(chat())
            assert a.kind == "route" and a.endpoints == [f"127.0.0.1:{eng.port}"]
            assert await health(ch, "liveness") == "SERVING"
        async with grpc.aio.insecure_channel(f"127.0.0.1:{epp.ports[0]}") as plain:
            a = await Stream(plain).request(chat())
            assert a.kind == "error"  # no TLS handshake: no answer
        async with grpc.aio.insecure_channel(f"127.0.0.1:{epp.ports[1]}") as probe:
            assert await health(probe, "liveness") == "SERVING"  # the health port stays plaintext


async def test_a_renewed_certificate_on_disk_is_served_without_a_restart(tmp_path: Path) -> None:
    crt, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    first, first_key = tls.self_signed(["127.0.0.1"])
    crt.write_bytes(first)
    key.write_bytes(first_key)
    creds, served = tls.server_credentials(str(crt), str(key))
    assert served == first
    async with tls_picker(creds) as (epp, _):
        async with secure(epp.ports[0], first) as ch:
            assert (await Stream(ch).request(chat())).kind == "route"
        second, second_key = tls.self_signed(["127.0.0.1"])
        crt.write_bytes(second)
        key.write_bytes(second_key)
        later = os.stat(crt).st_mtime + 5  # a distinct modification time, as a renewal has
        os.utime(crt, (later, later))
        os.utime(key, (later, later))
        async with secure(epp.ports[0], second) as ch:
            assert (await Stream(ch).request(chat())).kind == "route"  # trusted only by the new one
        async with secure(epp.ports[0], first) as ch:
            assert (await Stream(ch).request(chat())).kind == "error"  # the old one is gone


def test_bad_files_and_flags_are_start_up_errors(tmp_path: Path) -> None:
    with pytest.raises(tls.TlsError, match="cannot read"):
        tls.server_credentials(str(tmp_path / "nope.crt"), str(tmp_path / "nope.key"))
    (tmp_path / "x.crt").write_text("hello")
    (tmp_path / "x.key").write_text("hello")
    with pytest.raises(tls.TlsError, match="not PEM"):
        tls.server_credentials(str(tmp_path / "x.crt"), str(tmp_path / "x.key"))
    with pytest.raises(tls.TlsError, match="go together"):
        tls.server_credentials(str(tmp_path / "x.crt"), "")
    p = argparse.ArgumentParser()
    gateway_cli.add_arguments(p)
    assert router_cli.epp_tls(p.parse_args([])) is None  # default: plaintext
    with pytest.raises(SystemExit, match="need --epp-port"):
        router_cli.epp_tls(p.parse_args(["--epp-secure-serving"]))
    with pytest.raises(SystemExit, match="not both"):
        router_cli.epp_tls(p.parse_args(["--epp-port=9002", "--epp-secure-serving", "--epp-tls-cert=a"]))
    assert router_cli.epp_tls(p.parse_args(["--epp-port=9002", "--epp-secure-serving"])) is not None
    # the dedicated router's picker takes the same flags (an InferencePool in dedicated mode
    # points at the router's Service)
    r = argparse.ArgumentParser()
    router_cli.add_arguments(r)
    assert router_cli.epp_tls(r.parse_args(["--epp-port=9002", "--epp-secure-serving"])) is not None
    with pytest.raises(SystemExit, match=r"toposerve router: error: .*need --epp-port"):
        router_cli.epp_tls(r.parse_args(["--epp-secure-serving"]))
