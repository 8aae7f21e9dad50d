"""The whole stack on a real Triton: stock tritonclient through the gateway, task endpoints equal to ONNX
Runtime on the same model file, dynamic batching under concurrency, bad inputs refused with 4xx."""

import asyncio
import json
import math

import numpy as np
import orjson
import pytest

from autoglm.artifacts import RunDir
from serve import GatewaySettings, start_serving
from tests.serve.fixtures import get, on_free_ports, post, published_run, require_triton

pytestmark = [pytest.mark.integration,
              pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export")]
httpclient = pytest.importorskip("tritonclient.http")
ort = pytest.importorskip("onnxruntime")


def _stack(kind: str, **gateway):
    require_triton()
    settings = on_free_ports(published_run(kind))
    return settings, start_serving(settings, GatewaySettings(port=settings.serve.gateway_port, **gateway))


@pytest.fixture(scope="module")
def digits():
    settings, serving = _stack("digits", max_body_bytes=64 * 1024)
    with serving:
        yield settings, serving


@pytest.fixture(scope="module")
def charlm():
    settings, serving = _stack("charlm")
    with serving:
        yield settings, serving


def _onnx(settings) -> "ort.InferenceSession":
    path = RunDir(settings.run.root, settings.run.name).stage_dir("compress") / "fp32.onnx"
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _raw_digits(n: int) -> np.ndarray:
    from sklearn.datasets import load_digits

    return load_digits().images[:n].astype(np.float32)  # (n, 8, 8), pixels 0..16


@pytest.mark.parametrize("binary", [True, False])
def test_stock_tritonclient_works_unchanged_through_the_gateway(digits, binary):
    settings, serving = digits
    client = httpclient.InferenceServerClient(serving.gateway.url.removeprefix("http://"))
    direct = httpclient.InferenceServerClient(serving.triton_url.removeprefix("http://"))
    try:
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("digits-fp32")
        assert client.get_model_metadata("digits-fp32")["inputs"][0]["shape"] == [-1, 1, 8, 8]
        assert client.get_model_config("digits-fp32")["max_batch_size"] == 64
        x = (_raw_digits(5) / 16).reshape(5, 1, 8, 8)
        answers = []
        for c in (client, direct):
            tensor = httpclient.InferInput("image", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x, binary_data=binary)
            out = httpclient.InferRequestedOutput("logits", binary_data=binary)
            answers.append(c.infer("digits-fp32", [tensor], outputs=[out]).as_numpy("logits"))
        with pytest.raises(Exception, match="unknown model") as info:
            client.get_model_metadata("nope")
        assert type(info.value).__name__ == "InferenceServerException"
    finally:
        client.close()
        direct.close()
    np.testing.assert_array_equal(answers[0], answers[1])
    np.testing.assert_allclose(answers[0], _onnx(settings).run(None, {"image": x})[0], atol=1e-5)


def test_predict_equals_onnx_runtime_on_the_same_model_file(digits):
    settings, serving = digits
    images = _raw_digits(16)
    status, body = post(f"{serving.gateway.url}/v1/models/digits:predict", orjson.dumps({"images": images.tolist()}))
    assert status == 200, body
    logits = _onnx(settings).run(None, {"image": (images / 16).reshape(16, 1, 8, 8)})[0]
    expected = np.exp(logits - logits.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    predictions = json.loads(body)["predictions"]
    np.testing.assert_allclose([p["probabilities"] for p in predictions], expected, atol=1e-5)
    assert [p["class"] for p in predictions] == [str(k) for k in expected.argmax(1)]


@pytest.mark.parametrize(("path", "body", "headers", "status", "words"), [
    ("/v2/models/digits-fp32/infer", b'{"inputs": [', {}, 400, "not valid JSON"),
    ("/v2/models/digits-fp32/infer", orjson.dumps({"inputs": [{"name": "image", "shape": [1, 1, 8, 9],
                                                              "datatype": "FP32", "data": [0.0] * 72}]}),
     {}, 400, "does not match"),
    ("/v2/models/digits-fp32/infer", orjson.dumps({"inputs": [{"name": "image", "shape": [1, 1, 8, 8],
                                                              "datatype": "FP64", "data": [0.0] * 64}]}),
     {}, 400, "should be FP32"),
    ("/v2/models/digits-fp32/infer", None, None, 400, "NaN or infinity"),
    ("/v2/models/nope/infer", orjson.dumps({"inputs": []}), {}, 404, "unknown model"),
    ("/v1/models/digits:predict", b'{"images": [[' + b"[NaN, 1, 1, 1, 1, 1, 1, 1]," * 7 + b"[1,1,1,1,1,1,1,1]]]}",
     {}, 400, "not valid JSON"),
    ("/v1/models/digits:predict", orjson.dumps({"images": [[[None] * 8] * 8]}), {}, 422, "finite"),
    ("/v1/models/digits:predict", b'{"images": [' + b"[[1,2]]," * 20000 + b"]}", {}, 413, "limit"),
    ("/v1/models/nope:predict", orjson.dumps({"images": []}), {}, 404, "unknown model"),
])
def test_bad_inputs_are_4xx_naming_the_problem_and_triton_keeps_serving(digits, path, body, headers, status, words):
    _, serving = digits
    if body is None:  # a binary tensor holding NaN
        x = np.zeros((1, 1, 8, 8), np.float32)
        x[0, 0, 0, 0] = np.nan
        head = orjson.dumps({"inputs": [{"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32",
                                         "parameters": {"binary_data_size": 256}}]})
        body, headers = head + x.tobytes(), {"Inference-Header-Content-Length": str(len(head))}
    got, reply = post(serving.gateway.url + path, body, headers)
    assert got == status and words in json.loads(reply)["error"], reply
    ok, _ = post(f"{serving.gateway.url}/v1/models/digits:predict", orjson.dumps({"images": [[[0] * 8] * 8]}))
    assert ok == 200


def _triton_counts(serving) -> tuple[float, float]:
    text = get(serving.triton_metrics_url)[1].decode()
    values = {}
    for line in text.splitlines():
        for name in ("nv_inference_count{", "nv_inference_exec_count{"):
            if line.startswith(name) and 'model="digits-fp32"' in line:
                values[name] = float(line.rsplit(" ", 1)[1])
    return values["nv_inference_count{"], values["nv_inference_exec_count{"]


def test_concurrent_requests_share_dynamic_batches(digits):
    import aiohttp

    _, serving = digits
    body = orjson.dumps({"images": [[[4.0] * 8] * 8]})

    async def load(concurrency: int = 32, per_client: int = 25) -> list[int]:
        async with aiohttp.ClientSession(skip_auto_headers=["Accept-Encoding"]) as session:
            async def client():
                statuses = []
                for _ in range(per_client):
                    async with session.post(f"{serving.gateway.url}/v1/models/digits:predict", data=body) as r:
                        await r.read()
                        statuses.append(r.status)
                return statuses
            return [s for group in await asyncio.gather(*[client() for _ in range(concurrency)]) for s in group]

    rows0, execs0 = _triton_counts(serving)
    statuses = asyncio.run(load())
    rows1, execs1 = _triton_counts(serving)
    mean_batch = (rows1 - rows0) / (execs1 - execs0)
    print(f"\nmean batch over {len(statuses)} concurrent requests: {mean_batch:.2f}")
    assert set(statuses) == {200} and rows1 - rows0 == len(statuses)
    assert mean_batch > 1


def test_readiness_and_metrics(digits):
    _, serving = digits
    status, body = get(f"{serving.gateway.url}/readyz")
    assert status == 200 and json.loads(body)["models"] == {"digits-fp32": True}
    text = get(f"{serving.gateway.url}/metrics")[1].decode()
    assert 'autoglm_gateway_requests_total{route="/v1/models/{model}:predict",status="200"}' in text
    assert get(f"{serving.gateway.url}/docs")[0] == 200


def _lm_reference(settings, ids: np.ndarray) -> np.ndarray:
    return _onnx(settings).run(None, {"idx": ids})[0]


def test_score_equals_onnx_runtime_windows(charlm):
    settings, serving = charlm
    meta = serving.catalog.metadata
    stoi = {ch: i for i, ch in enumerate(meta["itos"])}
    text = "".join(ch for ch in "First Citizen:\nBefore we proceed any further, hear me speak. " * 2 if ch in stoi)
    status, body = post(f"{serving.gateway.url}/v1/models/charlm:score", orjson.dumps({"text": text}))
    assert status == 200, body
    ids = np.array([stoi[c] for c in text], np.int64)
    x, y, block, total = ids[:-1], ids[1:], meta["block_size"], 0.0
    for i in range(0, len(x), block):
        logits = _lm_reference(settings, x[None, i:i + block]).astype(np.float64)[0]
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        total -= logp[np.arange(len(logits)), y[i:i + block]].sum()
    result = json.loads(body)
    assert result["tokens"] == len(y) and math.isclose(result["loss"], total / len(y), rel_tol=1e-4)


def test_greedy_generation_equals_onnx_runtime_and_concurrent_generations_batch(charlm):
    settings, serving = charlm
    itos = serving.catalog.metadata["itos"]
    prompt = "".join(ch for ch in "ROMEO:\n" if ch in itos) or itos[1]
    request = orjson.dumps({"prompt": prompt, "max_new_tokens": 12, "temperature": 0})
    status, body = post(f"{serving.gateway.url}/v1/models/charlm:generate", request)
    assert status == 200, body
    ids = [itos.index(c) for c in prompt]
    for _ in range(12):
        logits = _lm_reference(settings, np.array([ids[-32:]], np.int64))
        ids.append(int(logits[0, -1].argmax()))
    assert json.loads(body)["text"] == "".join(itos[i] for i in ids[len(prompt):])
    streamed = orjson.dumps({"prompt": prompt, "max_new_tokens": 12, "temperature": 0, "stream": True})
    status, events = post(f"{serving.gateway.url}/v1/models/charlm:generate", streamed)
    last = json.loads(events.decode().strip().split("\n\n")[-1].removeprefix("data: "))
    assert status == 200 and last["text"] == json.loads(body)["text"]

    sampled = orjson.dumps({"prompt": prompt, "max_new_tokens": 20, "temperature": 1.0, "top_k": 5, "seed": 3})

    async def together(n: int = 8):
        import aiohttp

        async with aiohttp.ClientSession() as session:
            async def one():
                async with session.post(f"{serving.gateway.url}/v1/models/charlm:generate", data=sampled,
                                        headers={"content-type": "application/json"}) as r:
                    return r.status, await r.json()
            return await asyncio.gather(*[one() for _ in range(n)])

    results = asyncio.run(together())
    assert {s for s, _ in results} == {200} and len({r["text"] for _, r in results}) == 1  # same seed, same text
