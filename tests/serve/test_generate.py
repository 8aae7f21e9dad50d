""":generate through Triton's KV-cache model (a fake generate_stream): which path serves, streaming order,
stop strings, cancellation, limits and error mapping."""

import asyncio

import orjson
import pytest

from serve.gateway import create_app, get_gateway
from tests.serve.asgi import AsgiClient, gateway_client as client
from tests.serve.fakes import CHARLM, CHARLM_KV, fake_gateway

pytestmark = pytest.mark.anyio


def events(reply) -> list[dict]:
    return [orjson.loads(chunk[6:]) for chunk in reply.body.decode().split("\n\n") if chunk.startswith("data: ")]


async def test_the_task_name_generates_in_the_kv_model_and_a_variant_recomputes():
    gw, triton = fake_gateway(CHARLM_KV)
    async with client(gw) as c:
        cached = await c.post("/v1/models/charlm:generate", json={"prompt": "ab", "max_new_tokens": 6,
                                                                  "temperature": 0.5, "top_p": 0.9, "seed": 3})
        infers_before = sum(t.endswith(b"/infer") for _, t, _, _ in triton.requests)
        recomputed = await c.post("/v1/models/fp32:generate", json={"prompt": "ab", "max_new_tokens": 6,
                                                                    "temperature": 0})
    assert cached.json() == {"model": "charlm-generate", "text": "cdabcd", "tokens": 6, "finish_reason": "length"}
    assert recomputed.json()["text"] == "cdabcd" and recomputed.json()["model"] == "charlm-fp32"
    streams = [(t, orjson.loads(b)) for _, t, b, _ in triton.requests if t.endswith(b"/generate_stream")]
    assert len(streams) == 1 and infers_before == 0  # the KV path never recomputes in the gateway
    target, payload = streams[0]
    assert target == b"/v2/models/charlm-generate/generate_stream"
    assert payload == {"input_ids": [0, 1], "max_new_tokens": 6, "temperature": 0.5, "top_k": 0, "top_p": 0.9,
                       "seed": 3}


async def test_streaming_delivers_tokens_in_order_then_a_final_event():
    gw, triton = fake_gateway(CHARLM_KV)
    async with client(gw) as c:
        reply = await c.post("/v1/models/charlm:generate", json={"prompt": "d", "max_new_tokens": 5, "stream": True})
    assert reply.status == 200 and reply.headers["content-type"].startswith("text/event-stream")
    assert events(reply) == [{"delta": t, "tokens": n} for n, t in enumerate("abcda", 1)] + [
        {"model": "charlm-generate", "text": "abcda", "tokens": 5, "finish_reason": "length"}]
    assert triton.live == 0 and gw.guard.in_flight == 0


@pytest.mark.parametrize("catalog", [CHARLM_KV, CHARLM], ids=["kv", "recompute"])
async def test_stop_strings_end_the_text_before_them_on_both_paths(catalog):
    gw, _ = fake_gateway(catalog)
    async with client(gw) as c:
        whole = await c.post("/v1/models/charlm:generate", json={"prompt": "a", "max_new_tokens": 12,
                                                                 "temperature": 0, "stop": ["xx", "da"]})
        streamed = await c.post("/v1/models/charlm:generate", json={"prompt": "a", "max_new_tokens": 12,
                                                                    "temperature": 0, "stop": ["da"], "stream": True})
    assert whole.json()["text"] == "bc" and whole.json()["finish_reason"] == "stop"
    assert whole.json()["tokens"] == 4  # b, c, d (held back: it may start "da"), a (completes the stop)
    assert "".join(e.get("delta", "") for e in events(streamed)) == "bc"  # the held-back 'd' is never sent
    assert events(streamed)[-1]["finish_reason"] == "stop"


async def test_a_client_that_goes_away_closes_the_stream_to_triton():
    gw, triton = fake_gateway(CHARLM_KV)
    triton.token_delay_s = 0.005
    app = create_app(gw.settings)
    app.dependency_overrides[get_gateway] = lambda: gw
    body = orjson.dumps({"prompt": "a", "max_new_tokens": 50, "stream": True})
    sent, disconnect = [], asyncio.Event()

    async def receive():
        if not sent:
            sent.append(1)
            return {"type": "http.request", "body": body, "more_body": False}
        await disconnect.wait()
        return {"type": "http.disconnect"}

    messages = []

    async def send(message):
        messages.append(message)
        if message["type"] == "http.response.body" and message.get("body"):
            disconnect.set()  # the first token arrived: the client leaves

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/models/charlm:generate", "raw_path": b"/v1/models/charlm:generate", "query_string": b"",
             "root_path": "", "headers": [(b"content-type", b"application/json")], "client": ("127.0.0.1", 1),
             "server": ("127.0.0.1", 80), "state": {}}
    async with AsgiClient(app):  # runs the lifespan
        await asyncio.wait_for(app(scope, receive, send), 10)
    tokens = [m for m in messages if m["type"] == "http.response.body" and m.get("body")]
    assert 1 <= len(tokens) < 50 and triton.live == 0 and gw.guard.in_flight == 0


