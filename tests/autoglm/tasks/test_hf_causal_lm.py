"""hf-causal-lm on tiny GPT-2 and Llama models built offline (tests/hf_fixtures.py)."""

from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pytest

from autoglm.config import TrainSettings
from autoglm.errors import ConfigError, DataError
from tests import hf_fixtures as F

pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning", "ignore::FutureWarning")
QUICK = TrainSettings(lr=3e-3, batch_size=8, max_steps=20, warmup_frac=0.0, eval_every=20, eval_batches=4)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return F.write_text(tmp_path_factory.mktemp("data") / "corpus.txt")


def make(model_dir, data, cache):
    from autoglm.tasks.hf_causal_lm import HFCausalLMTask

    return HFCausalLMTask(data=str(data), cache_dir=cache, model_id=str(model_dir))


def logits(model, ids):
    import torch

    with torch.no_grad():
        return model.eval()(torch.from_numpy(ids)).numpy()


def test_data_is_tokenized_once_per_data_and_tokenizer(corpus, tmp_path):
    task = make(F.gpt2_dir(), corpus, tmp_path)
    task.prepare()
    meta = task._data_dir / "meta.json"
    stamp = meta.stat().st_mtime_ns

    again = make(F.gpt2_dir(), corpus, tmp_path)
    again.prepare()
    other = make(F.llama_dir(), corpus, tmp_path)
    other.prepare()

    assert again._data_dir == task._data_dir and meta.stat().st_mtime_ns == stamp
    assert other._data_dir != task._data_dir  # another tokenizer, other ids
    train, val = task._split("train"), task._split("val")
    assert len(val) == int((len(train) + len(val)) * 0.1)
    assert task.tokenizer.decode(np.concatenate([train, val])[:40].tolist()) == F.CORPUS[:len(
        task.tokenizer.decode(np.concatenate([train, val])[:40].tolist()))]


def test_jsonl_documents_are_joined_by_eos(tmp_path):
    data = F.write_jsonl_text(tmp_path / "docs.jsonl")
    task = make(F.gpt2_dir(), data, tmp_path / "cache")

    ids = np.concatenate([task._split("train"), task._split("val")])

    assert int((ids == task.tokenizer.eos_token_id).sum()) == len(F.CORPUS.splitlines())


def test_batches_are_shifted_windows_capped_at_the_context(corpus, tmp_path):
    task = make(F.gpt2_dir(), corpus, tmp_path)

    (x, y), = task.batches("train", 3, 1, seed=1, model_args={"block_size": 512})
    val = list(task.batches("val", 4, 2, model_args={"block_size": 32}))

    assert x["input_ids"].shape == (3, 128) and x["input_ids"].dtype == np.int64  # n_positions of the model
    np.testing.assert_array_equal(x["input_ids"][:, 1:], y[:, :-1])
    assert [b[0]["input_ids"].shape for b in val] == [(4, 32), (4, 32)]
    assert [b[1].tolist() for b in val] == [b[1].tolist() for b in task.batches("val", 4, 2, model_args={"block_size": 32})]


def test_fine_tuning_lowers_val_loss_and_a_checkpoint_reloads(corpus, tmp_path):
    from autoglm.tasks.checkpoint import load_checkpoint, save_checkpoint
    from autoglm.tasks.predict import torch_predictor

    task = make(F.gpt2_dir(), corpus, tmp_path)
    args = task.check_model_args({"block_size": 32})
    model = task.build_model(args)
    before = task.evaluate(torch_predictor(model), n_batches=4, model_args=args)["val_loss"]

    result = task.train(model, QUICK)
    path = save_checkpoint(tmp_path / "model.pt", task.name, model, {"val_loss": result.metric})
    reloaded = load_checkpoint(path).build_model(task)

    assert result.metric < before - 1.0
    ids = task.example_inputs(2, args)["input_ids"]
    np.testing.assert_allclose(logits(reloaded, ids), logits(model, ids), atol=1e-5)


