"""What a deployment's routers see, read from their /metrics (pure: text in, figures out).

The routers count every request before an engine does (router/demand.py; the series and their
meaning are in docs/router.md, "Demand metrics"). The autoscaler reads each router pod directly,
every few seconds, rather than through Prometheus, whose scrape interval would give back the lead.

Combining router replicas: arrivals, in-flight, queued and held requests are each router's own
share of the traffic, so they are **summed** over routers (and over pools: a request that could not
be placed yet is counted in ``pool=""``). The engines' service figures are every router's view of
the same engines, so they are **averaged** over routers, per pool, then over pools weighted by
their ready replicas.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

PREFIX = "toposerve_router_"


@dataclass(frozen=True)
class RouterFigures:
    """Demand and service figures of one deployment, over all its routers that answered."""

    routers: int = 0  # routers whose /metrics parsed
    arrivals_short: float = 0.0  # requests/s over 15 s
    arrivals_long: float = 0.0  # requests/s over 60 s
    prompt_tokens_short: float = 0.0  # prompt tokens/s of those arrivals
    prompt_tokens_long: float = 0.0
    decode_tokens_short: float = 0.0  # expected decode tokens/s of those arrivals
    decode_tokens_long: float = 0.0
    in_flight_requests: float = 0.0
    in_flight_tokens: float = 0.0
    queued: float = 0.0
    held: float = 0.0
    # Learnt from the engines' counters (None until some engine reported them)
    decode_tokens_per_replica: float | None = None  # tokens/s per ready replica, at the batch below
    prompt_tokens_per_replica: float | None = None
    running_per_replica: float | None = None
    ready_replicas: float = 0.0  # mean over routers of the ready backends they see


@dataclass
class RouterPage:
    """One router's page."""

    sums: dict[str, float]
    service: dict[str, dict[str, float]]  # pool -> figure -> value
    ready: dict[str, float]  # pool -> ready replicas


_SUMMED = {
    # "short" is the routers' 15 s window (router/demand.py LEADING_WINDOW_S): in the simulation
    # their 5 s one scaled up on noise (docs/benchmarks.md, "Leading signal").
    ("arrival_requests_per_second", "15s"): "arrivals_short",
    ("arrival_requests_per_second", "60s"): "arrivals_long",
    ("arrival_prompt_tokens_per_second", "15s"): "prompt_tokens_short",
    ("arrival_prompt_tokens_per_second", "60s"): "prompt_tokens_long",
    ("arrival_decode_tokens_per_second", "15s"): "decode_tokens_short",
    ("arrival_decode_tokens_per_second", "60s"): "decode_tokens_long",
    ("in_flight_requests", None): "in_flight_requests",
    ("in_flight_tokens", None): "in_flight_tokens",
    ("queued_requests", None): "queued",
    ("held_requests", None): "held",
}
_SERVICE = {
    "pool_decode_tokens_per_second_per_replica": "decode",
    "pool_prompt_tokens_per_second_per_replica": "prompt",
    "pool_running_requests_per_replica": "running",
}


def _finite(x: float) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x >= 0


# The gateway (router/gateway.py) labels each member router's series with its deployment.
DEPLOYMENT_LABELS = ("llmdeployment_namespace", "llmdeployment")


def parse_router_page(text: str, only: tuple[str, str] | None = None) -> RouterPage | None:
    """One router's /metrics; None when it does not parse (the router counts as not answering).

    ``only`` (namespace, name): a gateway's page carries every deployment it routes, each series
    labelled with its deployment; only that deployment's series count, and a page without any is
    None (that gateway does not route it). A dedicated router's series carry no such labels: all
    of them are its deployment's."""
    one = RouterPage({}, {}, {})
    matched = False
    try:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if not s.name.startswith(PREFIX) or not _finite(s.value):
                    continue
                if only is not None and not _mine(s.labels, only):
                    continue
                matched = True
                name = s.name[len(PREFIX) :]
                window = s.labels.get("window")
                key = _SUMMED.get((name, window))
                if key is not None:
                    one.sums[key] = one.sums.get(key, 0.0) + float(s.value)
                elif name in _SERVICE:
                    one.service.setdefault(s.labels.get("pool", ""), {})[_SERVICE[name]] = float(s.value)
                elif name == "pool_ready_replicas":
                    pool = s.labels.get("pool", "")
                    one.ready[pool] = one.ready.get(pool, 0.0) + float(s.value)
    except Exception:  # the parser raises ValueError and others on malformed text
        return None
    if only is not None and not matched and text.strip():
        return None
    return one


def _mine(labels: Mapping[str, str], only: tuple[str, str]) -> bool:
    """A dedicated router's series (no deployment labels), or the gateway's of that deployment."""
    if DEPLOYMENT_LABELS[1] not in labels:
        return True
    return (labels.get(DEPLOYMENT_LABELS[0]), labels.get(DEPLOYMENT_LABELS[1])) == only


def combine(pages: Iterable[RouterPage | None]) -> RouterFigures:
    """Sum the routers' demand, average their views of the engines (see the module docstring)."""
    got = [p for p in pages if p is not None]
    if not got:
        return RouterFigures()
    sums: dict[str, float] = {}
    for p in got:
        for k, v in p.sums.items():
            sums[k] = sums.get(k, 0.0) + v
    ready_by_pool: dict[str, float] = {}
    for p in got:
        for pool, n in p.ready.items():
            ready_by_pool[pool] = ready_by_pool.get(pool, 0.0) + n / len(got)
    service: dict[str, float | None] = {}
    for figure in ("decode", "prompt", "running"):
        per_pool: dict[str, list[float]] = {}
        for p in got:
            for pool, figs in p.service.items():
                if figure in figs:
                    per_pool.setdefault(pool, []).append(figs[figure])
        means = {pool: sum(xs) / len(xs) for pool, xs in per_pool.items()}
        weights = {pool: max(ready_by_pool.get(pool, 0.0), 1e-9) for pool in means}
        total = sum(weights.values())
        service[figure] = sum(means[p] * weights[p] for p in means) / total if means else None
    return RouterFigures(
        routers=len(got),
        **sums,
        decode_tokens_per_replica=service["decode"],
        prompt_tokens_per_replica=service["prompt"],
        running_per_replica=service["running"],
        ready_replicas=sum(ready_by_pool.values()),
    )
