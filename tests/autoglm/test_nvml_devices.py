"""NVML energy per device: only the GPUs the process uses (CUDA_VISIBLE_DEVICES by index or UUID, the configured
device), the total-energy counter where a GPU has it, sampled power where it does not; against a fake pynvml with
the real module's function names and several GPUs."""

from __future__ import annotations

import sys
import time
import types

import pytest

from autoglm.energy import MeterUnavailable, NvmlMeter, energy_meter


class _NVMLError(Exception):
    pass


class _NotSupported(_NVMLError):
    pass


def fake_pynvml(gpus: list[dict]) -> types.ModuleType:
    """``gpus``: one dict per NVML index with ``uuid``, ``step_mj`` (the counter's rise per read; None: no counter,
    NVMLError_NotSupported as on pre-Volta boards) and ``watts`` (board power). Records open NVML sessions."""
    mod = types.ModuleType("pynvml")
    mod.NVMLError, mod.NVMLError_NotSupported = _NVMLError, _NotSupported
    state = {"open": 0, "energy": [0] * len(gpus)}

    def init():
        state["open"] += 1

    def shutdown():
        state["open"] -= 1

    def handle(i):
        assert state["open"] > 0, "NVML used outside nvmlInit/nvmlShutdown"
        if not 0 <= i < len(gpus):
            raise _NVMLError("Invalid Argument")
        return ("handle", i)

    def energy(h):
        gpu = gpus[h[1]]
        if gpu["step_mj"] is None:
            raise _NotSupported("Not Supported")
        state["energy"][h[1]] += gpu["step_mj"]
        return state["energy"][h[1]]

    mod.nvmlInit, mod.nvmlShutdown = init, shutdown
    mod.nvmlDeviceGetCount = lambda: len(gpus)
    mod.nvmlDeviceGetHandleByIndex = handle
    mod.nvmlDeviceGetUUID = lambda h: gpus[h[1]]["uuid"].encode()  # older pynvml returns bytes
    mod.nvmlDeviceGetTotalEnergyConsumption = energy
    mod.nvmlDeviceGetPowerUsage = lambda h: int(gpus[h[1]]["watts"] * 1000)  # mW
    mod.state = state
    return mod


FOUR = [{"uuid": f"GPU-{i}aaa{i}-0000", "step_mj": 1000 * (i + 1), "watts": 0} for i in range(4)]


@pytest.fixture
def nvml(monkeypatch):
    def install(gpus=FOUR):
        mod = fake_pynvml(gpus)
        monkeypatch.setitem(sys.modules, "pynvml", mod)
        return mod
    return install


def _joules(meter: NvmlMeter) -> float:
    with meter:
        pass
    return meter.reading.joules


@pytest.mark.parametrize("visible, device, expected_j", [
    (None, None, 1 + 2 + 3 + 4),  # unset: every GPU, each counter read once per end of the window
    ("2", None, 3),
    ("3,1", None, 4 + 2),
    ("3,1", "cuda:1", 2),  # cuda:1 is the second visible GPU, NVML index 1
    ("GPU-2aaa2,0", "cuda:0", 3),  # a UUID prefix, as CUDA accepts it
    ("1,-1,3", None, 2),  # CUDA stops reading at the first invalid entry
])
def test_meters_only_the_gpus_this_process_uses(nvml, monkeypatch, visible, device, expected_j):
    nvml()
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)

    meter = NvmlMeter(device=device)

    assert _joules(meter) == pytest.approx(expected_j)
    assert meter.reading.method == "nvml" and meter.reading.measured


def test_energy_meter_passes_the_configured_device(nvml, monkeypatch):
    nvml()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,2")
    assert _joules(energy_meter("auto", device="cuda:1")) == pytest.approx(3)
    assert _joules(energy_meter("nvml", device="cuda")) == pytest.approx(2 + 3)
    assert _joules(energy_meter("nvml", device="any")) == pytest.approx(2 + 3)


@pytest.mark.parametrize("visible, device, reason", [
    ("", None, "hides every GPU"),
    ("0,1", "cuda:2", "not among the 2 visible"),
    ("7", None, "names GPU 7; NVML sees 4"),
    ("GPU-9", None, "matches 0 GPUs"),
    ("MIG-1234", None, "MIG instance"),
])
def test_unusable_selection_is_unavailable_with_the_reason(nvml, monkeypatch, visible, device, reason):
    nvml()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    with pytest.raises(MeterUnavailable, match=reason):
        NvmlMeter(device=device)


def test_power_is_sampled_where_a_gpu_has_no_counter(nvml, monkeypatch):
    mod = nvml([{"uuid": "GPU-a", "step_mj": 500, "watts": 0}, {"uuid": "GPU-b", "step_mj": None, "watts": 200}])
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    meter = NvmlMeter(sample_interval_s=0.005)
    assert meter.method == "nvml:power-sampled"

    with meter:
        assert mod.state["open"] == 1  # NVML stays initialised while the sampler reads it
        time.sleep(0.1)

    reading = meter.reading
    assert mod.state["open"] == 0
    assert reading.measured and reading.method == "nvml:power-sampled"
    # 0.5 J from GPU a's counter + 200 W x the window from GPU b's samples
    assert reading.joules == pytest.approx(0.5 + 200 * reading.seconds, rel=0.05)


def test_sampled_gpu_only_in_its_own_window(nvml, monkeypatch):
    nvml([{"uuid": "GPU-a", "step_mj": 500, "watts": 0}, {"uuid": "GPU-b", "step_mj": None, "watts": 200}])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    meter = NvmlMeter()
    assert meter.method == "nvml" and _joules(meter) == pytest.approx(0.5)


def test_a_restarted_window_leaves_nvml_balanced(nvml, monkeypatch):
    mod = nvml([{"uuid": "GPU-b", "step_mj": None, "watts": 100}])
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    meter = NvmlMeter(sample_interval_s=0.005)
    meter.start()
    meter.start()
    meter.stop()
    assert mod.state["open"] == 0


def test_power_that_fails_mid_window_is_an_error_not_a_short_figure(nvml, monkeypatch):
    mod = nvml([{"uuid": "GPU-b", "step_mj": None, "watts": 100}])
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    meter = NvmlMeter(sample_interval_s=0.005)
    meter.start()

    def lost(handle):
        raise _NVMLError("GPU is lost")

    monkeypatch.setattr(mod, "nvmlDeviceGetPowerUsage", lost)
    time.sleep(0.03)
    with pytest.raises(MeterUnavailable, match="sampling failed mid-window.*GPU is lost"):
        meter.stop()
    assert mod.state["open"] == 0
