"""The gateway with a Hugging Face task's metadata (a tokenizer in task.json), against the fake Triton:
:generate/:score/OpenAI encode with the tokenizer and count tokens, a stream never splits a UTF-8
character, the end-of-sequence token stops, a prompt past the context is refused, and a text
classifier's :predict takes texts."""

import numpy as np
import orjson
import pytest

from autoglm.text_codec import TextCodec
from serve.gateway.catalog import TaskCatalog
from tests.autoglm._imports import imported_after
from tests.autoglm._tokenizers import classifier_metadata, lm_metadata
from tests.serve import fakes
from tests.serve.asgi import gateway_client as client
from tests.serve.fakes import fake_gateway

pytestmark = pytest.mark.anyio
LM_IO = {"inputs": [{"name": "input_ids", "dtype": "int64", "shape": [-1]}],
         "outputs": [{"name": "logits", "dtype": "float32", "shape": [-1, -1]}]}
CLS_IO = {"inputs": [{"name": "input_ids", "dtype": "int64", "shape": [-1]},
                     {"name": "attention_mask", "dtype": "int64", "shape": [-1]}],
          "outputs": [{"name": "logits", "dtype": "float32", "shape": [2]}]}
PROMPT, REPLY = "Hello", " 😀 caf鑫"  # the reply's characters span several byte-level tokens


def lm_catalog(style="gpt2", block_size=16, generate=None, chat_template=None) -> TaskCatalog:
    return TaskCatalog("hf-causal-lm", {"fp32": "hf-causal-lm-fp32"}, "hf-causal-lm-fp32",
                       lm_metadata(style, block_size, chat_template), LM_IO, generate=generate)


@pytest.fixture
def hf_triton(monkeypatch):
    """Fake models: the LM continues ``PROMPT`` with ``REPLY`` then its end-of-sequence token (next token
    by last token); the classifier says 'positive' for texts of more than 4 tokens."""
    codec = TextCodec.from_metadata(lm_metadata("gpt2"))
    chain = [int(codec.encode(PROMPT)[-1]), *codec.encode(REPLY).tolist(), min(codec.eos_ids)]
    assert len(set(chain)) == len(chain)  # one successor per token
    successor = dict(zip(chain, chain[1:]))
    vocab, real = codec.vocab_size, fakes._model

    def model(name, x):
        if name == "hf-causal-lm-fp32":
            nxt = np.vectorize(lambda i: successor.get(int(i), chain[-1]))(x)
            return (np.eye(vocab, dtype=np.float32)[nxt] * 30.0).astype(np.float32)  # (B, T, V)
        if name == "hf-sequence-classification-fp32":
            long = (x != 0).sum(axis=1) > 4
            return np.stack([np.where(long, 0.0, 3.0), np.where(long, 3.0, 0.0)], axis=1).astype(np.float32)
        return real(name, x)

    monkeypatch.setattr(fakes, "_model", model)
    for name, dims in (("hf-causal-lm-fp32", [-1, vocab]), ("hf-sequence-classification-fp32", [2])):
        inputs = [{"name": s["name"], "data_type": "TYPE_INT64", "dims": [-1]}
                  for s in (CLS_IO if "classification" in name else LM_IO)["inputs"]]
        monkeypatch.setitem(fakes.CONFIGS, name, {"name": name, "max_batch_size": 8, "input": inputs,
                                                  "output": [{"name": "logits", "data_type": "TYPE_FP32",
                                                              "dims": dims}]})


def events(reply) -> list[dict]:
    return [orjson.loads(chunk[6:]) for chunk in reply.body.decode().split("\n\n") if chunk.startswith("data: ")]


def stream_payloads(triton) -> list[dict]:
    return [orjson.loads(body) for _, target, body, _ in triton.requests if target.endswith(b"/generate_stream")]


