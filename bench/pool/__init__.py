"""The tuning benchmark's task pool, and its development / evaluation split (fixed here, and only here).

Ten tasks of different domains: four text corpora trained with the charlm task (dialogue, structured text,
prose, code; see :mod:`bench.pool.corpora`) and six non-LM tasks (the digits CNN and an MLP on scikit-learn's
tables, classification and regression; see :mod:`bench.pool.tabular`). Six are **development** tasks: priors
(the portfolio in ``tune/portfolio.json``), warm starts, default ranges and any tuning of the tuner may look at
them; two of them (scikit-learn's synthetic generators: a small noisy regression and a small classification)
widen the tabular coverage the priors are learned on. The other four are **evaluation** tasks: the goals are
judged on them only, and nothing is fitted to them (``tests/bench/test_pool.py`` fails if the shipped portfolio's
provenance or a config's warm start names one). Shakespeare and digits, the tasks the tuner was developed on,
are development tasks.

Each task's **default** (the "default" method: its model and training settings, trained once) is sized so that
its budget B (the default's CPU-seconds, trained, exported, scored and timed as a trial) is about 5-10 CPU-s:
the held-out benchmark runs six methods up to 4B on every evaluation task and seed on a two-core machine, which
at nanoGPT's CPU size (B about 100 CPU-s on charlm) would take hours, and on two shared cores even B = 15
CPU-s on the corpora did not fit the hour the full run may take. The defaults are the shipped configs'
settings (charlm's are nanoGPT's CPU shakespeare_char ones; the MLP's are common PyTorch starting values: two
hidden layers of 64, Adam at 3e-3) with smaller models or shorter schedules, the same for every task of a kind.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from autoglm.config import Settings, load_settings

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

# the split: every pool task is named once here, with its half
SPLIT: dict[str, Literal["dev", "eval"]] = {
    "shakespeare": "dev", "json": "dev", "digits": "dev", "friedman1": "dev",
    "noisy-linear": "dev", "synthetic-classification": "dev",
    "prose": "eval", "code": "eval", "breast-cancer": "eval", "diabetes": "eval",
}

# the charlm default: nanoGPT's CPU settings with half the layers and width, 400 steps (B about 10 CPU-s)
LM_MODEL = {"n_layer": 2, "n_head": 4, "n_embd": 64, "block_size": 64}
LM_TRAIN = {"max_steps": 400, "eval_every": 100, "eval_batches": 10}
# every method searches the same ranges: the model no larger than nanoGPT's, schedules up to the default's
LM_SPACE = {"model.n_layer": {"high": 4}, "model.n_embd": {"choices": [32, 64, 96, 128]},
            "model.block_size": {"choices": [32, 64]}, "train.max_steps": {"low": 100, "high": 400}}
LM_SHARED = ("compress.prune.finetune_steps=50",)
# the MLP default: 2 x 128 hidden, Adam 3e-3, batch 32, 3000 steps (B about 5 CPU-s: an MLP step costs about a
# millisecond, so a longer schedule would only overfit these small tables)
MLP_MODEL = {"hidden": 128}
MLP_TRAIN = {"max_steps": 3000, "eval_every": 250}
MLP_SPACE = {"train.max_steps": {"low": 250, "high": 3000}}
MLP_SHARED = ("compress.prune.finetune_steps=100",)
# the digits default: the shipped CNN and schedule (B about 6 CPU-s)
DIGITS_SPACE = {"model.channels": {"high": 32}, "model.hidden": {"high": 128}, "train.max_steps": {"low": 100,
                                                                                                    "high": 600}}
DIGITS_SHARED = ("compress.prune.finetune_steps=50",)
# what every method and task shares: trials export with the quick exporter, TPE draws 3 random trials before it
# models (a budget fits a handful), rungs judge from the first trial on, and a trial times its graph with 10 runs
# (the bench re-times every point side by side afterwards, see bench._tuning.retime); whether trials share one
# schedule is the method's (bench._heldout.method_settings)
SHARED = ("compress.exporter='legacy'", "tune.startup_trials=3", "tune.early_stop.warmup_trials=1",
          "tune.probe_repeats=10", "run.threads=1")


@dataclass(frozen=True)
class PoolTask:
    """One pool task: what it is, which half it is in, and how to build its settings."""

    name: str
    domain: str
    task: str  # task.name: a built-in task or "module:Class"
    config: str | None = None  # the shipped config it starts from (configs/<config>.toml), None: the defaults
    corpus: str | None = None  # a bench.pool.corpora domain trained with charlm (None: the task's own data)
    model: dict[str, Any] = field(default_factory=dict)  # the default's model, over the config's
    train: dict[str, Any] = field(default_factory=dict)  # the default's training settings, over the config's
    space: dict[str, Any] = field(default_factory=dict)  # the searched ranges, narrowed alike for every method
    overrides: tuple[str, ...] = ()
    min_resource: int = 100  # steps at the first rung (tune.early_stop.min_resource): an evaluation falls there

    @property
    def split(self) -> Literal["dev", "eval"]:
        return SPLIT[self.name]

    def settings(self, seed: int, workdir: Path, extra: tuple[str, ...] | list[str] = ()) -> Settings:
        """The default's settings on ``seed``, runs and caches under ``workdir``; ``extra`` overrides on top."""
        cache = Path(workdir) / "cache"
        sets = [f"run.name='{self.name}'", f"run.root='{Path(workdir) / 'runs'}'", f"run.cache_dir='{cache}'",
                f"run.seed={seed}", f"task.name='{self.task}'", *SHARED, *self.overrides,
                f"tune.early_stop.min_resource={self.min_resource}"]
        if self.corpus is not None:
            from bench.pool.corpora import corpus_file

            sets.append(f"task.data='{corpus_file(self.corpus, cache)}'")
        sets += [f"task.model.{k}={v!r}" for k, v in self.model.items()]
        sets += [f"train.{k}={v!r}" for k, v in self.train.items()]
        sets += [*extra]
        return load_settings(CONFIGS / f"{self.config}.toml" if self.config else None, sets)


