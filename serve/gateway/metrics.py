"""The gateway's Prometheus metrics, in a registry of its own (one per app, so tests can make many).

Label children are resolved once and cached: ``Counter.labels()`` costs microseconds per call, and
the hot path counts every request. In-flight and the energy estimate are computed at scrape time.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class _EnergyEstimate:
    """J/request estimated from this worker's CPU-seconds x watts per core, labelled as an estimate."""

    def __init__(self, metrics: GatewayMetrics, watts_per_core: float):
        self.metrics, self.watts = metrics, watts_per_core
        self.method = f"estimated:gateway-cpu-s×{watts_per_core:g}W"

    def collect(self):
        family = GaugeMetricFamily("autoglm_gateway_energy_joules_per_request",
                                   "Estimated energy per request of this gateway worker (not Triton's)",
                                   labels=["method"])
        served = max(1, self.metrics.served)
        family.add_metric([self.method], time.process_time() * self.watts / served)
        yield family


class GatewayMetrics:
    """Requests by route and status, latency, in-flight, shedding, Triton errors, rows per request."""

    def __init__(self, in_flight=lambda: 0, watts_per_core: float = 10.0):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("autoglm_gateway_requests", "Requests by route and status",
                                ["route", "status"], registry=r)
        self.latency = Histogram("autoglm_gateway_request_seconds", "Request latency by route", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("autoglm_gateway_in_flight", "Requests admitted and not yet answered", registry=r)
        self.in_flight.set_function(in_flight)
        self.shed = Counter("autoglm_gateway_shed", "Requests refused to protect the service", ["reason"], registry=r)
        self.triton_errors = Counter("autoglm_gateway_triton_errors", "Failures talking to Triton", ["kind"],
                                     registry=r)
        self.rows = Histogram("autoglm_gateway_request_rows", "Rows (batch size) per inference request",
                              ["route"], buckets=ROW_BUCKETS, registry=r)
        r.register(_EnergyEstimate(self, watts_per_core))
        self.served = 0
        self._requests: dict[tuple[str, int], object] = {}
        self._latency: dict[str, object] = {}
        self._rows: dict[str, object] = {}

    def observe(self, route: str, status: int, seconds: float) -> None:
        """Count one answered request."""
        self.served += 1
        child = self._requests.get((route, status))
        if child is None:
            child = self._requests[(route, status)] = self.requests.labels(route, str(status))
        child.inc()
        hist = self._latency.get(route)
        if hist is None:
            hist = self._latency[route] = self.latency.labels(route)
        hist.observe(seconds)

    def shed_one(self, reason: str) -> None:
        """Count a request refused to protect the service (rate limit, in-flight bound)."""
        self.shed.labels(reason).inc()

    def observe_rows(self, route: str, rows: int) -> None:
        hist = self._rows.get(route)
        if hist is None:
            hist = self._rows[route] = self.rows.labels(route)
        hist.observe(rows)

    def triton_error(self, kind: str) -> None:
        self.triton_errors.labels(kind).inc()

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
