"""KServe v2 over HTTP as Triton speaks it, checked with stock tritonclient.http (sync and aio) against
the gateway and against the same Triton directly, side by side: compression both ways, Triton's own
error text, inference statistics, and the extensions the gateway refuses."""

import asyncio
import gzip
import json

import numpy as np
import pytest

from serve import GatewaySettings, start_serving
from tests.serve.fixtures import on_free_ports, post, published_run, require_triton, zip_bomb

pytestmark = [pytest.mark.integration,
              pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export")]
httpclient = pytest.importorskip("tritonclient.http")
aioclient = pytest.importorskip("tritonclient.http.aio")
from tritonclient.utils import InferenceServerException  # noqa: E402

LIMIT = 256 * 1024
X = (np.arange(5 * 64, dtype=np.float32).reshape(5, 1, 8, 8) % 17) / 16
CODINGS = [None, "gzip", "deflate"]


@pytest.fixture(scope="module")
def stack():
    require_triton()
    settings = on_free_ports(published_run("digits"))
    with start_serving(settings, GatewaySettings(port=settings.serve.gateway_port, max_body_bytes=LIMIT)) as serving:
        yield serving.gateway.url.removeprefix("http://"), serving.triton_url.removeprefix("http://")


def _inputs(binary: bool):
    tensor = httpclient.InferInput("image", list(X.shape), "FP32")
    tensor.set_data_from_numpy(X, binary_data=binary)
    return [tensor], [httpclient.InferRequestedOutput("logits", binary_data=binary)]


def _error(call) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        call()
    return info.value


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("request_coding", CODINGS)
def test_sync_client_compresses_both_ways_as_against_triton(stack, binary, request_coding):
    answers = []
    for url in stack:  # the gateway, then Triton directly
        client = httpclient.InferenceServerClient(url)
        try:
            for response_coding in CODINGS:
                inputs, outputs = _inputs(binary)
                result = client.infer("digits-fp32", inputs, outputs=outputs,
                                      request_compression_algorithm=request_coding,
                                      response_compression_algorithm=response_coding)
                answers.append(result.as_numpy("logits"))
        finally:
            client.close()
    assert len(answers) == 6 and answers[0].shape == (5, 10)
    for answer in answers[1:]:
        np.testing.assert_array_equal(answer, answers[0])


def test_aio_client_compresses_both_ways_and_sees_tritons_errors(stack):
    async def run(url):
        client = aioclient.InferenceServerClient(url)
        try:
            results = []
            for request_coding, response_coding in [("gzip", "deflate"), ("deflate", "gzip"), (None, "gzip")]:
                inputs, outputs = _inputs(True)
                result = await client.infer("digits-fp32", inputs, outputs=outputs,
                                            request_compression_algorithm=request_coding,
                                            response_compression_algorithm=response_coding)
                results.append(result.as_numpy("logits"))
            with pytest.raises(InferenceServerException) as info:
                await client.infer("nope", _inputs(True)[0])
            stats = await client.get_inference_statistics("digits-fp32")
            return results, info.value.message(), stats
        finally:
            await client.close()

    (gateway, gateway_error, gateway_stats), (direct, direct_error, _) = [asyncio.run(run(url)) for url in stack]
    for answer in gateway[1:] + direct:
        np.testing.assert_array_equal(answer, gateway[0])
    assert gateway_error == direct_error == "Request for unknown model: 'nope' is not found"
    assert gateway_stats["model_stats"][0]["name"] == "digits-fp32"


def test_unknown_models_raise_tritons_own_text(stack):
    messages = []
    for url in stack:
        client = httpclient.InferenceServerClient(url)
        try:
            calls = [lambda c=client: c.get_model_metadata("nope"), lambda c=client: c.get_model_config("nope"),
                     lambda c=client: c.infer("nope", _inputs(True)[0]),
                     lambda c=client: c.infer("digits-fp32", _inputs(True)[0], model_version="7"),
                     lambda c=client: c.get_model_metadata("digits-fp32", model_version="7"),
                     lambda c=client: c.get_inference_statistics("nope")]
            messages.append([(e.message(), e.status()) for e in map(_error, calls)])
            assert not client.is_model_ready("nope")
        finally:
            client.close()
    gateway, direct = messages
    assert gateway == direct, (gateway, direct)
    assert gateway[0] == ("Request for unknown model: 'nope' is not found", "404")


def test_inference_statistics_match_tritons_and_count_gateway_requests(stack):
    gateway, direct = (httpclient.InferenceServerClient(url) for url in stack)
    try:
        before = gateway.get_inference_statistics("digits-fp32")["model_stats"][0]["inference_count"]
        inputs, outputs = _inputs(True)
        gateway.infer("digits-fp32", inputs, outputs=outputs)
        every = gateway.get_inference_statistics()
        one = gateway.get_inference_statistics("digits-fp32")
        version = gateway.get_inference_statistics("digits-fp32", "1")
        mirror = direct.get_inference_statistics("digits-fp32")
    finally:
        gateway.close()
        direct.close()
    assert one["model_stats"][0]["inference_count"] == before + 5  # the 5 rows just sent
    assert [s["name"] for s in every["model_stats"]] == ["digits-fp32"]
    assert version["model_stats"][0]["version"] == "1"
    assert one["model_stats"][0].keys() == mirror["model_stats"][0].keys()


def test_shared_memory_and_repository_control_raise_saying_why(stack):
    client = httpclient.InferenceServerClient(stack[0])
    try:
        shm = [_error(call) for call in (
            client.get_system_shared_memory_status, client.get_cuda_shared_memory_status,
            lambda: client.register_system_shared_memory("r", "/r", 64),
            lambda: client.register_cuda_shared_memory("r", b"raw", 0, 64),
            client.unregister_system_shared_memory, client.unregister_cuda_shared_memory)]
        repository = [_error(call) for call in (
            client.get_model_repository_index, lambda: client.load_model("digits-fp32"),
            lambda: client.unload_model("digits-fp32"))]
        assert client.is_model_ready("digits-fp32")  # nothing was unloaded
    finally:
        client.close()
    assert all(e.status() == "400" and "cannot share" in e.message() and "binary_data=True" in e.message()
               for e in shm), [e.message() for e in shm]
    assert all(e.status() == "403" and "operator-only" in e.message() for e in repository)


def test_zip_bombs_are_413_and_bad_gzip_is_400_while_triton_keeps_serving(stack):
    gateway = f"http://{stack[0]}/v2/models/digits-fp32/infer"
    bomb = zip_bomb(256)
    assert len(bomb) < LIMIT  # small as sent: only its inflated size is over the limit
    status, body = post(gateway, bomb, {"Content-Encoding": "gzip"})
    assert status == 413 and "decompressed" in json.loads(body)["error"]
    status, body = post(gateway, b"\x1f\x8b\x08not really gzip", {"Content-Encoding": "gzip"})
    assert status == 400 and "not valid gzip" in json.loads(body)["error"]
    status, body = post(gateway, gzip.compress(b"{}"), {"Content-Encoding": "br"})
    assert status == 415 and "gzip or deflate" in json.loads(body)["error"]
    inputs, outputs = _inputs(True)
    client = httpclient.InferenceServerClient(stack[0])
    try:
        assert client.infer("digits-fp32", inputs, outputs=outputs).as_numpy("logits").shape == (5, 10)
    finally:
        client.close()


def test_replies_are_compressed_exactly_when_asked_as_triton_does(stack):
    import urllib.request

    from autoglm.local_http import DIRECT

    body = json.dumps({"inputs": [{"name": "image", "shape": [5, 1, 8, 8], "datatype": "FP32",
                                   "data": X.ravel().tolist()}]}).encode()
    replies = {}
    for where, url in zip(("gateway", "triton"), stack, strict=True):
        for accept in ("gzip", "deflate, gzip;q=0.5", None):
            headers = {"Content-Type": "application/json", **({"Accept-Encoding": accept} if accept else {})}
            request = urllib.request.Request(f"http://{url}/v2/models/digits-fp32/infer", data=body, headers=headers)
            with DIRECT.open(request, timeout=10) as reply:
                replies[where, accept] = reply.headers.get("Content-Encoding"), reply.read()
    for accept, coding in (("gzip", "gzip"), ("deflate, gzip;q=0.5", "deflate"), (None, None)):
        assert replies["gateway", accept] == replies["triton", accept]  # same coding, same bytes
        assert replies["gateway", accept][0] == coding
