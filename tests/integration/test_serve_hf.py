"""Hugging Face tasks end to end on a real Triton: train (a few steps) -> compress -> serve -> gateway, for a tiny
GPT-2, Llama and Gemma 3 (a sliding-window layer beside a global one) and a tiny Bert classifier built offline
(tests/hf_fixtures.py). The served greedy continuation equals transformers' own ``generate()`` decoded with the
model's tokenizer; a stream never splits a character; a prompt past the context is refused; the classifier answers
labels from texts."""

import functools
import json

import orjson
import pytest

from tests.serve.fixtures import FAST, _root, on_free_ports, post, require_triton

pytestmark = pytest.mark.integration
RECIPE = ["train.max_steps=20", "train.eval_every=20", "train.batch_size=8", "train.eval_batches=2", "train.lr=1e-3",
          "compress.generate.max_new_tokens=512"]


@functools.cache
def published(kind: str):
    """Settings of a published run of ``kind``: 'gpt2', 'llama', 'gemma3' (hf-causal-lm) or 'bert' (classifier)."""
    from autoglm.config import load_settings
    from autoglm.train import train_run
    from compress.stage import compress_run

    from tests import hf_fixtures as fixtures

    root = _root()
    data = root / f"{kind}-data"
    data.mkdir(exist_ok=True)
    if kind == "bert":
        task = ["task.name='hf-sequence-classification'", f"task.model_id='{fixtures.bert_dir()}'",
                f"task.data='{fixtures.write_labelled_csv(data / 'labelled.csv')}'"]
    else:
        model_dir = getattr(fixtures, f"{kind}_dir")()
        task = ["task.name='hf-causal-lm'", f"task.model_id='{model_dir}'", "task.model={block_size=32}",
                f"task.data='{fixtures.write_text(data / 'corpus.txt')}'"]
    settings = load_settings(None, [f"run.root='{root}'", f"run.cache_dir='{root / 'cache'}'", f"run.name=hf-{kind}",
                                    *FAST, *RECIPE, *task])
    train_run(settings, progress=False)
    compress_run(settings, progress=False)
    return settings


def serve(kind: str):
    from serve import GatewaySettings, start_serving

    require_triton()
    settings = on_free_ports(published(kind))
    return settings, start_serving(settings, GatewaySettings(port=settings.serve.gateway_port))


@pytest.fixture(scope="module", params=["gpt2", "llama", "gemma3"])
def served(request):
    """A causal LM of each family, served."""
    settings, serving = serve(request.param)
    with serving:
        yield request.param, settings, serving


@pytest.fixture(scope="module")
def classifier():
    settings, serving = serve("bert")
    with serving:
        yield serving


def call(serving, path: str, body: dict) -> tuple[int, dict | bytes]:
    status, reply = post(f"{serving.gateway.url}{path}", orjson.dumps(body), timeout=60)
    try:
        return status, json.loads(reply)
    except ValueError:
        return status, reply


def transformers_greedy(settings, prompt: str, new_tokens: int) -> str:
    """transformers' greedy continuation of ``prompt`` with the fine-tuned model and its tokenizer."""
    import torch

    from autoglm.artifacts import RunDir
    from autoglm.tasks import get_task
    from autoglm.tasks.checkpoint import load_checkpoint

    task = get_task(settings)
    model = load_checkpoint(RunDir(settings.run.root, settings.run.name).stage_dir("train") / "model.pt")
    hf = model.build_model(task).eval().hf
    tokenizer = task.tokenizer
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = hf.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    whole = tokenizer.decode(out[0].tolist(), skip_special_tokens=True)
    return whole[len(tokenizer.decode(ids[0].tolist(), skip_special_tokens=True)):]


def test_greedy_generation_equals_transformers_and_streams_whole_characters(served):
    _, settings, serving = served
    assert f"{serving.catalog.task}-generate" in serving.models
    prompt = "The cat sat on"
    status, reply = call(serving, "/v1/models/hf-causal-lm:generate",
                         {"prompt": prompt, "max_new_tokens": 24, "temperature": 0})
    assert status == 200 and reply["model"] == "hf-causal-lm-generate"
    assert reply["text"] == transformers_greedy(settings, prompt, 24)
    status, body = post(f"{serving.gateway.url}/v1/models/hf-causal-lm:generate",
                        orjson.dumps({"prompt": prompt, "max_new_tokens": 24, "temperature": 0, "stream": True}))
    events = [json.loads(chunk[6:]) for chunk in body.decode().split("\n\n") if chunk.startswith("data: ")]
    assert status == 200 and all("\ufffd" not in e.get("delta", "") for e in events)
    assert "".join(e.get("delta", "") for e in events) == reply["text"] == events[-1]["text"]


def test_a_prompt_past_the_context_is_refused(served):
    _, _, serving = served
    context = serving.catalog.metadata["block_size"]
    long = "The cat sat on the mat. " * context
    status, reply = call(serving, "/v1/models/hf-causal-lm:generate", {"prompt": long})
    assert status == 413 and f"context is {context} tokens" in reply["error"]
    status, reply = call(serving, "/v1/completions", {"model": "hf-causal-lm", "prompt": long})
    assert status == 400 and reply["error"]["code"] == "context_length_exceeded"


def test_the_openai_sdk_completes_with_the_served_greedy_text(served):
    openai = pytest.importorskip("openai")
    _, settings, serving = served
    client = openai.OpenAI(base_url=f"{serving.gateway.url}/v1", api_key="unused", max_retries=0)
    prompt = "The dog ran"
    done = client.completions.create(model="hf-causal-lm", prompt=prompt, max_tokens=12, temperature=0)
    assert done.choices[0].text == transformers_greedy(settings, prompt, 12)
    assert done.usage.completion_tokens == 12 and done.usage.prompt_tokens >= 3


def test_the_classifier_answers_labels_for_texts(classifier):
    serving = classifier
    status, reply = call(serving, "/v1/models/hf-sequence-classification:predict",
                         {"instances": ["the cat was good.", {"text": "a dog was awful."}]})
    assert status == 200 and len(reply["predictions"]) == 2
    for prediction in reply["predictions"]:
        assert prediction["class"] in serving.catalog.metadata["classes"]
        assert abs(sum(prediction["probabilities"].values()) - 1) < 1e-4
    status, reply = call(serving, "/v1/models/hf-sequence-classification:predict", {"instances": [""]})
    assert status == 422 and "empty text" in reply["error"]
