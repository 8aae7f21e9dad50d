"""Device and execution-provider choice: run.device/serve.device against fakes of torch.cuda, and
compress.providers against onnxruntime's provider lists (CPU wheel, onnxruntime-gpu with and without TensorRT)."""

from __future__ import annotations

import types

import pytest

from autoglm.config import load_settings
from autoglm.device import (CPU_EP, CUDA_EP, TENSORRT_EP, DeviceChoice, choose_providers, resolve_device,
                            serving_device, settings_providers, visible_gpus)
from autoglm.errors import ConfigError

CPU_WHEEL = ["AzureExecutionProvider", CPU_EP]  # what `pip install onnxruntime` reports
GPU_WHEEL = ["TensorrtExecutionProvider", CUDA_EP, CPU_EP]
GPU_WHEEL_NO_TRT = [CUDA_EP, CPU_EP]


def fake_torch(gpus: int, cuda_build: str | None = "12.8") -> types.SimpleNamespace:
    """torch's CUDA surface: ``torch.cuda.is_available``/``device_count`` and ``torch.version.cuda``."""
    cuda = types.SimpleNamespace(is_available=lambda: gpus > 0, device_count=lambda: gpus)
    return types.SimpleNamespace(cuda=cuda, version=types.SimpleNamespace(cuda=cuda_build), __version__="2.13.0")


GPU0 = DeviceChoice("cuda", 0, "cuda")


@pytest.mark.parametrize("spec, gpus, expected", [
    ("auto", 0, "cpu"), ("auto", 2, "cuda:0"), ("cpu", 2, "cpu"), ("cuda", 1, "cuda:0"), ("cuda:1", 2, "cuda:1"),
])
def test_resolves_the_device(spec, gpus, expected):
    assert resolve_device(spec, fake_torch(gpus)).torch == expected


def test_auto_on_this_host_matches_torch():
    import torch

    choice = resolve_device("auto")
    assert choice.is_cuda == torch.cuda.is_available()
    assert choice.to_dict()["requested"] == "auto" and choice.to_dict()["reason"]


@pytest.mark.parametrize("spec, gpus, build, match", [
    ("cuda", 0, None, r"CPU-only build.*install a CUDA build of torch.*'auto'"),
    ("cuda:0", 0, "12.8", "sees no CUDA device"),
    ("cuda:2", 2, "12.8", r"torch sees 2 GPU\(s\).*cuda:0..cuda:1"),
    ("gpu", 1, "12.8", "not a device"),
])
def test_an_unavailable_device_names_the_fix(spec, gpus, build, match):
    with pytest.raises(ConfigError, match=match):
        resolve_device(spec, fake_torch(gpus, build))


def test_config_validates_devices_and_serving_follows_run():
    settings = load_settings(overrides=["run.device=cuda:1"])
    assert serving_device(settings, fake_torch(2)).torch == "cuda:1"
    settings = load_settings(overrides=["run.device=cuda", "serve.device=cpu"])
    assert serving_device(settings, fake_torch(1)).torch == "cpu"
    defaults = load_settings()
    assert (defaults.run.device, defaults.serve.device, defaults.compress.providers) == ("auto", "auto", ["auto"])
    with pytest.raises(ConfigError, match="run.device"):
        load_settings(overrides=["run.device=gpu0"])
    with pytest.raises(ConfigError, match="unknown providers"):
        load_settings(overrides=["compress.providers=['rocm']"])
    with pytest.raises(ConfigError, match="stands alone"):
        load_settings(overrides=["compress.providers=['auto', 'cpu']"])


@pytest.mark.parametrize("entries, expected", [
    (None, None), ("", []), ("0,2", ["0", "2"]), ("GPU-ab12, 1", ["GPU-ab12", "1"]), ("1,-1,0", ["1"]),
    ("MIG-x", ["MIG-x"]),
])
def test_visible_gpus_reads_cuda_visible_devices(entries, expected):
    env = {} if entries is None else {"CUDA_VISIBLE_DEVICES": entries}
    assert visible_gpus(env) == expected


# ---- providers ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("available, device, expected, fallback", [
    (CPU_WHEEL, DeviceChoice("cpu"), [CPU_EP], None),  # today's behaviour on CPU hosts
    (GPU_WHEEL, DeviceChoice("cpu"), [CPU_EP], None),  # served on the CPU: no GPU provider, nothing fell back
    (GPU_WHEEL, GPU0, [TENSORRT_EP, CUDA_EP, CPU_EP], None),
    (GPU_WHEEL_NO_TRT, GPU0, [CUDA_EP, CPU_EP], "TensorrtExecutionProvider is not in this onnxruntime"),
    (CPU_WHEEL, GPU0, [CPU_EP], "CUDAExecutionProvider is not in this onnxruntime (install onnxruntime-gpu"),
])
def test_auto_takes_the_best_providers_present(available, device, expected, fallback):
    choice = choose_providers(["auto"], device, available)
    assert list(choice.providers) == expected
    assert (choice.fallback is None) if fallback is None else (fallback in choice.fallback)
    assert choice.to_dict()["fallback"] == choice.fallback  # recorded for the manifest


