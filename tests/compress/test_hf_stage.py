"""The compress stage on the Hugging Face tasks, after the train stage, with the default variants.

Tiny offline models (tests/hf_fixtures.py): Llama, Qwen3, Gemma 3 and Bert prune their MLP inner width; GPT-2 keeps
its MLP in transformers' Conv1D and Phi-3 fuses its gate and up projections, so their pruned variants are skipped
with the reason. The causal LMs get decode graphs whose context is the one the gateway is told (task.json's
block_size).
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

import pytest

from autoglm.artifacts import RunDir

pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")

from tests import hf_fixtures  # noqa: E402 - after the skips: it imports tokenizers and transformers

FAST = ["compress.exporter='legacy'", "measure.repeats=3", "measure.warmup=1", "measure.batch_sizes=[1]",
        "compress.prune.finetune_steps=4", "compress.quantize.calibration_batches=2", "compress.max_metric_loss=1.0",
        "compress.generate.int8=false", "train.max_steps=6", "train.eval_every=6", "train.batch_size=8",
        "train.eval_batches=2", "train.lr=1e-3", "train.warmup_frac=0.0"]
MODELS = {"gpt2": hf_fixtures.gpt2_dir, "llama": hf_fixtures.llama_dir, "qwen3": hf_fixtures.qwen3_dir,
          "phi3": hf_fixtures.phi3_dir, "gemma3": hf_fixtures.gemma3_dir, "bert": hf_fixtures.bert_dir}
UNPRUNABLE = {"gpt2": "GPT2LMHeadModel", "phi3": "Phi3ForCausalLM"}  # Conv1D; one fused gate/up projection
DEFAULT_VARIANTS = ["fp32", "int8", "pruned", "pruned-int8"]


def _settings(root, kind: str):
    from autoglm.config import load_settings

    if kind == "bert":
        task = ["task.name='hf-sequence-classification'", "task.model={max_length=16}",
                f"task.data='{hf_fixtures.write_labelled_csv(root / 'labels.csv')}'"]
    else:  # a served context below the fixtures' 128 positions: the cap, not the model's maximum, is served
        task = ["task.name='hf-causal-lm'", "task.model={block_size=32, context=96}",
                f"task.data='{hf_fixtures.write_text(root / 'text.txt')}'"]
    if kind == "gpt2":  # the setting that keeps the quantized graphs' cache in fp32 (llama keeps the default)
        task.append("compress.generate.kv_cache='fp32'")
    return load_settings(None, [f"run.root='{root}'", f"run.cache_dir='{root / 'cache'}'", f"run.name={kind}",
                                f"task.model_id='{MODELS[kind]()}'", *task, *FAST])


@functools.cache
def _compressed(kind: str, root: Path):
    """(kind, run dir, log records) of a train + compress run of the ``kind`` fixture, once per module."""
    from autoglm.train import train_run
    from compress.stage import compress_run

    (root / kind).mkdir(parents=True, exist_ok=True)
    settings = _settings(root / kind, kind)
    assert settings.compress.variants == DEFAULT_VARIANTS
    train_run(settings, progress=False)
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logging.getLogger("compress").addHandler(handler)
    try:
        compress_run(settings, progress=False)
    finally:
        logging.getLogger("compress").removeHandler(handler)
    return kind, RunDir(settings.run.root, kind), records


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("hf-stage")


@pytest.fixture(params=sorted(MODELS))
def compressed(request, root):
    return _compressed(request.param, root)


@pytest.fixture(params=["gpt2", "llama", "qwen3", "phi3", "gemma3"])
def causal(request, root):
    return _compressed(request.param, root)


def test_default_variants_prune_where_the_model_allows_it(compressed):
    kind, run, records = compressed

    rows = {v["name"]: v for v in json.loads((run.stage_dir("compress") / "variants.json").read_text())["variants"]}

    assert run.state("compress") == "complete"
    assert rows["fp32"]["status"] == rows["int8"]["status"] == "ok"
    skips = [r.getMessage() for r in records if "skipped" in r.getMessage()]
    if kind in UNPRUNABLE:  # skipped, said once, never a crash
        assert {rows[n]["status"] for n in ("pruned", "pruned-int8")} == {"skipped"}
        assert f"its {UNPRUNABLE[kind]} that structural pruning" in rows["pruned"]["reason"] and len(skips) == 1
    else:  # the gate/up projections of Llama, Qwen3 and Gemma 3, Bert's intermediate.dense: physically narrower
        for name in ("pruned", "pruned-int8"):
            assert rows[name]["status"] == "ok", rows[name]["reason"]
            assert rows[name]["recipe"]["params_after"] < rows[name]["recipe"]["params_before"]
        assert not skips


def test_causal_lms_get_decode_graphs_of_the_served_context(causal):
    _, run, _ = causal

    report = json.loads((run.stage_dir("compress") / "decode" / "decode.json").read_text())

    assert report["published"] and report["parity"]["passed"]
    assert report["context"] == 96  # task.model.context, below the model's 128 positions
    assert all(row["new_tokens"] <= 64 for row in report["parity"]["prompts"])
    # the manifest says which step graphs are served, as decode.json does (a small-batch one where measured faster)
    assert run.manifest("compress").metrics["generate"]["small_step"] == report["small_step"]


def test_the_kv_cache_setting_reaches_the_decode_graphs(causal):
    kind, run, _ = causal

    report = json.loads((run.stage_dir("compress") / "decode" / "decode.json").read_text())
    caches = {c["precision"]: c.get("kv_cache", "fp32") for c in report["candidates"]}

    if kind == "gpt2":  # compress.generate.kv_cache='fp32': no int8-cache copies are built
        assert not any(p.endswith("-kv8") for p in caches) and set(caches.values()) == {"fp32"}
    else:  # the default: each quantized pair also with an int8 cache
        assert caches["int4-kv8"] == "int8"


def test_the_repository_serves_the_generate_model_at_that_context(causal):
    _, run, _ = causal

    repo = run.stage_dir("repository")
    info = json.loads((repo / "task.json").read_text())

    assert info["metadata"]["block_size"] == 96  # the gateway's limit is the KV cache's length
    assert (repo / "python" / "hf-causal-lm-generate" / "config.pbtxt").is_file()