async def test_generation_streams_whole_characters_and_stops_at_the_end_of_sequence_token(hf_triton):
    gw, _ = fake_gateway(lm_catalog())
    async with client(gw) as c:
        whole = await c.post("/v1/models/hf-causal-lm:generate", json={"prompt": PROMPT, "max_new_tokens": 30,
                                                                       "temperature": 0})
        streamed = await c.post("/v1/models/fp32:generate", json={"prompt": PROMPT, "max_new_tokens": 30,
                                                                  "temperature": 0, "stream": True})
    n = len(gw.catalog.codec.encode(REPLY)) + 1  # the reply's tokens and the end-of-sequence token
    assert whole.json() == {"model": "hf-causal-lm-fp32", "text": REPLY, "tokens": n, "finish_reason": "stop"}
    deltas = [e["delta"] for e in events(streamed) if "delta" in e]
    assert "".join(deltas) == REPLY and any("😀" in d for d in deltas) and any("鑫" in d for d in deltas)
    assert all("\ufffd" not in d for d in deltas) and len(deltas) < n  # bytes wait for their character
    assert events(streamed)[-1] == {"model": "hf-causal-lm-fp32", "text": REPLY, "tokens": n, "finish_reason": "stop"}


async def test_the_kv_model_gets_the_tokenizers_ids_with_llamas_bos():
    gw, triton = fake_gateway(lm_catalog("llama", generate="hf-causal-lm-generate"))
    async with client(gw) as c:
        reply = await c.post("/v1/models/hf-causal-lm:generate", json={"prompt": "Hello wörld",
                                                                       "max_new_tokens": 3})
    assert reply.status == 200
    [payload] = stream_payloads(triton)
    assert payload["input_ids"] == gw.catalog.codec.encode("Hello wörld").tolist() and payload["input_ids"][0] == 1


async def test_a_prompt_past_the_context_is_refused_with_the_numbers_on_every_route(hf_triton):
    gw, triton = fake_gateway(lm_catalog(block_size=4))
    prompt = "The quick brown fox jumps"
    tokens = len(gw.catalog.codec.encode(prompt))
    async with client(gw) as c:
        native = await c.post("/v1/models/hf-causal-lm:generate", json={"prompt": prompt})
        completion = await c.post("/v1/completions", json={"model": "hf-causal-lm", "prompt": prompt})
        chat = await c.post("/v1/chat/completions", json={"model": "hf-causal-lm",
                                                          "messages": [{"role": "user", "content": prompt}]})
    assert native.status == 413 and native.error == (f"the prompt is {tokens} tokens but the model's context is 4 "
                                                      f"tokens: shorten the prompt")
    assert completion.status == 400 and completion.json()["error"]["code"] == "context_length_exceeded"
    error = completion.json()["error"]
    assert error["param"] == "prompt" and f"resulted in {tokens} tokens" in error["message"]
    assert chat.status == 400 and chat.json()["error"]["param"] == "messages"
    error = chat.json()["error"]
    assert error["code"] == "context_length_exceeded" and "maximum context length is 4" in error["message"]
    assert not [t for _, t, _, _ in triton.requests if t.endswith((b"/infer", b"/generate_stream"))]


async def test_openai_counts_tokens_not_characters_and_a_chat_template_brings_its_own_bos(hf_triton):
    template = "{{ bos_token }}{% for m in messages %}{{ m.role }}: {{ m.content }}{{ eos_token }}{% endfor %}"
    gw, triton = fake_gateway(lm_catalog("llama", 64, "hf-causal-lm-generate", chat_template=template))
    async with client(gw) as c:
        completion = await c.post("/v1/completions", json={"model": "hf-causal-lm", "prompt": "The quick brown fox",
                                                           "max_tokens": 2})
        chat = await c.post("/v1/chat/completions", json={"model": "hf-causal-lm", "max_tokens": 2,
                                                          "messages": [{"role": "user", "content": "Hi"}]})
    codec = gw.catalog.codec
    prompt_tokens = completion.json()["usage"]["prompt_tokens"]
    assert prompt_tokens == len(codec.encode("The quick brown fox")) != len("The quick brown fox")
    sent = stream_payloads(triton)[1]["input_ids"]
    assert sent == codec.encode("<s>user: Hi</s>", special_tokens=False).tolist()
    assert sent.count(1) == 1 and chat.json()["usage"]["prompt_tokens"] == len(sent)  # one BOS, the template's


