"""The charlm task: the built-in corpus, other data sources, batching and a GPT that learns."""

from __future__ import annotations

import json

import numpy as np
import pytest

from autoglm.tasks import task_class
from autoglm.tasks.charlm import CharLMTask
from autoglm.tasks.corpus import markdown_to_text

SONNET = ("From fairest creatures we desire increase,\nThat thereby beauty's rose might never die,\n"
          "But as the riper should by time decease,\nHis tender heir might bear his memory:\n")


def test_builtin_name_resolves_to_charlm_task():
    assert task_class("charlm") is CharLMTask


def test_builtin_corpus_matches_tiny_shakespeare_in_size_and_vocabulary(cache_dir):
    task = CharLMTask(cache_dir=cache_dir)

    task.prepare()
    meta = json.loads((task.data_dir / "meta.json").read_text())
    text = task.decode(np.fromfile(task.data_dir / "train.bin", dtype=np.uint16)[:200])

    print(f"charlm corpus: {meta['chars']:,} characters, vocabulary {meta['vocab_size']}")
    assert 60 <= len(task.vocab) <= 80
    assert 1_100_000 <= meta["chars"] <= 1_115_394
    assert meta["train_tokens"] + meta["val_tokens"] == meta["chars"]
    assert meta["val_tokens"] == meta["chars"] // 10
    assert text.startswith("THESEUS:\nNow, fair Hippolyta, our nuptial hour\n")
    assert not {"_", "*", "#"} & set(task.vocab)


def test_markdown_conversion_keeps_speeches_and_drops_directions():
    markdown = ("# A Play\n\n## ACT I\n\n_Enter THESEUS and\nHIPPOLYTA_\n\n**THESEUS**  \nNow, fair one,  \n"
                "our hour draws on.\n\n_Exit PHILOSTRATE_\n\nHippolyta, I woo'd thee.\n\n**HIPPOLYTA**  \n"
                "_\\[Aside]_  \nFour days.\n")

    text = markdown_to_text(markdown)

    assert text == ("THESEUS:\nNow, fair one,\nour hour draws on.\nHippolyta, I woo'd thee.\n\n"
                    "HIPPOLYTA:\nFour days.")


def test_prepare_is_idempotent(cache_dir):
    task = CharLMTask(cache_dir=cache_dir)
    task.prepare()
    files = sorted(task.data_dir.iterdir())
    stamps = [f.stat().st_mtime_ns for f in files]

    again = CharLMTask(cache_dir=cache_dir)
    again.prepare()
    again.prepare()

    assert again.data_dir == task.data_dir
    assert sorted(again.data_dir.iterdir()) == files
    assert [f.stat().st_mtime_ns for f in files] == stamps
    assert [f.name for f in files] == ["meta.json", "train.bin", "val.bin"]  # no temp files left


def test_text_file_source(tmp_path):
    source = tmp_path / "sonnets.txt"
    source.write_text(SONNET * 40, encoding="utf-8")
    task = CharLMTask(data=str(source), cache_dir=tmp_path / "cache")

    inputs, targets = next(task.batches("train", 4, 1, seed=0, model_args={"block_size": 32}))

    assert task.data_dir.parent == tmp_path / "cache" / "charlm"
    assert "".join(task.vocab) == "".join(sorted(set(SONNET)))
    assert inputs["idx"].shape == (4, 32) and inputs["idx"].dtype == np.int64
    np.testing.assert_array_equal(inputs["idx"][:, 1:], targets[:, :-1])  # targets are inputs shifted by one
    assert task.decode(task.encode("beauty's rose")) == "beauty's rose"


