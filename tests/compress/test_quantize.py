"""INT8 quantization: recipes refuse impossible settings, presets fit their graphs, quantized models keep metrics."""

from __future__ import annotations

import dataclasses

import pytest

from autoglm.errors import ConfigError
from compress import knobs
from compress.export import export_onnx
from compress.quantize import (
    FP32_COMPUTE_OPS,
    PRESETS,
    QuantRecipe,
    choose_preset,
    optimized_ops,
    quantize,
    recipe_for,
)
from tests.compress._trained import charlm, charlm_loss, digits, digits_metrics


@pytest.fixture(scope="module")
def digits_onnx(tmp_path_factory):
    task, model = digits()
    path = tmp_path_factory.mktemp("digits") / "fp32.onnx"
    export_onnx(model, task, model.model_args, path, exporter="legacy")
    return path


@pytest.fixture(scope="module")
def charlm_onnx(tmp_path_factory):
    task, model = charlm()
    path = tmp_path_factory.mktemp("charlm") / "fp32.onnx"
    export_onnx(model, task, model.model_args, path, exporter="legacy")
    return path


# ---- recipes -------------------------------------------------------------------------------------------
def test_presets_are_valid_and_say_why():
    assert set(PRESETS) == {"cnn-int8-static", "transformer-int8-dynamic", "transformer-int8-static-matmul"}
    for name, recipe in PRESETS.items():
        assert recipe.name == name and len(recipe.why) > 20
    assert PRESETS["cnn-int8-static"].mode == "static" and PRESETS["cnn-int8-static"].per_channel
    assert PRESETS["transformer-int8-dynamic"].calibration is None
    assert set(PRESETS["transformer-int8-static-matmul"].op_types) == {"MatMul", "Gemm"}


@pytest.mark.parametrize(("kwargs", "fix"), [
    ({"mode": "fast"}, "use one of"),
    ({"mode": "dynamic", "calibration": "minmax"}, "remove it or set mode='static'"),
    ({"mode": "static", "calibration": "kl"}, "use one of"),
    ({"mode": "dynamic", "activation_type": "int8"}, "activation_type='uint8'"),
    ({"mode": "static", "weight_type": "int4"}, "use one of"),
    ({"mode": "static", "op_types": ()}, "non-empty tuple"),
    ({"mode": "static", "op_types": "MatMul"}, "non-empty tuple"),
])
def test_recipe_refuses_impossible_settings_naming_the_fix(kwargs, fix):
    with pytest.raises(ConfigError, match=fix):
        QuantRecipe("r", **kwargs)


def test_static_recipe_defaults_to_minmax_and_u8_activations():
    recipe = QuantRecipe("r", "static", op_types=["MatMul"])
    assert (recipe.calibration, recipe.activation_type, recipe.op_types) == ("minmax", "uint8", ("MatMul",))


def test_knobs_cover_mode_calibration_and_per_channel():
    declared = knobs()
    assert declared["quantize.mode"].choices == ("none", "dynamic", "static", "qat", "int4")
    assert knobs(searched_only=True)["quantize.mode"].choices == ("none", "dynamic", "static")  # qat, int4: opt-in
    assert declared["quantize.mode"].default == "none"
    assert set(declared["quantize.calibration"].choices) == {"minmax", "entropy", "percentile"}
    assert set(declared["quantize.per_channel"].choices) == {True, False}


def test_choose_preset_by_graph_ops(digits_onnx, charlm_onnx):
    assert choose_preset(digits_onnx) == "cnn-int8-static"
    assert choose_preset(charlm_onnx) == "transformer-int8-dynamic"


def test_recipe_for_knob_values(digits_onnx, charlm_onnx):
    assert recipe_for(digits_onnx, "none") is None
    cnn = recipe_for(digits_onnx, "static", calibration="entropy", per_channel=False)
    assert (cnn.mode, cnn.calibration, cnn.per_channel, cnn.op_types) == ("static", "entropy", False, None)
    assert recipe_for(digits_onnx, "dynamic").op_types == ("MatMul",)  # never ConvInteger
    assert recipe_for(charlm_onnx, "static").op_types == ("MatMul", "Gemm")  # never all ops on an LM
    with pytest.raises(ConfigError, match="'none', 'dynamic' or 'static'"):
        recipe_for(digits_onnx, "int4")


# ---- quantizing ----------------------------------------------------------------------------------------
def test_static_without_calibration_names_the_setting(digits_onnx, tmp_path):
    for empty in (None, []):
        with pytest.raises(ConfigError, match=r"set compress\.quantize\.calibration_batches > 0"):
            quantize(digits_onnx, tmp_path / "int8.onnx", "cnn-int8-static", calibration_inputs=empty)
    assert not (tmp_path / "int8.onnx").exists()


