"""Observed output throughput from Prometheus (the I/O shell around ``planner.cost``).

One instant query per namespace, ``sum by (pod) (rate(vllm:generation_tokens_total[window]))``,
through prometheus-api-client; the answer is kept a few seconds so reconciling many deployments of
one namespace costs one query. Prometheus being down or slow is data, not a failure: the source
returns None and status then says nothing about throughput instead of claiming zero.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from toposerve.api.config import OperatorConfig
from toposerve.api.spec import LLMDeploymentSpec
from toposerve.planner.cost import (
    DeploymentCost,
    gpu_hourly_price,
    observed_cost,
    rates_by_pod,
    throughput_query,
)
from toposerve.planner.inventory import Inventory

log = logging.getLogger("toposerve.throughput")


class PrometheusThroughput:
    """Callable ``(namespace) -> {pod: output tokens/s}`` or None when Prometheus cannot say."""

    def __init__(self, url: str, window: str = "5m", timeout_s: float = 5.0, ttl_s: float = 5.0) -> None:
        from prometheus_api_client import PrometheusConnect
        from urllib3.util.retry import Retry

        # No retries: the client's default (retries with backoff) would stall a reconcile for seconds
        # while Prometheus is down; the next reconcile asks again anyway.
        self.prom = PrometheusConnect(url=url, timeout=timeout_s, retry=Retry(total=0))
        self.url, self.window, self.ttl_s = url, window, ttl_s
        self._cache: dict[str, tuple[float, dict[str, float] | None]] = {}

    def __call__(self, namespace: str) -> Mapping[str, float] | None:
        now = time.monotonic()
        hit = self._cache.get(namespace)
        if hit and now - hit[0] < self.ttl_s:
            return hit[1]
        rates: dict[str, float] | None
        try:
            rates = rates_by_pod(self.prom.custom_query(throughput_query(namespace, self.window)))
        except Exception as e:  # connection refused, timeout, non-200, bad JSON: all mean "unknown"
            log.warning("throughput from %s unavailable: %s", self.url, e)
            rates = None
        self._cache[namespace] = (now, rates)
        return rates


ThroughputSource = Callable[[str], Mapping[str, float] | None]


def deployment_cost(
    namespace: str,
    name: str,
    spec: LLMDeploymentSpec,
    pods: Iterable[Mapping[str, Any]],
    inventory: Inventory,
    config: OperatorConfig,
    source: ThroughputSource | None,
    pools: Iterable[str] = (),
) -> DeploymentCost:
    """The observed cost of one deployment: its pods priced by their nodes' capacity type, its
    engines' throughput from ``source`` (None: throughput unknown)."""
    rates = source(namespace) if source is not None else None
    node_spot = {n.name: n.spot for n in inventory.nodes}
    catalog = config.catalog()

    def price(gpu: str, spot: bool) -> float:
        return gpu_hourly_price(gpu, spot, config, catalog, spec.cost)

    return observed_cost(namespace, name, pods, node_spot, price, rates, pools)
