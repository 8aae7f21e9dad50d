"""The search space: presets, overrides from config, rejection of bad spaces, knobs -> compress variant."""

import optuna
import pytest

from autoglm.cli import cli
from autoglm.config import load_settings
from autoglm.errors import ConfigError
from autoglm.tasks import Knob
from autoglm.tasks.charlm import CharLMTask
from autoglm.tasks.digits import DigitsTask
from compress import variant_for
from tune.space import build_space, split_params, suggest, warm_start_params

COMPRESSION = {"quantize.mode", "prune.ratio"}


def test_presets_gather_the_tasks_knobs_and_the_compression_knobs():
    task = DigitsTask()

    joint, training, compression = (set(build_space(task, p)) for p in ("default", "training", "compression"))

    arch_and_train = {f"model.{k}" for k in task.model_space} | {f"train.{k}" for k in task.train_space}
    assert joint == arch_and_train | COMPRESSION
    assert training == arch_and_train
    assert compression == COMPRESSION


def test_charlm_searches_architecture_and_training_knobs():
    space = build_space(CharLMTask(), "training")

    assert {"model.n_layer", "model.n_embd", "model.n_head", "model.dropout", "train.lr", "train.weight_decay",
            "train.warmup_frac", "train.batch_size", "train.grad_accum", "train.max_steps"} <= set(space)
    assert space["train.lr"].log


def test_a_range_override_keeps_the_rest_of_the_knob():
    space = build_space(DigitsTask(), "default", {"train.lr": {"low": 1e-3}})

    assert space["train.lr"] == Knob("float", 3e-3, low=1e-3, high=1e-2, log=True)


def test_choices_make_a_knob_categorical_and_a_plain_value_fixes_it():
    space = build_space(DigitsTask(), "default", {"model.channels": {"choices": [8, 16]}, "train.max_steps": 50})
    trial = optuna.create_study().ask()

    params = suggest(trial, space)

    assert space["model.channels"].kind == "categorical" and params["model.channels"] in (8, 16)
    assert params["train.max_steps"] == 50 and "train.max_steps" not in trial.params  # fixed: not searched
    assert split_params(params)["train"]["max_steps"] == 50


def test_a_toml_file_can_name_only_the_knobs_to_search(tmp_path):
    path = tmp_path / "space.toml"
    path.write_text('only = true\n"train.lr" = {low = 1e-3, high = 5e-3, log = true}\n"prune.ratio" = 0.0\n')

    space = build_space(DigitsTask(), str(path))

    assert set(space) == {"train.lr", "prune.ratio"}
    assert space["train.lr"].high == 5e-3 and space["prune.ratio"] == 0.0


