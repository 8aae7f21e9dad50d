"""The OpenAI-compatible API on a real Triton and a real charlm KV-cache model, through the real ``openai``
SDK (sync, async, streaming, errors) and ``curl -N``: the same text as ``:generate``, in the same model,
whose in-flight batching both APIs share."""

import asyncio
import json
import shutil
import subprocess

import orjson
import pytest

from tests.integration.test_serve_generate import charlm, wait_for_live  # noqa: F401 - a fixture
from tests.serve.fixtures import post

pytestmark = pytest.mark.integration
openai = pytest.importorskip("openai")
aiohttp = pytest.importorskip("aiohttp")


@pytest.fixture(scope="module")
def serving(charlm):
    return charlm[1]


def generate(serving, **body) -> dict:
    status, reply = post(f"{serving.gateway.url}/v1/models/charlm:generate", orjson.dumps(body), timeout=60)
    assert status == 200, reply
    return json.loads(reply)


def client(serving, sdk=None):
    """An SDK client (``openai.OpenAI`` by default) of the gateway; an async one must live in one event loop."""
    return (sdk or openai.OpenAI)(base_url=f"{serving.gateway.url}/v1", api_key="unused", max_retries=0)


def test_a_completion_is_the_text_generate_gives(serving):
    sync = client(serving)
    assert [m.id for m in sync.models.list()] == ["charlm"]
    reply = sync.completions.create(model="charlm", prompt="ROMEO:\nWhat", max_tokens=24, temperature=0)
    want = generate(serving, prompt="ROMEO:\nWhat", max_new_tokens=24, temperature=0)
    assert reply.choices[0].text == want["text"] and reply.choices[0].finish_reason == "length"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len("ROMEO:\nWhat"), 24)
    seeded = [sync.completions.create(model="charlm", prompt="Th", max_tokens=30, seed=7, top_p=0.9).choices[0].text
              for _ in range(2)]
    assert seeded[0] == seeded[1]  # a seed reproduces the sampled text


def test_sync_streaming_yields_the_same_text_in_chunks(serving):
    sync = client(serving)
    whole = sync.completions.create(model="charlm", prompt="a", max_tokens=40, temperature=0).choices[0].text
    chunks = list(sync.completions.create(model="charlm", prompt="a", max_tokens=40, temperature=0, stream=True,
                                          stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert chunks[-2].choices[0].finish_reason == "length" and chunks[-1].usage.completion_tokens == 40


def test_async_chat_streams_the_plain_template_reply(serving):
    messages = [{"role": "system", "content": "Speak in verse."}, {"role": "user", "content": "Who goes there?"}]

    async def both():
        async with client(serving, openai.AsyncOpenAI) as sdk:
            return await chat(sdk)

    async def chat(sdk):
        whole = await sdk.chat.completions.create(model="charlm", messages=messages, max_tokens=60, temperature=0)
        stream = await sdk.chat.completions.create(model="charlm", messages=messages, max_tokens=60,
                                                      temperature=0, stream=True)
        return whole, [chunk async for chunk in stream]

    whole, chunks = asyncio.run(both())
    prompt = "SYSTEM:\nSpeak in verse.\n\nUSER:\nWho goes there?\n\nASSISTANT:\n"
    want = generate(serving, prompt=prompt, max_new_tokens=60, temperature=0, stop=["\n\n"])
    assert whole.choices[0].message.content == want["text"] and whole.choices[0].finish_reason == want["finish_reason"]
    assert whole.usage.prompt_tokens == len(prompt)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want["text"]
    assert chunks[-1].choices[0].finish_reason == want["finish_reason"]


def test_errors_are_the_sdks_exceptions(serving):
    sync = client(serving)
    with pytest.raises(openai.BadRequestError) as outside:
        sync.completions.create(model="charlm", prompt="caf\u00e9")
    assert outside.value.param == "prompt" and "vocabulary" in outside.value.message
    with pytest.raises(openai.BadRequestError) as tools:
        sync.chat.completions.create(model="charlm", messages=[{"role": "user", "content": "a"}],
                                     tools=[{"type": "function", "function": {"name": "f"}}])
    assert tools.value.param == "tools"
    with pytest.raises(openai.NotFoundError):
        sync.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "a"}])


def test_both_apis_generate_together_in_the_one_kv_model(serving):
    async def together():
        async with aiohttp.ClientSession() as session:
            gen = await session.post(f"{serving.gateway.url}/v1/models/charlm:generate",
                                     json={"prompt": "a", "max_new_tokens": 50_000, "stream": True})
            chat = await session.post(f"{serving.gateway.url}/v1/completions",
                                      json={"model": "charlm", "prompt": "a", "max_tokens": 50_000, "stream": True})
            await gen.content.readuntil(b"\n\n")
            first = await chat.content.readuntil(b"\n\n")
            live = await asyncio.to_thread(wait_for_live, serving, 2)
            gen.close()
            chat.close()  # leaving frees both sequences
            return first, live

    first, live = asyncio.run(together())
    assert first.startswith(b'data: {"id":"cmpl-') and live == 2
    assert wait_for_live(serving, 0) == 0


def test_curl_streams_openais_server_sent_events(serving):
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    body = json.dumps({"model": "charlm", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 20,
                       "temperature": 0, "stream": True})
    out = subprocess.run([curl, "-sN", "--noproxy", "*", f"{serving.gateway.url}/v1/chat/completions",
                          "-H", "Content-Type: application/json", "-d", body],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    events = out.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""] and all(e.startswith("data: {") for e in events[:-2])
    chunks = [json.loads(e[6:]) for e in events[:-2]]
    assert chunks[0]["object"] == "chat.completion.chunk" and chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
