"""The gateway's Prometheus metrics: plain counters, exported by a collector at scrape time.

prometheus_client's Counter/Histogram take a lock on every update (≈2-5 µs each, several per
request; in its multiprocess mode each also writes a file-backed map); a worker is one event loop,
so the hot path only bumps Python ints here and the collector turns them into metric families when
``/metrics`` is scraped. One registry per app, so tests can build many apps.

With several workers (a ``shared_dir``), :class:`SharedMetrics` writes this worker's totals into
prometheus-client's multiprocess files there, once a second and at every scrape, and a scrape of any
worker sums every worker's files with prometheus-client's own ``MultiProcessCollector``: ``/metrics``
is the whole gateway's, the other workers' figures at most :data:`PUBLISH_INTERVAL_S` old, and a
request costs no more than with one worker.
"""

from __future__ import annotations

import asyncio
import glob
import os
import time
from bisect import bisect_left
from collections import defaultdict
from contextlib import asynccontextmanager
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.utils import floatToGoString

from autoglm.errors import ConfigError

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
PUBLISH_INTERVAL_S = 1.0  # how old another worker's figures can be in a scrape
# name: help, one place for both exports
REQUESTS = ("autoglm_gateway_requests", "Requests by route and status")
LATENCY = ("autoglm_gateway_request_seconds", "Request latency by route")
ROWS = ("autoglm_gateway_request_rows", "Rows (batch size) per inference request")
IN_FLIGHT = ("autoglm_gateway_in_flight", "Requests admitted and not yet answered")
SHED = ("autoglm_gateway_shed", "Requests refused to protect the service")
TRITON_ERRORS = ("autoglm_gateway_triton_errors", "Failures talking to Triton")
ENERGY = ("autoglm_gateway_energy_joules_per_request",
          "Estimated energy per request of the gateway's workers (Triton's not included)")
CPU = ("autoglm_gateway_cpu_seconds", "CPU seconds of the gateway's workers (makes the energy figure)")
# per model version, where a routing chooses versions (serve.gateway.canary); errors are 5xx answers
VERSION_REQUESTS = ("autoglm_gateway_version_requests",
                    "Inference requests by model, version, role (stable, canary, pinned) and status")
