"""``:predict`` for any task against a fake Triton: KServe v1 instances and TF-Serving columns converted with
the task's io spec, a two-input two-output model of a user's task, token ids, and every bad body a 4xx."""

import numpy as np
import orjson
import pytest

from serve.gateway.catalog import TaskCatalog
from serve.gateway.tensors import DTYPES, split_body
from serve.gateway.upstream import UpstreamResponse
from serve.gateway.worker import Gateway
from serve.settings import GatewaySettings
from tests.serve.asgi import gateway_client as client
from tests.serve.asgi import schema_and_route_agree
from tests.serve.fakes import CHARLM, FakeTriton, fake_gateway

pytestmark = pytest.mark.anyio
IMAGE = [[8.0] * 8 for _ in range(8)]
BRIGHT = [[16.0] * 8 for _ in range(8)]
# A user's task with two inputs and two outputs: total = sum(x) * scale, count = len(ids)
PAIR_IO = {"inputs": [{"name": "x", "dtype": "float32", "shape": [3]}, {"name": "ids", "dtype": "int64",
                                                                        "shape": [-1]}],
           "outputs": [{"name": "total", "dtype": "float32", "shape": [1]},
                       {"name": "count", "dtype": "int64", "shape": [1]}]}
PAIR = TaskCatalog("pair", {"fp32": "pair-fp32"}, "pair-fp32", {}, PAIR_IO)
PAIR_CONFIG = {"name": "pair-fp32", "max_batch_size": 4,
               "input": [{"name": "x", "data_type": "TYPE_FP32", "dims": [3]},
                         {"name": "ids", "data_type": "TYPE_INT64", "dims": [-1]}],
               "output": [{"name": "total", "data_type": "TYPE_FP32", "dims": [1]},
                          {"name": "count", "data_type": "TYPE_INT64", "dims": [1]}]}


class PairTriton(FakeTriton):
    """The fake Triton with the two-input model added."""

    async def request(self, method, target, body=b"", headers=(), timeout_s=30):
        if not target.startswith(b"/v2/models/pair-fp32/"):
            return await super().request(method, target, body, headers, timeout_s)
        self.requests.append((method, target, body, dict(headers)))
        if target.endswith(b"/config"):
            return UpstreamResponse(200, {}, orjson.dumps(PAIR_CONFIG))
        header, binary = split_body(body, dict(headers)[b"Inference-Header-Content-Length"])
        arrays, offset = {}, 0
        for item in header["inputs"]:
            size = item["parameters"]["binary_data_size"]
            arrays[item["name"]] = np.frombuffer(binary[offset:offset + size], DTYPES[item["datatype"]]).reshape(
                item["shape"])
            offset += size
        total = arrays["x"].sum(axis=1, keepdims=True).astype(np.float32)
        count = np.full((len(total), 1), arrays["ids"].shape[1], np.int64)
        head = orjson.dumps({"outputs": [
            {"name": name, "datatype": datatype, "shape": list(a.shape), "parameters": {"binary_data_size": a.nbytes}}
            for name, datatype, a in (("total", "FP32", total), ("count", "INT64", count))]})
        return UpstreamResponse(200, {b"inference-header-content-length": str(len(head)).encode()},
                                head + total.tobytes() + count.tobytes())


def pair_gateway() -> tuple[Gateway, PairTriton]:
    triton = PairTriton()
    return Gateway(GatewaySettings(), pool=triton, catalog=PAIR), triton


def sent_tensors(triton) -> dict:
    """The tensors the gateway last sent to Triton, by name: (datatype, shape)."""
    _, _, body, headers = triton.requests[-1]
    header, _ = split_body(body, headers[b"Inference-Header-Content-Length"])
    return {t["name"]: (t["datatype"], t["shape"]) for t in header["inputs"]}


