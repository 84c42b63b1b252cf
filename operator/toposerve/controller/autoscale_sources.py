"""Where the builtin autoscaler reads vLLM's metrics (I/O shells around ``report``'s parsers).

* ``PrometheusSource`` (the operator config names a Prometheus): PromQL through
  prometheus-api-client, a windowed mean per pod plus each pod's newest sample time, so a pod
  whose series went stale counts as missing.
* ``ScrapeSource`` (no Prometheus): GET each ready pod's ``/metrics`` on its pod IP, instantaneous
  values; a pod that does not answer is missing.

Neither raises on a bad answer: a source that cannot be reached is ``Reading(ok=False)``, which
the decision turns into "hold, no scale-down".
"""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, Protocol

from toposerve.autoscale import promql
from toposerve.autoscale.forecast import slice_times
from toposerve.autoscale.report import (
    TTFT,
    Buckets,
    PodSample,
    Reading,
    bucket_delta,
    parse_matrix,
    parse_metrics_gauge,
    parse_metrics_text,
    parse_vector,
    prometheus_samples,
    summed,
    ttft_of,
    vector_sum,
)
from toposerve.autoscale.router_figures import RouterFigures, combine, parse_router_page
from toposerve.render.objects import ENGINE_PORT, ROUTER_PORT


class Source(Protocol):
    name: str

    def read(
        self, namespace: str, name: str, pods: Sequence[Mapping[str, Any]], window_s: int, stale_after_s: int
    ) -> Reading: ...

    def held(self, namespace: str, name: str, routers: Sequence[Mapping[str, Any]]) -> int:
        """Requests the deployment's routers hold at zero replicas (0 when unknown)."""
        ...

    def ttft(self, namespace: str, name: str, quantile: float, window_s: int) -> TTFT:
        """The deployment's TTFT quantile over the window (``TTFT()``: unknown, never raises)."""
        ...


