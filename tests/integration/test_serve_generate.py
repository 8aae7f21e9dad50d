"""Generation on a real Triton through the gateway: the KV-cache model's greedy text equals torch's,
streaming in order with a final event, cancellation frees the sequence, seeds are independent and
reproducible under concurrency, and limits are refused with 4xx."""

import asyncio
import json
import re
import time

import orjson
import pytest

from autoglm.artifacts import RunDir
from autoglm.tasks import get_task
from autoglm.tasks.checkpoint import load_checkpoint
from compress.decode import torch_greedy
from serve import GatewaySettings, start_serving
from tests.serve.fixtures import get, on_free_ports, post, published_run, require_triton

pytestmark = pytest.mark.integration
aiohttp = pytest.importorskip("aiohttp")


@pytest.fixture(scope="module")
def charlm():
    require_triton()
    settings = on_free_ports(published_run("charlm"))
    serving = start_serving(settings, GatewaySettings(port=settings.serve.gateway_port, max_new_tokens=50_000))
    with serving:
        yield settings, serving


def live_sequences(serving) -> float:
    _, text = get(serving.triton_metrics_url)
    match = re.search(rb'autoglm_generate_sequences\{model="charlm-generate",state="live"\} (\S+)', text)
    assert match, "the generation model exports its in-flight gauge"
    return float(match.group(1))


def generate(serving, **body):
    status, reply = post(f"{serving.gateway.url}/v1/models/charlm:generate", orjson.dumps(body), timeout=60)
    return status, json.loads(reply)


def test_greedy_text_equals_torch_greedy_generation(charlm):
    settings, serving = charlm
    assert "charlm-generate" in serving.models
    run = RunDir(settings.run.root, settings.run.name)
    task = get_task(settings)
    model = load_checkpoint(run.stage_dir("train") / "model.pt").build_model(task).eval()
    itos = serving.catalog.metadata["itos"]
    prompt = "".join(ch for ch in "ROMEO:\nWhat say" if ch in itos)
    status, reply = generate(serving, prompt=prompt, max_new_tokens=16, temperature=0)
    want = torch_greedy(model, [itos.index(c) for c in prompt], 16)
    assert status == 200 and reply["model"] == "charlm-generate" and reply["finish_reason"] == "length"
    assert reply["text"] == "".join(itos[i] for i in want) and reply["tokens"] == 16
    long_status, long_reply = generate(serving, prompt=prompt, max_new_tokens=200, temperature=0)
    assert long_status == 200 and long_reply["tokens"] == 200  # past the 32-token context: it slides on


def test_streaming_sends_tokens_in_order_then_the_summary(charlm):
    _, serving = charlm
    status, body = post(f"{serving.gateway.url}/v1/models/charlm:generate",
                        orjson.dumps({"prompt": "a", "max_new_tokens": 20, "temperature": 0, "stream": True}))
    events = [json.loads(chunk[6:]) for chunk in body.decode().split("\n\n") if chunk.startswith("data: ")]
    _, whole = generate(serving, prompt="a", max_new_tokens=20, temperature=0)
    deltas = events[:-1]
    assert status == 200 and deltas and all("delta" in e for e in deltas)
    assert [e["tokens"] for e in deltas] == sorted({e["tokens"] for e in deltas})  # in order, never repeated
    assert "".join(e["delta"] for e in deltas) == whole["text"] == events[-1]["text"]
    assert events[-1]["tokens"] == 20 and events[-1]["finish_reason"] == "length"


def tokens_total(serving) -> float:
    _, text = get(serving.triton_metrics_url)
    return float(re.search(rb'autoglm_generate_tokens_total\{model="charlm-generate"\} (\S+)', text).group(1))


def wait_for_live(serving, want: float, timeout_s: float = 10) -> float:
    """The gauge reaches Triton's metrics endpoint shortly after the model sets it: poll."""
    deadline = time.monotonic() + timeout_s
    while (value := live_sequences(serving)) != want and time.monotonic() < deadline:
        time.sleep(0.05)
    return value


def test_a_client_that_goes_away_frees_its_sequence(charlm):
    _, serving = charlm

    async def leave_early():
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{serving.gateway.url}/v1/models/charlm:generate",
                                    json={"prompt": "a", "max_new_tokens": 50_000, "stream": True}) as r:
                first = await r.content.readuntil(b"\n\n")
                during = await asyncio.to_thread(wait_for_live, serving, 1)  # still generating
            return first, during  # leaving the block closes the connection mid-stream

    before = tokens_total(serving)
    first, during = asyncio.run(leave_early())
    assert first.startswith(b"data: {\"delta\"") and during == 1
    assert wait_for_live(serving, 0) == 0  # the model saw the cancellation and freed the slot
    assert tokens_total(serving) - before < 50_000  # it stopped generating, it did not run to the end


def test_concurrent_generations_with_different_seeds_are_independent_and_reproducible(charlm):
    _, serving = charlm

    async def together():
        async with aiohttp.ClientSession() as session:
            async def one(seed):
                async with session.post(f"{serving.gateway.url}/v1/models/charlm:generate",
                                        json={"prompt": "Th", "max_new_tokens": 40, "temperature": 1.0,
                                              "top_k": 20, "seed": seed}) as r:
                    reply = await r.json()
                    assert r.status == 200, reply
                    return reply["text"]
            return await asyncio.gather(*[one(seed) for seed in (1, 2, 1, 2, 1, 2)])

    texts = asyncio.run(together())
    alone = [generate(serving, prompt="Th", max_new_tokens=40, temperature=1.0, top_k=20, seed=s)[1]["text"]
             for s in (1, 2)]
    assert texts == alone * 3 and alone[0] != alone[1]


def test_prefills_between_steps_stream_the_same_tokens(charlm):
    """``prefill_thread`` false (joins encoded on the decode loop between two steps, applied live): concurrent
    seeded generations still equal the same requests alone, and greedy text equals torch's."""
    from loadtest.control import LiveModels, ModelControl, ServingConfig, model_parameters

    _, serving = charlm
    live = LiveModels(ModelControl(serving.triton_url))
    assert model_parameters(live.base("charlm-generate"))["prefill_thread"] == "auto"  # the default, written
    live.apply(ServingConfig("charlm-generate", parameters={"prefill_thread": "false"}))
    try:
        test_concurrent_generations_with_different_seeds_are_independent_and_reproducible(charlm)
        test_greedy_text_equals_torch_greedy_generation(charlm)
    finally:
        live.restore()
    assert model_parameters(live.control.config("charlm-generate"))["prefill_thread"] == "auto"


def test_stop_strings_and_limits(charlm):
    _, serving = charlm
    _, free = generate(serving, prompt="a", max_new_tokens=60, temperature=0)
    stop = free["text"][10:12]
    status, stopped = generate(serving, prompt="a", max_new_tokens=60, temperature=0, stop=[stop])
    assert status == 200 and stopped["finish_reason"] == "stop"
    assert stopped["text"] == free["text"][:free["text"].index(stop)]
    for bad, words in (({"max_new_tokens": 50_001}, "limit of 50000"), ({"top_p": 2}, "top_p"),
                       ({"prompt": "\u00e9"}, "vocabulary"), ({"temperature": -1}, "temperature")):
        status, reply = generate(serving, **({"prompt": "a"} | bad))
        assert status == 422 and words in reply["error"], reply
