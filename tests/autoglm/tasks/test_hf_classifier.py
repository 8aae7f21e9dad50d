"""hf-sequence-classification on a tiny Bert classifier built offline (tests/hf_fixtures.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from autoglm.config import TrainSettings
from autoglm.errors import DataError
from tests import hf_fixtures as F

pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning", "ignore::FutureWarning")


def make(data, cache, model_dir=None):
    from autoglm.tasks.hf_classifier import HFClassifierTask

    return HFClassifierTask(data=str(data), cache_dir=cache, model_id=str(model_dir or F.bert_dir()))


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    return F.write_labelled_csv(tmp_path_factory.mktemp("data") / "labels.csv")


def test_one_file_splits_90_10_within_every_label(labelled, tmp_path):
    task = make(labelled, tmp_path)
    task.prepare()

    train, val = task._rows["train"], task._rows["val"]

    assert len(train) + len(val) == 150 and len(val) == 15
    assert sorted(lab for _, lab in val) == sorted(F.LABELS * 5)
    assert task.classes == list(F.LABELS)
    again = make(labelled, tmp_path)
    assert again._rows is None
    again.prepare()
    assert again._rows == task._rows  # the seeded split is the same every time


def test_a_directory_with_train_and_validation_files_and_jsonl(tmp_path):
    rows = F.labelled_rows()
    F.write_labelled_jsonl(tmp_path / "train.jsonl", rows[:120])
    F.write_labelled_csv(tmp_path / "validation.csv", rows[120:])
    task = make(tmp_path, tmp_path / "cache")

    (x, y), = task.batches("val", 50, 1)

    assert len(y) == 30 and x["input_ids"].shape == (30, 64)  # the knob's 128 capped at Bert's 64 positions
    assert [task.classes[i] for i in y] == [lab for _, lab in rows[120:]]
    assert (x["attention_mask"].sum(axis=1) == [len(task.tokenizer(t).input_ids) for t, _ in rows[120:]]).all()


def test_label_ids_follow_the_models_id2label_else_sorted(labelled, tmp_path):
    reordered = F.save_bert(tmp_path / "bert", labels=("positive", "negative", "neutral"))
    other = F.save_bert(tmp_path / "other", labels=("spam", "ham"))

    assert make(labelled, tmp_path / "c", reordered).classes == ["positive", "negative", "neutral"]
    assert make(labelled, tmp_path / "c", other).classes == sorted(F.LABELS)
    assert make(labelled, tmp_path / "c", other).build_model({}).hf.config.id2label == dict(enumerate(sorted(F.LABELS)))


def test_tokenized_splits_are_cached_per_length(labelled, tmp_path):
    task = make(labelled, tmp_path)
    list(task.batches("train", 4, 1, model_args={"max_length": 32}))
    list(task.batches("train", 4, 1, model_args={"max_length": 48}))

    assert len(list((tmp_path / task.name).iterdir())) == 2


def test_fine_tuning_learns_the_labels_and_round_trips(labelled, tmp_path):
    from autoglm.tasks.checkpoint import load_checkpoint, save_checkpoint
    from autoglm.tasks.predict import onnx_predictor, torch_predictor
    from compress.export import check_parity, export_onnx

    task = make(labelled, tmp_path)
    args = task.check_model_args({})
    model = task.build_model(args)

    result = task.train(model, TrainSettings(lr=3e-3, batch_size=16, max_steps=80, warmup_frac=0.05, eval_every=80,
                                             eval_batches=4))
    reloaded = load_checkpoint(save_checkpoint(tmp_path / "m.pt", task.name, model)).build_model(task)

    assert result.metric >= 0.8
    assert task.evaluate(torch_predictor(reloaded), model_args=args) == task.evaluate(torch_predictor(model),
                                                                                      model_args=args)
    assert export_onnx(model, task, args, tmp_path / "m.onnx", exporter="legacy") == "legacy"
    assert check_parity(task, model, tmp_path / "m.onnx", args).passed
    via_onnx = task.evaluate(onnx_predictor(tmp_path / "m.onnx"), model_args=args)
    assert via_onnx["accuracy"] == pytest.approx(result.metric)


def test_lora_merges_back_into_a_plain_classifier(labelled, tmp_path):
    import torch

    task = make(labelled, tmp_path)
    model = task.build_model({"max_length": 32, "lora_rank": 4})
    base = {k: v.clone() for k, v in model.state_dict().items()}

    task.train(model, TrainSettings(lr=1e-2, batch_size=16, max_steps=5, eval_every=5, eval_batches=1))

    assert type(model.hf).__name__ == "BertForSequenceClassification"
    assert model.state_dict().keys() == base.keys()
    changed = {k for k in base if not torch.equal(base[k], model.state_dict()[k])}
    assert any("attention" in k for k in changed) and any(k.startswith("hf.classifier") for k in changed)


def test_serving_metadata_follows_the_contract(labelled, tmp_path):
    meta = make(labelled, tmp_path).serving_metadata({"max_length": 256})

    assert set(meta) == {"tokenizer", "classes", "max_length", "model_type"}
    assert meta["classes"] == list(F.LABELS) and meta["max_length"] == 64 and meta["model_type"] == "bert"
    json.dumps(meta)


# ---- bad input -------------------------------------------------------------------------------------------
def test_label_sets_that_differ_between_splits_name_the_labels(tmp_path):
    rows = F.labelled_rows()
    F.write_labelled_csv(tmp_path / "train.csv", [r for r in rows if r[1] != "neutral"])
    F.write_labelled_csv(tmp_path / "val.csv", rows[:20] + [("odd one", "surprised")])
    with pytest.raises(DataError, match=r"only in train \[\], only in validation \['neutral', 'surprised'\]"):
        make(tmp_path, tmp_path / "cache").prepare()


def test_a_label_with_one_example_cannot_be_split(tmp_path):
    data = F.write_labelled_csv(tmp_path / "d.csv", F.labelled_rows()[:30] + [("lonely", "rare")])
    with pytest.raises(DataError, match=r"label\(s\) \['rare'\] .* single example"):
        make(data, tmp_path / "cache").prepare()


@pytest.mark.parametrize("content, match", [
    ("text,label\n", "holds no labelled texts"),
    ("sentence,class\nhi,a\n", "needs a header row with 'text' and 'label'"),
])
def test_empty_or_headerless_csv_is_a_data_error(content, match, tmp_path):
    (tmp_path / "d.csv").write_text(content)
    with pytest.raises(DataError, match=match):
        make(tmp_path / "d.csv", tmp_path / "cache").prepare()


def test_a_bad_jsonl_line_is_named(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "a", "label": "x"}\n{"text": "b"}\n')
    with pytest.raises(DataError, match=r"d.jsonl:2 needs a string \"text\" and a string"):
        make(tmp_path / "d.jsonl", tmp_path / "cache").prepare()


def test_scores_count_correct_labels():
    from autoglm.tasks.hf_classifier import HFClassifierTask

    sums = HFClassifierTask.score(None, np.array([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]]), np.array([0, 1, 1]))

    assert sums["correct"] == 2 and sums["count"] == 3