def test_gpu_provider_options_carry_the_device_and_precision():
    choice = choose_providers("auto", DeviceChoice("cuda", 1), GPU_WHEEL, fp16=True, cache_dir="trt-cache")
    trt, cuda, cpu = choice.options
    assert trt == {"device_id": "1", "trt_fp16_enable": "True", "trt_engine_cache_enable": "True",
                   "trt_engine_cache_path": "trt-cache"}
    assert cuda == {"device_id": "1"} and cpu == {}
    assert choice.session_args() == {"providers": list(choice.providers), "provider_options": list(choice.options)}
    assert choice.uses_gpu


@pytest.mark.parametrize("requested, available, package", [
    (["cuda", "cpu"], CPU_WHEEL, "onnxruntime-gpu"),
    (["tensorrt", "cuda", "cpu"], GPU_WHEEL_NO_TRT, "onnxruntime-gpu and tensorrt"),
])
def test_a_requested_missing_provider_is_an_error_naming_the_package(requested, available, package):
    with pytest.raises(ConfigError, match=f"asks for .*install {package}"):
        choose_providers(requested, GPU0, available)


def test_named_providers_keep_their_order_and_refuse_a_cpu_serving_device():
    assert choose_providers(["cuda", "tensorrt"], GPU0, GPU_WHEEL).providers == (CUDA_EP, TENSORRT_EP)
    assert choose_providers(["cpu"], GPU0, GPU_WHEEL).providers == (CPU_EP,)
    with pytest.raises(ConfigError, match="serve.device='cuda'"):
        choose_providers(["cuda"], DeviceChoice("cpu"), GPU_WHEEL)


def test_the_runs_providers_follow_serve_device():
    settings = load_settings(overrides=["serve.device=cuda:0", "compress.tensorrt_fp16=false"])
    choice = settings_providers(settings, GPU_WHEEL, fake_torch(1))
    assert choice.providers[0] == TENSORRT_EP and choice.options[0]["trt_fp16_enable"] == "False"
    assert settings_providers(load_settings(), CPU_WHEEL, fake_torch(0)).providers == (CPU_EP,)


# ---- who follows the device ----------------------------------------------------------------------------------
def test_ddp_backend_and_rank_devices_follow_run_device(monkeypatch):
    import torch

    from autoglm import ddp

    assert ddp.backend("cpu") == "gloo"
    monkeypatch.setattr(torch, "cuda", fake_torch(3).cuda)
    assert ddp.backend("auto") == "nccl" and ddp.backend("cpu") == "gloo"
    assert [str(ddp.rank_device("cuda", r)) for r in (0, 1, 2)] == ["cuda:0", "cuda:1", "cuda:2"]
    assert str(ddp.rank_device("cuda:1", 1)) == "cuda:2"  # cuda:N offsets the ranks' GPUs
    assert str(ddp.rank_device("cpu", 1)) == "cpu"
    with pytest.raises(ConfigError, match="rank 1 needs GPU 3 but torch sees 3"):
        ddp.rank_device("cuda:2", 1)


def test_train_records_the_device_it_trained_on(tmp_path):
    from autoglm.train import train_run

    settings = load_settings(None, [f"run.root='{tmp_path}'", f"run.cache_dir='{tmp_path / 'cache'}'",
                                    "train.max_steps=3", "train.eval_batches=1", "run.device=cpu"])
    manifest = train_run(settings, progress=False)
    assert manifest.metrics["device"] == "cpu" and "device" not in manifest.config  # CPU runs keep their config


def test_profile_rows_record_their_device():
    import numpy as np

    from autoglm.measure import profile

    measure = load_settings(overrides=["measure.repeats=3", "measure.warmup=0", "measure.energy=estimated"]).measure
    rows = profile(lambda inputs: inputs["x"] * 2, {2: {"x": np.ones((2, 3))}}, measure, device="cuda:1")
    assert rows[2]["device"] == "cuda:1"


def test_a_gpu_provider_onnx_runtime_dropped_is_refused(tmp_path, monkeypatch):
    """ONNX Runtime only warns when CUDA's libraries do not load, and runs the session on the CPU."""
    import onnxruntime

    from autoglm.tasks.predict import onnx_session

    from tests.compress.test_repository import _tiny_onnx

    real = onnxruntime.InferenceSession
    model = tmp_path / "m.onnx"
    _tiny_onnx(model)

    def without_cuda(path, sess_options=None, providers=(), provider_options=None):
        return real(path, sess_options=sess_options, providers=[CPU_EP])

    monkeypatch.setattr(onnxruntime, "InferenceSession", without_cuda)
    choice = choose_providers(["cuda", "cpu"], GPU0, GPU_WHEEL)
    with pytest.raises(ConfigError, match="could not start CUDAExecutionProvider.*install onnxruntime-gpu"):
        onnx_session(model, providers=choice)
    assert onnx_session(model, providers=[CPU_EP]).get_providers() == [CPU_EP]