def test_missing_source_and_unknown_preset(digits_onnx, tmp_path):
    with pytest.raises(ConfigError, match="export the model"):
        quantize(tmp_path / "nope.onnx", tmp_path / "int8.onnx", "transformer-int8-dynamic")
    with pytest.raises(ConfigError, match="cnn-int8-static"):
        quantize(digits_onnx, tmp_path / "int8.onnx", "cnn-int4")


def test_static_int8_digits_keeps_accuracy_on_int8_kernels(digits_onnx, tmp_path):
    task, model = digits()
    calibration = task.calibration_inputs(8, 16, model.model_args)
    fp32 = digits_metrics(digits_onnx)["accuracy"]
    for calibration_method in ("minmax", "percentile"):
        recipe = dataclasses.replace(PRESETS["cnn-int8-static"], calibration=calibration_method)
        dst = quantize(digits_onnx, tmp_path / f"{calibration_method}.onnx", recipe, calibration)
        assert digits_metrics(dst)["accuracy"] >= fp32 - 0.01, calibration_method
    ops = optimized_ops(dst)
    assert ops["QLinearConv"] == 2 and ops["QGemm"] == 2
    assert not set(ops) & FP32_COMPUTE_OPS


def test_a_recipe_that_quantizes_nothing_is_refused(digits_onnx, tmp_path):
    """An "INT8" file that is FP32 inside would mislead every comparison after it."""
    with pytest.raises(ConfigError, match="quantized nothing.*cnn-int8-static"):
        quantize(digits_onnx, tmp_path / "int8.onnx", QuantRecipe("attention-only", "dynamic", op_types=("Attention",)))
    assert not (tmp_path / "int8.onnx").exists()


def test_dynamic_on_a_cnn_quantizes_its_linear_layers_only(digits_onnx, tmp_path):
    dst = quantize(digits_onnx, tmp_path / "dyn.onnx", recipe_for(digits_onnx, "dynamic"))
    ops = optimized_ops(dst)
    assert ops["DynamicQuantizeMatMul"] + ops["MatMulInteger"] == 2 and "ConvInteger" not in ops
    assert digits_metrics(dst)["accuracy"] >= digits_metrics(digits_onnx)["accuracy"] - 0.01


def test_dynamic_int8_on_a_cnn_would_use_slow_conv_integer(digits_onnx, tmp_path):
    """Why the CNN preset is static: dynamic quantization of Conv runs as ConvInteger."""
    dst = quantize(digits_onnx, tmp_path / "dyn.onnx", QuantRecipe("all-dynamic", "dynamic"))
    assert optimized_ops(dst)["ConvInteger"] == 2


def test_charlm_dynamic_and_static_matmul_keep_val_loss(charlm_onnx, tmp_path):
    task, model = charlm()
    fp32 = charlm_loss(charlm_onnx)
    dynamic = quantize(charlm_onnx, tmp_path / "dyn.onnx", "transformer-int8-dynamic")
    assert charlm_loss(dynamic) == pytest.approx(fp32, rel=0.02)
    assert optimized_ops(dynamic)["DynamicQuantizeMatMul"] > 0
    calibration = task.calibration_inputs(4, 16, model.model_args)
    static = quantize(charlm_onnx, tmp_path / "static.onnx", "transformer-int8-static-matmul", calibration)
    assert charlm_loss(static) == pytest.approx(fp32, rel=0.02)


def test_a_failed_shape_inference_leaves_no_dump_in_the_working_directory(charlm_onnx, tmp_path, monkeypatch):
    import onnx
    import onnxruntime.quantization.shape_inference as shape_inference

    def gives_up(src, out, skip_symbolic_shape=False, **_):
        # what ORT's symbolic shape inference does when it gives up: the half-inferred model into the cwd,
        # its weights in a uuid-named file beside it
        onnx.save_model(onnx.load(src), "sym_shape_infer_temp.onnx", save_as_external_data=True)
        raise RuntimeError("Incomplete symbolic shape inference")

    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.data").write_bytes(b"the user's own")
    monkeypatch.setattr(shape_inference, "quant_pre_process", gives_up)
    dst = quantize(charlm_onnx, tmp_path / "out" / "int8.onnx", recipe_for(charlm_onnx, "dynamic"))
    assert dst.is_file()  # quantized from the raw graph
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.data", "out"]


def test_a_dump_name_the_user_had_is_left_alone(charlm_onnx, tmp_path, monkeypatch):
    import onnxruntime.quantization.shape_inference as shape_inference

    monkeypatch.chdir(tmp_path)
    mine = tmp_path / "sym_shape_infer_temp.onnx"
    mine.write_bytes(b"the user's own")
    monkeypatch.setattr(shape_inference, "quant_pre_process", lambda *a, **k: (_ for _ in ()).throw(RuntimeError()))
    quantize(charlm_onnx, tmp_path / "int8.onnx", recipe_for(charlm_onnx, "dynamic"))
    assert mine.read_bytes() == b"the user's own"
