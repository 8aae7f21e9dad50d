"""The digits task: fixed splits, deterministic batches, and a CNN that learns the digits quickly."""

from __future__ import annotations

import numpy as np

from autoglm.tasks import task_class
from autoglm.tasks.digits import DigitsTask
from autoglm.tasks.predict import torch_predictor


def test_builtin_name_resolves_to_digits_task():
    assert task_class("digits") is DigitsTask


def test_splits_are_stratified_70_15_15_and_independent_of_the_run_seed(tmp_path):
    a, b = DigitsTask(cache_dir=tmp_path, seed=1), DigitsTask(cache_dir=tmp_path, seed=2)

    sizes = {split: a.split_size(split) for split in ("train", "val", "test")}
    val_a = np.concatenate([y for _, y in a.batches("val", 64, 100)])
    val_b = np.concatenate([y for _, y in b.batches("val", 64, 100)])

    assert sizes == {"train": 1257, "val": 270, "test": 270}
    np.testing.assert_array_equal(val_a, val_b)
    assert np.bincount(val_a, minlength=10).min() >= 25  # every digit appears about 27 times


def test_batches_shapes_determinism_and_limits(tmp_path):
    task = DigitsTask(cache_dir=tmp_path)

    train1 = list(task.batches("train", 32, 3, seed=7))
    train2 = list(task.batches("train", 32, 3, seed=7))
    val = list(task.batches("val", 64, 100))
    capped = list(task.batches("test", 64, 2))

    assert len(train1) == 3
    inputs, targets = train1[0]
    assert inputs["image"].shape == (32, 1, 8, 8) and inputs["image"].dtype == np.float32
    assert targets.dtype == np.int64 and 0.0 <= inputs["image"].min() and inputs["image"].max() <= 1.0
    for (x1, y1), (x2, y2) in zip(train1, train2, strict=True):
        np.testing.assert_array_equal(x1["image"], x2["image"])
        np.testing.assert_array_equal(y1, y2)
    assert sum(len(y) for _, y in val) == 270 and len(val[-1][1]) == 270 - 4 * 64  # last batch smaller
    assert len(capped) == 2


def test_io_spec_names_image_and_logits(tmp_path):
    spec = DigitsTask(cache_dir=tmp_path).io_spec(DigitsTask.check_model_args({}))

    assert [(t.name, t.dtype, t.shape) for t in spec.inputs] == [("image", "float32", (1, 8, 8))]
    assert [(t.name, t.dtype, t.shape) for t in spec.outputs] == [("logits", "float32", (10,))]


def test_cnn_reaches_95_percent_test_accuracy_within_30_seconds(trained_digits):
    task, model, result = trained_digits.task, trained_digits.model, trained_digits.result

    test = task.evaluate(torch_predictor(model), "test", n_batches=100)

    print(f"digits: test accuracy {test['accuracy']:.4f} after {result.steps} steps, {result.wall_s:.1f} s wall, "
          f"{result.cpu_s:.1f} s CPU")
    assert test["accuracy"] >= 0.95
    assert result.wall_s < 30
    assert result.samples == result.steps * 64
    assert set(test) == {"accuracy", "loss"} and test["loss"] < 0.3


def test_model_prunes_structurally_with_torch_pruning(tmp_path):
    import torch
    import torch_pruning as tp

    task = DigitsTask(cache_dir=tmp_path)
    model = task.build_model(task.check_model_args({"channels": 16, "hidden": 64}))
    example = torch.from_numpy(task.example_inputs(batch_size=2)["image"])
    output_layer = model.classifier[-1]

    pruner = tp.pruner.MagnitudePruner(model, example, importance=tp.importance.MagnitudeImportance(p=1),
                                       pruning_ratio=0.5, ignored_layers=[output_layer])
    pruner.step()

    assert model.features[0].out_channels == 8 and model.classifier[1].out_features == 32
    assert model(example).shape == (2, 10)


def test_a_data_file_is_refused_not_ignored(tmp_path):
    import pytest

    from autoglm.cli import cli
    from autoglm.errors import ConfigError

    with pytest.raises(ConfigError, match="task 'digits' brings its own data and reads no file: unset task.data"):
        DigitsTask(data="my-digits.csv")
    assert cli(["train", "--set", f"run.root='{tmp_path}'", "--set", "task.name='digits'",
                "--set", "task.data='my-digits.csv'"]) == 2
    assert not any(tmp_path.rglob("model.pt"))  # refused before any training