VERSION_ERRORS = ("autoglm_gateway_version_errors", "Inference requests answered 5xx, by model, version and role")
VERSION_LATENCY = ("autoglm_gateway_version_request_seconds", "Inference latency by model, version and role")
CANARY_WEIGHT = ("autoglm_gateway_canary_weight", "Percent of a model's requests sent to its canary version")
AUTO_ROLLBACKS = ("autoglm_release_auto_rollbacks", "Canaries rolled back automatically by `autoglm release watch`")


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

    def __init__(self, in_flight=lambda: 0, watts_per_core: float = 10.0, shared_dir: Path | None = None,
                 worker: int | None = None, routing=dict):
        self.in_flight, self.routing = in_flight, routing  # routing(): the routing file's content
        self.watts_per_core = watts_per_core
        self.energy_method = f"estimated:gateway-cpu-s×{watts_per_core:g}W"
        self.requests: defaultdict[tuple[str, int], int] = defaultdict(int)
        self.latency: dict[str, _Histogram] = {}
        self.rows: dict[str, _Histogram] = {}
        self.shed: defaultdict[str, int] = defaultdict(int)
        self.triton_errors: defaultdict[str, int] = defaultdict(int)
        self.versions: defaultdict[tuple[str, str, str, int], int] = defaultdict(int)
        self.version_errors: defaultdict[tuple[str, str, str], int] = defaultdict(int)
        self.version_latency: dict[tuple[str, str, str], _Histogram] = {}
        self.served = 0
        self._cpu0 = time.process_time()
        self.registry = CollectorRegistry(auto_describe=True)
        self.shared = SharedMetrics(self, Path(shared_dir), worker or os.getpid()) if shared_dir else None
        self.registry.register(self.shared or self)

    # ---- updates (hot path) ------------------------------------------------------------------------
    def observe(self, route: str, status: int, seconds: float) -> None:
        """Count one answered request."""
        self.served += 1
        self.requests[(route, status)] += 1
        hist = self.latency.get(route)
        if hist is None:
            hist = self.latency[route] = _Histogram(LATENCY_BUCKETS)
        hist.observe(seconds)

    def observe_version(self, model: str, version: int, role: str, status: int, seconds: float) -> None:
        """Count one answered request of a model version the routing chose (or the client named)."""
        key = (model, str(version), role)
        self.versions[(*key, status)] += 1
        if status >= 500:
            self.version_errors[key] += 1
        hist = self.version_latency.get(key)
        if hist is None:
            hist = self.version_latency[key] = _Histogram(LATENCY_BUCKETS)
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
    def cpu_seconds(self) -> float:
        return time.process_time() - self._cpu0

    def energy(self, cpu_s: float, served: float) -> GaugeMetricFamily:
        family = GaugeMetricFamily(*ENERGY, labels=["method"])
        family.add_metric([self.energy_method], cpu_s * self.watts_per_core / max(1, served))
        return family

    def describe(self):
        return []  # no collect() at registration: the families are fixed, and the worker is not built yet

    def routing_families(self):
        """The canary weights and automatic rollbacks of the routing file (the gateway's, not a worker's)."""
        state = self.routing() or {}
        weight = GaugeMetricFamily(*CANARY_WEIGHT, labels=["model", "stable", "canary"])
        for model, split in sorted(state.get("models", {}).items()):
            if split.get("canary") is not None:
                weight.add_metric([model, str(split["stable"]), str(split["canary"])], float(state.get("weight", 0)))
        yield weight
        yield CounterMetricFamily(*AUTO_ROLLBACKS, value=len(state.get("auto_rollbacks", [])))

    def version_families(self):
        labels = ["model", "version", "role"]
        requests = CounterMetricFamily(*VERSION_REQUESTS, labels=[*labels, "status"])
        for (model, version, role, status), n in sorted(self.versions.items()):
            requests.add_metric([model, version, role, str(status)], n)
        errors = CounterMetricFamily(*VERSION_ERRORS, labels=labels)
        for key, n in sorted(self.version_errors.items()):
            errors.add_metric(list(key), n)
        latency = HistogramMetricFamily(*VERSION_LATENCY, labels=labels)
        for key, hist in sorted(self.version_latency.items()):
            latency.add_metric(list(key), hist.buckets(), hist.total)
        return requests, errors, latency

    def collect(self):
        """prometheus_client's Collector protocol: this worker's figures."""
        requests = CounterMetricFamily(*REQUESTS, labels=["route", "status"])
        for (route, status), n in sorted(self.requests.items()):
            requests.add_metric([route, str(status)], n)
        yield requests
        for (name, doc), hists in ((LATENCY, self.latency), (ROWS, self.rows)):
            family = HistogramMetricFamily(name, doc, labels=["route"])
            for route, hist in sorted(hists.items()):
                family.add_metric([route], hist.buckets(), hist.total)
            yield family
        yield GaugeMetricFamily(*IN_FLIGHT, value=self.in_flight())
        for (name, doc), label, values in ((SHED, "reason", self.shed), (TRITON_ERRORS, "kind", self.triton_errors)):
            family = CounterMetricFamily(name, doc, labels=[label])
            for key, n in sorted(values.items()):
                family.add_metric([key], n)
            yield family
        yield from self.version_families()
        yield from self.routing_families()
        yield self.energy(self.cpu_seconds(), self.served)

    def render(self) -> bytes:
        """The text exposition format: this worker's figures, or with a ``shared_dir`` every worker's summed."""
        return generate_latest(self.registry)

    @asynccontextmanager
    async def publishing(self):
        """While the block runs, this worker's figures reach the other workers' scrapes every
        :data:`PUBLISH_INTERVAL_S`; then its last ones, and its in-flight gauge leaves the sum."""
        if self.shared is None:
            yield
            return

        async def every_interval():
            while True:
                await asyncio.sleep(PUBLISH_INTERVAL_S)
                self.shared.publish()

        task = asyncio.create_task(every_interval())
        try:
            yield
        finally:
            task.cancel()
            self.shared.close()