async def test_instances_of_a_multi_input_model_answer_an_object_of_outputs_per_instance():
    gw, triton = pair_gateway()
    async with client(gw) as c:
        rows = await c.post("/v1/models/pair:predict", json={"instances": [{"x": [1, 2, 3.5], "ids": [4, 5]},
                                                                         {"x": [0, 0, 1], "ids": [7, 8]}]})
        sent = sent_tensors(triton)
        columns = await c.post("/v1/models/pair-fp32:predict", json={"inputs": {"x": [[1, 2, 3.5], [0, 0, 1]],
                                                                               "ids": [[4, 5], [7, 8]]}})
    assert rows.status == 200, rows.body
    assert rows.json() == {"model": "pair-fp32", "predictions": [{"total": [6.5], "count": [2]},
                                                                  {"total": [1.0], "count": [2]}]}
    assert sent == {"x": ("FP32", [2, 3]), "ids": ("INT64", [2, 2])}  # the io spec's dtypes, one batch
    assert columns.status == 200 and columns.json() == {"model": "pair-fp32",
                                                        "outputs": {"total": [[6.5], [1.0]], "count": [[2], [2]]}}


async def test_instances_of_a_one_output_model_answer_the_bare_output_and_match_the_friendly_body():
    gw, triton = fake_gateway()
    scaled = [np.array(image) / 16 for image in (IMAGE, BRIGHT)]  # the model takes pixels / pixel_max
    async with client(gw) as c:
        friendly = await c.post("/v1/models/digits:predict", json={"images": [IMAGE, BRIGHT]})
        plain = await c.post("/v1/models/digits:predict", json={"instances": [s.tolist() for s in scaled]})
        sent = sent_tensors(triton)
        channel = await c.post("/v1/models/digits:predict", json={"instances": [[s.tolist()] for s in scaled]})
        columns = await c.post("/v1/models/digits:predict", json={"inputs": [s.tolist() for s in scaled]})
    logits = np.array(plain.json()["predictions"])
    assert plain.status == channel.status == columns.status == 200, plain.body
    assert logits.shape == (2, 10) and sent == {"image": ("FP32", [2, 1, 8, 8])}  # the channel axis is restored
    assert channel.json() == plain.json() and columns.json()["outputs"] == plain.json()["predictions"]
    probabilities = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    answer = friendly.json()["predictions"]
    np.testing.assert_allclose([p["probabilities"] for p in answer], probabilities, rtol=1e-5)
    assert [p["class"] for p in answer] == [str(k) for k in logits.argmax(1)]


async def test_language_models_take_rows_of_token_ids_and_answer_their_logits():
    gw, triton = fake_gateway(CHARLM)
    async with client(gw) as c:
        reply = await c.post("/v1/models/charlm:predict", json={"instances": [[0, 1, 2], [3, 3, 0]]})
        too_long = await c.post("/v1/models/charlm:predict", json={"instances": [[0] * 5]})
        unknown = await c.post("/v1/models/charlm:predict", json={"instances": [[0, 4]]})
        ragged = await c.post("/v1/models/charlm:predict", json={"instances": [[0, 1], [0, 1, 2]]})
        generation_model = await c.post("/v1/models/charlm-generate:predict", json={"instances": [[0]]})
    logits = np.array(reply.json()["predictions"])
    assert reply.status == 200 and logits.shape == (2, 3, 4)
    assert logits[0].argmax(-1).tolist() == [1, 2, 3]  # the fake's next token is (id + 1) % 4
    assert too_long.status == 422 and "at most 4" in too_long.error
    assert unknown.status == 422 and "0..3" in unknown.error
    assert ragged.status == 422 and "instance 0 has shape [2] but instance 1 [3]" in ragged.error
    assert generation_model.status == 404
    assert sum(t.endswith(b"/infer") for _, t, _, _ in triton.requests) == 1


