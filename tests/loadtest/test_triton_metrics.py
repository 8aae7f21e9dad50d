"""Triton's Prometheus text -> per-model counters -> what one window did (mean batch, queue time)."""

import pytest

from autoglm.errors import AutoGLMError
from loadtest.triton_metrics import TritonSample, parse_prometheus, scrape, window_stats
from serve.triton import free_port


def _text(success, rows, executions, queue_us, compute_us=0, failure=0, model="m-fp32"):
    return f"""# HELP nv_inference_request_success Number of successful inference requests
# TYPE nv_inference_request_success counter
nv_inference_request_success{{model="{model}",version="1"}} {success}
nv_inference_request_success{{model="other",version="1"}} 999
nv_inference_request_failure{{model="{model}",reason="BACKEND",version="1"}} {failure}
nv_inference_request_failure{{model="{model}",reason="REJECTED",version="1"}} {failure}
nv_inference_count{{model="{model}",version="1"}} {rows}
nv_inference_exec_count{{model="{model}",version="1"}} {executions}
nv_inference_request_duration_us{{model="{model}",version="1"}} {queue_us + compute_us}
nv_inference_queue_duration_us{{model="{model}",version="1"}} {queue_us}
nv_inference_compute_infer_duration_us{{model="{model}",version="1"}} {compute_us}
nv_inference_pending_request_count{{model="{model}",version="1"}} 3
nv_inference_request_summary_us{{model="{model}",version="1",quantile="0.5"}} 760
nv_cpu_utilization 0.75
"""


def test_parse_handles_labels_comments_and_odd_values():
    text = ('# TYPE x counter\nx{a="1",b="say \\"hi\\""} 2.5\ny 3e2 1700000000\nz{q="0.5"} +Inf\n'
            'broken line without value\nw{model="m"} NaN\n')
    samples = parse_prometheus(text)
    assert ("x", {"a": "1", "b": 'say \\"hi\\"'}, 2.5) in samples
    assert ("y", {}, 300.0) in samples
    assert any(name == "z" and value == float("inf") for name, _, value in samples)
    assert len(samples) == 4  # the broken line is skipped


def test_sample_sums_versions_and_failure_reasons_of_one_model():
    sample = TritonSample.from_text(_text(10, 20, 5, 400, failure=2), "m-fp32")
    assert sample.counters["success"] == 10 and sample.counters["failure"] == 4
    assert sample.gauges == {"pending": 3.0, "cpu_utilization": 0.75}
    absent = TritonSample.from_text(_text(10, 20, 5, 400), "not-served")
    assert absent.counters["success"] == 0


def test_window_stats_mean_batch_and_queue_per_request():
    before = TritonSample.from_text(_text(100, 100, 100, 1_000, 5_000), "m-fp32")
    after = TritonSample.from_text(_text(1_100, 1_100, 300, 51_000, 105_000), "m-fp32")
    stats = window_stats(before, after)
    assert stats["valid"] and stats["requests"] == 1_000 and stats["executions"] == 200
    assert stats["mean_batch"] == pytest.approx(5.0)  # Δrows / Δexecutions
    assert stats["mean_queue_us"] == pytest.approx(50.0)  # Δqueue µs / Δrequests
    assert stats["mean_compute_us"] == pytest.approx(100.0)
    assert stats["cpu_utilization_at_end"] == 0.75


def test_a_reload_during_the_window_is_flagged_not_reported():
    before = TritonSample.from_text(_text(1_000, 1_000, 500, 10), "m-fp32")
    after = TritonSample.from_text(_text(20, 20, 20, 1), "m-fp32")  # counters restarted
    stats = window_stats(before, after)
    assert stats["valid"] is False and "reloaded" in stats["reason"]


def test_idle_window_has_no_ratios():
    same = TritonSample.from_text(_text(5, 5, 5, 5), "m-fp32")
    stats = window_stats(same, same)
    assert stats["requests"] == 0 and stats["mean_batch"] is None and stats["mean_queue_us"] is None


def test_unreachable_metrics_name_the_fix():
    with pytest.raises(AutoGLMError, match="--metrics-url"):
        scrape(f"http://127.0.0.1:{free_port()}/metrics", "m", timeout_s=2)
