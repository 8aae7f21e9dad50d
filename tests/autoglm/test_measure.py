"""Latency statistics, thread pinning, energy meters (NVML/RAPL faked, CPU estimate real) and profile()."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest

from autoglm import energy
from autoglm.config import MeasureSettings
from autoglm.energy import (
    CpuEstimateMeter,
    EnergyReading,
    MeterUnavailable,
    NvmlMeter,
    RaplMeter,
    energy_meter,
    ensure_comparable,
)
from autoglm.measure import LatencyStats, fixed_threads, measure_latency, measure_predictor, profile

REPO = Path(__file__).resolve().parents[2]


def _busy(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


# --- latency -------------------------------------------------------------------------------------------


def test_latency_of_a_sleep_is_ordered_and_at_least_the_sleep():
    stats = measure_latency(lambda: time.sleep(0.002), batch_size=4, warmup=1, repeats=10)

    assert stats.n == 10 and stats.batch_size == 4
    assert 2.0 <= stats.min_ms <= stats.p50_ms <= stats.p95_ms <= stats.p99_ms
    assert stats.min_ms <= stats.mean_ms
    assert stats.per_item_ms == pytest.approx(stats.p50_ms / 4)
    assert stats.items_per_s == pytest.approx(4000 / stats.p50_ms)


def test_stats_from_known_samples():
    stats = LatencyStats.from_samples([1_000_000, 2_000_000, 3_000_000, 4_000_000, 5_000_000], batch_size=2)

    assert (stats.mean_ms, stats.p50_ms, stats.min_ms) == (3.0, 3.0, 1.0)
    assert 4.0 < stats.p95_ms < stats.p99_ms <= 5.0
    assert stats.to_dict()["per_item_ms"] == 1.5


def test_measure_predictor_takes_batch_from_axis_0_and_calls_warmup_plus_repeats():
    calls = []
    stats = measure_predictor(lambda x: calls.append(x), {"x": np.zeros((7, 3))}, warmup=2, repeats=5)

    assert stats.batch_size == 7 and stats.n == 5 and len(calls) == 7


@pytest.mark.parametrize("kwargs", [{"repeats": 0}, {"warmup": -1}, {"batch_size": 0}])
def test_impossible_counts_are_refused(kwargs):
    with pytest.raises(ValueError, match="repeats >= 1"):
        measure_latency(lambda: None, **kwargs)


def test_predictor_inputs_need_a_batch_axis():
    with pytest.raises(ValueError, match="empty"):
        measure_predictor(lambda x: x, {})
    with pytest.raises(ValueError, match="scalar"):
        measure_predictor(lambda x: x, {"x": np.float32(1)})


def test_fixed_threads_sets_and_restores_torch_threads():
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()

    with fixed_threads(1):
        inside = torch.get_num_threads()

    assert inside == 1 and torch.get_num_threads() == before


def test_fixed_threads_does_not_import_torch():
    code = ("import sys\nfrom autoglm.measure import fixed_threads\n"
            "with fixed_threads(1): pass\nprint('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.stdout.strip() == "False"


# --- energy readings and the CPU estimate ----------------------------------------------------------------


def test_energy_reading_labels_and_per_item():
    measured = EnergyReading(joules=6.0, seconds=2.0, method="rapl")
    estimated = EnergyReading(joules=6.0, seconds=2.0, method="estimated:cpu-s×10W")

    assert measured.measured and not estimated.measured
    assert measured.per_item(3) == 2.0
    assert estimated.to_dict() == {"joules": 6.0, "seconds": 2.0, "method": "estimated:cpu-s×10W", "measured": False}
    with pytest.raises(ValueError):
        measured.per_item(0)


def test_estimate_is_labelled_and_scales_with_cpu_work():
    meter = CpuEstimateMeter(watts_per_core=10)
    with meter:
        _busy(0.02)
    small = meter.reading
    cpu0 = time.process_time()
    with meter:
        _busy(0.08)
    big = meter.reading
    cpu = time.process_time() - cpu0

    assert big.method == "estimated:cpu-s×10W" and not big.measured
    assert 0 < small.joules < big.joules <= cpu * 10
    assert big.joules >= 0.08 * 10  # it burnt at least that much CPU inside the window


def test_estimate_of_other_processes_survives_one_exiting():
    child = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        meter = CpuEstimateMeter(5, pids=[child.pid, os.getpid()])
        meter.start()
        time.sleep(0.2)
        child.kill()
        child.wait()
        reading = meter.stop()
    finally:
        child.kill()
        child.wait()

    assert reading.method == "estimated:cpu-s×5W" and reading.joules >= 0
    assert meter.lost_pids == [child.pid]
    with pytest.raises(MeterUnavailable, match="running"):
        CpuEstimateMeter(5, pids=[child.pid])


def test_reading_before_a_window_is_an_error():
    meter = CpuEstimateMeter(10)
    with pytest.raises(RuntimeError, match="no reading"):
        _ = meter.reading
    with pytest.raises(RuntimeError, match="before start"):
        meter.stop()


# --- NVML (faked: no GPU here) ------------------------------------------------------------------------------


class _NVMLError(Exception):
    pass


class _LibraryNotFound(_NVMLError):
    pass


class _NotSupported(_NVMLError):
    pass


def _fake_pynvml(energies_mj=(1000, 2000), init_error=None, energy_error=None) -> types.ModuleType:
    """A pynvml stand-in whose counters rise by 500 mJ per device on every read."""
    mod = types.ModuleType("pynvml")
    counters = list(energies_mj)
    mod.NVMLError, mod.NVMLError_LibraryNotFound = _NVMLError, _LibraryNotFound
    mod.NVMLError_NotSupported = _NotSupported

    def init():
        if init_error:
            raise init_error

    def energy_of(handle):
        if energy_error:
            raise energy_error
        counters[handle] += 500
        return counters[handle]

    mod.nvmlInit, mod.nvmlShutdown = init, lambda: None
    mod.nvmlDeviceGetCount = lambda: len(counters)
    mod.nvmlDeviceGetHandleByIndex = lambda i: i
    mod.nvmlDeviceGetTotalEnergyConsumption = energy_of

    def power_of(handle):  # a GPU without the energy counter usually has no power reading either in these fakes
        raise energy_error or _NotSupported("Not Supported")

    mod.nvmlDeviceGetPowerUsage = power_of
    return mod


def test_nvml_unavailable_without_pynvml(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    with pytest.raises(MeterUnavailable, match="pynvml is not importable"):
        NvmlMeter()


@pytest.mark.parametrize("fake, reason", [
    (dict(init_error=_LibraryNotFound("NVML Shared Library Not Found")), "LibraryNotFound"),
    (dict(energies_mj=()), "no GPU"),
    (dict(energy_error=_NotSupported("Not Supported")), "neither energy .*NotSupported.* nor power"),
])
def test_nvml_failures_become_meter_unavailable(monkeypatch, fake, reason):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(**fake))
    with pytest.raises(MeterUnavailable, match=reason):
        NvmlMeter()


def test_nvml_sums_devices_or_reads_one(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml())
    with NvmlMeter() as meter:
        pass
    assert meter.reading.method == "nvml" and meter.reading.measured
    assert meter.reading.joules == pytest.approx(1.0)  # 2 devices x 500 mJ

    with NvmlMeter(device_index=1) as one:
        pass
    assert one.reading.joules == pytest.approx(0.5)
    with pytest.raises(MeterUnavailable, match="index 5"):
        NvmlMeter(device_index=5)


# --- RAPL (a fake sysfs tree) ----------------------------------------------------------------------------


def _rapl_tree(root, packages):
    for name, (energy_uj, max_uj) in packages.items():
        d = root / name
        d.mkdir(parents=True)
        (d / "energy_uj").write_text(f"{energy_uj}\n")
        (d / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return root


def test_rapl_sums_packages_and_handles_wraparound(tmp_path):
    root = _rapl_tree(tmp_path, {"intel-rapl:0": (1_000_000, 10_000_000), "intel-rapl:1": (9_500_000, 10_000_000),
                                 "intel-rapl:0:0": (5, 10_000_000)})  # a subdomain: must not be counted
    meter = RaplMeter(root)
    assert [d.name for d in meter.domains] == ["intel-rapl:0", "intel-rapl:1"]

    meter.start()
    (root / "intel-rapl:0" / "energy_uj").write_text("3000000\n")  # +2 J
    (root / "intel-rapl:1" / "energy_uj").write_text("500000\n")  # wrapped: +0.5 J to the top, +0.5 J after
    (root / "intel-rapl:0:0" / "energy_uj").write_text("999999\n")
    reading = meter.stop()

    assert reading.method == "rapl" and reading.measured
    assert reading.joules == pytest.approx(3.0)


def test_rapl_unavailable_reasons(tmp_path):
    with pytest.raises(MeterUnavailable, match="does not exist"):
        RaplMeter(tmp_path / "absent")
    with pytest.raises(MeterUnavailable, match="no RAPL package domain"):
        RaplMeter(tmp_path)
    _rapl_tree(tmp_path, {"intel-rapl:0": ("garbage", 10)})
    with pytest.raises(MeterUnavailable, match="unreadable"):
        RaplMeter(tmp_path)


# --- choosing a meter --------------------------------------------------------------------------------------


def _no_counters(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    monkeypatch.setattr(energy, "RaplMeter", functools.partial(RaplMeter, tmp_path / "no-powercap"))


def test_auto_falls_back_to_the_estimate_and_says_why(monkeypatch, tmp_path):
    _no_counters(monkeypatch, tmp_path)

    meter = energy_meter("auto", watts_per_core=7.5)

    assert isinstance(meter, CpuEstimateMeter) and meter.method == "estimated:cpu-s×7.5W"
    assert "nvml: pynvml is not importable" in meter.fallback_reason
    assert "rapl: no RAPL" in meter.fallback_reason


def test_auto_on_this_host_records_why_it_estimates_or_measures():
    meter = energy_meter("auto")
    assert isinstance(meter, CpuEstimateMeter) == (meter.fallback_reason is not None)


def test_auto_prefers_a_working_counter(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml())
    meter = energy_meter("auto")
    assert isinstance(meter, NvmlMeter) and meter.fallback_reason is None


def test_auto_does_not_charge_cpu_work_the_gpus_energy(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml())
    meter = energy_meter("auto", device="cpu")
    assert not isinstance(meter, NvmlMeter)
    assert isinstance(meter, RaplMeter) or "nvml: the work runs on the CPU" in meter.fallback_reason
    assert isinstance(energy_meter("auto", device="cuda"), NvmlMeter)


@pytest.mark.parametrize("kind", ["nvml", "rapl"])
def test_explicit_unavailable_meter_names_the_fix(monkeypatch, tmp_path, kind):
    _no_counters(monkeypatch, tmp_path)
    with pytest.raises(MeterUnavailable, match=f'energy = "{kind}" is unavailable.*measure.energy = "estimated"'):
        energy_meter(kind)


def test_ensure_comparable_rejects_mixes():
    rapl, est10, est5 = (EnergyReading(1.0, 1.0, m) for m in ("rapl", "estimated:cpu-s×10W", "estimated:cpu-s×5W"))

    assert ensure_comparable([est10, est10.to_dict()]) == est10.method
    assert ensure_comparable([]) is None
    with pytest.raises(ValueError, match="never compare measured with estimated"):
        ensure_comparable([rapl, est10])
    with pytest.raises(ValueError, match="different methods"):
        ensure_comparable([est10, est5])


# --- profile -----------------------------------------------------------------------------------------------


def _predict(inputs):
    return inputs["x"] @ np.ones((16, 4), dtype=np.float32)


def test_profile_reports_latency_and_energy_per_batch():
    settings = MeasureSettings(warmup=1, repeats=3, batch_sizes=[1, 4], energy="estimated")
    inputs = {b: {"x": np.ones((b, 16), dtype=np.float32)} for b in settings.batch_sizes}

    result = profile(_predict, inputs, settings, threads=1)

    assert sorted(result) == [1, 4]
    for batch, row in result.items():
        assert row["batch_size"] == batch and row["n"] == 3
        assert row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"]
        assert row["energy_method"] == "estimated:cpu-s×10W" and row["energy_measured"] is False
        assert row["j_per_item"] >= 0 and row["energy_items"] == 3 * batch


def test_profile_extends_short_windows_for_slow_counters():
    meter = CpuEstimateMeter(10)
    meter.min_window_s = 0.05  # as a counter that updates slowly would ask
    settings = MeasureSettings(warmup=0, repeats=3)

    row = profile(_predict, {2: {"x": np.ones((2, 16), dtype=np.float32)}}, settings, meter=meter)[2]

    assert row["energy_window_s"] >= 0.05 and row["energy_items"] > 3 * 2 and row["n"] == 3


def test_profile_checks_batch_sizes_match_inputs():
    with pytest.raises(ValueError, match="batch 8"):
        profile(_predict, {8: {"x": np.ones((2, 16), dtype=np.float32)}}, MeasureSettings(energy="estimated"))