async def test_scoring_windows_by_block_size_tokens(hf_triton):
    gw, triton = fake_gateway(lm_catalog(block_size=4))
    async with client(gw) as c:
        reply = await c.post("/v1/models/hf-causal-lm:score", json={"text": "o" + REPLY})  # every token in the chain
        short = await c.post("/v1/models/hf-causal-lm:score", json={"text": "he"})  # one token
    ids = gw.catalog.codec.encode("o" + REPLY)
    assert reply.status == 200 and reply.json()["tokens"] == len(ids) - 1
    assert reply.json()["loss"] < 0.01  # the fake model predicts the reply exactly
    infers = [orjson.loads(b[:int(h[b"Inference-Header-Content-Length"])]) for _, t, b, h in triton.requests
              if t.endswith(b"/infer")]
    assert max(i["inputs"][0]["shape"][1] for i in infers) == 4
    assert short.status == 422 and short.error == "the text is 1 token(s): scoring needs at least 2"


def classifier() -> TaskCatalog:
    return TaskCatalog("hf-sequence-classification", {"fp32": "hf-sequence-classification-fp32"},
                       "hf-sequence-classification-fp32", classifier_metadata(max_length=8), CLS_IO)


async def test_a_text_classifier_predicts_labels_with_probabilities_from_texts(hf_triton):
    gw, triton = fake_gateway(classifier())
    async with client(gw) as c:
        reply = await c.post("/v1/models/hf-sequence-classification:predict",
                             json={"instances": ["the quick brown fox jumps over the lazy dog", "hi"]})
        objects = await c.post("/v1/models/hf-sequence-classification:predict", json={"instances": [{"text": "hi"}]})
    assert reply.status == 200, reply.body
    first, second = reply.json()["predictions"]
    assert first["class"] == "positive" and second["class"] == "negative"
    assert set(first["probabilities"]) == {"negative", "positive"} and first["probabilities"]["positive"] > 0.9
    assert objects.json()["predictions"][0]["class"] == "negative"
    _, _, body, headers = next(r for r in triton.requests if r[1].endswith(b"/infer"))
    header = orjson.loads(body[:int(headers[b"Inference-Header-Content-Length"])])
    assert [i["name"] for i in header["inputs"]] == ["input_ids", "attention_mask"]
    assert header["inputs"][0]["shape"] == [2, 8]  # truncated to max_length, padded to the longest


@pytest.mark.parametrize(("instances", "status", "words"), [
    ([3, "ok"], 422, "instance 0 must be a string"),
    (["ok", {"text": 5}], 422, "instance 1 must be a string"),
    (["fine", "  "], 422, "instance 1 is an empty text"),
    (["x"] * 9, 413, "9 texts in one request; the model takes at most 8"),
])
async def test_a_text_classifier_refuses_bad_instances_clearly(hf_triton, instances, status, words):
    gw, triton = fake_gateway(classifier())
    async with client(gw) as c:
        reply = await c.post("/v1/models/hf-sequence-classification:predict", json={"instances": instances})
    assert reply.status == status and words in reply.error
    assert not [t for _, t, _, _ in triton.requests if t.endswith(b"/infer")]


def test_the_gateway_with_a_tokenizer_imports_no_torch_transformers_or_onnx():
    code = ("from tests.autoglm._tokenizers import lm_metadata; from serve.gateway.catalog import TaskCatalog; "
            "import serve.gateway.app as a; a.create_app(); "
            "TaskCatalog('t', {}, 'm', lm_metadata('llama'), {}).codec.encode('hi')")
    assert imported_after(code, "m.split('.')[0] in ('torch', 'transformers', 'onnx', 'onnxruntime')") == []
