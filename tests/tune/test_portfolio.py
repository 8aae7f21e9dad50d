"""Transferable priors: portfolio entries relative to the task, scaled onto tasks never seen, queued first."""

import json

import pytest

from autoglm.config import Settings
from autoglm.errors import ConfigError
from autoglm.tasks.charlm import CharLMTask
from autoglm.tasks.digits import DigitsTask
from tests.autoglm.tasks.user_task import LinearRegressionTask
from tests.tune import _tiny
from tune import attributes as attrs
from tune.portfolio import (BUILTIN, Portfolio, PortfolioEntry, from_params, load_portfolio, portfolio_params,
                            save_portfolio, to_params)
from tune.space import build_space


def _settings(model=None, **train) -> Settings:
    settings = Settings()
    return settings.model_copy(update={"train": settings.train.model_copy(update=train),
                                       "task": settings.task.model_copy(update={"model": model or {}})})


def test_width_halves_every_width_knob_and_the_width_rule_doubles_the_learning_rate():
    task = DigitsTask()  # channels 32 and hidden 64 declare role="width"
    space = build_space(task, "training")
    settings = _settings(lr=3e-3, max_steps=400, batch_size=64)

    params = to_params(PortfolioEntry(width_mult=0.5, steps_frac=0.5, batch_mult=2.0), task, settings, space)

    assert params["model.channels"] == 16 and params["model.hidden"] == 32
    assert params["train.lr"] == pytest.approx(6e-3)  # 3e-3 / 0.5: lr ∝ 1/width
    assert params["train.max_steps"] == 200 and params["train.batch_size"] == 128
    assert params["model.dropout"] == 0.1  # no role: the configured value


def test_lr_mult_is_relative_to_the_configured_rate_and_everything_is_clipped_into_the_searched_range():
    task = DigitsTask()
    space = build_space(task, "training", {"train.lr": {"high": 5e-3}, "train.max_steps": {"high": 400}})
    settings = _settings(lr=2e-3, max_steps=400)

    faster = to_params(PortfolioEntry(lr_mult=2.0), task, settings, space)
    too_far = to_params(PortfolioEntry(lr_mult=4.0, steps_frac=3.0), task, settings, space)
    wide = to_params(PortfolioEntry(width_mult=8.0), task, settings, space)

    assert faster["train.lr"] == pytest.approx(4e-3)
    assert too_far["train.lr"] == 5e-3 and too_far["train.max_steps"] == 400  # the ranges' highest
    # the width rule follows the widths realized after clipping: channels x2 (64), hidden x4 (256)
    assert wide["model.channels"] == 64 and wide["model.hidden"] == 256
    assert wide["train.lr"] == pytest.approx(2e-3 / 8 ** 0.5)


def test_depth_and_width_follow_the_roles_a_transformer_declares():
    task = CharLMTask()  # n_layer role="depth", n_embd role="width" (a categorical of widths)
    space = build_space(task, "training")
    settings = _settings(lr=1e-3, max_steps=2000)

    params = to_params(PortfolioEntry(depth_mult=0.5, width_mult=0.5, lr_mult=2.0), task, settings, space)

    assert params["model.n_layer"] == 2 and params["model.n_embd"] == 64
    assert params["train.lr"] == pytest.approx(4e-3)  # 1e-3 x 2 / 0.5
    assert params["model.n_head"] == 4 and params["model.block_size"] == 64  # no role: as configured


def test_a_user_task_without_roles_takes_only_what_applies():
    task = LinearRegressionTask()  # searches train.lr only; its one model knob has no role
    space = build_space(task, "training")
    settings = _settings(lr=1e-2)

    params = to_params(PortfolioEntry(width_mult=0.5, depth_mult=0.5, lr_mult=2.0, steps_frac=0.5,
                                      knobs={"quantize.mode": "static", "model.n_layer": 9}), task, settings, space)

    assert params == {"model.bias": True, "train.lr": pytest.approx(2e-2)}  # width ignored: no width knob


def test_an_entry_choice_the_space_does_not_search_keeps_the_configured_value():
    task = DigitsTask()
    space = build_space(task, "default", {"quantize.mode": {"choices": ["none", "dynamic"]}})

    params = to_params(PortfolioEntry(knobs={"quantize.mode": "static", "prune.ratio": 0.5}), task, _settings(), space)

    assert params["quantize.mode"] == "none" and params["prune.ratio"] == 0.5


@pytest.mark.parametrize("entry", [PortfolioEntry(lr_mult=2.0, steps_frac=0.5),
                                   PortfolioEntry(width_mult=0.5, lr_mult=1.5, batch_mult=2.0, warmup_frac=0.1,
                                                  knobs={"quantize.mode": "static"}),
                                   PortfolioEntry(depth_mult=0.5, width_mult=2.0, weight_decay=0.05)])