def scaled(pool_task: PoolTask, factor: float) -> PoolTask:
    """``pool_task`` with every schedule, range of schedules, evaluation interval and rung ``factor`` times as long
    (a smoke run's tiny budgets)."""
    def steps(n) -> int:
        return max(1, round(n * factor))

    train = {**pool_task.train, **{k: steps(v) for k, v in pool_task.train.items() if k in ("max_steps", "eval_every")}}
    space = {k: {b: steps(v) if k == "train.max_steps" else v for b, v in r.items()}
             for k, r in pool_task.space.items()}
    return replace(pool_task, train=train, space=space, min_resource=steps(pool_task.min_resource))


def _lm(name: str, domain: str, corpus: str | None) -> PoolTask:
    return PoolTask(name, domain, "charlm", "charlm", corpus, LM_MODEL, LM_TRAIN, LM_SPACE, LM_SHARED, 100)


def _mlp(name: str, domain: str, cls: str) -> PoolTask:
    return PoolTask(name, domain, f"bench.pool.tabular:{cls}", None, None, MLP_MODEL, MLP_TRAIN, MLP_SPACE,
                    MLP_SHARED, 250)


POOL: dict[str, PoolTask] = {t.name: t for t in (
    _lm("shakespeare", "dialogue (Shakespeare's plays, charlm's built-in corpus)", None),
    _lm("json", "structured text (JSON: Kubernetes API schemas)", "structured"),
    _lm("prose", "prose (the Python language reference's help topics)", "prose"),
    _lm("code", "code (Python standard library source)", "code"),
    PoolTask("digits", "image classification (8x8 digits, CNN)", "digits", "digits", None, {}, {}, DIGITS_SPACE,
             DIGITS_SHARED, 50),
    _mlp("friedman1", "tabular regression (Friedman #1, MLP)", "Friedman1Task"),
    _mlp("breast-cancer", "tabular classification (breast cancer, MLP)", "BreastCancerTask"),
    _mlp("diabetes", "tabular regression (diabetes, MLP)", "DiabetesTask"),
    _mlp("noisy-linear", "tabular regression (small, noisy, linear; synthetic, MLP)", "NoisyLinearTask"),
    _mlp("synthetic-classification", "tabular classification (small, noisy labels; synthetic, MLP)",
         "SyntheticClassificationTask"),
)}


def dev_tasks() -> list[PoolTask]:
    """The development tasks: the only ones priors, warm starts and defaults may be derived from."""
    return [t for t in POOL.values() if t.split == "dev"]


def eval_tasks() -> list[PoolTask]:
    """The evaluation tasks: the goals are judged on them, and nothing is fitted to them."""
    return [t for t in POOL.values() if t.split == "eval"]


def split_label(names) -> str:
    """``"dev: a, b; eval: c, d"`` for the pool tasks among ``names``: every table says which is which."""
    names = list(names)
    halves = {half: [n for n in names if SPLIT.get(n) == half] for half in ("dev", "eval")}
    return "; ".join(f"{half}: {', '.join(found)}" for half, found in halves.items() if found)


def split_violations(provenance: dict[str, Any] | None, configs: list[Path]) -> list[str]:
    """Where a prior crosses the split: a portfolio ``provenance`` that is missing or names an evaluation task (or
    one outside the pool, which no one can check; an empty list: rules set by hand, learned from no task), and a
    shipped config carrying a warm start (a configuration picked on that config's own task; warm starts are a
    user's option, not something the project ships)."""
    found = []
    if not isinstance(provenance, dict) or not isinstance(provenance.get("learned_from"), list):
        found.append("the portfolio has no provenance listing the tasks it was learned from")
    for name in (provenance or {}).get("learned_from") or []:
        if SPLIT.get(name) != "dev":
            found.append(f"the portfolio was learned from {name!r}, "
                         f"{'an evaluation task' if name in SPLIT else 'not a pool task'}")
    for path in configs:
        if load_settings(path).tune.warm_start is not None:
            found.append(f"{path.name} ships a tune.warm_start")
    return found
