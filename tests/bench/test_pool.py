"""The tuning benchmark's task pool: every task trains on CPU, and the development / evaluation split holds."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

from autoglm.tasks import get_task
from bench.pool import POOL, SPLIT, dev_tasks, eval_tasks, split_violations

ROOT = Path(__file__).resolve().parents[2]
TINY = ("train.max_steps=3", "train.eval_every=3", "train.eval_batches=1", "train.batch_size=8")


@pytest.mark.parametrize("name", sorted(POOL))
def test_every_pool_task_loads_and_trains_a_few_steps_on_cpu(name, tmp_path):
    settings = POOL[name].settings(0, tmp_path, TINY)
    task = get_task(settings)
    task.prepare()
    model = task.build_model(settings.task.model)

    result = task.train(model, settings.train)

    assert result.steps == 3 and math.isfinite(result.metric)
    assert [step for step, _ in result.history] == [3]


def test_the_pool_is_split_across_domains_and_kinds():
    assert set(SPLIT) == set(POOL)
    assert len(dev_tasks()) >= len(eval_tasks()) >= 4
    lm = [t for t in POOL.values() if t.task == "charlm"]
    assert len({t.corpus for t in lm}) == len(lm) >= 4  # each corpus a domain of its own
    user = [get_task(t.settings(0, Path("unused"))) for t in POOL.values() if ":" in t.task]
    assert {t.direction for t in user} == {"maximize", "minimize"}  # classification and regression
    assert len(POOL) - len(lm) >= 4
    for half in (dev_tasks(), eval_tasks()):  # both halves hold text and non-text tasks
        assert {t.task == "charlm" for t in half} == {True, False}


def test_a_prior_from_an_evaluation_task_or_a_shipped_warm_start_is_caught(tmp_path):
    config = tmp_path / "mine.toml"
    config.write_text('[tune.warm_start]\n"train.lr" = 4e-3\n')
    clean = tmp_path / "clean.toml"
    clean.write_text('[train]\nlr = 1e-3\n')
    dev, held_out = dev_tasks()[0].name, eval_tasks()[0].name

    assert split_violations({"learned_from": [dev]}, [clean]) == []
    assert split_violations({"learned_from": [dev, held_out]}, [clean]) == [
        f"the portfolio was learned from {held_out!r}, an evaluation task"]
    assert split_violations({"learned_from": ["mnist"]}, [clean]) == ["the portfolio was learned from 'mnist', "
                                                                     "not a pool task"]
    assert split_violations({"learned_from": [dev]}, [config]) == ["mine.toml ships a tune.warm_start"]
    assert split_violations({}, [])  # a portfolio that cannot say where it came from is not trusted
    assert split_violations({"learned_from": []}, []) == []  # rules set by hand, from no task


def test_the_shipped_priors_come_from_development_tasks_only():
    configs = sorted((ROOT / "configs").glob("*.toml"))
    portfolio = ROOT / "tune" / "portfolio.json"
    if importlib.util.find_spec("tune.portfolio") is None:
        provenance = {"learned_from": [dev_tasks()[0].name]}  # no portfolio mechanism: only the configs to check
    else:
        provenance = json.loads(portfolio.read_text()).get("provenance")

    assert split_violations(provenance, configs) == []


def test_the_bench_comparison_warm_starts_only_on_development_tasks():
    from bench.tune import SETUPS

    pool_name = {"digits": "digits", "charlm": "shakespeare"}  # charlm's comparison trains the built-in corpus
    for name, setup in SETUPS.items():
        assert not setup.warm_start or SPLIT[pool_name[name]] == "dev"
