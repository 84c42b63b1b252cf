"""Per-pool TTFT and busy throughput from Prometheus, for poolOrder cost (the I/O shell around
``planner.costorder``'s queries).

Asked only for deployments with ``poolOrder: cost``, three instant queries under one deadline
(``prometheusTimeoutSeconds``) and without the client's retries (the same reasons as
``autoscale_sources.PrometheusSource``); the answer is kept ``ttl_s`` seconds, so the reconciles
one change triggers cost one read. Prometheus down, slow or answering garbage is data, not a
failure: the source returns None, every pool is ranked on the planner's estimate and none is held
against the SLO, and the reconcile goes on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from toposerve.autoscale import promql
from toposerve.planner.costorder import (
    PoolSignals,
    busy_count_query,
    busy_sum_query,
    by_pool,
    ttft_query,
)

log = logging.getLogger("toposerve.pool_signals")

# (namespace, name, TTFT quantile or None without an SLO, window seconds) -> signals or None
PoolSignalsSource = Callable[[str, str, float | None, int], PoolSignals | None]


class PrometheusPoolSignals:
    def __init__(
        self,
        url: str,
        selector: str,
        timeout: float = 5.0,
        ttl_s: float = 15.0,
        client: Any = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url, self.selector, self.timeout, self.ttl_s = url, selector, timeout, ttl_s
        self._client = client
        self._clock = clock
        self._cache: dict[tuple[str, str, float | None, int], tuple[float, PoolSignals | None]] = {}

    def _prom(self) -> Any:
        if self._client is None:
            from prometheus_api_client import PrometheusConnect
            from urllib3.util.retry import Retry

            self._client = PrometheusConnect(
                url=self.url, disable_ssl=True, timeout=self.timeout, retry=Retry(total=0)
            )
        return self._client

    def __call__(
        self, namespace: str, name: str, quantile: float | None, window_s: int
    ) -> PoolSignals | None:
        key = (namespace, name, quantile, window_s)
        now = self._clock()
        hit = self._cache.get(key)
        if hit is not None and now - hit[0] < self.ttl_s:
            return hit[1]
        sel = promql.selector(self.selector, namespace, name)
        queries = [busy_sum_query(sel), busy_count_query(sel)]
        if quantile is not None:
            queries.append(ttft_query(sel, quantile, window_s))
        signals: PoolSignals | None
        try:
            deadline = now + self.timeout
            answers = []
            for q in queries:
                left = deadline - self._clock()
                if left <= 0:
                    raise TimeoutError(f"no answer within {self.timeout:g} s (prometheusTimeoutSeconds)")
                answers.append(by_pool(self._prom().custom_query(q, timeout=left)))
            signals = PoolSignals(
                ttft_seconds=answers[2] if quantile is not None else {},
                busy_tokens_per_second_sum=answers[0],
                busy_minutes=answers[1],
            )
        except Exception as e:  # refused, timeout, 5xx, bad JSON: unknown, so estimates
            log.warning("per-pool figures from %s unavailable: %s", self.url, e)
            signals = None
        self._cache[key] = (now, signals)
        return signals
