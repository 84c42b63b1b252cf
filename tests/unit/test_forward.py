"""dev/podrunner.forward, the TCP relay behind the pods' API access and dev/serviceproxy.py: each
connection's bytes reach only that connection, also when connections end and new ones reuse their
file descriptors at once (the race _Pair exists for)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

from toposerve.dev.podrunner import _Pair, forward


def test_a_pair_is_closed_only_when_both_pumps_are_done() -> None:
    a, b = socket.socketpair()
    pair = _Pair(a, b)
    pair.done()  # one direction ended: both shut down, neither descriptor given up yet
    assert a.fileno() >= 0 and b.fileno() >= 0
    assert a.recv(1) == b""  # the other pump's recv returns at once
    pair.done()
    assert a.fileno() == -1 and b.fileno() == -1


def _echo_server() -> tuple[socket.socket, tuple[str, int]]:
    """Echoes what it gets, then a trailer its clients do not wait for: as an HTTP server's
    chunked-encoding end after `data: [DONE]`, which the openai SDK does not read before closing."""
    srv = socket.create_server(("127.0.0.1", 0), backlog=64)

    def serve() -> None:
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return

            def echo(c: socket.socket = c) -> None:
                with c, contextlib.suppress(OSError):
                    while data := c.recv(65536):
                        c.sendall(data)
                        time.sleep(0)
                        c.sendall(b"0\r\n\r\n")

            threading.Thread(target=echo, daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return srv, srv.getsockname()[:2]


def test_short_connections_in_parallel_each_get_their_own_bytes() -> None:
    """Each client closes as soon as it has its echo, with the trailer on its way, while new
    connections are accepted: any byte crossing into another connection fails this. The race
    _Pair closes is too narrow to hit reliably here (the relay that closed early passed 3 runs
    of 1,200 connections), so this guards the behaviour; the _Pair test above guards the rule."""
    srv, addr = _echo_server()
    relay = forward(("127.0.0.1", 0), addr)
    port = relay.getsockname()[1]
    wrong: list[str] = []

    def client(k: int) -> None:
        for n in range(150):
            msg = f"client {k} message {n};".encode()
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(msg)
                got = b""
                while len(got) < len(msg):
                    chunk = s.recv(len(msg) - len(got))  # its own bytes only, not the trailer
                    if not chunk:
                        break
                    got += chunk
                if got != msg:
                    wrong.append(f"{msg!r} -> {got!r}")

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    relay.close()
    srv.close()
    assert wrong == [], wrong[:5]
