"""The TTFT SLO input: the decision's proposal, histogram quantiles, both metrics sources, the
loop's status and Event."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from toposerve.autoscale import promql
from toposerve.autoscale.decision import Inputs, ttft_replicas
from toposerve.autoscale.report import (
    TTFT,
    PodSample,
    Reading,
    bucket_delta,
    histogram_quantile,
    parse_metrics_text,
    summed,
    ttft_of,
)
from toposerve.controller.autoscale_sources import PrometheusSource, ScrapeSource

from .test_builtin import Clock, FakeKube, llmd, pod, scaler
from .test_decision import cfg, ready, run, starting

INF = math.inf
SLO = cfg(ttft_slo=1.0, ttft_quantile=0.95)


# ---- the decision ---------------------------------------------------------------------------------


def test_ttft_replicas_is_the_hpa_formula_on_ready_replicas() -> None:
    assert ttft_replicas(2.0, 1.0, current=3, ready=3, tolerance=0.1) == 6
    assert ttft_replicas(1.05, 1.0, current=3, ready=3, tolerance=0.1) == 3  # inside the band
    assert ttft_replicas(0.5, 1.0, current=4, ready=4, tolerance=0.1) == 2
    # two ready + two starting: ceil(2 x 1.5) = 3 is covered by the 4 on the way: hold
    assert ttft_replicas(1.5, 1.0, current=4, ready=2, tolerance=0.1) == 4
    # never against the signal
    assert ttft_replicas(0.5, 1.0, current=2, ready=1, tolerance=0.1) <= 2
    assert ttft_replicas(3.0, 1.0, current=5, ready=1, tolerance=0.1) == 5


def test_a_slow_first_token_scales_up_even_when_kv_cache_is_fine() -> None:
    d = run(SLO, Inputs(now=10_000, current=2, replicas=ready(2, 0.7), ttft=1.8))
    assert (d.desired, d.reason) == (4, "ScaleUp") and "TTFT p95 above target" in d.message
    assert d.ttft == 1.8 and not d.ttft_missing


def test_the_largest_proposal_wins_between_kv_and_ttft() -> None:
    d = run(SLO, Inputs(now=10_000, current=2, replicas=ready(2, 2.1), ttft=1.5))  # kv asks 6, TTFT 3
    assert d.desired == 6 and "kv-cache" in d.message


def test_a_fast_first_token_lets_kv_scale_down() -> None:
    d = run(SLO, Inputs(now=10_000, current=4, replicas=ready(4, 0.2), ttft=0.3))
    assert d.desired == 2 and d.reason == "ScaleDown"


def test_a_ttft_within_the_slo_holds_back_a_kv_scale_down_only_by_its_own_proposal() -> None:
    # KV asks for 2, TTFT (0.95 of the SLO, inside the band) keeps 4: the largest proposal wins
    d = run(SLO, Inputs(now=10_000, current=4, replicas=ready(4, 0.2), ttft=0.95))
    assert d.desired == 4 and d.reason == "WithinTolerance"


def test_missing_ttft_never_scales_down_but_idle_does_not_block() -> None:
    missing = run(SLO, Inputs(now=10_000, current=4, replicas=ready(4, 0.1), ttft=None))
    assert missing.desired == 4 and missing.ttft_missing and "no fresh TTFT" in missing.message
    nan = run(SLO, Inputs(now=10_000, current=4, replicas=ready(4, 0.1), ttft=float("nan")))
    assert nan.desired == 4 and nan.ttft_missing
    idle = run(SLO, Inputs(now=10_000, current=4, replicas=ready(4, 0.1), ttft=None, ttft_idle=True))
    assert idle.desired == 1 and not idle.ttft_missing
    # missing TTFT still lets KV scale up
    up = run(SLO, Inputs(now=10_000, current=2, replicas=ready(2, 1.4), ttft=None))
    assert up.desired == 4


def test_ttft_from_a_source_that_is_down_counts_as_missing() -> None:
    d = run(
        SLO, Inputs(now=10_000, current=3, replicas=ready(3, 0.1), source_ok=False, ttft=5.0, ttft_idle=True)
    )
    assert d.desired == 3 and d.reason == "MetricsUnavailable" and d.ttft is None and d.ttft_missing


def test_without_an_slo_ttft_is_ignored() -> None:
    d = run(cfg(), Inputs(now=10_000, current=2, replicas=ready(2, 0.7), ttft=9.0))
    assert d.desired == 2 and d.ttft is None and not d.ttft_missing


def test_starting_replicas_count_as_capacity_for_ttft() -> None:
    d = run(SLO, Inputs(now=10_000, current=4, replicas=ready(2, 0.7) + starting(2), ttft=1.5))
    assert d.desired == 4


@settings(max_examples=300, deadline=None)
@given(
    st.integers(1, 8),
    st.floats(0.0, 2.0),
    st.one_of(st.none(), st.floats(0.01, 10.0)),
    st.booleans(),
)
def test_ttft_never_scales_down_while_missing_and_bounds_hold(
    n: int, kv: float, ttft: float | None, idle: bool
) -> None:
    d = run(SLO, Inputs(now=10_000, current=n, replicas=ready(n, kv), ttft=ttft, ttft_idle=idle))
    assert SLO.min_replicas <= d.desired <= SLO.max_replicas or d.desired == n
    if ttft is None and not idle:
        assert d.desired >= n
    if ttft is not None and ttft > 1.1:
        assert d.desired >= min(n, SLO.max_replicas)


# ---- histogram quantiles ---------------------------------------------------------------------------

B = ((0.1, 10.0), (0.5, 60.0), (1.0, 90.0), (2.5, 100.0), (INF, 100.0))


def test_histogram_quantile_interpolates_like_prometheus() -> None:
    assert histogram_quantile(0.5, B) == pytest.approx(0.1 + 0.4 * (50 - 10) / 50)
    assert histogram_quantile(0.05, B) == pytest.approx(0.05)  # first bucket from 0
    assert histogram_quantile(0.95, B) == pytest.approx(1.0 + 1.5 * 5 / 10)
    # in the +Inf bucket: the highest finite bound
    assert histogram_quantile(0.99, ((1.0, 90.0), (INF, 100.0))) == 1.0
    assert histogram_quantile(0.5, ((1.0, 0.0), (INF, 0.0))) is None
    assert histogram_quantile(0.5, ((1.0, 5.0),)) is None  # no +Inf bucket
    assert histogram_quantile(0.5, ()) is None


def test_bucket_deltas_between_scrapes() -> None:
    before = ((0.5, 10.0), (INF, 12.0))
    after = ((0.5, 14.0), (INF, 20.0))
    assert bucket_delta(before, after) == ((0.5, 4.0), (INF, 8.0))
    assert bucket_delta(after, before) == before  # the engine restarted: count from zero
    assert summed([((0.5, 1.0), (INF, 2.0)), ((0.5, 3.0), (INF, 3.0))]) == ((0.5, 4.0), (INF, 5.0))
    assert ttft_of(((0.5, 0.0), (INF, 0.0)), 0.95) == TTFT(None, idle=True)
    assert ttft_of((), 0.95) == TTFT(None, idle=False)  # no TTFT series: missing


def text(counts: tuple[int, int, int], kv: float = 0.3) -> str:
    a, b, total = counts
    return (
        f'vllm:kv_cache_usage_perc{{model_name="m"}} {kv}\n'
        "# TYPE vllm:time_to_first_token_seconds histogram\n"
        f'vllm:time_to_first_token_seconds_bucket{{le="0.5",model_name="m"}} {a}\n'
        f'vllm:time_to_first_token_seconds_bucket{{le="1.0",model_name="m"}} {b}\n'
        f'vllm:time_to_first_token_seconds_bucket{{le="+Inf",model_name="m"}} {total}\n'
        f'vllm:time_to_first_token_seconds_count{{model_name="m"}} {total}\n'
        f'vllm:time_to_first_token_seconds_sum{{model_name="m"}} 1.0\n'
    )


def test_metrics_text_yields_the_ttft_buckets() -> None:
    s = parse_metrics_text(text((3, 5, 6)))
    assert s.kv == 0.3 and s.ttft_buckets == ((0.5, 3.0), (1.0, 5.0), (INF, 6.0))
    assert parse_metrics_text("garbage{").ttft_buckets == ()


# ---- sources ----------------------------------------------------------------------------------------


class FakeProm:
    def __init__(self, answers: dict[str, Any], fail: bool = False) -> None:
        self.answers, self.fail, self.asked = answers, fail, []

    def custom_query(self, q: str, timeout: float | None = None) -> Any:
        self.asked.append(q)
        if self.fail:
            raise ConnectionError("refused")
        return self.answers.get(q.split("(")[0], [])


def vec(x: str) -> list[dict[str, Any]]:
    return [{"metric": {}, "value": [1.0, x]}]


def test_prometheus_ttft_queries_the_quantile_and_the_request_rate() -> None:
    sel_t = 'namespace="{namespace}",toposerve_io_deployment="{name}"'
    prom = FakeProm({"histogram_quantile": vec("1.25"), "sum": vec("3.5")})
    src = PrometheusSource("http://p", sel_t, client=prom)
    assert src.ttft("ns", "llm", 0.9, 60) == TTFT(1.25)
    sel = 'namespace="ns",toposerve_io_deployment="llm"'
    assert prom.asked == [
        f"sum(rate(vllm:time_to_first_token_seconds_count{{{sel}}}[60s]))",
        f"histogram_quantile(0.9, sum by (le) (rate(vllm:time_to_first_token_seconds_bucket{{{sel}}}[60s])))",
    ]
    idle = PrometheusSource(
        "http://p", sel_t, client=FakeProm({"histogram_quantile": vec("NaN"), "sum": vec("0")})
    )
    assert idle.ttft("ns", "llm", 0.9, 60) == TTFT(None, idle=True)
    stale = PrometheusSource("http://p", sel_t, client=FakeProm({}))  # no series at all
    assert stale.ttft("ns", "llm", 0.9, 60) == TTFT()
    busy_nan = PrometheusSource(
        "http://p", sel_t, client=FakeProm({"histogram_quantile": vec("NaN"), "sum": vec("2")})
    )
    assert busy_nan.ttft("ns", "llm", 0.9, 60) == TTFT()
    down = PrometheusSource("http://p", sel_t, client=FakeProm({}, fail=True))
    assert down.ttft("ns", "llm", 0.9, 60) == TTFT()
    garbage = PrometheusSource("http://p", sel_t, client=FakeProm({"sum": "<html>", "histogram_quantile": 7}))
    assert garbage.ttft("ns", "llm", 0.9, 60) == TTFT()


class Scrape(ScrapeSource):
    def __init__(self, pages: dict[str, str | None]) -> None:
        super().__init__()
        self.pages = pages

    def _get(self, ip: str, port: int) -> str | None:
        return self.pages.get(ip)


def engine(name: str, ip: str) -> dict[str, Any]:
    return {"metadata": {"name": name}, "status": {"podIP": ip}}


def test_scrape_ttft_comes_from_bucket_deltas_between_two_reads() -> None:
    src = Scrape({"1": text((10, 10, 10)), "2": text((0, 0, 0))})
    pods = [engine("a", "1"), engine("b", "2")]
    src.read("ns", "llm", pods, 60, 60)
    assert src.ttft("ns", "llm", 0.95, 60) == TTFT()  # no baseline yet: missing
    # 20 new requests: on a, 10 under 0.5 s; on b, 10 between 0.5 s and 1 s
    src.pages = {"1": text((20, 20, 20)), "2": text((0, 10, 10))}
    src.read("ns", "llm", pods, 60, 60)
    assert src.ttft("ns", "llm", 0.5, 60).seconds == pytest.approx(0.5)
    assert src.ttft("ns", "llm", 0.95, 60).seconds == pytest.approx(0.5 + 0.5 * 9 / 10)
    src.read("ns", "llm", pods, 60, 60)  # nothing new: idle
    assert src.ttft("ns", "llm", 0.95, 60) == TTFT(None, idle=True)
    src.pages = {"1": None, "2": None}  # both stop answering: missing
    src.read("ns", "llm", pods, 60, 60)
    assert src.ttft("ns", "llm", 0.95, 60) == TTFT()
    assert src.ttft("ns", "other", 0.95, 60) == TTFT()


# ---- the loop --------------------------------------------------------------------------------------


class TTFTSource:
    name = "fake"

    def __init__(self, kv: float, ttft: TTFT) -> None:
        self.kv, self.value = kv, ttft

    def held(self, namespace: str, name: str, routers: Any) -> int:
        return 0

    def read(self, namespace: str, name: str, pods: Any, window_s: int, stale_after_s: int) -> Reading:
        return Reading("fake", True, {p["metadata"]["name"]: PodSample(self.kv, 0.0, 1.0) for p in pods})

    def ttft(self, namespace: str, name: str, quantile: float, window_s: int) -> TTFT:
        assert quantile == 0.9 and window_s == 60
        return self.value


def test_the_loop_scales_on_ttft_and_says_so_in_status_and_event() -> None:
    body = llmd(2, ttftSLO={"seconds": 1.0, "quantile": 0.9})
    kube, clock = FakeKube(body, [pod("a"), pod("b")]), Clock()
    a = scaler(kube, TTFTSource(0.5, TTFT(2.0)), clock)  # type: ignore[arg-type]
    (d,) = a.run_once([])
    assert (d.current, d.desired) == (2, 4)
    ((reason, msg, _),) = kube.events
    assert reason == "ScaledUp" and "TTFT p90 above target" in msg and "TTFT 2.000s (SLO 1s)" in msg
    inputs = kube.statuses[-1]["autoscaling"]["inputs"]
    assert (inputs["ttftSeconds"], inputs["ttftSLOSeconds"], inputs["ttftMissing"]) == (2.0, 1.0, False)


def test_the_loop_holds_on_missing_ttft_and_leaves_ttft_out_without_an_slo() -> None:
    body = llmd(4, ttftSLO={"seconds": 1.0, "quantile": 0.9}, scaleDown={"stabilizationWindowSeconds": 0})
    kube, clock = FakeKube(body, [pod(n) for n in "abcd"]), Clock()
    (d,) = scaler(kube, TTFTSource(0.1, TTFT()), clock).run_once([])  # type: ignore[arg-type]
    assert d.desired == 4 and kube.statuses[-1]["autoscaling"]["inputs"]["ttftMissing"] is True
    plain = FakeKube(llmd(2), [pod("a"), pod("b")])
    scaler(plain, TTFTSource(0.7, TTFT(9.0)), Clock()).run_once([])  # type: ignore[arg-type]
    assert "ttftSeconds" not in plain.statuses[-1]["autoscaling"]["inputs"]


def test_promql_ttft_queries() -> None:
    assert (
        promql.ttft_requests('a="b"', 30) == 'sum(rate(vllm:time_to_first_token_seconds_count{a="b"}[30s]))'
    )
    assert promql.ttft_trigger('a="b"', 0.95, 30).endswith(">= 0) or vector(0)")


def test_the_mock_engines_real_metrics_page_gives_the_same_quantile_as_its_observations() -> None:
    """The /metrics text vLLM's names produce (the mock engine's prometheus_client registry, vLLM's
    TTFT buckets), parsed and differenced as ScrapeSource does."""
    from toposerve.mockengine.metrics import TTFT_BUCKETS, EngineMetrics

    m = EngineMetrics("m", {"block_size": "16"})
    before = parse_metrics_text(m.render().decode())
    for x in [0.03] * 90 + [0.3] * 10:
        m.ttft.labels("m").observe(x)
    after = parse_metrics_text(m.render().decode())
    assert [le for le, _ in after.ttft_buckets] == [*TTFT_BUCKETS, INF]
    window = bucket_delta(before.ttft_buckets, after.ttft_buckets)
    p50 = ttft_of(window, 0.5).seconds
    p95 = ttft_of(window, 0.95).seconds
    assert p50 is not None and p95 is not None
    # each lies in the bucket that holds the true value (0.03 and 0.3)
    assert max(le for le in TTFT_BUCKETS if le < 0.03) < p50 <= min(le for le in TTFT_BUCKETS if le >= 0.03)
    assert max(le for le in TTFT_BUCKETS if le < 0.3) < p95 <= min(le for le in TTFT_BUCKETS if le >= 0.3)
