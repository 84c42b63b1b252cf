"""The local cluster's kube-proxy stand-in chooses endpoints as kube-proxy does (dev/serviceproxy.py)."""

from __future__ import annotations

from typing import Any

from toposerve.dev.serviceproxy import choices


def ep(ip: str, **cond: bool) -> dict[str, Any]:
    return {"addresses": [ip], "conditions": cond}


def sl(*eps: dict[str, Any], port: int = 8080, name: str = "http") -> dict[str, Any]:
    return {"ports": [{"name": name, "port": port}], "endpoints": list(eps)}


def test_new_connections_go_to_ready_endpoints_only() -> None:
    slices = [sl(ep("10.0.0.1", ready=True), ep("10.0.0.2", ready=False, serving=True, terminating=True)),
              sl(ep("10.0.0.3"))]  # fmt: skip  # nil ready means ready
    assert choices(slices, "http") == [("10.0.0.1", 8080), ("10.0.0.3", 8080)]


def test_terminating_serving_endpoints_only_when_none_is_ready() -> None:
    slices = [sl(ep("10.0.0.1", ready=False, serving=True, terminating=True),
                 ep("10.0.0.2", ready=False, serving=False, terminating=True),
                 ep("10.0.0.3", ready=False))]  # fmt: skip
    assert choices(slices, "http") == [("10.0.0.1", 8080)]
    assert choices([sl(ep("10.0.0.2", ready=False, serving=False, terminating=True))], "http") == []


def test_the_port_is_the_named_one() -> None:
    assert choices([sl(ep("10.0.0.1", ready=True), name="metrics")], "http") == []
    assert choices([sl(ep("10.0.0.1", ready=True), port=8000)], "http") == [("10.0.0.1", 8000)]