def test_lora_trains_merges_and_exports_without_adapters(corpus, tmp_path):
    import onnx
    import torch

    from autoglm.tasks.checkpoint import load_checkpoint, save_checkpoint
    from autoglm.tasks.predict import torch_predictor
    from compress.export import check_parity, export_onnx

    task = make(F.llama_dir(), corpus, tmp_path)
    args = task.check_model_args({"block_size": 32, "lora_rank": 4, "lora_dropout": 0.0})
    model = task.build_model(args)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    before = task.evaluate(torch_predictor(model), n_batches=4, model_args=args)["val_loss"]

    result = task.train(model, QUICK.model_copy(update={"lr": 1e-2}))

    assert result.metric < before - 0.05
    assert type(model.hf).__name__ == "LlamaForCausalLM"  # peft is gone
    assert model.state_dict().keys() == base.keys()
    changed = [k for k in base if not torch.equal(base[k], model.state_dict()[k])]
    assert any("q_proj" in k for k in changed) and all("embed" not in k for k in changed)
    reloaded = load_checkpoint(save_checkpoint(tmp_path / "lora.pt", task.name, model)).build_model(task)
    ids = task.example_inputs(2, args)["input_ids"]
    np.testing.assert_allclose(logits(reloaded, ids), logits(model, ids), atol=1e-5)

    used = export_onnx(model, task, args, tmp_path / "model.onnx", exporter="legacy")
    graph = onnx.load(str(tmp_path / "model.onnx")).graph
    assert not [n.name for n in (*graph.node, *graph.initializer) if "lora" in n.name.lower()]
    assert check_parity(task, model, tmp_path / "model.onnx", args, exporter=used).passed


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen3", "phi3", "gemma3"])
def test_onnx_export_keeps_batch_and_sequence_dynamic(family, corpus, tmp_path):
    from autoglm.tasks.predict import onnx_predictor
    from compress.export import check_parity, export_onnx

    task = make(getattr(F, f"{family}_dir")(), corpus, tmp_path)
    args = task.check_model_args({"block_size": 32})
    model = task.build_model(args)

    assert export_onnx(model, task, args, tmp_path / "m.onnx", exporter="legacy") == "legacy"
    assert check_parity(task, model, tmp_path / "m.onnx", args).passed
    ids = task.example_inputs(3, args)["input_ids"][:, :9]
    np.testing.assert_allclose(onnx_predictor(tmp_path / "m.onnx")({"input_ids": ids}), logits(model, ids),
                               atol=1e-4, rtol=1e-3)


def test_serving_metadata_follows_the_contract(corpus, tmp_path):
    task = make(F.llama_dir(), corpus, tmp_path)

    meta = task.serving_metadata({})

    assert set(meta) == {"tokenizer", "block_size", "eos_token_ids", "chat_template", "model_type", "family"}
    assert meta["tokenizer"]["model"]["type"] == "BPE" and meta["tokenizer"]["model"]["byte_fallback"]
    assert meta["block_size"] == 128 and meta["eos_token_ids"] == [task.tokenizer.eos_token_id]
    assert meta["chat_template"] == F.CHAT_TEMPLATE and meta["model_type"] == "llama"
    json.dumps(meta)


# ---- bad input: each one line that names the fix ---------------------------------------------------------
def one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def test_empty_data_is_a_data_error(tmp_path):
    task = make(F.gpt2_dir(), F.write_text(tmp_path / "empty.txt", ""), tmp_path / "cache")
    with pytest.raises(DataError, match="holds no text") as exc:
        task.prepare()
    one_line(exc)


def test_too_little_data_for_a_window_is_a_data_error(tmp_path):
    task = make(F.gpt2_dir(), F.write_text(tmp_path / "short.txt", F.CORPUS[:300]), tmp_path / "cache")
    with pytest.raises(DataError, match="too few for block_size"):
        next(task.batches("val", 2, 1))


def test_a_tokenizer_larger_than_the_embeddings_is_a_mismatch(corpus, tmp_path):
    task = make(F.save_gpt2(tmp_path / "small", vocab_size=100), corpus, tmp_path / "cache")
    with pytest.raises(DataError, match=r"tokenizer/model mismatch.*320 tokens.*only 100") as exc:
        task.prepare()
    one_line(exc)


def test_missing_files_are_listed(corpus, tmp_path):
    broken = shutil.copytree(F.gpt2_dir(), tmp_path / "broken")
    for name in ("tokenizer.json", "tokenizer_config.json", "model.safetensors"):
        (broken / name).unlink()
    with pytest.raises(DataError, match=r"lacks weights \(model.safetensors\), tokenizer files") as exc:
        make(broken, corpus, tmp_path / "cache").prepare()
    one_line(exc)


def test_an_unknown_architecture_names_it(corpus, tmp_path):
    odd = shutil.copytree(F.gpt2_dir(), tmp_path / "odd")
    config = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps(config | {"model_type": "nonesuch"}))
    with pytest.raises(ConfigError, match="model_type 'nonesuch' is not an architecture") as exc:
        make(odd, corpus, tmp_path / "cache").prepare()
    one_line(exc)


def test_a_classifier_is_no_causal_lm(corpus, tmp_path):
    task = make(F.bert_dir(), corpus, tmp_path / "cache")
    with pytest.raises(ConfigError, match="holds no causal LM"):
        task.build_model({})


@pytest.mark.parametrize("how", ["offline", "unreachable"])
def test_a_hub_id_offline_fails_at_once_in_one_line(how, corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    if how == "offline":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    task = make("someone/some-model", corpus, tmp_path / "cache")
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="not in the local hub cache") as exc:
        task.prepare()
    assert time.perf_counter() - start < 5
    assert "task.model_id to a local directory" in one_line(exc)


def test_model_id_is_required_and_refused_by_other_tasks(settings_in):
    from autoglm.tasks import get_task

    with pytest.raises(ConfigError, match="needs task.model_id"):
        get_task(settings_in("task.name='hf-causal-lm'", "task.data='x.txt'"))
    with pytest.raises(ConfigError, match="task.model_id='gpt2' is set, but task 'charlm' builds its own"):
        get_task(settings_in("task.name='charlm'", "task.model_id='gpt2'"))
    task = get_task(settings_in("task.name='hf-causal-lm'", "task.data='x.txt'", f"task.model_id='{F.gpt2_dir()}'"))
    assert task.model_id == str(F.gpt2_dir())
