"""Triton repository writer: typed config -> config.pbtxt round trip, validation, layout, model.py logic."""

import importlib.util
import json
import stat
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import json_format

from autoglm.detokenizer import DecodeTable
from autoglm.errors import ConfigError
from autoglm.tasks.base import IOSpec, TensorSpec
from autoglm.triton_config import (DynamicBatching, InstanceGroup, ModelConfig, parse_pbtxt, render_pbtxt, to_protobuf,
                                   triton_dtype)
from compress.repository import python_model_source, write_model

IMAGE_IO = IOSpec(inputs=(TensorSpec("image", "float32", (1, 8, 8)),),
                  outputs=(TensorSpec("logits", "float32", (10,)),))
TOKENS_IO = IOSpec(inputs=(TensorSpec("idx", "int64", (-1,)),),
                   outputs=(TensorSpec("logits", "float32", (-1, 65)),))


def _config(**overrides):
    args = dict(name="digits", io=IMAGE_IO, dynamic_batching=DynamicBatching(max_queue_delay_us=500,
                preferred_batch_sizes=(4, 8), max_queue_size=32, default_timeout_us=10_000),
                instance_group=InstanceGroup(count=2), parameters={"intra_op_threads": "1"},
                warmup_batch_sizes=(1, 8))
    return ModelConfig(**(args | overrides))


def test_render_parse_round_trip_keeps_every_field():
    cfg = _config()
    text = render_pbtxt(cfg)
    parsed = parse_pbtxt(text)
    assert parsed == to_protobuf(cfg)
    assert parsed.name == "digits" and parsed.max_batch_size == 64
    assert [(t.name, list(t.dims)) for t in parsed.input] == [("image", [1, 8, 8])]  # no batch axis
    assert [(t.name, list(t.dims)) for t in parsed.output] == [("logits", [10])]
    assert list(parsed.dynamic_batching.preferred_batch_size) == [4, 8]
    assert parsed.dynamic_batching.max_queue_delay_microseconds == 500
    assert parsed.instance_group[0].count == 2


def test_queue_policy_bounds_the_queue():
    policy = parse_pbtxt(render_pbtxt(_config())).dynamic_batching.default_queue_policy
    assert policy.max_queue_size == 32
    assert policy.default_timeout_microseconds == 10_000


def test_no_dynamic_batching_renders_none():
    assert not to_protobuf(_config(dynamic_batching=None)).HasField("dynamic_batching")


def test_warmup_per_batch_size_random_floats_zero_ints_dynamic_axes_at_one():
    image = to_protobuf(_config())
    assert [(w.batch_size, list(w.inputs["image"].dims)) for w in image.model_warmup] == [(1, [1, 8, 8]),
                                                                                           (8, [1, 8, 8])]
    assert all(w.inputs["image"].random_data for w in image.model_warmup)
    tokens = to_protobuf(ModelConfig("charlm", TOKENS_IO))
    (warmup,) = tokens.model_warmup
    assert warmup.inputs["idx"].zero_data and list(warmup.inputs["idx"].dims) == [1]


def test_dtype_mapping():
    assert [triton_dtype(d) for d in ("float32", "int64", "float16", "bool", "uint8", "object")] == [
        "TYPE_FP32", "TYPE_INT64", "TYPE_FP16", "TYPE_BOOL", "TYPE_UINT8", "TYPE_STRING"]
    proto = to_protobuf(ModelConfig("charlm", TOKENS_IO))
    assert proto.input[0].data_type == type(proto).DESCRIPTOR.fields_by_name["input"].message_type.fields_by_name[
        "data_type"].enum_type.values_by_name["TYPE_INT64"].number
    with pytest.raises(ConfigError, match="no Triton type"):
        triton_dtype("complex64")


def test_python_flavour_uses_python_backend_and_caller_parameters_only():
    proto = to_protobuf(_config())
    assert proto.backend == "python" and proto.platform == ""
    assert dict((k, v.string_value) for k, v in proto.parameters.items()) == {"intra_op_threads": "1"}
    with_env = to_protobuf(_config(parameters={"EXECUTION_ENV_PATH": "/opt/env"}))
    assert with_env.parameters["EXECUTION_ENV_PATH"].string_value == "/opt/env"


def test_native_flavours_render_platform_and_model_file():
    ort = to_protobuf(_config(flavour="onnxruntime", parameters={"intra_op_threads": "2"}))
    assert (ort.platform, ort.backend, ort.default_model_filename) == ("onnxruntime_onnx", "", "model.onnx")
    assert ort.parameters["intra_op_thread_count"].string_value == "2"  # the onnxruntime backend's own name
    trt = to_protobuf(_config(flavour="tensorrt", parameters={}, instance_group=InstanceGroup(kind="gpu")))
    assert (trt.platform, trt.default_model_filename) == ("tensorrt_plan", "model.plan")
    assert trt.instance_group[0].kind == type(trt.instance_group[0]).KIND_GPU