@pytest.mark.parametrize(("payload", "words"), [
    ({"prompt": "a", "top_p": 0}, "top_p"),
    ({"prompt": "a", "top_p": 1.5}, "top_p"),
    ({"prompt": "a", "stop": [""]}, "stop"),
    ({"prompt": "a", "stop": ["a"] * 9}, "stop"),
    ({"prompt": "a", "seed": -1}, "seed"),
    ({"prompt": "a", "top_k": 2**31}, "top_k"),
    ({"prompt": "a", "max_new_tokens": 0}, "max_new_tokens"),
    ({"prompt": "a", "max_new_tokens": 257}, "limit of 256"),
])
async def test_bad_generation_parameters_are_refused_before_triton(payload, words):
    gw, triton = fake_gateway(CHARLM_KV)
    async with client(gw) as c:
        reply = await c.post("/v1/models/charlm:generate", json=payload)
    assert reply.status == 422 and words in reply.error, reply.body
    assert not [t for _, t, _, _ in triton.requests if t.endswith(b"/generate_stream")]


@pytest.mark.parametrize(("status", "message", "expected"), [
    (400, "charlm-generate: 256 requests are already waiting; retry later", 503),
    (400, "charlm-generate: token ids must be within 0..3", 422),
    (400, "charlm-generate: generation failed: boom", 502),  # Triton says 400 for any first-response error
])
async def test_triton_generation_errors_map_to_gateway_statuses(status, message, expected):
    gw, triton = fake_gateway(CHARLM_KV)
    triton.stream_error = (status, message)
    async with client(gw) as c:
        reply = await c.post("/v1/models/charlm:generate", json={"prompt": "a"})
        streamed = await c.post("/v1/models/charlm:generate", json={"prompt": "a", "stream": True})
    assert reply.status == expected and message in reply.error
    assert streamed.status == 200 and b"event: error" in streamed.body and message.encode() in streamed.body


@pytest.mark.parametrize(("status", "raw", "expected", "words"), [
    (400, b'{"error":"charlm-generate: token ids must be within 0..3"}', 422, "token ids"),  # plain JSON body
    (400, b'{"error":"Request for unknown model: \'charlm-generate\' is not found"}', 503, "unknown model"),
    (200, b"data: {not json}\n\n", 502, "malformed event"),
    (200, b"data: [1, 2]\n\n", 502, "malformed event"),
    (200, b'data: {"token_ids": 1, "text": "b", "finish_reason": ""}\n\n', 502, "without its final response"),
    (200, b'data: {"token_ids": 1, "text": "b", "finish_reason": "len', 502, "ended inside an event"),
])
async def test_a_reply_that_is_not_a_whole_event_stream_is_an_error_never_an_empty_success(status, raw, expected,
                                                                                          words):
    gw, triton = fake_gateway(CHARLM_KV)
    triton.stream_raw = (status, raw)
    async with client(gw) as c:
        reply = await c.post("/v1/models/charlm:generate", json={"prompt": "a"})
        streamed = await c.post("/v1/models/charlm:generate", json={"prompt": "a", "stream": True})
    assert reply.status == expected and words in reply.error, reply.body
    assert streamed.body.endswith(b"\n\n") and b"event: error" in streamed.body and words.encode() in streamed.body
    assert b'"finish_reason"' not in streamed.body.split(b"event: error")[-1]


async def test_the_generation_model_answers_only_generate():
    gw, _ = fake_gateway(CHARLM_KV)
    async with client(gw) as c:
        score = await c.post("/v1/models/charlm-generate:score", json={"text": "abcd"})
        direct = await c.post("/v1/models/charlm-generate:generate", json={"prompt": "a", "max_new_tokens": 2})
    assert score.status == 404 and ":generate" in score.error
    assert direct.status == 200 and direct.json()["text"] == "bc"