def test_nanogpt_directory_source_is_read_in_place(tmp_path):
    itos = sorted(set(SONNET))
    ids = np.array([itos.index(ch) for ch in SONNET * 40], dtype=np.uint16)
    data_dir = tmp_path / "shakespeare_char"
    data_dir.mkdir()
    ids[:5000].tofile(data_dir / "train.bin")
    ids[5000:].tofile(data_dir / "val.bin")
    (data_dir / "meta.json").write_text(json.dumps({"vocab_size": len(itos), "itos": itos}))
    task = CharLMTask(data=str(data_dir), cache_dir=tmp_path / "cache")

    inputs, targets = next(task.batches("val", 2, 1, model_args={"block_size": 16}))

    assert task.data_dir == data_dir and not (tmp_path / "cache").exists()
    assert task.decode(inputs["idx"][0]) == (SONNET * 40)[5000:5016]
    assert task.decode(targets[0]) == (SONNET * 40)[5001:5017]
    assert task.io_spec(task.check_model_args({})).outputs[0].shape == (-1, len(itos))


def test_val_batches_are_the_same_every_call_and_test_reuses_val(cache_dir):
    task = CharLMTask(cache_dir=cache_dir)
    args = task.check_model_args({"block_size": 32})

    first = list(task.batches("val", 8, 5, seed=0, model_args=args))
    second = list(task.batches("val", 8, 5, seed=123, model_args=args))
    test = list(task.batches("test", 8, 5, seed=0, model_args=args))

    assert len(first) == 5 and first[0][0]["idx"].shape == (8, 32)
    for (a, ya), (b, yb), (c, yc) in zip(first, second, test, strict=True):
        np.testing.assert_array_equal(a["idx"], b["idx"])
        np.testing.assert_array_equal(a["idx"], c["idx"])
        np.testing.assert_array_equal(ya, yc)
    windows = np.concatenate([x["idx"] for x, _ in first])
    assert len(windows) == 40 and len({w.tobytes() for w in windows}) == 40  # 40 distinct windows
    val = np.fromfile(task.data_dir / "val.bin", dtype=np.uint16)
    last_start = (len(range(0, len(val) - 32, 32)) - 1) * 32
    np.testing.assert_array_equal(first[-1][0]["idx"][-1], val[last_start:last_start + 32])  # spread to the end


def test_val_metric_is_the_mean_loss_over_every_window_when_batches_cover_the_split(tmp_path):
    source = tmp_path / "sonnets.txt"
    source.write_text(SONNET * 40, encoding="utf-8")
    task = CharLMTask(data=str(source), cache_dir=tmp_path / "cache")
    uniform = lambda inputs: np.zeros((*inputs["idx"].shape, len(task.vocab)), dtype=np.float32)  # noqa: E731

    metrics = task.evaluate(uniform, "val", n_batches=100, batch_size=3, model_args={"block_size": 16})
    seen = sum(y.size for _, y in task.batches("val", 3, 100, model_args={"block_size": 16}))

    assert metrics["val_loss"] == pytest.approx(np.log(len(task.vocab)))
    assert seen == (len(SONNET * 40) // 10 - 1) // 16 * 16  # every whole window of the val split, once


def test_prunable_layers_are_the_mlp_inner_width(cache_dir):
    task = CharLMTask(cache_dir=cache_dir)
    model = task.build_model(task.check_model_args({"n_layer": 2, "n_embd": 64}))

    layers = task.prunable_layers(model)

    assert [layer.out_features for layer in layers] == [256, 256]


@pytest.mark.slow
def test_small_gpt_reaches_val_loss_below_2_5_within_a_minute(trained_charlm):
    model, result = trained_charlm.model, trained_charlm.result

    tokens_per_s = result.samples / result.wall_s
    print(f"charlm: val_loss {result.metric:.4f} after {result.steps} steps, {result.wall_s:.1f} s wall, "
          f"{result.cpu_s:.1f} s CPU, {tokens_per_s:,.0f} tokens/s; history {result.history}")
    assert result.metric < 2.5
    assert result.wall_s < 75  # time_budget_s=60 plus the final evaluation
    assert result.samples == result.steps * 12 * 64
    assert model.model_args["block_size"] == 64 and model.training is True