def test_scalar_per_row_tensor_is_declared_with_a_reshape():
    io = IOSpec(inputs=(TensorSpec("x", "float32", ()),), outputs=(TensorSpec("y", "float32", ()),))
    proto = parse_pbtxt(render_pbtxt(ModelConfig("scalar", io)))
    assert list(proto.input[0].dims) == [1] and proto.input[0].HasField("reshape")


@pytest.mark.parametrize(("overrides", "message"), [
    (dict(name="../evil"), "safe directory name"),
    (dict(name="a/b"), "safe directory name"),
    (dict(name=".hidden"), "safe directory name"),
    (dict(name=""), "safe directory name"),
    (dict(flavour="tflite"), "flavour 'tflite' is unknown"),
    (dict(max_batch_size=0), "max_batch_size=0"),
    (dict(dynamic_batching=DynamicBatching(preferred_batch_sizes=(128,))), "raise max_batch_size"),
    (dict(warmup_batch_sizes=(65,)), "warmup batch size 65"),
    (dict(parameters={"intra_op_threads": "two"}), "non-negative integer"),
    (dict(flavour="onnxruntime", parameters={"EXECUTION_ENV_PATH": "/env"}), "only to the python flavour"),
    (dict(flavour="tensorrt", parameters={}), "instance_group.kind='gpu'"),
    (dict(io=IOSpec(inputs=(), outputs=IMAGE_IO.outputs)), "no inputs"),
    (dict(io=IOSpec(inputs=(TensorSpec("x", "float32", (0,)),), outputs=IMAGE_IO.outputs)), "-1 for a dynamic"),
])
def test_invalid_configs_are_refused_with_the_fix(overrides, message):
    with pytest.raises(ConfigError, match=message):
        _config(**overrides)


@pytest.mark.parametrize(("build", "message"), [
    (lambda: InstanceGroup(count=0), "must be >= 1"),
    (lambda: InstanceGroup(kind="tpu"), "use 'cpu' or 'gpu'"),
    (lambda: DynamicBatching(max_queue_delay_us=-1), "non-negative"),
])
def test_invalid_parts_are_refused(build, message):
    with pytest.raises(ConfigError, match=message):
        build()


def test_write_model_lays_out_the_python_flavour(tmp_path):
    onnx_file = tmp_path / "fp32.onnx"
    onnx_file.write_bytes(b"onnx bytes")
    model_dir = write_model(tmp_path / "repo", _config(), onnx_file, version=3)
    assert model_dir == tmp_path / "repo" / "digits"
    assert sorted(str(p.relative_to(model_dir)) for p in model_dir.rglob("*")) == [
        "3", "3/model.onnx", "3/model.py", "config.pbtxt"]
    assert (model_dir / "3" / "model.onnx").read_bytes() == b"onnx bytes"
    assert (model_dir / "3" / "model.py").read_bytes() == python_model_source()
    assert parse_pbtxt((model_dir / "config.pbtxt").read_text()) == to_protobuf(_config())
    assert stat.S_IMODE((model_dir / "config.pbtxt").stat().st_mode) == 0o644


def test_the_python_models_sources_are_found_through_their_modules_wherever_compress_lies(tmp_path, monkeypatch):
    import autoglm.detokenizer
    import autoglm.sampling
    import compress.decode_engine
    import compress.repository
    from autoglm.config import Settings
    from compress.decode import DecodeGraphs

    # as if compress were installed apart from autoglm: no file is reached by a path relative to compress/
    monkeypatch.setattr(compress.repository, "__file__", str(tmp_path / "elsewhere" / "compress" / "repository.py"))
    task = types.SimpleNamespace(name="tiny", serving_metadata=lambda _args: {"itos": ["a", "b"]})
    onnx_file = tmp_path / "fp32.onnx"
    onnx_file.write_bytes(b"onnx bytes")

    digits = write_model(tmp_path / "repo", _config(), onnx_file)
    name = compress.repository.write_generate_model(tmp_path / "repo", Settings(), task, {},
                                                    DecodeGraphs(b"prefill", b"step", "fp32", {}))

    generate, package = tmp_path / "repo" / "python" / name / "1", Path(compress.decode_engine.__file__).parent
    assert (digits / "1" / "model.py").read_bytes() == (package / "triton_python_model.py").read_bytes()
    assert (generate / "model.py").read_bytes() == (package / "triton_generate_model.py").read_bytes()
    assert (generate / "decode_engine.py").read_bytes() == (package / "decode_engine.py").read_bytes()
    assert (generate / "sampling.py").read_bytes() == Path(autoglm.sampling.__file__).read_bytes()
    assert (generate / "detokenizer.py").read_bytes() == Path(autoglm.detokenizer.__file__).read_bytes()
    assert DecodeTable.from_json((generate / "detokenizer.json").read_text()).tokens == (b"a", b"b")


