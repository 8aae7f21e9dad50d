"""The rules engine on synthetic metric series with a fake clock, and the actuator's override."""

import json

import pytest

from autoglm.autoscaling import AutoscaleRules
from serve.autoscale import Autoscaler, RulesEngine, Sample, TritonActuator, TritonMetrics


def series(engine, start, end, step, instances, **values):
    """Feed samples every ``step`` s in [start, end); returns the decisions (applied as they come)."""
    decisions, t = [], start
    while t < end:
        sample = Sample(t, values.get("requests", 100), values.get("avg"), values.get("p95"), values.get("util", 0.5))
        decision = engine.evaluate(sample, "m", instances)
        if decision:
            engine.applied(decision)
            instances = decision.after
            decisions.append(decision)
        t += step
    return decisions, instances


def test_sustained_high_latency_scales_up_after_the_window_only():
    engine = RulesEngine(AutoscaleRules())
    decisions, n = series(engine, 0, 25, 5, 1, avg=250.0)
    assert decisions == [] and n == 1  # 25 s of breach: not yet
    decisions, n = series(engine, 25, 35, 5, 1, avg=250.0)
    assert [(d.before, d.after, d.rule) for d in decisions] == [(1, 2, "latency")] and decisions[0].t == 30
    assert "250.0 ms > 200 ms for 30 s" in decisions[0].reason


def test_p95_alone_can_trigger_and_a_dip_resets_the_window():
    engine = RulesEngine(AutoscaleRules())
    series(engine, 0, 20, 5, 1, avg=50.0, p95=400.0)
    series(engine, 20, 25, 5, 1, avg=50.0, p95=150.0)  # one good sample: the window starts again
    decisions, _ = series(engine, 25, 50, 5, 1, avg=50.0, p95=400.0)
    assert decisions == []
    decisions, _ = series(engine, 50, 60, 5, 1, avg=50.0, p95=400.0)
    assert len(decisions) == 1 and decisions[0].t == 55


def test_cooldown_then_repeated_scale_up_to_the_maximum():
    engine = RulesEngine(AutoscaleRules(max_instances=3))
    decisions, n = series(engine, 0, 400, 5, 1, avg=500.0)
    assert [(d.before, d.after) for d in decisions] == [(1, 2), (2, 3)] and n == 3
    assert decisions[1].t - decisions[0].t >= 60  # up_cooldown_s, then a fresh 30 s window


def test_low_utilization_for_five_minutes_scales_down_to_the_minimum():
    engine = RulesEngine(AutoscaleRules(min_instances=1))
    decisions, n = series(engine, 0, 295, 5, 3, avg=5.0, util=0.1)
    assert decisions == []
    decisions, n = series(engine, 295, 2000, 5, 3, avg=5.0, util=0.1)
    assert [(d.before, d.after, d.rule) for d in decisions] == [(3, 2, "utilization"), (2, 1, "utilization")]
    assert decisions[1].t - decisions[0].t >= 300  # a fresh 5 min window (and the down cooldown) in between


def test_idle_model_with_no_requests_counts_as_unused():
    engine = RulesEngine(AutoscaleRules(down_after_s=10, down_cooldown_s=0))
    decisions, _ = series(engine, 0, 20, 5, 2, requests=0, util=0.0)
    assert [(d.before, d.after) for d in decisions] == [(2, 1)]


TRITON_TEXT = """# TYPE nv_inference_request_success counter
nv_inference_request_success{{model="m",version="1"}} {n}
nv_inference_count{{model="m",version="1"}} {rows}
nv_inference_exec_count{{model="m",version="1"}} {execs}
nv_inference_request_duration_us{{model="m",version="1"}} {dur}
nv_inference_compute_infer_duration_us{{model="m",version="1"}} {compute}
nv_inference_request_summary_us{{model="m",version="1",quantile="0.95"}} 9000
nv_inference_request_success{{model="other",version="1"}} 5
"""


def two_windows(first: dict, second: dict) -> TritonMetrics:
    """Triton metrics scraped twice, 2 s apart, with these counter values."""
    clock, texts = iter([0.0, 2.0]), iter([TRITON_TEXT.format(**first), TRITON_TEXT.format(**second)])
    metrics = TritonMetrics("http://unused/metrics", "m", clock=lambda: next(clock))
    metrics.fetch = lambda: next(texts)
    return metrics


def test_triton_metrics_become_window_samples():
    metrics = two_windows(dict(n=100, rows=100, execs=50, dur=1e6, compute=2e5),
                          dict(n=300, rows=300, execs=100, dur=5e6, compute=1.0e6))
    assert metrics.sample(instances=2) is None  # the first scrape only sets the baseline
    sample = metrics.sample(instances=2)
    assert sample.requests == 200 and sample.avg_latency_ms == pytest.approx(20.0) and sample.p95_latency_ms == 9.0
    # 800 ms of per-request compute over batches of 4 -> 200 ms busy over 2 s x 2 instances
    assert sample.utilization == pytest.approx(0.05)


