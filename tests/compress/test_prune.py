"""Structural pruning: smaller layers, same I/O, exportable, accuracy back after a short fine-tune."""

from __future__ import annotations

import copy

import pytest
import torch
import torch_pruning as tp

from autoglm.errors import AutoGLMError, ConfigError
from autoglm.measure import measure_predictor
from autoglm.tasks.predict import onnx_predictor
from compress import knobs
from compress.export import check_parity, export_onnx
from compress.prune import count_params, prune_and_finetune, prune_model
from compress.quantize import quantize
from tests.compress._trained import DIGITS_TRAIN, charlm, charlm_loss, digits, digits_metrics


def _macs(model, task) -> float:
    example = torch.from_numpy(task.example_inputs(1, model.model_args)["image"])
    macs, _ = tp.utils.count_ops_and_params(model, example)
    return macs


@pytest.fixture(scope="module")
def pruned_digits():
    task, model = digits()
    pruned, result = prune_and_finetune(copy.deepcopy(model), task, model.model_args, 0.5, DIGITS_TRAIN, 100)
    return pruned, result


@pytest.mark.parametrize("ratio", [0, 1, 1.5, -0.1, True, "0.5"])
def test_ratio_must_be_a_fraction(ratio):
    task, model = digits()
    with pytest.raises(ConfigError, match="0 < ratio < 1"):
        prune_model(copy.deepcopy(model), task, model.model_args, ratio)


def test_knobs_declare_ratio_and_finetune_steps():
    ratio, steps = knobs()["prune.ratio"], knobs()["prune.finetune_steps"]
    assert (ratio.low, ratio.high, ratio.default) == (0.0, 0.75, 0.0)
    assert steps.kind == "int" and steps.low >= 1


def test_pruning_half_the_cnn_shrinks_it_and_keeps_its_io(pruned_digits):
    task, model = digits()
    pruned, _ = pruned_digits
    assert pruned.features[0].out_channels == model.features[0].out_channels // 2
    assert pruned.classifier[-1].out_features == 10  # the output layer is never pruned
    assert count_params(pruned) < 0.35 * count_params(model)
    assert _macs(pruned, task) < 0.35 * _macs(model, task)
    assert pruned.pruning["params_after"] == count_params(pruned)
    x = torch.from_numpy(task.example_inputs(5)["image"])
    assert pruned(x).shape == model(x).shape == (5, 10)


def test_pruned_cnn_recovers_accuracy_after_a_short_finetune(pruned_digits):
    pruned, result = pruned_digits
    assert result.steps == 100
    assert digits_metrics(pruned)["accuracy"] >= 0.95


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_pruned_cnn_exports_with_parity(pruned_digits, exporter, tmp_path):
    task, _ = digits()
    pruned, _ = pruned_digits
    used = export_onnx(pruned, task, pruned.model_args, tmp_path / "pruned.onnx", exporter=exporter)
    assert used == exporter
    assert check_parity(task, pruned, tmp_path / "pruned.onnx", pruned.model_args).passed


def test_pruned_then_int8_runs_and_is_faster(pruned_digits, tmp_path, record_property):
    """Assert on structure (params/MACs, above); report the batch-32 latency ratio, do not gate on it."""
    task, model = digits()
    pruned, _ = pruned_digits
    export_onnx(model, task, model.model_args, tmp_path / "full.onnx", exporter="legacy")
    export_onnx(pruned, task, pruned.model_args, tmp_path / "pruned.onnx", exporter="legacy")
    calibration = task.calibration_inputs(8, 16, model.model_args)
    quantize(tmp_path / "pruned.onnx", tmp_path / "pruned-int8.onnx", "cnn-int8-static", calibration)
    assert digits_metrics(tmp_path / "pruned-int8.onnx")["accuracy"] >= 0.95
    batch = task.example_inputs(32)
    full, small = onnx_predictor(tmp_path / "full.onnx", 1), onnx_predictor(tmp_path / "pruned.onnx", 1)
    ratios = []
    for _ in range(3):  # interleaved, so a busy neighbour slows both alike
        ratios.append(measure_predictor(small, batch, warmup=10, repeats=100).p50_ms
                      / measure_predictor(full, batch, warmup=10, repeats=100).p50_ms)
    record_property("pruned_over_full_latency_b32", min(ratios))
    print(f"pruned 50% / full ORT latency at batch 32: {min(ratios):.2f}")


def test_output_layer_in_prunable_layers_is_still_kept(monkeypatch):
    task, model = digits()
    monkeypatch.setattr(task, "prunable_layers", lambda m: [m.features[0], m.classifier[-1]])
    pruned = prune_model(copy.deepcopy(model), task, model.model_args, 0.5)
    assert pruned.classifier[-1].out_features == 10
    assert pruned.classifier[1].out_features == model.classifier[1].out_features  # not allowed: kept
    assert pruned.features[0].out_channels == model.features[0].out_channels // 2


def test_only_output_layer_allowed_is_an_error(monkeypatch):
    task, model = digits()
    monkeypatch.setattr(task, "prunable_layers", lambda m: [m.classifier[-1]])
    with pytest.raises(ConfigError, match="prunable_layers"):
        prune_model(copy.deepcopy(model), task, model.model_args, 0.5)


def test_finetune_steps_validated_and_zero_only_prunes():
    task, model = digits()
    with pytest.raises(ConfigError, match="finetune_steps"):
        prune_and_finetune(copy.deepcopy(model), task, model.model_args, 0.5, DIGITS_TRAIN, -1)
    pruned, result = prune_and_finetune(copy.deepcopy(model), task, model.model_args, 0.25, DIGITS_TRAIN, 0)
    assert result.steps == 0 and 0 < result.metric <= 1 and count_params(pruned) < count_params(model)


def test_gpt_prunes_only_mlp_width_and_exports(tmp_path):
    """charlm's prunable_layers allows the MLP expansion layers only (residual width, heads are tied)."""
    task, model = charlm()
    assert task.prunable_layers(model) == [block.mlp.c_fc for block in model.transformer.h]
    pruned = prune_model(copy.deepcopy(model), task, model.model_args, 0.5)
    for before, after in zip(model.transformer.h, pruned.transformer.h):
        assert after.mlp.c_fc.out_features == before.mlp.c_fc.out_features // 2
        assert after.mlp.c_proj.out_features == before.mlp.c_proj.out_features  # residual width kept
        assert after.attn.c_attn.weight.shape == before.attn.c_attn.weight.shape
    assert pruned.lm_head.weight is pruned.transformer.wte.weight  # weight tying survives
    for exporter in ("legacy", "dynamo"):
        path = tmp_path / f"{exporter}.onnx"
        export_onnx(pruned, task, pruned.model_args, path, exporter=exporter)
        assert check_parity(task, pruned, path, pruned.model_args, batch_sizes=(1, 3), n_batches=1).passed
    assert charlm_loss(path) < charlm_loss(model) * 1.2  # unpruned attention keeps most of it


def test_a_pruning_that_changes_the_output_shape_is_refused(monkeypatch):
    """Should a task's layers ever let the output width change, prune_model refuses the result."""
    task, model = digits()
    # the output layer is always protected, so switch that protection off to provoke it
    monkeypatch.setattr("compress.prune._ignored_layers", lambda *a: [])
    with pytest.raises(AutoGLMError, match="output shape"):
        prune_model(copy.deepcopy(model), task, model.model_args, 0.5)