@pytest.mark.parametrize(("payload", "status", "words"), [
    (b'{"instances": [[1, 2, NaN]]', 400, "not valid JSON"),
    (b'{"instances": [{"x": [1, 2, NaN], "ids": [1]}]}', 400, "NaN or an infinite number"),
    (b'{"instances": [{"x": [1, 2, 1e999], "ids": [1]}]}', 400, "NaN or an infinite number"),
    ({"instances": [{"x": [1, 2, 1e300], "ids": [1]}]}, 422, "outside FP32's finite range"),
    ({"instances": []}, 422, "'instances' must be a non-empty list"),
    ({"instances": 5}, 422, "'instances' must be a non-empty list"),
    ({"inputs": {}}, 422, "'inputs' must be a non-empty object"),
    ({"instances": [{"x": [1, 2, 3], "ids": [1]}], "inputs": {"x": [[1, 2, 3]]}}, 422, "the request body must"),
    ({"instance": [[1, 2, 3]]}, 422, "the request body must be {\"instances\""),
    ({"images": [IMAGE]}, 422, "classification tasks"),
    ({"instances": [[1, 2, 3]]}, 422, "instance 0: the model takes several inputs"),
    ({"instances": [{"x": [1, 2, 3]}]}, 422, "instance 0: has inputs ['x'], the model takes ['x', 'ids']"),
    ({"instances": [{"x": [1, 2, 3], "ids": [1]}, {"x": [1, 2], "ids": [1]}]}, 422,
     "instance 1 (input 'x'): expected shape [3] of FP32 (input 'x'), got shape [2]"),
    ({"instances": [{"x": [[1, 2], [3]], "ids": [1]}]}, 422, "got a ragged nested list"),
    ({"instances": [{"x": [1, 2, 3], "ids": []}]}, 422, "expected shape [*] of INT64 (input 'ids'), got shape [0]"),
    ({"instances": [{"x": [1, None, 3], "ids": [1]}]}, 422, "not numbers"),
    ({"instances": [{"x": [1, "2", 3], "ids": [1]}]}, 422, "expected numbers for [3] of FP32 (input 'x'), got strings"),
    ({"instances": [{"x": [1, True, 3], "ids": [1]}]}, 422, "got true/false"),
    ({"instances": [{"x": [1, 2, 3], "ids": [True]}]}, 422, "got true/false"),
    ({"instances": [{"x": [1, 2, 3], "ids": [1.5]}]}, 422, "expected integers for [*] of INT64"),
    ({"instances": [{"x": [1, 2, 3], "ids": [2 ** 63]}]}, 422, "INT64's range"),
    ({"instances": [{"x": [1, 2, 3], "ids": [1]}] * 5}, 413, "at most 4"),
    ({"inputs": {"x": [[1, 2, 3]], "ids": [[1], [2]]}}, 422, "the same number of rows"),
    ({"inputs": {"x": [[1, 2, 3]], "y": [[1]]}}, 422, "\"inputs\" names ['x', 'y']"),
    ({"inputs": [[1, 2, 3]]}, 422, "send \"inputs\" as an object"),
    ({"inputs": {"x": 5, "ids": [[1]]}}, 422, "'inputs' must be a non-empty object"),
])
async def test_bad_instances_are_4xx_naming_the_expected_spec(payload, status, words):
    gw, triton = pair_gateway()
    body = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    async with client(gw) as c:
        reply = await c.post("/v1/models/pair:predict", body=body)
    assert reply.status == status and words in reply.error, reply.body
    assert not any(t.endswith(b"/infer") for _, t, _, _ in triton.requests)


@pytest.mark.parametrize(("body", "accepted"), [
    ({"instances": [{"x": [1, 2, 3], "ids": [1, 2]}]}, True),
    ({"inputs": {"x": [[1, 2, 3]], "ids": [[1, 2]]}}, True),
    ({"instances": []}, False),
    ({"instances": [{"x": [1, 2, 3], "ids": [1]}], "inputs": {"x": [[1, 2, 3]], "ids": [[1]]}}, False),
    ({"inputs": []}, False),
    ({"instances": None}, False),
    ({}, False),
])
async def test_instances_bodies_are_what_the_openapi_schema_describes(body, accepted):
    gw, _ = pair_gateway()
    assert await schema_and_route_agree(gw, "/v1/models/pair:predict", body) == (accepted, accepted)
