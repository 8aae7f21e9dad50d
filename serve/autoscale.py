"""The engine that applies the autoscaling rules, and a local actuator on Triton's model-control API.

The rules themselves (:class:`~autoglm.autoscaling.AutoscaleRules`, with the design's defaults) live in
the core, where deploy renders them for Kubernetes too. :class:`RulesEngine` is pure (samples and a
clock in, decisions out), so it is tested with synthetic series. :class:`Autoscaler` wires it to Triton's
metrics and the gateway's latency histogram (:mod:`serve.signals`) and to :class:`TritonActuator`,
which changes ``instance_group.count`` in place through ``POST /v2/repository/models/<m>/load`` with
a config override (≈0.2 s, no dropped requests).
"""

from __future__ import annotations

import http.client
import json
import logging
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass, replace

from prometheus_client import CollectorRegistry, Counter, Gauge

from autoglm.autoscaling import AutoscaleRules
from autoglm.errors import AutoGLMError
from autoglm.local_http import DIRECT
from serve.signals import GatewayLatency, Sample, TritonMetrics

log = logging.getLogger("serve.autoscale")


@dataclass(frozen=True)
class Decision:
    t: float
    model: str
    before: int
    after: int
    rule: str  # "latency" or "utilization"
    reason: str

    @property
    def direction(self) -> str:
        return "up" if self.after > self.before else "down"


class RulesEngine:
    """Turns a series of samples into scaling decisions; remembers how long each condition has held."""

    def __init__(self, rules: AutoscaleRules):
        self.rules = rules
        self.slow_since: float | None = None
        self.idle_since: float | None = None
        self.last_change: tuple[float, str] | None = None  # (time, "up" | "down")

    def _cooling(self, t: float) -> bool:
        if self.last_change is None:
            return False
        when, direction = self.last_change
        return t - when < (self.rules.up_cooldown_s if direction == "up" else self.rules.down_cooldown_s)

    def evaluate(self, sample: Sample, model: str, instances: int) -> Decision | None:
        """The decision this sample triggers, if any (the caller applies it and calls :meth:`applied`)."""
        r, t = self.rules, sample.t
        latencies = [v for v in (sample.avg_latency_ms, sample.p95_latency_ms) if v is not None]
        slow = any(v > r.latency_ms for v in latencies)
        idle = not slow and sample.utilization < r.utilization_below
        self.slow_since = (self.slow_since if self.slow_since is not None else t) if slow else None
        self.idle_since = (self.idle_since if self.idle_since is not None else t) if idle else None
        if self._cooling(t):
            return None
        if self.slow_since is not None and t - self.slow_since >= r.up_after_s and instances < r.max_instances:
            worst = max(latencies)
            return Decision(t, model, instances, r.scaled_up(instances), "latency",
                            f"latency {worst:.1f} ms > {r.latency_ms:g} ms for {t - self.slow_since:.0f} s")
        if self.idle_since is not None and t - self.idle_since >= r.down_after_s and instances > r.min_instances:
            return Decision(t, model, instances, r.scaled_down(instances), "utilization",
                            f"utilization {sample.utilization:.0%} < {r.utilization_below:.0%} for "
                            f"{t - self.idle_since:.0f} s")
        return None

    def applied(self, decision: Decision) -> None:
        """Start the cooldown; conditions must hold for a full window again before the next change."""
        self.last_change = (decision.t, decision.direction)
        self.slow_since = self.idle_since = None


class TritonActuator:
    """Reads and changes a model's instance count on a running Triton, in place."""

    def __init__(self, triton_url: str):
        self.url = triton_url.rstrip("/")

    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"{self.url}{path}", data=data, method=method)
        try:
            with DIRECT.open(request, timeout=30) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            raise AutoGLMError(f"Triton refused {method} {path}: {exc.read().decode(errors='replace')[:300]}") from None
        return json.loads(raw) if raw else {}

    def config(self, model: str) -> dict:
        # The HTTP config JSON, not gRPC's: gRPC renders int64 as strings and the override then forces a reload.
        return self._call("GET", f"/v2/models/{model}/config")

    def instances(self, model: str) -> int:
        return sum(int(group.get("count", 1)) for group in self.config(model).get("instance_group", []))

    def scale(self, model: str, count: int) -> None:
        config = self.config(model)
        groups = config.get("instance_group") or [{"kind": "KIND_CPU"}]
        config["instance_group"] = [dict(groups[0], count=count)]
        self._call("POST", f"/v2/repository/models/{model}/load", {"parameters": {"config": json.dumps(config)}})


class Autoscaler:
    """Samples the model every ``rules.interval_s``, evaluates the rules, applies and exports decisions."""

    def __init__(self, rules: AutoscaleRules, model: str, metrics: TritonMetrics, actuator: TritonActuator,
                 registry: CollectorRegistry | None = None, gateway: GatewayLatency | None = None):
        self.rules, self.model, self.metrics, self.actuator = rules, model, metrics, actuator
        self.gateway = gateway
        self.engine = RulesEngine(rules)
        self.decisions: list[Decision] = []
        self.registry = registry or CollectorRegistry()
        self._instances = Gauge("autoglm_autoscale_instances", "Model instances", ["model"], registry=self.registry)
        self._decided = Counter("autoglm_autoscale_decisions", "Scaling decisions applied",
                                ["model", "direction", "rule"], registry=self.registry)
        self._latency = Gauge("autoglm_autoscale_latency_ms", "Latency seen by the rules", ["model", "stat"],
                              registry=self.registry)
        self._utilization = Gauge("autoglm_autoscale_utilization", "Busy fraction of the instances", ["model"],
                                  registry=self.registry)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def tick(self) -> Decision | None:
        """One evaluation: sample, decide, apply."""
        instances = self.actuator.instances(self.model)
        self._instances.labels(self.model).set(instances)
        sample = self.metrics.sample(instances)
        gateway_p95 = self.gateway.p95_ms() if self.gateway is not None else None
        if sample is None:
            return None
        if gateway_p95 is not None:  # what clients see: the worse of the gateway's and Triton's p95
            sample = replace(sample, p95_latency_ms=max(gateway_p95, sample.p95_latency_ms or 0.0))
        for stat, value in (("avg", sample.avg_latency_ms), ("p95", sample.p95_latency_ms)):
            self._latency.labels(self.model, stat).set(value or 0.0)
        self._utilization.labels(self.model).set(sample.utilization)
        decision = self.engine.evaluate(sample, self.model, instances)
        if decision is None:
            return None
        self.actuator.scale(self.model, decision.after)
        self.engine.applied(decision)
        self.decisions.append(decision)
        self._decided.labels(self.model, decision.direction, decision.rule).inc()
        self._instances.labels(self.model).set(decision.after)
        log.warning("autoscale %s: %d -> %d instances (%s)", self.model, decision.before, decision.after,
                    decision.reason)
        return decision

    def _run(self) -> None:
        while not self._stop.wait(self.rules.interval_s):
            try:
                self.tick()
            except (OSError, AutoGLMError, ValueError, http.client.HTTPException) as exc:  # Triton restarting
                log.info("autoscale tick skipped: %s", exc)
            except Exception:  # noqa: BLE001 -- a bug must not stop autoscaling for good
                log.exception("autoscale tick failed")

    def start(self) -> Autoscaler:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="serve-autoscaler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