@pytest.mark.parametrize(("preset", "overrides", "message"), [
    ("default", {"model.chanels": 8}, "unknown knob 'model.chanels'"),
    ("default", {"train.lr": {"low": 1e-2, "high": 1e-3}}, "need low <= high"),
    ("default", {"train.lr": {"low": 0.0}}, "a log range needs low > 0"),
    ("default", {"train.lr": {"lo": 1e-3}}, "unknown field(s) ['lo']"),
    ("default", {"train.batch_size": {"choices": []}}, "choices must not be empty"),
    ("default", {"train.batch_size": 0}, "train.batch_size=0 is invalid"),
    ("default", {"train.warmup_frac": {"low": 0.0, "high": 1.5}}, "train.warmup_frac=1.5 is invalid"),
    ("default", {"quantize.mode": "fast"}, "use one of ['none', 'dynamic', 'static', 'qat', 'int4']"),
    ("default", {"train.lr": {"low": "1e-4"}}, "low must be a number, not '1e-4'"),
    ("default", {"train.batch_size": {"choices": 64}}, "choices must be a list"),
    ("default", {"train.lr": {"log": "no"}}, "log must be true or false"),
    ("default", {"train.warmup_frac": {"step": 0}}, "step must be a positive number"),
    ("default", {"prune.ratio": {"high": 1.0}}, "prune.ratio=1.0 is invalid"),
    # sizes and probabilities a model cannot be built with: the trial would fail in its export
    ("default", {"model.channels": 0}, "model.channels=0 is invalid: use an integer >= 1"),
    ("default", {"model.hidden": {"low": 0, "high": 4}}, "model.hidden=0 is invalid"),
    ("default", {"model.dropout": {"low": 0.5, "high": 1.5}}, "model.dropout=1.5 is invalid: use a number >= 0 "
                                                               "and <= 1"),
    ("default", {"train.lr": {"high": float("inf")}}, "high must be finite"),
    ("default", {"train.batch_size": {"low": 16, "high": 256}}, "train.batch_size takes choices, not ['high', "
                                                                "'low']: e.g. {choices = [32, 64, 128]}"),
    ("default", {"quantize.per_channel": {"low": 0}}, "choices = [true, false]"),
    ("default", {"model": {"channels": 16}}, "quote the knob's name, e.g. \"model.channels\" = ..."),
    ("training", {"quantize.mode": "static"}, "knob 'quantize.mode' is not in this search space"),
    ("training", {"quantize.calibration": "entropy"}, "knob 'quantize.calibration' is not in this search space"),
    ("compression", {"train.lr": 1e-3}, "knob 'train.lr' is not in this search space"),
    ("fastest", {}, "unknown search space preset 'fastest'"),
    ("missing.toml", {}, "missing.toml does not exist"),
])
def test_a_bad_search_space_is_rejected_with_a_message_naming_the_fix(preset, overrides, message):
    with pytest.raises(ConfigError) as error:
        build_space(DigitsTask(), preset, overrides)

    assert message in str(error.value)


def test_the_passes_other_knobs_can_be_searched_or_fixed_where_the_space_compresses():
    space = build_space(DigitsTask(), "default", {"quantize.calibration": {"choices": ["minmax", "entropy"]},
                                                  "prune.finetune_steps": 100})
    params = suggest(optuna.create_study().ask(), space)

    assert space["quantize.calibration"].choices == ("minmax", "entropy") and "quantize.per_channel" not in space
    assert split_params(params)["quantize"]["calibration"] in ("minmax", "entropy")
    assert split_params(params)["prune"]["finetune_steps"] == 100
    assert "quantize.calibration" not in build_space(DigitsTask(), "default")  # by default compress's config holds


def test_a_malformed_toml_space_is_a_config_error(tmp_path):
    path = tmp_path / "space.toml"
    path.write_text("train.lr = {low = \n")

    with pytest.raises(ConfigError, match="is not valid TOML"):
        build_space(DigitsTask(), str(path))


def test_the_tune_command_refuses_a_bad_space_before_any_trial(tmp_path, capsys):
    code = cli(["tune", "--run", "bad", "--set", f"run.root='{tmp_path}'",
                "--set", 'tune.space={"model.chanels" = 8}'])

    err = capsys.readouterr().err
    assert code == 2 and "unknown knob 'model.chanels'" in err and "Traceback" not in err
    assert not (tmp_path / "bad" / "tune" / "trials").exists()


@pytest.mark.parametrize(("mode", "ratio", "variant"), [
    ("none", 0.0, "fp32"), ("dynamic", 0.0, "int8-dynamic"), ("static", 0.0, "int8-static"),
    ("none", 0.5, "pruned"), ("dynamic", 0.25, "pruned-int8"), ("static", 0.5, "pruned-int8"),
    ("qat", 0.0, "qat"), ("qat", 0.25, "pruned-qat"), ("int4", 0.0, "int4"), ("int4", 0.5, "pruned-int4"),
])
def test_variant_for_maps_the_compression_knobs_to_a_compress_variant(mode, ratio, variant):
    assert variant_for({"quantize": {"mode": mode}, "prune": {"ratio": ratio}}) == variant


