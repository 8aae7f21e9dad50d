"""The OpenAI-compatible API through the real ``openai`` SDK (AsyncOpenAI over an in-process ASGI transport)
on the fake Triton: the same KV-cache model and payload as ``:generate``, OpenAI's bodies and chunks, usage,
refused parameters and errors raised as the SDK's exception classes, keys, limits and metrics."""

import dataclasses

import orjson
import pytest

from autoglm.gateway_spec import ApiKey, hash_api_key
from serve.gateway import create_app, get_gateway
from serve.gateway.openai_api import plain_chat_prompt
from serve.gateway.openai_schema import ChatMessage
from tests.serve.asgi import gateway_client
from tests.serve.fakes import CHARLM_KV, DIGITS, fake_gateway

openai = pytest.importorskip("openai")
httpx2 = pytest.importorskip("httpx2")  # the SDK's HTTP client
pytestmark = pytest.mark.anyio

# a tokenizer's chat template (Jinja, as transformers ships them) that speaks the fake's "abcd" vocabulary
CHAT_KV = dataclasses.replace(CHARLM_KV, metadata={**CHARLM_KV.metadata, "chat_template": (
    "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
    "{{ m.content }}{% endfor %}{% if add_generation_prompt %}a{% endif %}")})
KEY = "agk_openai-test-key"


def sdk(gw, key: str = "unused") -> "openai.AsyncOpenAI":
    app = create_app(gw.settings)
    app.dependency_overrides[get_gateway] = lambda: gw
    transport = httpx2.ASGITransport(app)
    return openai.AsyncOpenAI(base_url="http://gateway/v1", api_key=key, max_retries=0,
                              http_client=httpx2.AsyncClient(transport=transport))


def streams(triton) -> list[tuple[bytes, dict]]:
    return [(t, orjson.loads(b)) for _, t, b, _ in triton.requests if t.endswith(b"/generate_stream")]


async def test_models_lists_the_generation_task_and_nothing_for_a_classifier():
    gw, _ = fake_gateway(CHARLM_KV)
    listed = await sdk(gw).models.list()
    assert [(m.id, m.object, m.owned_by) for m in listed.data] == [("charlm", "model", "autoglm")]
    digits, _ = fake_gateway(DIGITS)
    assert (await sdk(digits).models.list()).data == []
    with pytest.raises(openai.NotFoundError) as refused:
        await sdk(digits).completions.create(model="digits", prompt="a")
    assert refused.value.param == "model" and refused.value.code == "model_not_found"


async def test_models_retrieve_answers_a_listed_model_and_404s_the_rest():
    gw, _ = fake_gateway(CHARLM_KV)
    card = await sdk(gw).models.retrieve("charlm")
    assert (card.id, card.object, card.owned_by) == ("charlm", "model", "autoglm")
    with pytest.raises(openai.NotFoundError) as refused:
        await sdk(gw).models.retrieve("digits")
    assert refused.value.param == "model" and refused.value.code == "model_not_found"


async def test_a_completion_runs_in_the_kv_model_with_the_generate_payload():
    gw, triton = fake_gateway(CHARLM_KV)
    reply = await sdk(gw).completions.create(model="charlm", prompt="ab", max_tokens=6, temperature=0.5,
                                             top_p=0.9, seed=-3, stop="zz")
    assert reply.object == "text_completion" and reply.model == "charlm" and reply.id.startswith("cmpl-")
    assert reply.choices[0].text == "cdabcd" and reply.choices[0].finish_reason == "length"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == (2, 6, 8)
    [(target, payload)] = streams(triton)
    assert target == b"/v2/models/charlm-generate/generate_stream"  # the model :generate streams from
    assert payload == {"input_ids": [0, 1], "max_new_tokens": 6, "temperature": 0.5, "top_k": 0, "top_p": 0.9,
                       "seed": 2**63 - 3, "stop": ["zz"]}  # a negative OpenAI seed, taken modulo 2**63


async def test_openai_defaults_16_tokens_for_completions_and_the_gateway_limit_for_chat():
    gw, triton = fake_gateway(CHAT_KV, max_new_tokens=40)
    await sdk(gw).completions.create(model="charlm", prompt=["ab"])  # a list of one prompt
    chat = await sdk(gw).chat.completions.create(model="charlm", messages=[{"role": "user", "content": "b"}])
    newer = await sdk(gw).chat.completions.create(model="charlm", messages=[{"role": "user", "content": "b"}],
                                                  max_completion_tokens=3)
    sent = [payload for _, payload in streams(triton)]
    assert [p["max_new_tokens"] for p in sent] == [16, 40, 3]
    assert sent[0]["temperature"] == 1.0 and sent[0]["top_p"] == 1.0 and sent[0]["seed"] == -1
    assert chat.choices[0].message.content == "bcda" * 10 and newer.usage.completion_tokens == 3


