"""One trained model, two runtimes: torch and ONNX Runtime must score the same on the same batches."""

from __future__ import annotations

import numpy as np
import pytest

from autoglm.tasks.predict import onnx_predictor, session_options, torch_predictor
from tests.autoglm.tasks.conftest import export_onnx

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")


@pytest.mark.parametrize("trained_name", ["trained_digits", "trained_charlm"])
def test_torch_and_onnx_give_the_same_metrics(trained_name, request, tmp_path):
    trained = request.getfixturevalue(trained_name)
    task, model = trained.task, trained.model
    path = export_onnx(trained, tmp_path / "model.onnx")

    via_torch = task.evaluate(torch_predictor(model), "val", n_batches=4, model_args=model.model_args)
    via_onnx = task.evaluate(onnx_predictor(path, threads=2), "val", n_batches=4, model_args=model.model_args)

    assert via_torch.keys() == via_onnx.keys()
    for key, value in via_torch.items():
        assert via_onnx[key] == pytest.approx(value, rel=1e-4), key


def test_onnx_charlm_accepts_any_batch_and_sequence_length(trained_charlm, tmp_path):
    task, model = trained_charlm.task, trained_charlm.model
    predict_onnx = onnx_predictor(export_onnx(trained_charlm, tmp_path / "gpt.onnx"))
    predict_torch = torch_predictor(model)
    inputs = task.example_inputs(batch_size=3, model_args=model.model_args)

    for batch, length in [(1, 1), (3, 17), (3, 64)]:
        idx = {"idx": inputs["idx"][:batch, :length]}
        out = predict_onnx(idx)
        assert out.shape == (batch, length, len(task.vocab))
        np.testing.assert_allclose(out, predict_torch(idx), rtol=1e-4, atol=1e-4)


def test_onnx_predictor_accepts_a_session_and_names_missing_inputs(trained_digits, tmp_path):
    import onnxruntime as ort

    from autoglm.errors import ConfigError

    path = export_onnx(trained_digits, tmp_path / "cnn.onnx")
    session = ort.InferenceSession(str(path), session_options(1), providers=["CPUExecutionProvider"])
    predict = onnx_predictor(session)
    image = trained_digits.task.example_inputs(batch_size=5)["image"]

    assert predict({"image": image}).shape == (5, 10)
    with pytest.raises(ConfigError, match=r"missing \['image'\]"):
        predict({"pixels": image})


def test_session_options_use_full_graph_optimization():
    import onnxruntime as ort

    options = session_options(threads=3)

    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert options.intra_op_num_threads == 3