class PrometheusSource:
    """PromQL reads, each method's queries under one deadline of ``timeout`` seconds and without
    retries: prometheus-api-client retries 3 times with backoff by default (on 5xx and connection
    errors), which turned a slow Prometheus into ~26 s per deployment per pass. A read that misses
    its deadline is "unavailable" (hold, no scale-down), decided again next sync period."""

    name = "prometheus"

    def __init__(
        self,
        url: str,
        selector: str,
        timeout: float = 5.0,
        client: Any = None,
        router_selector: str = "",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url, self.selector, self.timeout = url, selector, timeout
        self.router_selector = router_selector
        self._client = client
        self._clock = clock

    def _prom(self) -> Any:
        if self._client is None:
            from prometheus_api_client import PrometheusConnect
            from urllib3.util.retry import Retry

            # timeout= (constructor and per query) needs prometheus-api-client >= 0.5.7 (pyproject).
            self._client = PrometheusConnect(
                url=self.url, disable_ssl=True, timeout=self.timeout, retry=Retry(total=0)
            )
        return self._client

    def _queries(self, *queries: str) -> list[Any]:
        """Answers to ``queries`` in order, all within one deadline; raises TimeoutError once it passed."""
        deadline = self._clock() + self.timeout
        answers = []
        for q in queries:
            left = deadline - self._clock()
            if left <= 0:
                raise TimeoutError(
                    f"no answer within the {self.timeout:g} s deadline (prometheusTimeoutSeconds)"
                )
            answers.append(self._prom().custom_query(q, timeout=left))
        return answers

    def read(
        self, namespace: str, name: str, pods: Sequence[Mapping[str, Any]], window_s: int, stale_after_s: int
    ) -> Reading:
        sel = promql.selector(self.selector, namespace, name)
        try:
            now = time.time()
            kv, waiting, running, seen = (
                parse_vector(a)
                for a in self._queries(
                    promql.per_pod(promql.KV, sel, window_s),
                    promql.per_pod(promql.WAITING, sel, window_s),
                    promql.per_pod(promql.RUNNING, sel, window_s),
                    f"max by (pod) (timestamp({promql.KV}{{{sel}}}))",
                )
            )
        except Exception as e:  # connection refused, timeout, 5xx, non-JSON: all "unavailable"
            return Reading(f"prometheus {self.url}", False, {}, f"{type(e).__name__}: {e}"[:300])
        samples = prometheus_samples(kv, waiting, running, seen, now, stale_after_s)
        return Reading(f"prometheus {self.url}", True, samples)

    def held(self, namespace: str, name: str, routers: Sequence[Mapping[str, Any]]) -> int:
        try:
            sel = promql.selector(self.router_selector, namespace, name)
            (answer,) = self._queries(promql.held(sel))
            total = vector_sum(answer)
        except Exception:  # unknown is 0: nothing wakes a deployment at zero on a broken answer
            return 0
        return max(0, round(total or 0))

    def ttft(self, namespace: str, name: str, quantile: float, window_s: int) -> TTFT:
        sel = promql.selector(self.selector, namespace, name)
        try:
            count, quant = self._queries(
                promql.ttft_requests(sel, window_s), promql.ttft_quantile(sel, quantile, window_s)
            )
            requests, seconds = vector_sum(count), vector_sum(quant)
        except Exception:  # down, slow, garbage: unknown, so no scale-down
            return TTFT()
        if requests is None:
            return TTFT()  # no series at all (stale, or never scraped): missing
        if requests <= 0:
            return TTFT(None, idle=True)
        return TTFT(seconds)  # None when the quantile came back NaN or empty

    def history(
        self,
        namespace: str,
        name: str,
        now: float,
        offset_s: float,
        period_s: float,
        lookback: int,
        window_s: int,
    ) -> tuple[list[float], list[float]]:
        """(KV usage sums, waiting sums) at ``now + offset - k x period`` for the last ``lookback``
        periods: one range query per metric, stepping a whole period. Raises when Prometheus does."""
        sel = promql.selector(self.selector, namespace, name)
        start, end = slice_times(now, offset_s, period_s, lookback)
        out: list[list[float]] = []
        for metric in (promql.KV, promql.WAITING):
            result = self._prom().custom_query_range(
                promql.total(metric, sel, window_s),
                start_time=datetime.fromtimestamp(start, UTC),
                end_time=datetime.fromtimestamp(end, UTC),
                step=f"{int(period_s)}s",
            )
            out.append(parse_matrix(result))
        return out[0], out[1]


class ScrapeSource:
    name = "scrape"

    def __init__(self, timeout: float = 2.0, port: int = ENGINE_PORT) -> None:
        self.timeout, self.port = timeout, port
        # TTFT from bucket deltas between two scrapes: each pod's last buckets, and per deployment
        # the observations between its last two reads (None: no baseline yet).
        self._buckets: dict[tuple[str, str], dict[str, Buckets]] = {}
        self._window: dict[tuple[str, str], Buckets | None] = {}

    def _get(self, ip: str, port: int) -> str | None:
        return metrics_page(ip, port, self.timeout)

    def _scrape(self, ip: str) -> PodSample:
        text = self._get(ip, self.port)
        return PodSample() if text is None else parse_metrics_text(text)

    def held(self, namespace: str, name: str, routers: Sequence[Mapping[str, Any]]) -> int:
        total = 0.0
        for r in routers:
            ip = (r.get("status") or {}).get("podIP")
            text = self._get(str(ip), ROUTER_PORT) if ip else None
            total += (parse_metrics_gauge(text, promql.HELD) or 0.0) if text else 0.0
        return max(0, round(total))

    def read(
        self, namespace: str, name: str, pods: Sequence[Mapping[str, Any]], window_s: int, stale_after_s: int
    ) -> Reading:
        targets = [
            (str(p["metadata"]["name"]), str((p.get("status") or {}).get("podIP")))
            for p in pods
            if (p.get("status") or {}).get("podIP")
        ]
        if not targets:
            self._remember(namespace, name, {})
            return Reading("scrape", True, {})
        with ThreadPoolExecutor(max_workers=min(8, len(targets))) as pool:
            got = list(pool.map(lambda t: self._scrape(t[1]), targets))
        samples = {pod: s for (pod, _), s in zip(targets, got, strict=True)}
        self._remember(namespace, name, samples)
        return Reading("scrape", True, samples)

    def _remember(self, namespace: str, name: str, samples: Mapping[str, PodSample]) -> None:
        key = (namespace, name)
        before = self._buckets.get(key, {})
        now = {pod: s.ttft_buckets for pod, s in samples.items() if s.ttft_buckets}
        deltas = [bucket_delta(before[pod], b) for pod, b in now.items() if pod in before]
        self._window[key] = summed(deltas) if deltas else None
        self._buckets[key] = now

    def ttft(self, namespace: str, name: str, quantile: float, window_s: int) -> TTFT:
        """From the last two reads (the sync period apart), not ``window_s``: /metrics has no history."""
        window = self._window.get((namespace, name))
        return TTFT() if window is None else ttft_of(window, quantile)


def metrics_page(ip: str, port: int, timeout: float) -> str | None:
    """A pod's /metrics (at most 4 MiB), or None when it does not answer in ``timeout``."""
    try:
        with urllib.request.urlopen(f"http://{ip}:{port}/metrics", timeout=timeout) as resp:
            return str(resp.read(4 << 20).decode("utf-8", "replace"))
    except Exception:  # refused, timeout, reset: no answer from this pod
        return None


def read_routers(
    routers: Sequence[Mapping[str, Any]],
    only: tuple[str, str] | None = None,
    timeout: float = 2.0,
    port: int = ROUTER_PORT,
) -> RouterFigures:
    """The deployment's routers' demand and service figures, read from each router pod's /metrics
    directly (not through Prometheus: its scrape interval would give back the lead); a router that
    does not answer in ``timeout`` is left out (``routers`` in the result counts those that did).
    ``only`` (namespace, name): gateway pods are among them; of their pages, only that
    deployment's series count (router_figures.parse_router_page)."""
    ips = [str(ip) for r in routers if (ip := (r.get("status") or {}).get("podIP"))]
    if not ips:
        return RouterFigures()

    def page(ip: str) -> Any:
        text = metrics_page(ip, port, timeout)
        return None if text is None else parse_router_page(text, only)  # None: its share is unknown

    with ThreadPoolExecutor(max_workers=min(8, len(ips))) as pool:
        return combine(pool.map(page, ips))


def source_for(
    prometheus_url: str | None, selector: str, router_selector: str = "", timeout: float = 5.0
) -> Source:
    """Prometheus when the operator config names one, else the pods' own /metrics."""
    if prometheus_url:
        return PrometheusSource(prometheus_url, selector, timeout, router_selector=router_selector)
    return ScrapeSource()