def test_qat_is_searched_where_tune_space_opts_in():
    default = build_space(DigitsTask(), "default")
    opted = build_space(DigitsTask(), "default", {"quantize.mode": {"choices": ["none", "static", "qat"]}})

    assert default["quantize.mode"].choices == ("none", "dynamic", "static")  # each qat trial costs a fine-tune
    assert opted["quantize.mode"].choices == ("none", "static", "qat")
    assert build_space(DigitsTask(), "compression", {"quantize.mode": "qat"})["quantize.mode"] == "qat"
    with pytest.raises(ConfigError, match="tune.space.quantize.mode='int2' is invalid"):
        build_space(DigitsTask(), "default", {"quantize.mode": {"choices": ["none", "int2"]}})


def test_variant_for_without_compression_knobs_is_fp32():
    assert variant_for({"model": {"channels": 8}}) == "fp32"


def _warm_start_settings(**train):
    from autoglm.config import Settings

    settings = Settings()
    return settings.model_copy(update={"train": settings.train.model_copy(update=train)})


def test_the_warm_start_is_the_configured_run_clipped_into_the_searched_ranges():
    task = DigitsTask()
    space = build_space(task, "default", {"train.max_steps": {"high": 400}, "model.dropout": 0.1})
    settings = _warm_start_settings(lr=3e-3, batch_size=100, max_steps=600)

    params = warm_start_params(task, settings, space, {"quantize.mode": "static"})

    assert params["train.lr"] == 3e-3 and params["train.max_steps"] == 400  # clipped to the range's longest
    assert params["train.batch_size"] == 128  # the nearest searched choice
    assert params["model.channels"] == settings.task.model.get("channels", 32)
    assert params["quantize.mode"] == "static" and params["prune.ratio"] == 0.0  # compression knobs: defaults
    assert "model.dropout" not in params  # fixed knobs are not the sampler's to take
    assert set(params) == {k for k, v in space.items() if isinstance(v, Knob)}


def test_a_warm_start_skips_knobs_the_space_does_not_search_and_rejects_unknown_ones():
    task = DigitsTask()
    space = build_space(task, "training")

    params = warm_start_params(task, _warm_start_settings(), space, {"quantize.mode": "static"})

    assert "quantize.mode" not in params and "train.lr" in params
    with pytest.raises(ConfigError, match=r"tune.warm_start: unknown knob\(s\) \['quantize.mod'\]"):
        warm_start_params(task, _warm_start_settings(), space, {"quantize.mod": "static"})
    with pytest.raises(ConfigError, match=r"tune.warm_start: train.lr='1e-3' must be a number"):
        warm_start_params(task, _warm_start_settings(), space, {"train.lr": "1e-3"})


@pytest.mark.parametrize(("shared", "enabled", "expected"), [
    (True, True, 300),  # the rungs own the step budget: every trial's schedule is the range's longest
    (False, True, None),  # max_steps stays searched
    (True, False, None),  # no rungs: a shared schedule would only remove a knob
])
def test_a_shared_schedule_fixes_max_steps_at_the_ranges_longest_only_under_early_stopping(
        tmp_path, shared, enabled, expected):
    from tests.tune import _tiny
    from tune.stage import open_search

    space = '{"model.channels" = 8, "model.hidden" = 32, "train.max_steps" = {low = 100, high = 300}}'
    settings = load_settings(None, [*_tiny.overrides(tmp_path), f"tune.space={space}",
                                    f"tune.early_stop.shared_schedule={str(shared).lower()}",
                                    f"tune.early_stop.enabled={str(enabled).lower()}"])

    _, space, study, _ = open_search(settings, tmp_path / "tune")
    steps = [suggest(study.ask(), space)["train.max_steps"] for _ in range(8)]

    if expected is None:
        assert isinstance(space["train.max_steps"], Knob) and len(set(steps)) > 1
    else:
        assert space["train.max_steps"] == expected and set(steps) == {expected}


# ---- the training loop's knobs: opt-in by name, conditional knobs sampled define-by-run -----------

LOOP = {"train.optimizer", "train.schedule", "train.feedback_every"}


