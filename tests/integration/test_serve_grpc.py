"""KServe v2 over gRPC on a real Triton: stock tritonclient.grpc (sync, aio, streaming on the decoupled
generation model) through the gateway answers as Triton itself does, with keys, bounds and metrics."""

import asyncio
import contextlib
import hashlib
import queue

import numpy as np
import pytest

from serve import GatewaySettings, start_serving
from serve.gateway.grpc_proxy import SERVICE, grpc_service
from serve.gateway.worker import Gateway
from serve.triton import free_port
from tests.serve.fixtures import get, on_free_ports, published_run, require_triton

pytestmark = pytest.mark.integration
grpcclient = pytest.importorskip("tritonclient.grpc")
aioclient = pytest.importorskip("tritonclient.grpc.aio")
from tritonclient.utils import InferenceServerException  # noqa: E402

KEY = "agk_integration"


@pytest.fixture
def anyio_backend():
    return "asyncio"


def _stack(kind: str):
    require_triton()
    settings = on_free_ports(published_run(kind))
    gateway = GatewaySettings(port=settings.serve.gateway_port, grpc_port=settings.serve.gateway.grpc_port)
    return start_serving(settings, gateway)


@pytest.fixture(scope="module")
def digits():
    with _stack("digits") as serving:
        yield serving


@pytest.fixture(scope="module")
def charlm():
    with _stack("charlm") as serving:
        yield serving


def _images(n: int) -> np.ndarray:
    from sklearn.datasets import load_digits

    return load_digits().images[:n].astype(np.float32).reshape(n, 1, 8, 8)


def _inputs(module, name: str, x: np.ndarray, datatype: str = "FP32"):
    tensor = module.InferInput(name, list(x.shape), datatype)
    tensor.set_data_from_numpy(x)
    return [tensor]


def test_tritonclient_grpc_works_unchanged_through_the_gateway(digits):
    client = grpcclient.InferenceServerClient(digits.gateway.grpc_url)
    direct = grpcclient.InferenceServerClient(digits.triton.grpc_url)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("digits-fp32")
    assert client.get_server_metadata() == direct.get_server_metadata()
    meta = client.get_model_metadata("digits-fp32", as_json=True)
    assert meta == direct.get_model_metadata("digits-fp32", as_json=True)
    assert client.get_model_config("digits-fp32") == direct.get_model_config("digits-fp32")
    x, name, out = _images(5), meta["inputs"][0]["name"], meta["outputs"][0]["name"]
    got = client.infer("digits-fp32", _inputs(grpcclient, name, x)).as_numpy(out)
    np.testing.assert_allclose(got, direct.infer("digits-fp32", _inputs(grpcclient, name, x)).as_numpy(out))
    assert client.get_inference_statistics("digits-fp32").model_stats[0].name == "digits-fp32"
    errors = []
    for c in (client, direct):
        with pytest.raises(InferenceServerException) as raised:
            c.get_model_metadata("no-such-model")
        errors.append((raised.value.status(), raised.value.message()))
    assert errors[0] == errors[1] and "unknown model" in errors[0][1]  # Triton's own text, unchanged
    _, metrics = get(f"{digits.gateway.url}/metrics")
    assert f'route="grpc:/{SERVICE}/ModelInfer",status="OK"'.encode() in metrics
    assert f'route="grpc:/{SERVICE}/ModelMetadata",status="NOT_FOUND"'.encode() in metrics


@pytest.mark.anyio
async def test_tritonclient_grpc_aio_infers_concurrently(digits):
    meta = grpcclient.InferenceServerClient(digits.triton.grpc_url).get_model_metadata("digits-fp32", as_json=True)
    name, out = meta["inputs"][0]["name"], meta["outputs"][0]["name"]
    x = _images(16)
    async with aioclient.InferenceServerClient(digits.gateway.grpc_url) as client, \
            aioclient.InferenceServerClient(digits.triton.grpc_url) as direct:
        results = await asyncio.gather(*(client.infer("digits-fp32", _inputs(aioclient, name, x[i:i + 1]))
                                         for i in range(16)))
        want = (await direct.infer("digits-fp32", _inputs(aioclient, name, x))).as_numpy(out)
    np.testing.assert_allclose(np.concatenate([r.as_numpy(out) for r in results]), want, rtol=1e-5, atol=1e-5)