async def test_chat_uses_the_tokenizers_template_and_its_errors_name_messages():
    gw, triton = fake_gateway(CHAT_KV)
    reply = await sdk(gw).chat.completions.create(
        model="charlm", max_tokens=5, messages=[{"role": "user", "content": "ab"},
                                                {"role": "assistant", "content": [{"type": "text", "text": "c"}]}])
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert reply.choices[0].message.role == "assistant" and reply.choices[0].message.content == "bcdab"
    assert streams(triton)[0][1]["input_ids"] == [0, 1, 2, 0] and "stop" not in streams(triton)[0][1]
    assert reply.usage.prompt_tokens == 4
    with pytest.raises(openai.BadRequestError) as refused:
        await sdk(gw).chat.completions.create(model="charlm", messages=[{"role": "system", "content": "a"}])
    assert refused.value.param == "messages" and "no system role" in refused.value.message


def test_the_plain_template_is_a_play_script_ending_at_the_assistants_turn():
    messages = [ChatMessage(role="developer", content="Be brief."), ChatMessage(role="user", content="Hi")]
    assert plain_chat_prompt(messages) == "SYSTEM:\nBe brief.\n\nUSER:\nHi\n\nASSISTANT:\n"


async def test_streamed_chat_sends_the_role_then_content_then_the_finish_and_usage():
    gw, _ = fake_gateway(CHAT_KV)
    stream = await sdk(gw).chat.completions.create(model="charlm", messages=[{"role": "user", "content": "d"}],
                                                   max_tokens=5, stream=True, stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    assert {c.object for c in chunks} == {"chat.completion.chunk"} and len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    body = chunks[1:-2]
    assert "".join(c.choices[0].delta.content for c in body) == "bcdab"
    assert all(c.choices[0].finish_reason is None and c.usage is None for c in body)
    assert chunks[-2].choices[0].finish_reason == "length" and chunks[-2].choices[0].delta.content is None
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5 and gw.guard.in_flight == 0


async def test_streamed_completions_are_openais_exact_server_sent_events():
    gw, _ = fake_gateway(CHARLM_KV)
    async with gateway_client(gw) as c:
        reply = await c.post("/v1/completions", json={"model": "charlm", "prompt": "a", "max_tokens": 12,
                                                      "temperature": 0, "stop": ["da"], "stream": True})
    assert reply.status == 200 and reply.headers["content-type"].startswith("text/event-stream")
    events = reply.body.decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""] and all(e.startswith("data: ") for e in events[:-1])
    chunks = [orjson.loads(e[6:]) for e in events[:-2]]
    assert [c["choices"][0]["text"] for c in chunks] == ["b", "c", ""]  # the held-back "d" never shows
    assert chunks[0].keys() == {"id", "object", "created", "model", "choices"}  # no usage: not asked for
    assert chunks[-1]["choices"][0] == {"index": 0, "text": "", "logprobs": None, "finish_reason": "stop"}


@pytest.mark.parametrize(("params", "param"), [
    ({"n": 2}, "n"), ({"logprobs": 1}, "logprobs"), ({"echo": True}, "echo"), ({"best_of": 3}, "best_of"),
    ({"suffix": "x"}, "suffix"), ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"frequency_penalty": -1}, "frequency_penalty"), ({"logit_bias": {"1": 5}}, "logit_bias"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"extra_body": {"tools": [{"type": "function"}]}}, "tools"),
    ({"extra_body": {"response_format": {"type": "json_object"}}}, "response_format"),
    ({"extra_body": {"guided_json": {}}}, "guided_json"),
    ({"temperature": 2.5}, "temperature"), ({"top_p": 0}, "top_p"), ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 257}, "max_tokens"), ({"stop": ["a", "b", "c", "d", "e"]}, "stop"), ({"stop": ""}, "stop.0"),
    ({"prompt": ["a", "b"]}, "prompt"), ({"prompt": [1, 2]}, "prompt"), ({"prompt": ""}, "prompt"),
    ({"prompt": "é"}, "prompt"), ({"seed": 2**64}, "seed"),
])
async def test_what_the_models_cannot_do_is_a_400_naming_the_parameter(params, param):
    gw, triton = fake_gateway(CHARLM_KV)
    with pytest.raises(openai.BadRequestError) as refused:
        await sdk(gw).completions.create(**({"model": "charlm", "prompt": "a"} | params))
    assert refused.value.status_code == 400 and refused.value.param == param, refused.value.body
    assert refused.value.type == "invalid_request_error" and not streams(triton)


