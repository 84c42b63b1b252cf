"""How many requests an engine has in flight, from its own Prometheus metrics.

The operator deletes a draining pod (controller/evacuation.py) once its engine reports nothing
running or waiting. vLLM and the mock engine both export ``vllm:num_requests_running`` and
``vllm:num_requests_waiting`` on the serving port; their sum is what in-flight streams still need.
An engine that cannot be asked answers None, and the drain deadline decides instead.
"""

from __future__ import annotations

import urllib.request

from toposerve.render.objects import ENGINE_PORT

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_GAUGES = ("vllm:num_requests_running", "vllm:num_requests_waiting")


def parse_in_flight(text: str) -> int | None:
    """Running + waiting requests from a Prometheus text page; None when neither gauge is there."""
    total, seen = 0.0, False
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in _GAUGES:
            try:
                total += float(line.rsplit(" ", 1)[1])
            except (IndexError, ValueError):
                return None
            seen = True
    return round(total) if seen else None


def in_flight(ip: str, port: int = ENGINE_PORT, timeout: float = 2.0) -> int | None:
    """Ask the engine at ``ip``; None when it does not answer."""
    host = f"[{ip}]" if ":" in ip else ip
    try:
        with _NO_PROXY.open(f"http://{host}:{port}/metrics", timeout=timeout) as r:
            return parse_in_flight(r.read().decode(errors="replace"))
    except (OSError, ValueError):
        return None