def _generate_inputs(module, ids: list[int], max_new: int):
    return [*_inputs(module, "input_ids", np.array(ids, np.int64), "INT64"),
            *_inputs(module, "max_new_tokens", np.array([max_new], np.int32), "INT32"),
            *_inputs(module, "temperature", np.array([0.0], np.float32), "FP32")]


def _stream_tokens(url: str, ids: list[int], max_new: int) -> list[int]:
    """start_stream / async_stream_infer, as Triton's own streaming example does, until the final response."""
    replies: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: replies.put((result, error)))
    try:
        client.async_stream_infer("charlm-generate", _generate_inputs(grpcclient, ids, max_new),
                                  enable_empty_final_response=True)
        tokens = []
        while True:
            result, error = replies.get(timeout=30)
            assert error is None, error
            ids = result.as_numpy("token_ids")  # one or more tokens per response; the final one has some too
            tokens += [] if ids is None else ids.tolist()
            if result.get_response().parameters["triton_final_response"].bool_param:
                return tokens
    finally:
        client.stop_stream()


def test_streaming_generation_through_the_gateway_equals_triton_direct(charlm):
    itos = charlm.catalog.metadata["itos"]
    ids = [itos.index(c) for c in "the " if c in itos]
    via_gateway = _stream_tokens(charlm.gateway.grpc_url, ids, 12)
    assert via_gateway == _stream_tokens(charlm.triton.grpc_url, ids, 12) and len(via_gateway) == 12


def _gateway_on(serving, **settings) -> Gateway:
    """An in-process gateway worker in front of the stack's Triton, with its own limits."""
    return Gateway(GatewaySettings(grpc_port=free_port(), triton_url=serving.triton_url,
                                   triton_grpc_url=serving.triton.grpc_url, **settings))


@pytest.mark.anyio
async def test_a_keyed_gateway_refuses_calls_without_its_key(digits):
    gw = _gateway_on(digits, api_keys=[{"name": "ci", "sha256": hashlib.sha256(KEY.encode()).hexdigest()}])
    x = _images(1)
    async with grpc_service(gw), aioclient.InferenceServerClient(f"127.0.0.1:{gw.settings.grpc_port}") as client:
        with pytest.raises(InferenceServerException) as raised:
            await client.infer("digits-fp32", _inputs(aioclient, "image", x))
        ok = await client.infer("digits-fp32", _inputs(aioclient, "image", x), headers={"authorization": f"Bearer {KEY}"})
    await gw.aclose()
    assert raised.value.status() == "StatusCode.UNAUTHENTICATED" and "API key" in raised.value.message()
    assert ok.as_numpy("logits").shape == (1, 10)


@pytest.mark.anyio
async def test_an_open_stream_holds_its_slot_and_overload_is_unavailable(charlm):
    gw = _gateway_on(charlm, max_in_flight=1)
    started = asyncio.Event()

    async def requests():
        yield {"model_name": "charlm-generate", "inputs": _generate_inputs(aioclient, [1, 2, 3], 200)}
        await asyncio.sleep(30)  # keep the stream open, as a client waiting to send more would

    async with grpc_service(gw), aioclient.InferenceServerClient(f"127.0.0.1:{gw.settings.grpc_port}") as client:
        async def consume():
            async for _ in client.stream_infer(requests()):
                started.set()

        stream = asyncio.create_task(consume())
        await asyncio.wait_for(started.wait(), 30)
        with pytest.raises(InferenceServerException) as raised:
            await client.is_model_ready("charlm-generate")  # metadata: keyed, not bounded
            await client.infer("charlm-generate", _generate_inputs(aioclient, [1], 1))
        stream.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await stream
    await gw.aclose()
    assert raised.value.status() == "StatusCode.UNAVAILABLE" and "limit of 1 requests" in raised.value.message()
    assert gw.metrics.shed["in_flight"] == 1 and gw.guard.in_flight == 0