@pytest.mark.parametrize(("params", "param"), [
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"), ({"tool_choice": "auto"}, "tool_choice"),
    ({"functions": [{"name": "f"}]}, "functions"), ({"logprobs": True}, "logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"response_format": {"type": "json_object"}}, "response_format"), ({"n": 3}, "n"),
    ({"messages": [{"role": "tool", "content": "a", "tool_call_id": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages.0.content.0.type"),
    ({"messages": []}, "messages"), ({"max_tokens": 3, "max_completion_tokens": 4}, "max_completion_tokens"),
])
async def test_chat_refusals_name_the_parameter(params, param):
    gw, _ = fake_gateway(CHAT_KV)
    with pytest.raises(openai.BadRequestError) as refused:
        await sdk(gw).chat.completions.create(**({"model": "charlm", "messages": [{"role": "user", "content": "a"}]}
                                                 | params))
    assert refused.value.param == param, refused.value.body


async def test_neutral_values_of_unbuilt_parameters_are_accepted():
    gw, _ = fake_gateway(CHAT_KV)
    reply = await sdk(gw).chat.completions.create(
        model="charlm", messages=[{"role": "user", "content": "a", "name": "ann"}], max_tokens=2, n=1,
        logprobs=False, presence_penalty=0.0, frequency_penalty=0, response_format={"type": "text"}, user="u1")
    assert reply.choices[0].message.content == "bc"


async def test_errors_are_openais_error_object_with_the_sdks_classes():
    gw, triton = fake_gateway(CHARLM_KV, api_keys=[ApiKey(name="team", sha256=hash_api_key(KEY))],
                              rate_limit_rps=1, rate_limit_burst=2)
    with pytest.raises(openai.AuthenticationError) as no_key:
        await sdk(gw, "agk_wrong").completions.create(model="charlm", prompt="a")
    assert no_key.value.code == "invalid_api_key" and no_key.value.body["message"] == "invalid API key"
    with pytest.raises(openai.AuthenticationError):
        await sdk(gw, "agk_wrong").models.list()
    client = sdk(gw, KEY)
    assert (await client.completions.create(model="charlm", prompt="a", max_tokens=1)).choices[0].text == "b"
    with pytest.raises(openai.NotFoundError) as unknown:
        await client.completions.create(model="gpt-4o", prompt="a")
    assert unknown.value.param == "model" and "GET /v1/models" in unknown.value.message
    with pytest.raises(openai.RateLimitError) as limited:
        await client.completions.create(model="charlm", prompt="a")
    assert limited.value.response.headers["retry-after"] and limited.value.code == "rate_limit_exceeded"


async def test_overload_and_triton_failures_map_to_openai_statuses():
    gw, triton = fake_gateway(CHARLM_KV, max_in_flight=1)
    gw.guard.in_flight = 1  # every slot taken
    with pytest.raises(openai.InternalServerError) as full:
        await sdk(gw).completions.create(model="charlm", prompt="a")
    assert full.value.status_code == 503 and full.value.type == "server_error"
    gw.guard.in_flight = 0
    async with gateway_client(gw) as c:
        bad_json = await c.post("/v1/chat/completions", body=b"{not json", headers={"content-type": "application/json"})
        too_big = await c.post("/v1/completions", body=b"{}", headers={"content-length": str(10**9)},
                               content_length=False)
    assert bad_json.status == 400 and set(bad_json.json()["error"]) == {"message", "type", "param", "code"}
    assert too_big.status == 413 and too_big.json()["error"]["type"] == "invalid_request_error"
    triton.stream_error = (400, "charlm-generate: generation failed: boom")
    with pytest.raises(openai.InternalServerError) as failed:
        await sdk(gw).completions.create(model="charlm", prompt="a")
    assert failed.value.status_code == 502
    stream = await sdk(gw).completions.create(model="charlm", prompt="a", stream=True)
    with pytest.raises(openai.APIError, match="generation failed: boom"):  # once streaming: an error event
        [chunk async for chunk in stream]
    assert gw.guard.in_flight == 0 and triton.live == 0


async def test_the_routes_are_counted_in_the_gateways_metrics():
    gw, _ = fake_gateway(CHAT_KV)
    client = sdk(gw)
    await client.chat.completions.create(model="charlm", messages=[{"role": "user", "content": "a"}], max_tokens=1)
    await client.models.list()
    async with gateway_client(gw) as c:
        text = (await c.get("/metrics")).body.decode()
    assert 'autoglm_gateway_requests_total{route="/v1/chat/completions",status="200"} 1.0' in text
    assert 'autoglm_gateway_requests_total{route="/v1/models",status="200"} 1.0' in text
