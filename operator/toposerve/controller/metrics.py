"""The operator's own Prometheus metrics (served by `toposerve run --metrics-port`)."""

from __future__ import annotations

import contextlib

from prometheus_client import Counter, Gauge, Histogram

from toposerve.planner.cost import DeploymentCost

RECONCILES = Counter("toposerve_reconcile_total", "Reconciles by result.", ["result"])
RECONCILE_SECONDS = Histogram(
    "toposerve_reconcile_duration_seconds",
    "Time of one reconcile.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
CHILDREN_APPLIED = Counter(
    "toposerve_children_applied_total", "Server-side applies of child objects.", ["kind"]
)
STATUS_WRITES = Counter(
    "toposerve_status_writes_total", "Status patches written (unchanged status is skipped)."
)
QUEUE_DEPTH = Gauge("toposerve_queue_depth", "LLMDeployments waiting to be reconciled.")
LEADER = Gauge("toposerve_leader", "1 while this replica holds the leader Lease.")
API_SECONDS = Histogram(
    "toposerve_api_request_duration_seconds",
    "Kubernetes API calls made by reconciles, by HTTP method (watches not included).",
    ["method"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
)

# Observed cost (planner/cost.py): one series per deployment and pool; pool="" is the deployment total.
_COST_LABELS = ["namespace", "deployment", "pool"]
COST_PER_HOUR = Gauge(
    "toposerve_cost_per_hour_dollars", "USD per hour of the GPUs serving pods hold now.", _COST_LABELS
)
GPUS_HELD = Gauge("toposerve_gpus", "GPUs held by serving pods bound to nodes.", _COST_LABELS)
OUTPUT_TOKENS_PER_SECOND = Gauge(
    "toposerve_output_tokens_per_second", "Observed output tokens/s (engines' counters).", _COST_LABELS
)
COST_PER_MILLION = Gauge(
    "toposerve_cost_per_million_output_tokens_dollars",
    "USD per million output tokens at the observed throughput (absent at 0 tokens/s).",
    _COST_LABELS,
)
_COST_GAUGES = (COST_PER_HOUR, GPUS_HELD, OUTPUT_TOKENS_PER_SECOND, COST_PER_MILLION)
_cost_series: dict[tuple[str, str], set[str]] = {}


def record_cost(cost: DeploymentCost) -> None:
    """Set the cost gauges of one deployment, dropping series of pools (or figures) that went away."""
    key = (cost.namespace, cost.name)
    pools = {"": cost.total, **{p.name: p for p in cost.pools}}
    forget_cost(cost.namespace, cost.name, keep=set(pools))
    for pool, c in pools.items():
        labels = (cost.namespace, cost.name, pool)
        COST_PER_HOUR.labels(*labels).set(c.cost_per_hour)
        GPUS_HELD.labels(*labels).set(c.gpus)
        for gauge, value in (
            (OUTPUT_TOKENS_PER_SECOND, c.output_tokens_per_second),
            (COST_PER_MILLION, c.cost_per_million_output_tokens),
        ):
            if value is None:
                _remove(gauge, labels)
            else:
                gauge.labels(*labels).set(value)
    _cost_series[key] = set(pools)


def forget_cost(namespace: str, name: str, keep: set[str] | None = None) -> None:
    """Remove the cost series of a deleted deployment (or of pools not in ``keep``)."""
    for pool in _cost_series.pop((namespace, name), set()) - (keep or set()):
        for gauge in _COST_GAUGES:
            _remove(gauge, (namespace, name, pool))


def _remove(gauge: Gauge, labels: tuple[str, str, str]) -> None:
    with contextlib.suppress(KeyError):  # never set (e.g. throughput unknown so far)
        gauge.remove(*labels)
