"""The operator's own Prometheus metrics (served by `toposerve run --metrics-port`)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

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
