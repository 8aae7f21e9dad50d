"""Latency and energy of any predictor, measured the same way for torch, ONNX Runtime and Triton.

``measure_latency`` times a zero-argument callable; ``measure_predictor`` times a task predictor on one
batch of inputs; ``profile`` does both for each batch size and adds energy per inference, which is what
a stage writes into its manifest. Energy meters live in :mod:`autoglm.energy` and are re-exported here.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from autoglm.energy import (
    CpuEstimateMeter,
    Device,
    EnergyReading,
    Meter,
    MeterUnavailable,
    NvmlMeter,
    RaplMeter,
    energy_meter,
    ensure_comparable,
)

if TYPE_CHECKING:
    from autoglm.config import MeasureSettings
    from autoglm.tasks.base import Inputs, Predictor

__all__ = [
    "CpuEstimateMeter", "EnergyReading", "LatencyStats", "Meter", "MeterUnavailable", "NvmlMeter",
    "RaplMeter", "batch_size_of", "energy_meter", "ensure_comparable", "fixed_threads", "measure_latency",
    "measure_predictor", "profile",
]


@dataclass(frozen=True)
class LatencyStats:
    """Latency of one call (one batch) in milliseconds, over ``n`` timed repeats."""

    batch_size: int
    n: int
    mean_ms: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    min_ms: float
    per_item_ms: float
    items_per_s: float

    @classmethod
    def from_samples(cls, samples_ns: Sequence[int] | np.ndarray, batch_size: int = 1) -> LatencyStats:
        """Summarise per-call durations in nanoseconds."""
        ms = np.asarray(samples_ns, dtype=np.float64) / 1e6
        if ms.size == 0:
            raise ValueError("no latency samples: repeats must be >= 1")
        p50, p95, p99 = np.percentile(ms, [50, 95, 99])  # linear interpolation: monotone in q
        per_item = p50 / batch_size
        # Throughput from the median, not the mean: one preempted call on a shared host skews the mean.
        return cls(batch_size=batch_size, n=int(ms.size), mean_ms=float(ms.mean()), p50_ms=float(p50),
                   p95_ms=float(p95), p99_ms=float(p99), min_ms=float(ms.min()), per_item_ms=float(per_item),
                   items_per_s=1e3 / per_item if per_item > 0 else float("inf"))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_counts(batch_size: int, warmup: int, repeats: int) -> None:
    if batch_size < 1 or warmup < 0 or repeats < 1:
        raise ValueError(f"need batch_size >= 1, warmup >= 0 and repeats >= 1 "
                         f"(got batch_size={batch_size}, warmup={warmup}, repeats={repeats})")


def _timed(fn: Callable[[], Any], warmup: int, repeats: int) -> np.ndarray:
    for _ in range(warmup):
        fn()
    samples = np.empty(repeats, dtype=np.int64)
    for i in range(repeats):
        t0 = time.perf_counter_ns()
        fn()
        samples[i] = time.perf_counter_ns() - t0
    return samples


def measure_latency(fn: Callable[[], Any], *, batch_size: int = 1, warmup: int = 5,
                    repeats: int = 30) -> LatencyStats:
    """Call ``fn`` ``warmup`` times untimed, then time ``repeats`` calls one by one."""
    _check_counts(batch_size, warmup, repeats)
    return LatencyStats.from_samples(_timed(fn, warmup, repeats), batch_size)


def batch_size_of(inputs: Inputs) -> int:
    """Axis 0 of the first input: every input of a task shares the batch axis."""
    if not inputs:
        raise ValueError("inputs is empty: pass a dict of named numpy arrays with the batch on axis 0")
    first = np.asarray(next(iter(inputs.values())))
    if first.ndim == 0:
        raise ValueError("inputs must have a batch axis 0; the first input is a scalar")
    return int(first.shape[0])


def measure_predictor(predict: Predictor, inputs: Inputs, *, warmup: int = 5, repeats: int = 30) -> LatencyStats:
    """Latency of ``predict(inputs)``; the batch size is axis 0 of the first input."""
    return measure_latency(lambda: predict(inputs), batch_size=batch_size_of(inputs), warmup=warmup,
                           repeats=repeats)


@contextlib.contextmanager
def fixed_threads(n: int | None) -> Iterator[None]:
    """Pin torch's intra-op thread count inside the block and restore it after; ``None`` changes nothing.

    torch is configured only if something already imported it, so measuring an ONNX Runtime or Triton
    predictor never pulls torch in. ONNX Runtime threads are per session: set
    ``session_options.intra_op_num_threads`` when the session is created; this cannot change them.
    """
    if n is not None and n < 1:
        raise ValueError(f"threads must be >= 1 or None, got {n}")
    torch = sys.modules.get("torch")
    if n is None or torch is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def profile(predict: Predictor, inputs_by_batch: Mapping[int, Inputs], settings: MeasureSettings,
            pids: Sequence[int] | None = None, *, threads: int | None = None,
            meter: Meter | None = None, device: Device = "cpu") -> dict[int, dict[str, Any]]:
    """Latency and energy per inference of ``predict`` at each batch size in ``inputs_by_batch``.

    Energy is read over the timed repeats; when those are shorter than the meter's ``min_window_s``
    (NVML updates every few tens of ms) the predictor keeps running inside the window until it is long
    enough, and J/item divides by every item processed in it. ``meter`` defaults to
    ``energy_meter(settings.energy, settings.watts_per_core, pids, device)``; ``device`` is where
    ``predict`` runs ("cpu", or "cuda:N" for a CUDA/TensorRT session or engine on that GPU) and is recorded
    with every figure.

    Returns ``{batch: {**LatencyStats.to_dict(), "j_per_item", "energy_method", "energy_measured",
    "energy_window_s", "energy_items", "energy_fallback_reason", "device"}}``.
    """
    if not inputs_by_batch:
        raise ValueError("inputs_by_batch is empty: give inputs for at least one batch size")
    if meter is None:
        meter = energy_meter(settings.energy, settings.watts_per_core, pids, device)
    results: dict[int, dict[str, Any]] = {}
    with fixed_threads(threads):
        for batch, inputs in sorted(inputs_by_batch.items()):
            if batch_size_of(inputs) != batch:
                raise ValueError(f"inputs for batch {batch} have {batch_size_of(inputs)} rows on axis 0")
            _check_counts(batch, settings.warmup, settings.repeats)
            call = functools.partial(predict, inputs)
            for _ in range(settings.warmup):
                call()
            calls = settings.repeats
            with meter:
                t_start = time.perf_counter()
                samples = _timed(call, 0, settings.repeats)
                while time.perf_counter() - t_start < meter.min_window_s:
                    call()
                    calls += 1
            reading = meter.reading
            items = calls * batch
            results[batch] = {
                **LatencyStats.from_samples(samples, batch).to_dict(),
                "j_per_item": reading.per_item(items),
                "energy_method": reading.method,
                "energy_measured": reading.measured,
                "energy_window_s": reading.seconds,
                "energy_items": items,
                "energy_fallback_reason": meter.fallback_reason,
                "device": device,
            }
    return results
