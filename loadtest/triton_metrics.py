"""Triton's Prometheus metrics (``:8002/metrics``), scraped before and after a window and differenced.

Cumulative counters per model (summed over versions): requests that succeeded or failed, rows
inferred (``nv_inference_count``) and executions (``nv_inference_exec_count``: their ratio is the mean
batch the dynamic batcher formed), and queue / compute microseconds. Gauges (CPU utilization, pending
requests) are read at the end of the window.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from autoglm.errors import AutoGLMError
from autoglm.local_http import DIRECT

COUNTERS = {
    "success": "nv_inference_request_success",
    "failure": "nv_inference_request_failure",
    "rows": "nv_inference_count",
    "executions": "nv_inference_exec_count",
    "request_us": "nv_inference_request_duration_us",
    "queue_us": "nv_inference_queue_duration_us",
    "compute_input_us": "nv_inference_compute_input_duration_us",
    "compute_infer_us": "nv_inference_compute_infer_duration_us",
    "compute_output_us": "nv_inference_compute_output_duration_us",
}
GAUGES = {"pending": "nv_inference_pending_request_count", "cpu_utilization": "nv_cpu_utilization"}
_LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\d+)?$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Prometheus text exposition -> (name, labels, value) samples; comments and junk lines skipped."""
    samples = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = _LINE.match(line)
        if not match:
            continue
        name, labels, value = match.groups()
        try:
            number = float(value)
        except ValueError:
            continue
        samples.append((name, dict(_LABEL.findall(labels or "")), number))
    return samples


@dataclass(frozen=True)
class TritonSample:
    """Counters of one model (summed over versions and failure reasons) and server gauges at one moment."""

    model: str
    counters: dict[str, float]
    gauges: dict[str, float]

    @classmethod
    def from_text(cls, text: str, model: str) -> TritonSample:
        by_name = {metric: key for key, metric in COUNTERS.items()}
        counters = dict.fromkeys(COUNTERS, 0.0)
        gauges: dict[str, float] = {}
        gauge_names = {metric: key for key, metric in GAUGES.items()}
        for name, labels, value in parse_prometheus(text):
            if name in by_name and labels.get("model") == model:
                counters[by_name[name]] += value
            elif name in gauge_names and labels.get("model", model) == model:
                gauges[gauge_names[name]] = gauges.get(gauge_names[name], 0.0) + value
        return cls(model, counters, gauges)


def scrape(metrics_url: str, model: str, timeout_s: float = 5.0) -> TritonSample:
    """Read ``metrics_url`` now; AutoGLMError naming the fix when Triton's metrics are unreachable."""
    try:
        with DIRECT.open(metrics_url, timeout=timeout_s) as resp:
            text = resp.read().decode("utf-8", errors="replace")
    except OSError as exc:
        raise AutoGLMError(f"cannot read Triton's metrics at {metrics_url} ({exc}): start Triton with metrics "
                           "on (port 8002 by default) or pass --metrics-url") from exc
    return TritonSample.from_text(text, model)


def window_stats(before: TritonSample, after: TritonSample) -> dict[str, Any]:
    """What Triton did between two samples: requests, mean batch, mean queue and compute time per request.

    A counter that went down means the model was reloaded (counters restart): the window is unusable,
    and the result says so instead of reporting negative rates.
    """
    if before.model != after.model:
        raise ValueError(f"samples of different models: {before.model} vs {after.model}")
    delta = {key: after.counters[key] - before.counters[key] for key in COUNTERS}
    if any(value < 0 for value in delta.values()):
        return {"model": after.model, "valid": False,
                "reason": "Triton's counters went down: the model was reloaded during the window; measure again"}
    success, executions = delta["success"], delta["executions"]
    compute = delta["compute_input_us"] + delta["compute_infer_us"] + delta["compute_output_us"]
    return {
        "model": after.model, "valid": True,
        "requests": int(success), "failures": int(delta["failure"]),
        "rows": int(delta["rows"]), "executions": int(executions),
        "mean_batch": delta["rows"] / executions if executions else None,
        "mean_queue_us": delta["queue_us"] / success if success else None,
        "mean_compute_us": compute / success if success else None,
        "mean_request_us": delta["request_us"] / success if success else None,
        "pending_at_end": after.gauges.get("pending"),
        "cpu_utilization_at_end": after.gauges.get("cpu_utilization"),
    }