class SharedMetrics:
    """One worker's part of a gateway's metrics across workers: its totals in prometheus-client's
    multiprocess files under ``directory`` (``counter_<worker>.db``, ``histogram_<worker>.db``,
    ``gauge_livesum_<worker>.db``), and a collector summing every worker's files.

    Whole totals are written (not increments), so a file is always this worker's state as of its last
    publish. A dead worker's counters stay in the sum (the gateway's counters never go back); its
    in-flight gauge is dropped at the next scrape.
    """

    def __init__(self, metrics: GatewayMetrics, directory: Path, worker: int):
        if not directory.is_dir():
            raise ConfigError(f"the gateway's shared_dir {directory} is not a directory: create it empty (or unset "
                              f"PROMETHEUS_MULTIPROC_DIR for workers that count alone)")
        self.metrics, self.directory, self.worker = metrics, directory, worker
        self._files = {kind: MmapedDict(str(directory / f"{kind}_{worker}.db"))
                       for kind in ("counter", "histogram", "gauge_livesum")}
        self._keys: dict[tuple, str] = {}
        self._les = {bounds: (*map(floatToGoString, bounds), "+Inf") for bounds in (LATENCY_BUCKETS, ROW_BUCKETS)}
        self._closed = False

    def _write(self, kind: str, metric: tuple[str, str], suffix: str, labels: tuple[tuple[str, str], ...],
               value: float) -> None:
        key = self._keys.get((metric[0], suffix, labels))
        if key is None:
            key = self._keys[(metric[0], suffix, labels)] = mmap_key(
                metric[0], metric[0] + suffix, [k for k, _ in labels], [v for _, v in labels], metric[1])
        self._files[kind].write_value(key, float(value), 0.0)

    def publish(self) -> None:
        """Write this worker's totals (≈0.5 µs a value; a few hundred values)."""
        if self._closed:
            return
        m, write = self.metrics, self._write
        for (route, status), n in m.requests.items():
            write("counter", REQUESTS, "_total", (("route", route), ("status", str(status))), n)
        for metric, hists in ((LATENCY, m.latency), (ROWS, m.rows)):
            for route, hist in hists.items():
                for le, n in zip(self._les[hist.bounds], hist.counts):
                    write("histogram", metric, "_bucket", (("route", route), ("le", le)), n)
                write("histogram", metric, "_sum", (("route", route),), hist.total)
        for metric, label, values in ((SHED, "reason", m.shed), (TRITON_ERRORS, "kind", m.triton_errors)):
            for key, n in values.items():
                write("counter", metric, "_total", ((label, key),), n)
        for (model, version, role, status), n in m.versions.items():
            write("counter", VERSION_REQUESTS, "_total", (("model", model), ("version", version), ("role", role),
                                                           ("status", str(status))), n)
        for (model, version, role), n in m.version_errors.items():
            write("counter", VERSION_ERRORS, "_total", (("model", model), ("version", version), ("role", role)), n)
        for (model, version, role), hist in m.version_latency.items():
            labels = (("model", model), ("version", version), ("role", role))
            for le, n in zip(self._les[hist.bounds], hist.counts):
                write("histogram", VERSION_LATENCY, "_bucket", (*labels, ("le", le)), n)
            write("histogram", VERSION_LATENCY, "_sum", labels, hist.total)
        write("counter", CPU, "_total", (), m.cpu_seconds())
        write("gauge_livesum", IN_FLIGHT, "", (), m.in_flight())

    def describe(self):
        return []  # the families come from the files

    def collect(self):
        """Every worker's figures, summed (the in-flight gauge over live workers), with the energy per request
        of all their CPU time."""
        self.publish()  # this worker's own figures are exact
        for path in glob.glob(str(self.directory / "gauge_livesum_*.db")):
            pid = int(path.rsplit("_", 1)[1][:-3])
            if not _alive(pid):
                mark_process_dead(pid, str(self.directory))
        cpu_s = served = 0.0
        for family in MultiProcessCollector.merge(glob.glob(str(self.directory / "*.db"))):
            if family.name == CPU[0]:
                cpu_s = sum(sample.value for sample in family.samples)
                continue
            if family.name == REQUESTS[0]:
                served = sum(sample.value for sample in family.samples)
            yield family
        yield from self.metrics.routing_families()
        yield self.metrics.energy(cpu_s, served)

    def close(self) -> None:
        """The last figures, then this worker leaves the in-flight sum."""
        self.publish()
        self._closed = True
        for dictionary in self._files.values():
            dictionary.close()
        mark_process_dead(self.worker, str(self.directory))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True
