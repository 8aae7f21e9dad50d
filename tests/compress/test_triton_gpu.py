"""GPU serving configs: KIND_GPU instance groups with device ids in both flavours, the onnxruntime backend's
TensorRT accelerator (parsed back through Triton's own protobuf), the repository's choice per flavour on a fake GPU
host, and the python-backend model.py choosing providers on its instance's GPU against a fake onnxruntime."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest
from google.protobuf import json_format

from autoglm.config import load_settings
from autoglm.device import CPU_EP, CUDA_EP, TENSORRT_EP
from autoglm.errors import ConfigError
from autoglm.triton_config import (DynamicBatching, InstanceGroup, ModelConfig, TensorRTAccelerator, parse_pbtxt,
                                   render_pbtxt, serving_instances, to_protobuf, with_serving_knobs)
from compress import repository
from compress.repository import serving_gpus, write_model
from tests.autoglm.test_device import GPU_WHEEL, fake_torch
from tests.compress.test_repository import IMAGE_IO, _config, _fake_pb_utils, _tiny_onnx


def _kind_gpu(proto) -> int:
    return type(proto.instance_group[0]).KIND_GPU


def test_kind_gpu_with_device_ids_in_both_flavours():
    for flavour in ("python", "onnxruntime"):
        proto = parse_pbtxt(render_pbtxt(_config(flavour=flavour, instance_group=serving_instances(2, 1))))
        group = proto.instance_group[0]
        assert (group.kind, list(group.gpus), group.count) == (_kind_gpu(proto), [1], 2)
    cpu = parse_pbtxt(render_pbtxt(_config(instance_group=serving_instances(2, None))))
    assert cpu.instance_group[0].kind == type(cpu.instance_group[0]).KIND_CPU and not cpu.instance_group[0].gpus


def test_native_flavour_renders_the_tensorrt_accelerator():
    cfg = _config(flavour="onnxruntime", instance_group=serving_instances(1, 0),
                  tensorrt=TensorRTAccelerator("INT8", workspace_bytes=1 << 28))
    proto = parse_pbtxt(render_pbtxt(cfg))

    assert proto == to_protobuf(cfg)
    (accelerator,) = proto.optimization.execution_accelerators.gpu_execution_accelerator
    assert accelerator.name == "tensorrt"
    assert accelerator.parameters["precision_mode"] == "INT8"
    assert accelerator.parameters["max_workspace_size_bytes"] == str(1 << 28)
    assert accelerator.parameters["trt_engine_cache_enable"] == "1"
    assert not proto.optimization.execution_accelerators.cpu_execution_accelerator



def test_serving_knobs_change_and_the_gpu_placement_stays():
    """What a tuned config written back keeps: device ids, the accelerator, warm-up; only the knobs move."""
    gpu = _config(flavour="onnxruntime", instance_group=serving_instances(1, 1),
                  tensorrt=TensorRTAccelerator("FP16"))
    batching = DynamicBatching(max_queue_delay_us=2000, preferred_batch_sizes=(16,))
    text = with_serving_knobs(render_pbtxt(gpu), max_batch_size=16, batching=batching, instances=3)

    want = dataclasses.replace(gpu, max_batch_size=16, dynamic_batching=batching,
                               instance_group=serving_instances(3, 1))
    assert text == render_pbtxt(want)  # byte for byte what compress renders for those knobs
    with pytest.raises(ConfigError, match="1..max_batch_size=8"):
        with_serving_knobs(text, max_batch_size=8, batching=batching, instances=1)
    with pytest.raises(ConfigError, match="batches by itself"):
        with_serving_knobs(render_pbtxt(_config(dynamic_batching=None)), max_batch_size=8, batching=batching,
                           instances=1)

@pytest.mark.parametrize("build, message", [
    (lambda: InstanceGroup(1, "cpu", (0,)), "set kind='gpu'"),
    (lambda: InstanceGroup(1, "gpu", (0, 0)), "distinct GPU ids"),
    (lambda: InstanceGroup(1, "gpu", (-1,)), "distinct GPU ids"),
    (lambda: TensorRTAccelerator("INT4"), "use FP32, FP16 or INT8"),
    (lambda: _config(flavour="onnxruntime", tensorrt=TensorRTAccelerator()), "on GPU instances"),
    (lambda: _config(instance_group=serving_instances(1, 0), tensorrt=TensorRTAccelerator()), "flavour='onnxruntime'"),
])
def test_impossible_gpu_configs_are_refused(build, message):
    with pytest.raises(ConfigError, match=message):
        build()


# ---- the repository's choice per flavour -------------------------------------------------------------------
@pytest.fixture
def gpu_host(monkeypatch):
    """torch sees two GPUs and onnxruntime is onnxruntime-gpu with TensorRT."""
    monkeypatch.setitem(sys.modules, "torch", fake_torch(2))
    monkeypatch.setattr("autoglm.device.available_providers", lambda: list(GPU_WHEEL))


def test_a_cpu_host_keeps_cpu_repositories(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", fake_torch(0))
    assert serving_gpus(load_settings()) == {"python": None, "native": None}


def test_the_gpu_overlay_gets_a_gpu_native_flavour_on_any_host():
    assert serving_gpus(load_settings(overrides=["deploy.env=gpu", "serve.device=cpu"])) == {
        "python": None, "native": 0}


def test_a_gpu_serving_device_gives_gpu_models_in_both_flavours(gpu_host, tmp_path):
    settings = load_settings(overrides=["serve.device=cuda:1"])
    assert serving_gpus(settings) == {"python": 1, "native": 1}
    fp32 = tmp_path / "fp32.onnx"
    _tiny_onnx(fp32)

    (python, native) = repository._flavours(settings, fp32, serving_gpus(settings))

    assert python[2]["parameters"] == {"providers": f"{TENSORRT_EP},{CUDA_EP},{CPU_EP}", "tensorrt_fp16": "true"}
    assert native[2]["tensorrt"] == TensorRTAccelerator("FP16")
    cpu_only = load_settings(overrides=["serve.device=cuda:1", "compress.providers=['cuda','cpu']",
                                        "compress.tensorrt_fp16=false"])
    python, native = repository._flavours(cpu_only, fp32, serving_gpus(cpu_only))
    assert python[2]["parameters"]["providers"] == f"{CUDA_EP},{CPU_EP}" and "tensorrt" not in native[2]


def test_static_int8_graphs_get_tensorrt_int8(tmp_path, gpu_host):
    qdq = tmp_path / "int8.onnx"
    _qdq_onnx(qdq)
    settings = load_settings(overrides=["serve.device=cuda"])
    (_, native) = repository._flavours(settings, qdq, serving_gpus(settings))
    assert native[2]["tensorrt"].precision == "INT8"
    assert repository._flavours(settings, tmp_path / "m.plan", serving_gpus(settings)) == [("native", "tensorrt", {})]


def _qdq_onnx(path: Path) -> None:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(np.array(0.1, np.float32), "s"),
             numpy_helper.from_array(np.array(0, np.int8), "z")]
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
         helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])],
        "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 4])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


# ---- model.py on a GPU instance -----------------------------------------------------------------------------
class _FakeSession:
    def __init__(self, real, providers, provider_options, drop=()):
        self.real, self.providers, self.provider_options = real, providers, provider_options
        self._running = [p for p in providers if p not in drop]

    def get_providers(self):
        return self._running

    def __getattr__(self, name):
        return getattr(self.real, name)


def _load_model_py(tmp_path, monkeypatch, cfg, available, drop=()):
    """model.py of ``cfg`` with onnxruntime's provider surface faked: it lists ``available`` and records what
    the session was given (the real CPU session underneath answers the rest)."""
    import onnxruntime as real_ort

    onnx_file = tmp_path / "model.onnx"
    _tiny_onnx(onnx_file)
    model_dir = write_model(tmp_path / "repo", cfg, onnx_file)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", _fake_pb_utils())
    spec = importlib.util.spec_from_file_location("gpu_model_under_test", model_dir / "1" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    made = []

    def session(path, options, providers, provider_options):
        made.append(_FakeSession(real_ort.InferenceSession(path, options, providers=[CPU_EP]), providers,
                                 provider_options, drop))
        return made[-1]

    kept = {k: getattr(real_ort, k) for k in ("SessionOptions", "GraphOptimizationLevel")}
    module.ort = types.SimpleNamespace(**kept, get_available_providers=lambda: list(available),
                                       InferenceSession=session)
    args = {"model_config": json.dumps(json_format.MessageToDict(to_protobuf(cfg), preserving_proto_field_name=True)),
            "model_repository": str(model_dir), "model_version": "1", "model_instance_kind": "GPU",
            "model_instance_device_id": "1"}
    return module.TritonPythonModel(), args, made


def _gpu_python_config(providers: str) -> ModelConfig:
    return ModelConfig(name="digits", io=IMAGE_IO, instance_group=serving_instances(1, 1),
                       parameters={"providers": providers, "tensorrt_fp16": "true"})


def test_model_py_runs_its_providers_on_the_instances_gpu(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    cfg = _gpu_python_config(f"{TENSORRT_EP},{CUDA_EP},{CPU_EP}")
    model, args, made = _load_model_py(tmp_path, monkeypatch, cfg, GPU_WHEEL)

    model.initialize(args)

    (session,) = made
    assert session.providers == [TENSORRT_EP, CUDA_EP, CPU_EP]
    assert session.provider_options == [{"device_id": "1", "trt_fp16_enable": "True"}, {"device_id": "1"}, {}]


@pytest.mark.parametrize("available, drop, message", [
    ([CPU_EP], (), r"not in this environment's onnxruntime.*install onnxruntime-gpu"),
    (GPU_WHEEL, (CUDA_EP,), r"could not start \['CUDAExecutionProvider'\].*install onnxruntime-gpu"),
])
def test_model_py_refuses_to_load_without_its_gpu_provider(tmp_path, monkeypatch, available, drop, message):
    pytest.importorskip("onnxruntime")
    model, args, _ = _load_model_py(tmp_path, monkeypatch, _gpu_python_config(f"{CUDA_EP},{CPU_EP}"), available, drop)
    with pytest.raises(ValueError, match=message):
        model.initialize(args)


# ---- the trt-int8 engines' source graph -------------------------------------------------------------------------
def test_tensorrt_int8_graph_is_symmetric_int8_qdq(tmp_path):
    """TensorRT's explicit quantization parses int8 QDQ with zero point 0 only (ORT's default static graph has
    uint8 activations with zero points): every Q/DQ pair of the TensorRT preset must be that."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from compress.quantize import TENSORRT_INT8, quantize

    src = tmp_path / "fp32.onnx"
    _tiny_onnx(src)
    rng = np.random.default_rng(0)
    batches = [{"image": rng.standard_normal((4, 1, 8, 8)).astype(np.float32) + 1.0} for _ in range(3)]

    dst = quantize(src, tmp_path / "trt.onnx", TENSORRT_INT8, batches)

    graph = onnx.load(str(dst)).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    qdq = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert any(n.op_type == "QuantizeLinear" for n in qdq)
    for node in qdq:
        zero = inits[node.input[2]]
        assert zero.dtype == np.int8 and not zero.any(), node.name
