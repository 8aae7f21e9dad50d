"""``:predict`` for any task on a real Triton: a user's own task (loaded as ``module:Class``) trained tiny,
compressed and served, asked with KServe v1 instances through ``curl`` and plain HTTP; digits through the
friendly body and instances alike; charlm rows of token ids. Answers equal ONNX Runtime on the same file."""

import json
import subprocess

import numpy as np
import orjson
import pytest

from autoglm.artifacts import RunDir
from serve import GatewaySettings, start_serving
from tests.serve.fixtures import on_free_ports, post, published_run, require_triton

pytestmark = [pytest.mark.integration,
              pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export")]
ort = pytest.importorskip("onnxruntime")


def _serving(kind: str):
    require_triton()
    settings = on_free_ports(published_run(kind))
    with start_serving(settings, GatewaySettings(port=settings.serve.gateway_port)) as serving:
        yield settings, serving


@pytest.fixture(scope="module")
def linreg():
    yield from _serving("linreg")


@pytest.fixture(scope="module")
def digits():
    yield from _serving("digits")


@pytest.fixture(scope="module")
def charlm():
    yield from _serving("charlm")


def _onnx(settings, inputs: dict) -> np.ndarray:
    path = RunDir(settings.run.root, settings.run.name).stage_dir("compress") / "fp32.onnx"
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, inputs)[0]


def curl(url: str, body: bytes) -> tuple[int, dict]:
    """POST with the real curl, as a user would: (status, JSON answer)."""
    result = subprocess.run(["curl", "-sS", "--noproxy", "*", "-X", "POST", "-H", "Content-Type: application/json",
                             "--data-binary", "@-", "-w", "\n%{http_code}", url],
                            input=body, capture_output=True, timeout=30, check=True)
    answer, _, status = result.stdout.rpartition(b"\n")
    return int(status), json.loads(answer)


def test_a_user_task_answers_instances_through_curl_and_plain_http(linreg):
    settings, serving = linreg
    assert serving.catalog.task == "linreg" and serving.catalog.kind == "tensors"
    x = np.random.default_rng(1).normal(size=(5, 4)).astype(np.float32)
    url = f"{serving.gateway.url}/v1/models/linreg:predict"

    by_curl = curl(url, orjson.dumps({"instances": x.tolist()}))
    by_http = post(url, orjson.dumps({"instances": x.tolist()}))
    columns = post(url, orjson.dumps({"inputs": {"x": x.tolist()}}))
    named = curl(url, orjson.dumps({"instances": [{"x": row} for row in x.tolist()]}))

    expected = _onnx(settings, {"x": x})  # (5, 1)
    assert by_curl[0] == 200 and by_curl[1]["model"] == "linreg-fp32", by_curl
    np.testing.assert_allclose(by_curl[1]["predictions"], expected, rtol=1e-5, atol=1e-6)
    assert by_http[0] == 200 and json.loads(by_http[1]) == by_curl[1]
    assert columns[0] == 200 and json.loads(columns[1])["outputs"] == by_curl[1]["predictions"]
    assert named == by_curl
    np.testing.assert_allclose(expected[:, 0], x @ [1.5, -2.0, 0.5, 3.0] + 0.7, atol=0.2)  # it learned the task


@pytest.mark.parametrize(("body", "status", "words"), [
    ({"instances": [[1, 2, 3, 4], [1, 2, 3]]}, 422,
     "instance 1: expected shape [4] of FP32 (input 'x'), got shape [3]"),
    ({"instances": [[1, 2, 3, True]]}, 422, "true/false"),
    ({"instances": [[1, 2, 3, "4"]]}, 422, "got strings"),
    ({"instances": [[0, 0, 0, 0]] * 65}, 413, "at most 64"),
    ({"images": [[[0] * 8] * 8]}, 422, "classification tasks"),
    (b'{"instances": [[1, 2, 3, NaN]]}', 400, "not valid JSON"),
])
def test_bad_instances_of_a_user_task_are_4xx_by_curl_and_triton_keeps_serving(linreg, body, status, words):
    _, serving = linreg
    url = f"{serving.gateway.url}/v1/models/linreg:predict"
    got, answer = curl(url, body if isinstance(body, bytes) else orjson.dumps(body))
    assert got == status and words in answer["error"], answer
    assert curl(url, b'{"instances": [[0, 0, 0, 0]]}')[0] == 200


def test_digits_answer_the_same_through_the_friendly_body_and_instances(digits):
    from sklearn.datasets import load_digits

    settings, serving = digits
    images = load_digits().images[:12].astype(np.float32)  # (12, 8, 8), pixels 0..16
    url = f"{serving.gateway.url}/v1/models/digits:predict"
    friendly = post(url, orjson.dumps({"images": images.tolist()}))
    rows = post(url, orjson.dumps({"instances": (images / 16).reshape(12, 1, 8, 8).tolist()}))
    assert friendly[0] == rows[0] == 200, (friendly, rows)
    logits = np.array(json.loads(rows[1])["predictions"])
    np.testing.assert_allclose(logits, _onnx(settings, {"image": (images / 16).reshape(12, 1, 8, 8)}), atol=1e-5)
    answer = json.loads(friendly[1])["predictions"]
    assert [p["class"] for p in answer] == [str(k) for k in logits.argmax(1)]
    probabilities = np.exp(logits - logits.max(1, keepdims=True))
    probabilities /= probabilities.sum(1, keepdims=True)
    np.testing.assert_allclose([p["probabilities"] for p in answer], probabilities, atol=1e-5)


def test_charlm_takes_rows_of_token_ids_and_answers_their_logits(charlm):
    settings, serving = charlm
    vocab, block = len(serving.catalog.metadata["itos"]), serving.catalog.metadata["block_size"]
    ids = np.random.default_rng(2).integers(0, vocab, size=(3, 10))
    url = f"{serving.gateway.url}/v1/models/charlm:predict"
    status, body = post(url, orjson.dumps({"instances": ids.tolist()}))
    assert status == 200, body
    logits = np.array(json.loads(body)["predictions"])  # (3, 10, vocab)
    np.testing.assert_allclose(logits, _onnx(settings, {"idx": ids}), atol=1e-4)
    too_long = post(url, orjson.dumps({"instances": [[0] * (block + 1)]}))
    outside = post(url, orjson.dumps({"instances": [[vocab]]}))
    assert too_long[0] == 422 and f"at most {block}" in json.loads(too_long[1])["error"]
    assert outside[0] == 422 and f"0..{vocab - 1}" in json.loads(outside[1])["error"]
