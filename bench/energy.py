"""Energy meters on this host: which work, and the CPU estimate on a fixed workload.

The estimate (CPU-seconds × watts per core) is what ``measure.energy = "auto"`` falls back to without
NVML or RAPL; this checks that metering costs nothing measurable and shows the label it carries. Where
RAPL is readable its measured figure is shown beside the estimate (NVML is left out: it counts the GPU,
which a numpy workload does not use).
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from autoglm.energy import CpuEstimateMeter, Meter, MeterUnavailable, NvmlMeter, RaplMeter, energy_meter
from bench.harness import Table, ratio

WATTS_PER_CORE = 10.0  # the default of measure.watts_per_core
SIZE = 256


def _availability() -> Table:
    rows = []
    for name, make, counts in [
        ("nvml", NvmlMeter, "GPU board energy (mJ counter)"),
        ("rapl", RaplMeter, "CPU package energy of the whole host (µJ counter)"),
        ("estimated", lambda: CpuEstimateMeter(WATTS_PER_CORE), "CPU-seconds of the process × W/core"),
    ]:
        try:
            meter = make()
            rows.append([name, "yes", meter.method, counts])
        except MeterUnavailable as exc:
            rows.append([name, "no", "—", str(exc)])
    auto = energy_meter("auto", WATTS_PER_CORE)
    notes = [f'`measure.energy = "auto"` picks **{auto.method}**'
             + (f" (skipped: {auto.fallback_reason})" if auto.fallback_reason else "")]
    return Table("Energy meters available here", ["meter", "available", "method", "counts / why not"], rows, notes)


def _loop(a: np.ndarray, b: np.ndarray, n: int) -> int:
    for _ in range(n):
        a @ b
    return n


def _metered(meter: Meter, a: np.ndarray, b: np.ndarray, n: int) -> tuple[float, float]:
    """(seconds per inference, joules per inference); runs on past n until the meter's window is long enough."""
    done = 0
    with meter:
        t0 = time.perf_counter()
        done += _loop(a, b, n)
        while time.perf_counter() - t0 < meter.min_window_s:
            done += _loop(a, b, max(1, n // 10))
        seconds = time.perf_counter() - t0
    return seconds / done, meter.reading.per_item(done)


def _workload(quick: bool) -> Table:
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((SIZE, SIZE), dtype=np.float32) for _ in range(2))
    n, rounds = (50, 3) if quick else (300, 7)
    estimate = CpuEstimateMeter(WATTS_PER_CORE)
    try:
        rapl: RaplMeter | None = RaplMeter()
    except MeterUnavailable:
        rapl = None
    bare, est, measured = [], [], []
    _loop(a, b, n)  # warm-up: BLAS thread pool and caches
    for _ in range(rounds):  # interleaved, so drift on the shared host hits every variant alike
        t0 = time.perf_counter()
        _loop(a, b, n)
        bare.append((time.perf_counter() - t0) / n)
        est.append(_metered(estimate, a, b, n))
        if rapl is not None:
            measured.append(_metered(rapl, a, b, n))

    def ms(xs: list[float]) -> float:
        return statistics.median(xs) * 1e3

    est_s, est_j = ms([s for s, _ in est]), statistics.median(j for _, j in est)
    cpu_per_wall = est_j / WATTS_PER_CORE / (est_s / 1e3)
    rows = [
        ["bare loop", ms(bare), None, None, "—"],
        ["inside the estimate meter", est_s, est_j * 1e3, cpu_per_wall, estimate.method],
    ]
    if rapl is not None:  # whole-package energy: includes whatever else runs on the host
        rows.append(["inside the RAPL meter", ms([s for s, _ in measured]),
                     statistics.median(j for _, j in measured) * 1e3, None, rapl.method])

    t0 = time.perf_counter()
    for _ in range(1000):
        estimate.start()
        estimate.stop()
    pair_us = (time.perf_counter() - t0) * 1e3
    notes = [
        f"{rounds} interleaved rounds of {n} float32 {SIZE}×{SIZE} matmuls; medians over rounds.",
        f"meter overhead: {ratio(est_s, ms(bare))} the bare loop's time per inference; "
        f"one start()+stop() pair costs {pair_us:.1f} µs.",
        "CPU-s per wall-s above 1 means BLAS used several threads (spinning threads count as busy).",
        f"The estimate is CPU-seconds × {WATTS_PER_CORE:g} W per core, not a measurement: compare it only "
        "with other estimates made with the same watts per core.",
    ]
    return Table("CPU estimate on a fixed numpy workload", ["run", "ms / inference", "mJ / inference",
                                                            "CPU-s per wall-s", "method"], rows, notes)


def run(quick: bool) -> list[Table]:
    return [_availability(), _workload(quick)]
