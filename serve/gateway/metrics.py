"""The gateway's Prometheus metrics: plain counters, exported by a collector at scrape time.

prometheus_client's Counter/Histogram take a lock on every update (≈2-5 µs each, several per
request); a worker is one event loop, so the hot path only bumps Python ints here and the
collector turns them into metric families when ``/metrics`` is scraped. One registry per app, so
tests can build many apps.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import defaultdict

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class _Histogram:
    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds, self.counts, self.total = bounds, [0] * (len(bounds) + 1), 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def buckets(self) -> list[tuple[str, int]]:
        out, running = [], 0
        for bound, count in zip((*map(str, self.bounds), "+Inf"), self.counts):
            running += count
            out.append((bound, running))
        return out


class GatewayMetrics:
    """Requests by route and status, latency, in-flight, shedding, Triton errors, rows per request,
    and the estimated energy per request (this worker's CPU-seconds × watts per core)."""

    def __init__(self, in_flight=lambda: 0, watts_per_core: float = 10.0):
        self.in_flight = in_flight
        self.watts_per_core = watts_per_core
        self.energy_method = f"estimated:gateway-cpu-s×{watts_per_core:g}W"
        self.requests: defaultdict[tuple[str, int], int] = defaultdict(int)
        self.latency: dict[str, _Histogram] = {}
        self.rows: dict[str, _Histogram] = {}
        self.shed: defaultdict[str, int] = defaultdict(int)
        self.triton_errors: defaultdict[str, int] = defaultdict(int)
        self.served = 0
        self._cpu0 = time.process_time()
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(self)

    # ---- updates (hot path) ------------------------------------------------------------------------
    def observe(self, route: str, status: int, seconds: float) -> None:
        """Count one answered request."""
        self.served += 1
        self.requests[(route, status)] += 1
        hist = self.latency.get(route)
        if hist is None:
            hist = self.latency[route] = _Histogram(LATENCY_BUCKETS)
        hist.observe(seconds)

    def observe_rows(self, route: str, rows: int) -> None:
        hist = self.rows.get(route)
        if hist is None:
            hist = self.rows[route] = _Histogram(ROW_BUCKETS)
        hist.observe(rows)

    def shed_one(self, reason: str) -> None:
        """Count a request refused to protect the service (rate limit, in-flight bound)."""
        self.shed[reason] += 1

    def triton_error(self, kind: str) -> None:
        self.triton_errors[kind] += 1

    # ---- export ------------------------------------------------------------------------------------
    def collect(self):
        """prometheus_client's Collector protocol."""
        requests = CounterMetricFamily("autoglm_gateway_requests", "Requests by route and status",
                                       labels=["route", "status"])
        for (route, status), n in sorted(self.requests.items()):
            requests.add_metric([route, str(status)], n)
        yield requests
        for name, doc, hists in (("autoglm_gateway_request_seconds", "Request latency by route", self.latency),
                                 ("autoglm_gateway_request_rows", "Rows (batch size) per inference request",
                                  self.rows)):
            family = HistogramMetricFamily(name, doc, labels=["route"])
            for route, hist in sorted(hists.items()):
                family.add_metric([route], hist.buckets(), hist.total)
            yield family
        yield GaugeMetricFamily("autoglm_gateway_in_flight", "Requests admitted and not yet answered",
                                value=self.in_flight())
        for name, doc, label, values in (
                ("autoglm_gateway_shed", "Requests refused to protect the service", "reason", self.shed),
                ("autoglm_gateway_triton_errors", "Failures talking to Triton", "kind", self.triton_errors)):
            family = CounterMetricFamily(name, doc, labels=[label])
            for key, n in sorted(values.items()):
                family.add_metric([key], n)
            yield family
        energy = GaugeMetricFamily("autoglm_gateway_energy_joules_per_request",
                                   "Estimated energy per request of this gateway worker (Triton's not included)",
                                   labels=["method"])
        cpu_s = time.process_time() - self._cpu0
        energy.add_metric([self.energy_method], cpu_s * self.watts_per_core / max(1, self.served))
        yield energy

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
