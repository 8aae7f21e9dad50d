"""The gateway app against a fake Triton (swapped in with dependency_overrides): task endpoints, the v2
passthrough's validation and error mapping, and the OpenAPI document."""

import math
import subprocess
import sys

import numpy as np
import orjson
import pytest

from tests.serve.asgi import gateway_client as client
from tests.serve.asgi import schema_and_route_agree
from tests.serve.fakes import CHARLM, fake_gateway

pytestmark = pytest.mark.anyio
IMAGE = [[8.0] * 8 for _ in range(8)]
BRIGHT = [[16.0] * 8 for _ in range(8)]


def v2_json(x: np.ndarray, name="image", datatype="FP32") -> dict:
    return {"inputs": [{"name": name, "shape": list(x.shape), "datatype": datatype, "data": x.ravel().tolist()}]}


def v2_binary(x: np.ndarray, name="image", datatype="FP32", size=None) -> tuple[bytes, dict]:
    head = orjson.dumps({"inputs": [{"name": name, "shape": list(x.shape), "datatype": datatype,
                                     "parameters": {"binary_data_size": x.nbytes if size is None else size}}],
                         "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]})
    return head + x.tobytes(), {"inference-header-content-length": len(head)}


async def test_predict_answers_class_and_probabilities_per_image():
    gw, triton = fake_gateway()
    async with client(gw) as c:
        reply = await c.post("/v1/models/digits:predict", json={"images": [IMAGE, BRIGHT]})
    assert reply.status == 200, reply.body
    body = reply.json()
    assert body["model"] == "digits-fp32" and [p["class"] for p in body["predictions"]] == ["9", "9"]
    assert all(math.isclose(sum(p["probabilities"]), 1, rel_tol=1e-5) for p in body["predictions"])
    _, target, _, headers = triton.requests[-1]
    assert target == b"/v2/models/digits-fp32/infer" and b"Inference-Header-Content-Length" in headers  # binary


@pytest.mark.parametrize(("name", "payload", "status", "words"), [
    ("digits", b"{not json", 400, "not valid JSON"),
    ("digits", b'{"images": [[[NaN]]]}', 400, "not valid JSON"),
    ("digits", b'{"images": [[[1e999]]]}', 400, "not valid JSON"),
    ("digits", {"pictures": [IMAGE]}, 422, "images"),
    ("digits", {"images": []}, 422, "non-empty"),
    ("digits", {"images": [[[1.0] * 7] * 8]}, 422, "8x8"),
    ("digits", {"images": [[["x"] * 8] * 8]}, 422, "numbers"),
    ("digits", {"images": [[[17.0] * 8] * 8]}, 422, "0..16"),
    ("digits", {"images": [IMAGE] * 9}, 413, "at most 8"),
    ("nope", {"images": [IMAGE]}, 404, "unknown model 'nope'"),
])
async def test_predict_refuses_bad_input_with_a_4xx_naming_it(name, payload, status, words):
    gw, triton = fake_gateway()
    body = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    async with client(gw) as c:
        reply = await c.post(f"/v1/models/{name}:predict", body=body)
    assert reply.status == status and words in reply.error
    assert not any(t.endswith(b"/infer") for _, t, _, _ in triton.requests)


@pytest.mark.parametrize(("body", "accepted"), [
    ({"images": [IMAGE, BRIGHT]}, True),
    ({"images": [[IMAGE]]}, True),  # with the model's channel axis, 1x8x8
    ({"images": [IMAGE], "colour": "red"}, False),
    ({"images": [IMAGE[0]]}, False),  # one row is not an image
    ({"images": IMAGE}, False),
    ({"images": [[[None] * 8] * 8]}, False),
    ([IMAGE], False),
])
async def test_predict_takes_exactly_the_bodies_its_openapi_schema_describes(body, accepted):
    gw, _ = fake_gateway()
    assert await schema_and_route_agree(gw, "/v1/models/digits:predict", body) == (accepted, accepted)


async def test_language_models_take_instances_of_token_ids_not_images():
    gw, _ = fake_gateway(CHARLM)
    async with client(gw) as c:
        reply = await c.post("/v1/models/charlm:predict", json={"images": [IMAGE]})
    assert reply.status == 422 and "classification tasks" in reply.error and '"instances"' in reply.error


async def test_v2_infer_forwards_json_and_binary_bodies_unchanged():
    gw, triton = fake_gateway()
    x = np.full((2, 1, 8, 8), 0.5, np.float32)
    async with client(gw) as c:
        as_json = await c.post("/v2/models/digits-fp32/infer", json=v2_json(x))
        forwarded_json = triton.requests[-1][2]
        body, headers = v2_binary(x)
        as_binary = await c.post("/v2/models/digits-fp32/versions/1/infer", body=body, headers=headers)
    assert as_json.status == 200 and as_json.json()["outputs"][0]["shape"] == [2, 10]
    assert forwarded_json == orjson.dumps(v2_json(x))
    assert as_binary.status == 200 and "inference-header-content-length" in as_binary.headers
    method, target, sent, sent_headers = triton.requests[-1]
    assert target == b"/v2/models/digits-fp32/versions/1/infer" and sent == body
    assert b"Accept-Encoding" not in sent_headers and sent_headers[b"Inference-Header-Content-Length"]


@pytest.mark.parametrize(("payload", "words"), [
    (v2_json(np.zeros((1, 1, 8, 9), np.float32)), "does not match"),
    (v2_json(np.zeros((1, 64), np.float32)), "does not match"),
    (v2_json(np.zeros((9, 1, 8, 8), np.float32)), "between 1 and 8"),
    (v2_json(np.zeros((1, 1, 8, 8), np.float32), datatype="FP64"), "should be FP32"),
    (v2_json(np.zeros((1, 1, 8, 8), np.float32), name="pixels"), "unknown input 'pixels'"),
    ({"inputs": [{"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [1.0] * 63}]}, "holds 63"),
    ({"inputs": [{"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": ["a"] * 64}]}, "str"),
    ({"inputs": []}, "non-empty"),
    ({"inputs": [{"name": "image", "shape": "1x64", "datatype": "FP32", "data": []}]}, "shape must be a list"),
    ({**v2_json(np.zeros((1, 1, 8, 8), np.float32)), "outputs": [{"name": "probs"}]}, "unknown output"),
    ({**v2_json(np.zeros((1, 1, 8, 8), np.float32)), "outputs": 5}, "'outputs' must be a list"),
    ({**v2_json(np.zeros((1, 1, 8, 8), np.float32)), "id": 5}, "'id' must be a string"),
    ({**v2_json(np.zeros((1, 1, 8, 8), np.float32)), "parameters": 5}, "'parameters' must be an object"),
    ({"inputs": [{"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [1e308] * 64}]},
     "outside FP32's finite range"),
])
async def test_v2_infer_validates_before_forwarding(payload, words):
    gw, triton = fake_gateway()
    async with client(gw) as c:
        reply = await c.post("/v2/models/digits-fp32/infer", json=payload)
    assert reply.status == 400 and words in reply.error, reply.body
    assert not any(t.endswith(b"/infer") for _, t, _, _ in triton.requests)


async def test_v2_binary_body_is_checked_for_size_and_non_finite_values():
    gw, _ = fake_gateway()
    x = np.zeros((1, 1, 8, 8), np.float32)
    x[0, 0, 3, 3] = np.nan
    async with client(gw) as c:
        body, headers = v2_binary(x)
        nan = await c.post("/v2/models/digits-fp32/infer", body=body, headers=headers)
        short = v2_binary(np.zeros((1, 1, 8, 8), np.float32), size=100)
        wrong_size = await c.post("/v2/models/digits-fp32/infer", body=short[0], headers=short[1])
        truncated = await c.post("/v2/models/digits-fp32/infer", body=body[:-4], headers=headers)
        bad_json = await c.post("/v2/models/digits-fp32/infer", body=b'{"inputs": [NaN]}')
        as_float = v2_binary(np.zeros((1, 1, 8, 8), np.float32), size=256.0)  # 256 bytes, but a float
        float_size = await c.post("/v2/models/digits-fp32/infer", body=as_float[0], headers=as_float[1])
    assert float_size.status == 400 and "whole number of bytes (got 256.0)" in float_size.error
    assert nan.status == 400 and "NaN or infinity" in nan.error
    assert wrong_size.status == 400 and "binary_data_size 100" in wrong_size.error
    assert truncated.status == 400 and "binary bytes" in truncated.error
    assert bad_json.status == 400 and "not valid JSON" in bad_json.error


@pytest.mark.parametrize(("setup", "v2", "predicted", "words"), [
    (lambda t: setattr(t, "down", True), 503, 503, "unavailable"),  # the gateway's own: Triton is not there
    (lambda t: setattr(t, "fail_status", 500), 500, 502, "backend exploded"),
    (lambda t: setattr(t, "fail_status", 503), 503, 503, "backend exploded"),
    (lambda t: setattr(t, "fail_status", 400), 400, 400, "backend exploded"),
])
async def test_v2_relays_triton_answers_unchanged_and_task_routes_map_them(setup, v2, predicted, words):
    gw, triton = fake_gateway()
    gw.signatures["digits-fp32"] = await gw.signature("digits-fp32")
    setup(triton)
    async with client(gw) as c:
        reply = await c.post("/v2/models/digits-fp32/infer", json=v2_json(np.zeros((1, 1, 8, 8), np.float32)))
        task = await c.post("/v1/models/digits:predict", json={"images": [IMAGE]})
    assert (reply.status, task.status) == (v2, predicted) and words in reply.error and words in task.error
    if triton.fail_status:  # Triton's own answer, byte for byte
        assert reply.body == b'{"error":"backend exploded"}'
    if predicted == 503:
        assert task.headers["retry-after"] == "1"
    assert bool(gw.metrics.triton_errors) == (v2 != 400)  # a refused request is not a Triton failure


def _reply(outputs, header_length=None, tail=b""):
    head = orjson.dumps({"model_name": "digits-fp32", "outputs": outputs})
    return {b"inference-header-content-length": str(header_length or len(head)).encode()}, head + tail


LOGITS = {"name": "logits", "datatype": "FP32", "shape": [1, 10]}


@pytest.mark.parametrize("reply", [
    _reply([LOGITS | {"parameters": {"binary_data_size": 40}}], tail=bytes(8)),  # 40 bytes declared, 8 sent
    _reply([LOGITS | {"parameters": {"binary_data_size": 8}}], tail=bytes(8)),  # 8 bytes for 10 floats
    _reply([LOGITS | {"parameters": {"binary_data_size": 40}}], header_length=10**6, tail=bytes(40)),
    ({}, b'{"outputs": [{"name": "logits"'),  # cut inside the JSON
    _reply([LOGITS | {"data": [1.0, 2.0]}]),  # 2 values for shape [1, 10]
    _reply([{"name": "logits", "datatype": "BYTES", "shape": [1]} | {"data": ["x"]}]),
])
async def test_a_reply_from_triton_that_cannot_be_read_is_a_502_never_a_500(reply):
    gw, triton = fake_gateway()
    triton.infer_raw = reply
    async with client(gw) as c:
        predicted = await c.post("/v1/models/digits:predict", json={"images": [IMAGE]})
    assert predicted.status == 502 and "Triton's reply could not be read" in predicted.error
    assert gw.metrics.triton_errors["bad_response"] == 1


async def test_readiness_asks_triton_once_however_many_probes_ask_at_once():
    import asyncio

    gw, triton = fake_gateway()
    async with client(gw) as c:
        replies = await asyncio.gather(*(c.get("/readyz") for _ in range(50)))
        asked = [target for _, target, _, _ in triton.requests]
        triton.down = True
        cached = await c.get("/readyz")  # within the TTL: the shared answer
        gw.ready_ttl_s = 0.0
        fresh = await c.get("/readyz")
    assert [r.status for r in replies] == [200] * 50
    assert sorted(asked) == [b"/v2/health/ready", b"/v2/models/digits-fp32/ready"]  # 1 + one per model
    assert cached.status == 200 and fresh.status == 503 and fresh.json()["triton"] is False


async def test_unknown_model_is_404_in_tritons_words_on_every_v2_route():
    gw, _ = fake_gateway()
    async with client(gw) as c:
        replies = [await c.post("/v2/models/nope/infer", json=v2_json(np.zeros((1, 1, 8, 8), np.float32))),
                   await c.get("/v2/models/nope"), await c.get("/v2/models/nope/config"),
                   await c.post("/v2/models/a/b/c/infer", json={}), await c.get("/v2/models/..%2Fx/ready")]
    assert [r.status for r in replies] == [404] * 5
    assert [r.body for r in replies[:3]] == [b'{"error":"Request for unknown model: \'nope\' is not found"}'] * 3
    assert replies[4].error.startswith("Request for unknown model: '..%2Fx' is not found")


async def test_generate_decodes_greedily_and_reproducibly_with_a_seed():
    gw, triton = fake_gateway(CHARLM)
    async with client(gw) as c:
        greedy = await c.post("/v1/models/charlm:generate", json={"prompt": "ab", "max_new_tokens": 6,
                                                                  "temperature": 0})
        sampled = [await c.post("/v1/models/fp32:generate", json={"prompt": "a", "max_new_tokens": 8,
                                                                  "temperature": 5.0, "seed": 7}) for _ in range(2)]
    assert greedy.status == 200 and greedy.json() == {"model": "charlm-fp32", "text": "cdabcd", "tokens": 6,
                                                   "finish_reason": "length"}
    infers = [t for _, t, _, _ in triton.requests if t.endswith(b"/infer")]
    assert len(infers) >= 6  # one Triton request per generated character
    assert sampled[0].json() == sampled[1].json() and sampled[0].json()["tokens"] == 8


@pytest.mark.parametrize(("payload", "status", "words"), [
    (b'{"prompt": "a", "temperature": NaN}', 422, "temperature"),
    (b'{"prompt": "a",', 400, "invalid request"),
    ({"prompt": "axe"}, 422, "'ex'"),
    ({"prompt": ""}, 422, "prompt"),
    ({"prompt": "a", "max_new_tokens": 10_000}, 422, "limit of 256"),
    ({"prompt": "a", "top_k": 0}, 422, "top_k"),
    ({"prompt": "a", "colour": "red"}, 422, "colour"),
])
async def test_generate_refuses_bad_requests(payload, status, words):
    gw, _ = fake_gateway(CHARLM)
    body = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    async with client(gw) as c:
        reply = await c.post("/v1/models/charlm:generate", body=body, headers={"content-type": "application/json"})
    assert reply.status == status and words in reply.error, reply.body


async def test_score_gives_low_loss_for_likely_text_and_high_for_unlikely():
    gw, _ = fake_gateway(CHARLM)
    async with client(gw) as c:
        likely = (await c.post("/v1/models/charlm:score", json={"text": "abcdabcdabcda"})).json()
        unlikely = (await c.post("/v1/models/charlm:score", json={"text": "aaaaaaaaaaaaa"})).json()
    assert likely["tokens"] == unlikely["tokens"] == 12  # windows of block_size 4, the rest in a shorter one
    assert likely["loss"] < 1e-6 < 10 < unlikely["loss"]
    assert math.isclose(unlikely["perplexity"], math.exp(unlikely["loss"]), rel_tol=1e-9)


async def test_v2_metadata_health_and_readiness_are_relayed():
    gw, triton = fake_gateway()
    gw.ready_ttl_s = 0.0  # every /readyz asks Triton afresh
    async with client(gw) as c:
        assert (await c.get("/v2")).json() == {"name": "triton"}
        assert (await c.get("/v2/health/ready")).status == 200
        assert (await c.get("/v2/models/digits-fp32/config")).json()["max_batch_size"] == 8
        assert (await c.get("/healthz")).json() == {"status": "ok"}
        ready = await c.get("/readyz")
        triton.down = True
        not_ready = await c.get("/readyz")
        live = await c.get("/v2/health/live")
    assert ready.status == 200 and ready.json()["models"] == {"digits-fp32": True}
    assert not_ready.status == 503 and not_ready.json()["ready"] is False
    assert live.status == 503


async def test_openapi_documents_fast_routes_and_task_schemas():
    gw, _ = fake_gateway()
    async with client(gw) as c:
        schema = (await c.get("/openapi.json")).json()
        docs = await c.get("/docs")
    paths = schema["paths"]
    for path in ("/v2/models/{model}/infer", "/v1/models/{model}:predict", "/v1/models/{model}:generate",
                 "/v1/models/{model}:score", "/readyz", "/metrics"):
        assert path in paths, path
    assert "PredictRequest" in schema["components"]["schemas"] and docs.status == 200



async def test_each_fast_route_is_documented_and_dispatched_from_the_one_table():
    from serve.gateway.fast_path import FAST_ROUTES

    gw, _ = fake_gateway()
    async with client(gw) as c:
        schema = (await c.get("/openapi.json")).json()
        for route in FAST_ROUTES:
            for path, summary in route.operations:
                operation = schema["paths"][path]["post"]
                body = operation["requestBody"]["content"]["application/json"]["schema"]
                assert operation["summary"] == summary and body["$ref"].endswith(f"/{route.body.__name__}")
                # an empty body: refused by the route's own handler, counted under the route's label
                reply = await c.post(path.format(model="digits-fp32", version="1"), body=b"")
                assert reply.status == 400 and "not valid JSON" in reply.error, (path, reply.body)
    counted = {label: n for (label, _), n in gw.metrics.requests.items() if label != "other"}  # "other": the schema
    assert counted == {route.path: len(route.operations) for route in FAST_ROUTES}


def test_a_fast_route_refuses_a_further_path_that_its_dispatch_would_not_match():
    from serve.gateway.fast_path import FAST_ROUTES, FastRoute

    infer = FAST_ROUTES[0]
    with pytest.raises(ValueError, match="give it a FastRoute of its own"):
        FastRoute(infer.path, infer.handler, infer.body, infer.response, "v2", "infer", "",
                  also=(("/v2/models/{model}/infer_async", "elsewhere"),))


def test_gateway_never_imports_torch_or_onnx():
    code = ("import sys, serve, serve.__main__, serve.gateway.app as a; a.create_app(); "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'onnx', 'onnxruntime')); "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


async def test_generate_streams_server_sent_events_and_holds_its_slot_until_done():
    gw, _ = fake_gateway(CHARLM)
    async with client(gw) as c:
        reply = await c.post("/v1/models/charlm:generate", json={"prompt": "a", "max_new_tokens": 3,
                                                                 "temperature": 0, "stream": True})
        refused = await c.post("/v1/models/charlm:generate", json={"prompt": "q", "stream": True})
    assert reply.status == 200 and reply.headers["content-type"].startswith("text/event-stream")
    events = [orjson.loads(line[6:]) for line in reply.body.decode().split("\n\n") if line.startswith("data: ")]
    assert events == [{"delta": "b", "tokens": 1}, {"delta": "c", "tokens": 2}, {"delta": "d", "tokens": 3},
                      {"model": "charlm-fp32", "text": "bcd", "tokens": 3, "finish_reason": "length"}]
    assert refused.status == 422 and gw.guard.in_flight == 0  # a bad prompt fails before the stream starts
