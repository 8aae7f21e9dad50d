"""Request bodies from validation data: raw digits for :predict, text for :generate/:score, v2 tensors."""

from dataclasses import asdict

import numpy as np
import pytest

from autoglm.errors import AutoGLMError
from autoglm.tasks.digits import DigitsTask
from loadtest.payloads import build_payloads, task_requests, v2_body


def _digits_info():
    task = DigitsTask()
    return {"task": "digits", "io": asdict(task.io_spec({})), "metadata": task.serving_metadata({}),
            "model_args": {}, "models": {"fp32": "digits-fp32"}, "recommended": "digits-fp32"}


def test_digits_payloads_are_raw_validation_images(settings_in):
    payloads = build_payloads(settings_in(), _digits_info(), samples=6)
    task, v2 = payloads["scenarios"]["task"], payloads["scenarios"]["v2"]
    assert len(task) == len(v2) == 6 and payloads["unavailable"] == {}
    first = task[0]
    assert first["path"] == "/v1/models/{model}:predict"
    image = np.asarray(first["body"]["images"])
    assert image.shape == (1, 8, 8) and image.dtype.kind == "i" and image.min() >= 0 and image.max() <= 16
    tensor = v2[0]["body"]["inputs"][0]
    assert v2[0]["path"] == "/v2/models/{model}/infer"
    assert (tensor["name"], tensor["shape"], tensor["datatype"]) == ("image", [1, 1, 8, 8], "FP32")
    np.testing.assert_allclose(np.asarray(tensor["data"]).reshape(8, 8), image[0] / 16.0, atol=1e-6)


def test_batched_requests_carry_several_examples(settings_in):
    payloads = build_payloads(settings_in(), _digits_info(), samples=2, per_request=4)
    assert np.asarray(payloads["scenarios"]["task"][0]["body"]["images"]).shape == (4, 8, 8)
    assert payloads["scenarios"]["v2"][0]["body"]["inputs"][0]["shape"] == [4, 1, 8, 8]


def test_language_model_requests_generate_and_score():
    info = {"task": "charlm", "io": {"inputs": [{"name": "idx"}]}, "metadata": {"itos": list("ab c"),
                                                                               "block_size": 8}}
    requests = task_requests(info, {"idx": np.array([[0, 1, 2, 3, 0, 1]])}, generate_tokens=5)
    assert [r["path"] for r in requests] == ["/v1/models/{model}:generate", "/v1/models/{model}:score"]
    assert requests[0]["body"] == {"prompt": "ab ", "max_new_tokens": 5, "temperature": 0}
    assert requests[1]["body"] == {"text": "ab cab"}
    assert v2_body({"idx": np.array([[0, 1]])})["inputs"][0]["datatype"] == "INT64"


def test_hugging_face_lm_requests_are_text_decoded_from_validation_ids():
    from autoglm.text_codec import TextCodec
    from tests.autoglm._tokenizers import lm_metadata

    meta = lm_metadata("llama", block_size=32)
    codec = TextCodec.from_metadata(meta)
    ids = codec.encode("The quick brown fox jumps over the lazy dog 😀")
    info = {"task": "hf-causal-lm", "io": {"inputs": [{"name": "input_ids"}]}, "metadata": meta}
    generate, score = task_requests(info, {"input_ids": ids[None]}, generate_tokens=4)
    assert score["body"] == {"text": "The quick brown fox jumps over the lazy dog 😀"}
    assert generate["body"]["prompt"] == codec.decode(ids[:len(ids) // 2]) and generate["body"]["max_new_tokens"] == 4


def test_text_classifier_requests_predict_the_validation_texts():
    from autoglm.text_codec import TextCodec
    from tests.autoglm._tokenizers import classifier_metadata

    meta = classifier_metadata()
    ids, mask = TextCodec.from_metadata(meta).encode_batch(["the lazy dog", "quick brown fox"], 8)
    info = {"task": "hf-sequence-classification", "metadata": meta,
            "io": {"inputs": [{"name": "input_ids"}, {"name": "attention_mask"}]}}
    [request] = task_requests(info, {"input_ids": ids, "attention_mask": mask}, generate_tokens=4)
    assert request == {"path": "/v1/models/{model}:predict", "body": {"instances": ["the lazy dog", "quick brown fox"]}}


def test_unknown_task_kinds_point_at_the_v2_scenario():
    info = {"task": "custom", "io": {"inputs": [{"name": "x"}]}, "metadata": {}}
    with pytest.raises(AutoGLMError, match="--scenario v2"):
        task_requests(info, {"x": np.zeros((1, 3), np.float32)}, 4)
    with pytest.raises(AutoGLMError, match="dtype complex64"):
        v2_body({"x": np.zeros((1, 2), np.complex64)})


def test_payloads_follow_the_served_task_not_the_configured_model(settings_in):
    # a config for another task (charlm's model settings) must not be checked against the served digits task
    payloads = build_payloads(settings_in("task.name='charlm'", "task.model.n_layer=2"), _digits_info(), samples=2)
    assert len(payloads["scenarios"]["task"]) == 2


def test_a_user_task_configured_by_reference_builds_its_payloads(settings_in):
    # task.json names the task ("linreg"); the config names its class ("module:Class"): the same task
    from tests.autoglm.tasks.user_task import LinearRegressionTask

    task = LinearRegressionTask()
    info = {"task": "linreg", "io": asdict(task.io_spec({})), "metadata": task.serving_metadata({}),
            "model_args": {}, "models": {"fp32": "linreg-fp32"}, "recommended": "linreg-fp32"}
    settings = settings_in("task.name='tests.autoglm.tasks.user_task:LinearRegressionTask'")
    payloads = build_payloads(settings, info, samples=2)
    x = np.concatenate([b["x"] for b, _ in task.batches("val", 1, 2)])
    sent = np.array([r["body"]["inputs"][0]["data"] for r in payloads["scenarios"]["v2"]], np.float32)
    np.testing.assert_allclose(sent.reshape(x.shape), x)  # the validation rows, as the v2 scenario sends them
