"""The PromQL every mode uses, written once (pure): the builtin loop asks per pod, KEDA asks for
the sum (its AverageValue target divides by the target, which is ceil(replicas x mean / target),
the same number)."""

from __future__ import annotations

KV = "vllm:kv_cache_usage_perc"
WAITING = "vllm:num_requests_waiting"
RUNNING = "vllm:num_requests_running"
HELD = "toposerve_router_held_requests"  # the router's requests held at zero replicas


def selector(template: str, namespace: str, name: str) -> str:
    """The label matchers of one LLMDeployment's engine series (namespace and name are DNS labels,
    which need no escaping in a PromQL string)."""
    return template.replace("{namespace}", namespace).replace("{name}", name)


# Within one pod vLLM exports one series per engine (labels model_name and engine: vLLM 0.33.0
# v1/metrics/loggers.py, create_metric_per_engine), several with data parallelism. KV usage is a
# fraction of each engine's own cache: averaged within the pod (0.4 and 0.4 is 0.4, not 0.8);
# waiting and running are request counts: summed within the pod. The scrape fallback
# (report.parse_metrics_text) combines a pod's series the same way.
WITHIN_POD: dict[str, str] = {KV: "avg", WAITING: "sum", RUNNING: "sum"}


def per_pod(metric: str, sel: str, window_s: int) -> str:
    """One smoothed value per pod: the mean over the window, so one noisy scrape decides nothing,
    with the pod's engine series combined as WITHIN_POD says."""
    agg = WITHIN_POD.get(metric, "avg")
    return f"{agg} by (pod) (avg_over_time({metric}{{{sel}}}[{window_s}s]))"


def total(metric: str, sel: str, window_s: int) -> str:
    """The sum over pods of the per-pod value; 0 when no pod reports (e.g. at zero replicas)."""
    return f"sum({per_pod(metric, sel, window_s)}) or vector(0)"


def held(router_sel: str) -> str:
    """Requests the deployment's routers hold for a replica to appear; 0 when none report."""
    return f"sum({HELD}{{{router_sel}}}) or vector(0)"


def waiting_or_held(sel: str, router_sel: str, window_s: int) -> str:
    """Waiting requests on the engines plus those the routers hold: what wakes a deployment at zero."""
    return f"({total(WAITING, sel, window_s)}) + ({held(router_sel)})"


TTFT = "vllm:time_to_first_token_seconds"  # a histogram: _bucket{le}, _count, _sum


def ttft_quantile(sel: str, quantile: float, window_s: int) -> str:
    """The deployment's TTFT quantile over the window, from the engines' summed bucket rates (so
    every request counts once, whichever pod served it). NaN when no request started in the window."""
    return f"histogram_quantile({quantile:g}, sum by (le) (rate({TTFT}_bucket{{{sel}}}[{window_s}s])))"


def ttft_requests(sel: str, window_s: int) -> str:
    """Requests per second whose first token the window saw; no series at all means no data."""
    return f"sum(rate({TTFT}_count{{{sel}}}[{window_s}s]))"


def ttft_trigger(sel: str, quantile: float, window_s: int) -> str:
    """For KEDA (metricType Value): the quantile, 0 when idle (NaN fails the comparison and the
    empty result becomes 0), so an idle deployment is not held up by TTFT."""
    return f"({ttft_quantile(sel, quantile, window_s)} >= 0) or vector(0)"
