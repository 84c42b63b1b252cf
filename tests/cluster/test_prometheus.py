"""Prometheus (Debian's real server) discovers the mock engine pod through the local API server,
scrapes it on its pod IP, and answers a query for its vLLM-named metric."""

from __future__ import annotations

import json
import urllib.parse
from typing import Any

import pytest

from tests.cluster.conftest import Cluster, wait_for
from tests.cluster.mock import deploy_mock_engine, http_get, ready_pods

pytestmark = pytest.mark.cluster


def prom(cluster: Cluster, path: str, **params: str) -> Any:
    url = f"{cluster.prometheus_url}{path}"
    if params:
        url += "?" + urllib.parse.urlencode(params)
    _, body = http_get(url)
    data = json.loads(body)
    assert data["status"] == "success", data
    return data["data"]


def test_prometheus_scrapes_the_mock_engine_pod(cluster: Cluster, namespace: str) -> None:
    deploy_mock_engine(cluster, namespace)
    (pod,) = ready_pods(cluster, namespace)

    def target() -> dict[str, Any] | None:
        for t in prom(cluster, "/api/v1/targets", state="active")["activeTargets"]:
            if t["labels"].get("namespace") == namespace and t["health"] == "up":
                return dict(t)
        return None

    t = wait_for(target, "an up scrape target for the mock engine pod", timeout=120)
    assert t["labels"]["pod"] == pod.metadata.name
    assert t["scrapeUrl"] == f"http://{pod.status.pod_ip}:8000/metrics"

    query = f'vllm:num_requests_running{{namespace="{namespace}"}}'

    def series() -> list[Any] | None:
        return prom(cluster, "/api/v1/query", query=query)["result"] or None

    (s,) = wait_for(series, f"a result for {query}")
    assert s["metric"]["pod"] == pod.metadata.name
    assert s["metric"]["model_name"] == "tiny-mock"
    assert float(s["value"][1]) == 0.0
