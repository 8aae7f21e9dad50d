"""QAT: fake quantization in training, a QDQ ONNX on INT8 kernels, at least as accurate as PTQ."""

from __future__ import annotations

import pytest
import torch

from autoglm.errors import ConfigError
from autoglm.measure import measure_predictor
from autoglm.tasks.predict import onnx_predictor
from compress.export import export_onnx
from compress.qat import QATLayer, export_qat, prepare_qat, qat, qat_finetune
from compress.quantize import FP32_COMPUTE_OPS, optimized_ops, quantize
from tests.compress._trained import DIGITS_TRAIN, digits, digits_metrics


@pytest.fixture(scope="module")
def ptq_digits(tmp_path_factory):
    """Post-training static INT8 of the same model: the baseline QAT must match."""
    task, model = digits()
    workdir = tmp_path_factory.mktemp("ptq")
    export_onnx(model, task, model.model_args, workdir / "fp32.onnx", exporter="legacy")
    calibration = task.calibration_inputs(8, 16, model.model_args)
    return quantize(workdir / "fp32.onnx", workdir / "int8.onnx", "cnn-int8-static", calibration)


@pytest.fixture(scope="module")
def qat_digits(tmp_path_factory):
    task, model = digits()
    return qat(model, task, model.model_args, DIGITS_TRAIN, 100, tmp_path_factory.mktemp("qat") / "qat.onnx")


def test_fake_quantization_is_in_the_training_forward():
    task, model = digits()
    qmodel = prepare_qat(model, task, model.model_args)
    layers = [m for m in qmodel.modules() if isinstance(m, QATLayer)]
    assert len(layers) == 4 and not any(isinstance(m, QATLayer) for m in model.modules())  # model untouched
    x = torch.from_numpy(task.example_inputs(8)["image"])
    qmodel.train()
    out = qmodel(x)
    out.sum().backward()  # straight-through gradients reach the float weights
    assert all(layer.layer.weight.grad is not None for layer in layers)
    with torch.no_grad():  # the first conv's outputs sit on its uint8 grid
        hidden = qmodel.model.features[0](qmodel.in_fq[0](x))
        scale, _ = qmodel.model.features[0].out_fq.qparams()
        steps = hidden / scale
        assert torch.allclose(steps, steps.round(), atol=1e-3)


def test_qat_onnx_runs_on_the_same_int8_kernels_as_ptq(qat_digits, ptq_digits, record_property):
    ops, ptq_ops = optimized_ops(qat_digits), optimized_ops(ptq_digits)
    assert not set(ops) & FP32_COMPUTE_OPS
    assert (ops["QLinearConv"], ops["QGemm"]) == (ptq_ops["QLinearConv"], ptq_ops["QGemm"]) == (2, 2)
    assert qat_digits.stat().st_size < 1.2 * ptq_digits.stat().st_size  # int8 weights, not FP32
    task, _ = digits()
    batch = task.example_inputs(32)
    qat_run, ptq_run = onnx_predictor(qat_digits, 1), onnx_predictor(ptq_digits, 1)
    ratio = min(measure_predictor(qat_run, batch, warmup=10, repeats=100).p50_ms
                / measure_predictor(ptq_run, batch, warmup=10, repeats=100).p50_ms for _ in range(3))
    record_property("qat_over_ptq_latency_b32", ratio)  # reported, not gated: same kernels (above)
    print(f"QAT / PTQ ORT latency at batch 32: {ratio:.2f}")


def test_onnx_computes_what_qat_trained(tmp_path):
    """Biases on ORT's int32 grid and 7-bit weights where the CPU lacks VNNI: torch == INT8 kernels."""
    task, model = digits()
    qmodel = prepare_qat(model, task, model.model_args)
    path = export_qat(qmodel, task, model.model_args, tmp_path / "qat.onnx")
    logits_step = qmodel.model.classifier[-1].out_fq.qparams()[0]
    x = task.example_inputs(64)
    got = onnx_predictor(path, 1)(x)
    with torch.no_grad():
        want = qmodel(torch.from_numpy(x["image"])).numpy()
    assert abs(got - want).max() <= logits_step * 1.01  # at most one rounding tie apart
    assert (got.argmax(1) == want.argmax(1)).all()


def test_qat_accuracy_at_least_ptq(qat_digits, ptq_digits):
    assert digits_metrics(qat_digits)["accuracy"] >= digits_metrics(ptq_digits)["accuracy"] - 0.005


def test_qat_recovers_what_ptq_loses_on_a_coarse_grid(tmp_path):
    """On a 2-bit grid PTQ collapses (about 50% accuracy); QAT brings it back (85-90%), and the ONNX agrees.

    At INT8 digits PTQ loses nothing to recover, and at 3-4 bits the held-out differences are a few
    images; 2 bits makes the effect of training through the quantizer unmistakable.
    """
    task, model = digits()
    ptq = digits_metrics(prepare_qat(model, task, model.model_args, bits=2))
    qmodel = prepare_qat(model, task, model.model_args, bits=2)
    qat_finetune(qmodel, task, DIGITS_TRAIN, 100)
    trained = digits_metrics(qmodel)
    assert trained["loss"] < 0.7 * ptq["loss"] and trained["accuracy"] > ptq["accuracy"] + 0.1
    onnx_metrics = digits_metrics(export_qat(qmodel, task, model.model_args, tmp_path / "qat2.onnx"))
    assert onnx_metrics["accuracy"] == pytest.approx(trained["accuracy"], abs=0.005)


@pytest.mark.parametrize(("kwargs", "fix"), [({"bits": 9}, "2..8"), ({"calibration_batches": 0}, "> 0")])
def test_prepare_refuses_bad_settings(kwargs, fix):
    task, model = digits()
    with pytest.raises(ConfigError, match=fix):
        prepare_qat(model, task, model.model_args, **kwargs)


def test_finetune_refuses_bad_steps():
    task, model = digits()
    qmodel = prepare_qat(model, task, model.model_args)
    with pytest.raises(ConfigError, match="steps"):
        qat_finetune(qmodel, task, DIGITS_TRAIN, 1)
    with pytest.raises(ConfigError, match="lr_frac"):
        qat_finetune(qmodel, task, DIGITS_TRAIN, 10, lr_frac=0)