def test_utilization_counts_requests_per_execution_not_rows():
    # 100 requests of 16 images each, one per execution: 2 s of compute in 2 s on one instance
    metrics = two_windows(dict(n=0, rows=0, execs=0, dur=0, compute=0),
                          dict(n=100, rows=1600, execs=100, dur=2e6, compute=2e6))
    metrics.sample(instances=1)
    assert metrics.sample(instances=1).utilization == pytest.approx(1.0)  # fully busy, not 1/16


def test_two_versions_add_their_counters_but_report_the_slower_p95_not_the_sum():
    text = """nv_inference_request_success{model="m",version="1"} 10
nv_inference_request_success{model="m",version="2"} 30
nv_inference_request_summary_us{model="m",version="1",quantile="0.95"} 9000
nv_inference_request_summary_us{model="m",version="2",quantile="0.95"} 4000
nv_inference_request_summary_us{model="m",version="3",quantile="0.95"} NaN
"""
    metrics = TritonMetrics("http://unused/metrics", "m")
    metrics.fetch = lambda: text
    assert metrics.scrape() == {"nv_inference_request_success": 40.0, "nv_inference_request_summary_us@0.95": 9000.0}


class FakeActuator(TritonActuator):
    def __init__(self, count):
        super().__init__("http://unused")
        self.cfg = {"name": "m", "max_batch_size": 8, "instance_group": [{"count": count, "kind": "KIND_CPU"}]}
        self.posted = []

    def _call(self, method, path, body=None):
        if method == "GET":
            return json.loads(json.dumps(self.cfg))
        self.posted.append((path, body))
        self.cfg = json.loads(body["parameters"]["config"])
        return {}


def test_actuator_overrides_only_the_instance_count():
    actuator = FakeActuator(1)
    actuator.scale("m", 3)
    path, body = actuator.posted[0]
    assert path == "/v2/repository/models/m/load" and actuator.instances("m") == 3
    assert json.loads(body["parameters"]["config"])["max_batch_size"] == 8


def test_autoscaler_applies_exports_and_logs_decisions():
    actuator = FakeActuator(1)
    samples = iter([Sample(t, 50, 300.0, None, 0.9) for t in (0, 1, 2)])

    class Metrics:
        def sample(self, instances):
            return next(samples)

    scaler = Autoscaler(AutoscaleRules(up_after_s=1, up_cooldown_s=0), "m", Metrics(), actuator)
    results = [scaler.tick() for _ in range(3)]
    assert results[0] is None and results[1].after == 2 and actuator.instances("m") >= 2
    from prometheus_client import generate_latest

    text = generate_latest(scaler.registry).decode()
    assert 'autoglm_autoscale_decisions_total{direction="up",model="m",rule="latency"}' in text


GATEWAY_TEXT = """# TYPE autoglm_gateway_request_seconds histogram
autoglm_gateway_request_seconds_bucket{{le="0.01",route="/v2/models/{{model}}/infer"}} {a}
autoglm_gateway_request_seconds_bucket{{le="0.1",route="/v2/models/{{model}}/infer"}} {b}
autoglm_gateway_request_seconds_bucket{{le="+Inf",route="/v2/models/{{model}}/infer"}} {c}
autoglm_gateway_request_seconds_count{{route="/v2/models/{{model}}/infer"}} {c}
autoglm_gateway_request_seconds_sum{{route="/v2/models/{{model}}/infer"}} 1.0
autoglm_gateway_request_seconds_bucket{{le="+Inf",route="/v1/models/{{model}}:generate"}} {c}
autoglm_gateway_request_seconds_bucket{{le="0.01",route="/metrics"}} 1000
autoglm_gateway_request_seconds_bucket{{le="0.1",route="/metrics"}} 1000
autoglm_gateway_request_seconds_bucket{{le="+Inf",route="/metrics"}} 1000
"""


def test_gateway_p95_comes_from_histogram_deltas_of_inference_routes():
    from serve.autoscale import GatewayLatency

    texts = iter([GATEWAY_TEXT.format(a=10, b=10, c=10), GATEWAY_TEXT.format(a=10, b=110, c=110),
                  GATEWAY_TEXT.format(a=10, b=110, c=110)])
    gateway = GatewayLatency("http://unused/metrics")
    gateway.fetch = lambda: next(texts)
    assert gateway.p95_ms() is None  # baseline
    assert gateway.p95_ms() == pytest.approx(10 + 90 * 0.95)  # all 100 new requests in (10 ms, 100 ms]
    assert gateway.p95_ms() is None  # no requests in this window  (streams of :generate, seconds long, never count)
