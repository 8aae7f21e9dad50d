"""What the autoscaler reads: window samples of a model from Triton's metrics, and the gateway's p95.

Both scrape Prometheus text endpoints and turn cumulative counters into per-window figures, so the
rules engine sees "the last few seconds", never totals since start.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from autoglm.local_http import DIRECT


@dataclass(frozen=True)
class Sample:
    """One evaluation window: what the model saw since the previous sample."""

    t: float
    requests: int
    avg_latency_ms: float | None  # None: no requests in the window
    p95_latency_ms: float | None
    utilization: float  # busy fraction of the model's instances, 0..1


class TritonMetrics:
    """Samples of one model from Triton's Prometheus endpoint (cumulative counters → window deltas)."""

    def __init__(self, metrics_url: str, model: str, clock: Callable[[], float] = time.monotonic):
        self.url, self.model, self.clock = metrics_url, model, clock
        self._last: tuple[float, dict[str, float]] | None = None

    def fetch(self) -> str:
        with DIRECT.open(self.url, timeout=5) as resp:
            return resp.read().decode()

    def scrape(self) -> dict[str, float]:
        """This model's series: counters summed over versions; quantiles keyed ``name@q``, the slowest version's
        (a sum of two versions' p95 is no latency at all; a version with no requests reports NaN and is skipped)."""
        values: dict[str, float] = {}
        for family in text_string_to_metric_families(self.fetch()):
            for s in family.samples:
                if s.labels.get("model") != self.model:
                    continue
                # the parser names counters ``*_total``; Triton's own names have no suffix
                key = s.name.removesuffix("_total")
                if "quantile" in s.labels:
                    if not math.isnan(s.value):
                        key = f"{key}@{s.labels['quantile']}"
                        values[key] = max(values.get(key, s.value), s.value)
                else:
                    values[key] = values.get(key, 0.0) + s.value
        return values

    def sample(self, instances: int) -> Sample | None:
        """The window since the previous call (None on the first call, or after a Triton restart)."""
        now, cur = self.clock(), self.scrape()
        last, self._last = self._last, (now, cur)
        if last is None:
            return None
        t0, prev = last

        def delta(name: str) -> float:
            return cur.get(name, 0.0) - prev.get(name, 0.0)

        requests = delta("nv_inference_request_success")
        if requests < 0:  # counters reset: Triton restarted
            return None
        execs = delta("nv_inference_exec_count")
        compute = sum(delta(f"nv_inference_compute_{p}_duration_us") for p in ("input", "infer", "output"))
        # Every request of a batch is charged the batch's compute time: rescale to time per execution
        # (by requests per execution, not rows: a request of 16 images is still one request).
        busy_us = compute * (execs / requests) if requests else 0.0
        utilization = min(1.0, busy_us / max(1e-9, (now - t0) * 1e6 * instances))
        avg = delta("nv_inference_request_duration_us") / requests / 1000 if requests else None
        p95 = cur.get("nv_inference_request_summary_us@0.95")
        return Sample(now, int(requests), avg, p95 / 1000 if requests and p95 is not None else None, utilization)


class GatewayLatency:
    """The gateway's p95 over inference routes, from its latency histogram (bucket deltas per window).

    It adds what Triton cannot see (the gateway's queueing and JSON work) to the latency rule; with
    several workers the gateway's ``/metrics`` sums them all.
    """

    def __init__(self, metrics_url: str):
        self.url = metrics_url
        self._last: dict[float, float] | None = None

    def fetch(self) -> str:
        with DIRECT.open(self.url, timeout=5) as resp:
            return resp.read().decode()

    def p95_ms(self) -> float | None:
        """None when the window saw no inference request (or on the first call)."""
        cumulative: dict[float, float] = {}
        for family in text_string_to_metric_families(self.fetch()):
            for s in family.samples:
                route = s.labels.get("route", "")
                # inference only: a :generate stream lasts seconds by design, a :score is a batch job
                if s.name == "autoglm_gateway_request_seconds_bucket" and (
                        route.endswith(":predict") or route.endswith("/infer")):
                    le = float(s.labels["le"])
                    cumulative[le] = cumulative.get(le, 0.0) + s.value
        last, self._last = self._last, cumulative
        if last is None:
            return None
        seconds = bucket_quantile({b: n - last.get(b, 0.0) for b, n in cumulative.items()}, 0.95)
        return None if seconds is None else seconds * 1000


def bucket_quantile(cumulative: dict[float, float], q: float) -> float | None:
    """The ``q`` quantile of a window's cumulative histogram buckets (upper bound -> count), interpolated
    linearly within the bucket as PromQL's ``histogram_quantile`` does; None for an empty window."""
    bounds = sorted(cumulative)
    counts = [cumulative[b] for b in bounds]
    if not counts or counts[-1] <= 0:
        return None
    target, previous_bound, previous_count = q * counts[-1], 0.0, 0.0
    for bound, count in zip(bounds, counts):
        if count >= target:
            if math.isinf(bound):
                return previous_bound
            share = (target - previous_count) / max(count - previous_count, 1e-9)
            return previous_bound + (bound - previous_bound) * share
        previous_bound, previous_count = bound, count
    return None
