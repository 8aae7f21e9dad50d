"""The latency histogram the locust process keeps, and the SLO verdict both sides share."""

import math

import numpy as np
import pytest

from loadtest.latency import LatencyHistogram, Slo


def test_percentiles_are_within_one_percent_of_exact():
    rng = np.random.default_rng(0)
    samples = rng.lognormal(mean=0.0, sigma=1.2, size=20_000)  # ms: 0.02 .. 100+, sub-millisecond included
    hist = LatencyHistogram()
    for ms in samples:
        hist.record(ms)
    for q in (50, 95, 99):
        exact = float(np.percentile(samples, q, method="inverted_cdf"))
        assert hist.percentile(q) == pytest.approx(exact, rel=0.01)
    assert hist.min_ms == pytest.approx(samples.min()) and hist.max_ms == pytest.approx(samples.max())


def test_summary_counts_failures_and_rates():
    hist = LatencyHistogram()
    for ms in (1.0, 2.0, 3.0):
        hist.record(ms)
    hist.record(50.0, failed=True)
    summary = hist.summary(seconds=2.0)
    assert summary["requests"] == 4 and summary["failures"] == 1
    assert summary["rps"] == 2.0 and summary["error_rate"] == 0.25
    assert summary["mean_ms"] == pytest.approx(14.0)
    assert summary["p50_ms"] == pytest.approx(2.0, rel=0.01)


def test_empty_window_and_merge():
    empty = LatencyHistogram()
    assert empty.percentile(95) is None
    assert empty.summary(1.0)["p95_ms"] is None and empty.summary(0)["rps"] == 0.0
    a, b = LatencyHistogram(), LatencyHistogram()
    a.record(1.0)
    b.record(100.0, failed=True)
    a.merge(b)
    assert (a.requests, a.failures, a.max_ms) == (2, 1, 100.0)


def test_zero_and_tiny_latencies_do_not_break_the_log_buckets():
    hist = LatencyHistogram()
    hist.record(0.0)
    hist.record(1e-9)
    assert hist.percentile(99) == pytest.approx(1e-4, rel=0.01)


@pytest.mark.parametrize(("summary", "expected"), [
    ({"requests": 100, "failures": 0, "p95_ms": 5.0, "error_rate": 0.0}, []),
    ({"requests": 100, "failures": 0, "p95_ms": 12.5, "error_rate": 0.0}, ["p95 12.500 ms > SLO 10 ms"]),
    ({"requests": 100, "failures": 5, "p95_ms": 5.0, "error_rate": 0.05}, ["error rate 5.00% (5 of 100) > SLO 1.00%"]),
    ({"requests": 0, "failures": 0, "p95_ms": None, "error_rate": 0.0}, ["no request completed"]),
])
def test_slo_breaches_name_what_missed(summary, expected):
    reasons = Slo(p95_ms=10, error_rate=0.01).breaches(summary)
    assert len(reasons) == len(expected)
    for reason, start in zip(reasons, expected, strict=True):
        assert reason.startswith(start)


def test_an_infinite_slo_never_breaches_on_latency():
    assert Slo(math.inf, 1.0).breaches({"requests": 1, "failures": 1, "p95_ms": 1e9, "error_rate": 1.0}) == []