def test_from_params_inverts_to_params(entry):
    task = CharLMTask()
    space = build_space(task, "default")
    settings = _settings(lr=1e-3, max_steps=2000, batch_size=16)

    params = to_params(entry, task, settings, space)
    back = to_params(from_params(params, task, settings), task, settings, space)

    assert back == pytest.approx(params)
    relative = from_params(params, task, settings)
    for field in ("lr_mult", "steps_frac", "width_mult", "depth_mult", "batch_mult", "warmup_frac", "weight_decay"):
        if getattr(entry, field) is not None:
            assert getattr(relative, field) == pytest.approx(getattr(entry, field))


def test_from_params_leaves_out_the_knobs_only_its_task_has():
    entry = from_params({"model.block_size": 32, "model.n_layer": 2, "train.optimizer": "sgd",
                         "quantize.mode": "dynamic"}, CharLMTask, _settings())

    assert entry.depth_mult == 0.5 and entry.knobs == {"train.optimizer": "sgd", "quantize.mode": "dynamic"}


def test_a_portfolio_saves_and_loads_with_its_provenance(tmp_path):
    portfolio = Portfolio((PortfolioEntry(lr_mult=2.0, source="dev task a, trial 3"), PortfolioEntry()),
                          {"learned_from": ["a", "b"], "method": "greedy", "command": "make bench"})

    loaded = load_portfolio(save_portfolio(portfolio, tmp_path / "p.json"))

    assert loaded == portfolio
    assert json.loads((tmp_path / "p.json").read_text())["entries"][1] == {}


@pytest.mark.parametrize(("data", "words"), [
    ({"entries": [{}]}, "provenance"),
    ({"provenance": {"learned_from": [], "method": "x"}, "entries": [{"lr": 2}]}, "unknown field"),
    ({"provenance": {"learned_from": [], "method": "x"}, "entries": [{"lr_mult": -1}]}, "number > 0"),
    ({"provenance": {"learned_from": [], "method": "x"}, "entries": [{"knobs": {"lr": 1}}]}, "dotted knob names"),
])
def test_a_bad_portfolio_file_is_refused_with_the_fix(tmp_path, data, words):
    (tmp_path / "p.json").write_text(json.dumps(data))

    with pytest.raises(ConfigError, match=words):
        load_portfolio(tmp_path / "p.json")
    with pytest.raises(ConfigError, match="does not exist"):
        load_portfolio(tmp_path / "missing.json")


def test_the_shipped_portfolio_loads_and_says_where_it_comes_from():
    shipped = load_portfolio(None)

    assert load_portfolio("builtin") == shipped and BUILTIN.name == "portfolio.json"
    assert len(shipped.entries) >= 4 and shipped.provenance["method"]
    assert isinstance(shipped.provenance["learned_from"], list)


def test_entries_that_mean_the_same_point_on_a_task_are_queued_once():
    task = LinearRegressionTask()
    portfolio = Portfolio((PortfolioEntry(), PortfolioEntry(width_mult=0.5), PortfolioEntry(lr_mult=2.0)),
                          {"learned_from": [], "method": "test"})

    queued = portfolio_params(portfolio, task, _settings(lr=1e-2), build_space(task, "training"), 3)

    assert [i for i, _ in queued] == [0, 2]
    assert portfolio_params(portfolio, task, _settings(), build_space(task, "training", {"train.lr": 1e-2,
                                                                                       "model.bias": True}), 3) == []


def test_a_new_study_queues_the_warm_start_then_the_portfolio_once(tmp_path):
    from tune.stage import open_search

    path = save_portfolio(Portfolio((PortfolioEntry(), PortfolioEntry(lr_mult=2.0), PortfolioEntry(lr_mult=0.5)),
                                    {"learned_from": [], "method": "test"}), tmp_path / "p.json")
    settings = _tiny.settings(tmp_path, "train.lr=2e-3", "tune.warm_start={'quantize.mode' = 'static'}",
                              f"tune.portfolio='{path}'", "tune.portfolio_size=2")

    _, _, study, _ = open_search(settings, tmp_path / "tune")
    open_search(settings, tmp_path / "tune")  # resumed: nothing queued again

    trials = study.get_trials(deepcopy=False)
    assert [t.state.name for t in trials] == ["WAITING"] * 3
    assert trials[0].user_attrs == {"warm_start": True}
    assert [attrs.PORTFOLIO.get(t) for t in trials[1:]] == [0, 1]
    assert [t.system_attrs["fixed_params"]["train.lr"] for t in trials] == pytest.approx([2e-3, 2e-3, 4e-3])
    assert not any(attrs.placed(t) for t in trials[1:])  # they stand for the sampler's start-up


def test_portfolio_off_queues_nothing(tmp_path):
    from tune.stage import open_search

    _, _, study, _ = open_search(_tiny.settings(tmp_path, "tune.portfolio='off'"), tmp_path / "tune")

    assert study.get_trials(deepcopy=False) == []