def test_a_hugging_face_lm_gets_its_tokenizers_byte_table_and_eos_beside_the_generation_model(tmp_path):
    from autoglm.config import Settings
    from compress.decode import DecodeGraphs
    from compress.repository import write_generate_model
    from tests.autoglm._tokenizers import lm_metadata

    meta = lm_metadata("gpt2")
    task = types.SimpleNamespace(name="hf-causal-lm", serving_metadata=lambda _args: meta)
    name = write_generate_model(tmp_path, Settings(), task, {}, DecodeGraphs(b"prefill", b"step", "fp32", {}))
    table = DecodeTable.from_json((tmp_path / "python" / name / "1" / "detokenizer.json").read_text())
    assert table.eos_ids == {0} and table.tokens[0] == b""  # <|endoftext|>: special, adds no text
    assert b"\xc4\xa0" not in b"".join(table.tokens) and b" " in table.tokens  # 'Ġ' is the byte of a space
    assert "itos" not in (tmp_path / "python" / name / "config.pbtxt").read_text()


def test_write_model_native_has_no_model_py_and_checks_the_file(tmp_path):
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"engine")
    cfg = _config(flavour="tensorrt", parameters={}, instance_group=InstanceGroup(kind="gpu"))
    model_dir = write_model(tmp_path / "repo", cfg, plan)
    assert sorted(p.name for p in (model_dir / "1").iterdir()) == ["model.plan"]
    with pytest.raises(ConfigError, match="serves a .onnx file"):
        write_model(tmp_path / "repo", _config(), plan)
    with pytest.raises(ConfigError, match="does not exist"):
        write_model(tmp_path / "repo", _config(), tmp_path / "missing.onnx")
    with pytest.raises(ConfigError, match="version 0"):
        write_model(tmp_path / "repo", cfg, plan, version=0)


# ---- the python-backend model.py, run against a stand-in for triton_python_backend_utils ----------------
class _Tensor:
    def __init__(self, name, array):
        self.name, self.array = name, array

    def as_numpy(self):
        return self.array


class _Error:
    INVALID_ARG, INTERNAL = 3, 13

    def __init__(self, message, code=None):
        self.message, self.code = message, code


class _Response:
    def __init__(self, output_tensors, error=None):
        self.outputs, self.error = {t.name: t.array for t in output_tensors}, error


def _fake_pb_utils():
    return types.SimpleNamespace(
        Tensor=_Tensor, TritonError=_Error, InferenceResponse=_Response,
        get_input_tensor_by_name=lambda request, name: _Tensor(name, request[name]) if name in request else None,
        triton_string_to_numpy=lambda t: {"TYPE_FP32": np.float32, "TYPE_INT64": np.int64}[t])


def _tiny_onnx(path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    weight = np.random.default_rng(0).standard_normal((64, 10)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["image", "shape"], ["flat"]),  # (B,1,8,8) -> (B,64)
         helper.make_node("MatMul", ["flat", "w"], ["logits"])],  # (B,64) @ (64,10) -> (B,10)
        "tiny", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        [numpy_helper.from_array(np.array([-1, 64], dtype=np.int64), "shape"), numpy_helper.from_array(weight, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return weight


def test_model_py_batches_requests_and_fails_only_the_bad_one(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    onnx_file = tmp_path / "model.onnx"
    weight = _tiny_onnx(onnx_file)
    model_dir = write_model(tmp_path / "repo", _config(), onnx_file)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", _fake_pb_utils())
    spec = importlib.util.spec_from_file_location("model_under_test", model_dir / "1" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.TritonPythonModel()
    # Triton hands the model its config as JSON; json_format even renders int64 dims as strings.
    config_json = json.dumps(json_format.MessageToDict(to_protobuf(_config()), preserving_proto_field_name=True))
    model.initialize({"model_config": config_json, "model_repository": str(model_dir), "model_version": "1"})

    rng = np.random.default_rng(1)
    good = [rng.standard_normal((n, 1, 8, 8)).astype(np.float32) for n in (3, 1)]
    requests = [{"image": good[0]}, {"image": np.zeros((2, 1, 8, 9), np.float32)},
                {"image": good[1]}, {"image": good[1].astype(np.float64)}, {}]
    responses = model.execute(requests)

    assert len(responses) == len(requests)
    for response, x in zip((responses[0], responses[2]), good):
        assert response.error is None
        np.testing.assert_allclose(response.outputs["logits"], x.reshape(len(x), 64) @ weight, atol=1e-5)
    assert "shape [2, 1, 8, 9]" in responses[1].error.message and responses[1].error.code == _Error.INVALID_ARG
    assert "dtype float64" in responses[3].error.message
    assert "missing" in responses[4].error.message

    real = model.session

    class Failing:  # ONNX Runtime refuses one request's values (say, an id beyond the vocabulary)
        def run(self, names, feed):
            if (feed["image"] == 999).any():
                raise RuntimeError("indices element out of data bounds")
            return real.run(names, feed)

    model.session = Failing()
    bad = good[1].copy()
    bad[0, 0, 0, 0] = 999
    fine, failed = model.execute([{"image": good[1]}, {"image": bad}])  # same shape: one batch, then alone
    np.testing.assert_allclose(fine.outputs["logits"], good[1].reshape(1, 64) @ weight, atol=1e-5)
    assert fine.error is None and "out of data bounds" in failed.error.message
    model.session = real
    model.finalize()
    assert model.session is None