@pytest.mark.parametrize("preset", ["default", "training", "adaptive"])
def test_no_preset_searches_the_loops_optimizer_schedule_or_feedback(preset):
    for task in (DigitsTask(), CharLMTask()):
        assert not {k for k in build_space(task, preset) if k.startswith("train.")} - {
            f"train.{k}" for k in task.train_space}


def test_naming_the_optimizer_and_schedule_searches_their_own_knobs_only_where_they_apply():
    space = build_space(DigitsTask(), "training", {"train.optimizer": {}, "train.schedule": {},
                                                   "train.feedback_every": {}})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))

    drawn = [suggest(study.ask(), space) for _ in range(60)]

    assert LOOP | {"train.momentum", "train.beta1", "train.step_gamma", "train.adaptive_batch"} <= set(space)
    names = list(space)
    assert names.index("train.optimizer") < names.index("train.momentum")  # the parent is sampled first
    for params in drawn:
        assert ("train.momentum" in params) == (params["train.optimizer"] == "sgd")
        assert ("train.beta1" in params) == ("train.beta2" in params) == (params["train.optimizer"] == "adamw")
        assert ("train.step_gamma" in params) == ("train.step_every" in params) == (params["train.schedule"] == "step")
        assert ("train.adaptive_batch" in params) == (params["train.feedback_every"] > 0)
        assert ("train.max_grad_accum" in params) == bool(params.get("train.adaptive_batch"))
    assert {p["train.optimizer"] for p in drawn} == {"adamw", "sgd", "adafactor"}
    assert any(p.get("train.adaptive_batch") for p in drawn)
    assert set(study.trials[0].params) == set(drawn[0])  # what Optuna records: only the knobs drawn


def test_a_fixed_optimizer_brings_only_its_own_knobs():
    space = build_space(DigitsTask(), "default", {"train.optimizer": "sgd", "train.feedback_every": 0,
                                                  "train.schedule": {"choices": ["cosine", "step"]}})

    assert space["train.optimizer"] == "sgd" and isinstance(space["train.momentum"], Knob)
    assert not {"train.beta1", "train.beta2", "train.adaptive_batch", "train.max_grad_accum"} & set(space)
    assert {"train.step_gamma", "train.step_every"} <= set(space)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"train.optimizer": "lion"}, r"tune.space.train.optimizer='lion' is invalid: use one of \['adamw', 'sgd', "
                                  r"'adafactor'\]"),
    ({"train.schedule": {"choices": ["cosine", "cyclic"]}}, "tune.space.train.schedule='cyclic' is invalid"),
    ({"train.momentum": {"low": 0.5, "high": 1.5}}, "tune.space.train.momentum=1.5 is invalid"),
    ({"train.optimzer": {}}, "unknown knob 'train.optimzer'"),
])
def test_bad_loop_knobs_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        build_space(DigitsTask(), "default", overrides)


def test_the_compression_preset_refuses_the_loops_knobs_naming_the_preset_to_use():
    with pytest.raises(ConfigError, match="not in this search space"):
        build_space(DigitsTask(), "compression", {"train.optimizer": {}})


def test_a_warm_start_takes_the_configured_optimizer_and_skips_knobs_it_does_not_use():
    task = DigitsTask()
    space = build_space(task, "training", {"train.optimizer": {}, "train.schedule": {}})

    params = warm_start_params(task, _warm_start_settings(optimizer="sgd", momentum=0.95), space)

    assert params["train.optimizer"] == "sgd" and params["train.momentum"] == 0.95
    assert params["train.schedule"] == "cosine"
    assert not {"train.beta1", "train.beta2", "train.step_gamma"} & set(params)


def test_adaptive_batch_can_be_fixed_on_with_feedback_searched():
    space = build_space(DigitsTask(), "training", {"train.feedback_every": {"choices": [10, 50]},
                                                   "train.adaptive_batch": True})
    params = suggest(optuna.create_study().ask(), space)

    assert params["train.adaptive_batch"] is True and params["train.feedback_every"] in (10, 50)
    assert params["train.max_grad_accum"] in (4, 8, 16)
