"""Latency histograms and the SLO verdict, shared by the locust process and the pipeline.

Pure Python with no third-party imports, because the locust process imports it (locust patches that
process with gevent; nothing heavy belongs there) and the runner reads the summaries it writes.

Locust's own percentiles round every response under 100 ms to a whole millisecond, which is useless
for a sub-millisecond Triton; :class:`LatencyHistogram` keeps log-spaced buckets 1% wide instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

BUCKETS_PER_E = 100  # bucket k holds [e^(k/100), e^((k+1)/100)) ms: every bucket is 1.005% wide
_FLOOR_MS = 1e-4  # 0.1 µs: anything faster is recorded here


class LatencyHistogram:
    """Counts, failures and log-spaced latency buckets of one window; O(1) per request."""

    def __init__(self) -> None:
        self.buckets: dict[int, int] = {}
        self.requests = 0
        self.failures = 0
        self.min_ms = math.inf
        self.max_ms = 0.0
        self.sum_ms = 0.0

    def record(self, ms: float, failed: bool = False) -> None:
        """One completed request, failed or not (both count in the latency)."""
        ms = max(float(ms), _FLOOR_MS)
        key = math.floor(math.log(ms) * BUCKETS_PER_E)
        self.buckets[key] = self.buckets.get(key, 0) + 1
        self.requests += 1
        self.failures += bool(failed)
        self.sum_ms += ms
        self.min_ms = min(self.min_ms, ms)
        self.max_ms = max(self.max_ms, ms)

    def percentile(self, q: float) -> float | None:
        """The q-th percentile (0..100) in ms, within 1% of the exact value; None when empty."""
        if not self.requests:
            return None
        rank = max(1, math.ceil(self.requests * q / 100))
        seen = 0
        for key in sorted(self.buckets):
            seen += self.buckets[key]
            if seen >= rank:
                middle = math.exp((key + 0.5) / BUCKETS_PER_E)  # the geometric middle of the bucket
                return min(max(middle, self.min_ms), self.max_ms)
        return self.max_ms  # pragma: no cover - ranks never exceed the count

    def merge(self, other: LatencyHistogram) -> None:
        """Add another window's counts into this one."""
        for key, count in other.buckets.items():
            self.buckets[key] = self.buckets.get(key, 0) + count
        self.requests += other.requests
        self.failures += other.failures
        self.sum_ms += other.sum_ms
        self.min_ms = min(self.min_ms, other.min_ms)
        self.max_ms = max(self.max_ms, other.max_ms)

    def summary(self, seconds: float) -> dict[str, float | int | None]:
        """What the runner joins and reports: counts, rates and percentiles over ``seconds``."""
        return {
            "requests": self.requests, "failures": self.failures, "seconds": seconds,
            "rps": self.requests / seconds if seconds > 0 else 0.0,
            "error_rate": self.failures / self.requests if self.requests else 0.0,
            "mean_ms": self.sum_ms / self.requests if self.requests else None,
            "p50_ms": self.percentile(50), "p95_ms": self.percentile(95), "p99_ms": self.percentile(99),
            "min_ms": self.min_ms if self.requests else None, "max_ms": self.max_ms if self.requests else None,
        }


@dataclass(frozen=True)
class Slo:
    """The service level: p95 latency and error rate limits (what the gate enforces)."""

    p95_ms: float
    error_rate: float

    def breaches(self, summary: dict) -> list[str]:
        """Why ``summary`` misses the SLO, one reason each; empty when it meets it."""
        requests = summary.get("requests") or 0
        if requests == 0:
            return ["no request completed in the measured window: check the target URL and the model name"]
        reasons = []
        p95 = summary.get("p95_ms")
        if p95 is not None and p95 > self.p95_ms:
            reasons.append(f"p95 {p95:.3f} ms > SLO {self.p95_ms:g} ms")
        rate = summary.get("error_rate") or 0.0
        if rate > self.error_rate:
            reasons.append(f"error rate {rate:.2%} ({summary.get('failures')} of {requests}) > SLO "
                           f"{self.error_rate:.2%}")
        return reasons
