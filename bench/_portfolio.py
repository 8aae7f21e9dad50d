"""``bench tune --learn-portfolio``: learn ``tune/portfolio.json`` on the development tasks of the pool, and only there.

1. On each development task (:func:`bench.pool.dev_tasks`, seed 0) the default runs once (its CPU-seconds are B),
   then an AutoGLM-cold study (tune's TPE + early stopping, nothing queued first) searches for 4B.
2. Each study's best completed configurations (:data:`PER_TASK`, distinct trained models) are expressed relative
   to their task with :func:`tune.portfolio.from_params`; the task's configured run (the empty entry) joins them.
3. Every candidate is trained on every development task (:func:`tune.portfolio.to_params`: the candidate as that
   task's concrete values, trained on the full schedule like a trial, compressed and scored), giving its metric
   there, turned into a normalized regret: 0 for the task's best candidate, 1 for its worst.
4. A greedy portfolio: entry by entry, the candidate that lowers the mean (over tasks) of the best regret among
   the entries so far the most (auto-sklearn 2.0's greedy portfolio construction), up to ``tune.portfolio_size``.

The provenance names the development tasks; ``tests/bench/test_pool.py`` fails if it names an evaluation task.
"""

from __future__ import annotations

import math
import statistics
import tempfile
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from autoglm.config import TuneSettings
from bench._heldout import HORIZON, method_settings, warm_up
from bench._tuning import better, cpu_spent, search
from bench.harness import Table
from bench.pool import POOL, dev_tasks, scaled

PER_TASK = 2  # candidates from each development study: its best completed configurations
COMMAND = 'make bench ARGS="tune --learn-portfolio"'


def _study(args) -> list[dict]:
    """One development task's AutoGLM-cold study to 4B; its best configurations as portfolio entries (JSON)."""
    from autoglm.tasks import task_class
    from tune.portfolio import from_params

    name, workdir, factor = args
    pool_task = POOL[name] if factor == 1.0 else scaled(POOL[name], factor)
    where = Path(workdir) / name
    warm_up(where / "warm-up")
    _, trials = search(method_settings(pool_task, 0, where, "default"), where / "default", 0.0, 1)
    settings = method_settings(pool_task, 0, where, "AutoGLM cold")
    task, found = search(settings, where / "study", HORIZON * cpu_spent(trials), 500)
    done = sorted((t for t in found if t.state.name == "COMPLETE"), key=lambda t: t.values[0],
                  reverse=task.direction == "maximize")
    entries, seen = [], []
    for t in done:
        entry = from_params(t.params, task_class(settings.task.name), settings).to_dict()
        entry.pop("source", None)
        if entry in seen:  # a compression sibling the portfolio cannot tell apart
            continue
        seen.append(entry)
        entries.append(entry | {"source": f"{name}: AutoGLM-cold study trial {t.number} ({task.metric} "
                                          f"{t.values[0]:.4g})"})
        if len(entries) == PER_TASK:
            break
    return entries


def _score(args) -> float:
    """A candidate entry trained on one development task as a fixed configuration; its served metric."""
    from autoglm.tasks import get_task
    from tune.portfolio import PortfolioEntry, to_params
    from tune.space import build_space, with_shared_schedule

    index, entry, name, workdir, factor = args
    pool_task = POOL[name] if factor == 1.0 else scaled(POOL[name], factor)
    where = Path(workdir) / name / f"candidate-{index}"
    warm_up(where / "warm-up")
    settings = method_settings(pool_task, 0, where, "AutoGLM cold")
    task = get_task(settings)
    task.prepare()
    space = with_shared_schedule(build_space(task, settings.tune.search_space, settings.tune.space))
    params = to_params(PortfolioEntry.from_dict(entry), task, settings, space)
    tune = settings.tune.model_dump() | {"space": params | {"train.max_steps": space["train.max_steps"]},
                                         "early_stop": {**settings.tune.model_dump()["early_stop"], "enabled": False}}
    fixed = settings.model_copy(update={"tune": TuneSettings.model_validate(tune)})
    _, trials = search(fixed, where / "run", 0.0, 1)
    done = [t for t in trials if t.state.name == "COMPLETE"]
    return done[0].values[0] if done else math.nan


def regrets(values: dict[str, list[float]], directions: dict[str, str]) -> dict[str, list[float]]:
    """Per task, each candidate's normalized regret: 0 for the best, 1 for the worst (or a failed run)."""
    out = {}
    for task, row in values.items():
        sign = 1.0 if directions[task] == "maximize" else -1.0
        good = [sign * v for v in row if not math.isnan(v)]
        best, worst = (max(good), min(good)) if good else (0.0, 0.0)
        span = best - worst or 1.0
        out[task] = [1.0 if math.isnan(v) else (best - sign * v) / span for v in row]
    return out


def greedy(regret: dict[str, list[float]], size: int) -> list[int]:
    """Candidate indices, each the one that lowers the mean over tasks of the portfolio's best regret the most."""
    chosen: list[int] = []
    n = len(next(iter(regret.values())))
    for _ in range(min(size, n)):
        def mean_with(c: int) -> float:
            return statistics.fmean(min(row[i] for i in (*chosen, c)) for row in regret.values())

        chosen.append(min((c for c in range(n) if c not in chosen), key=lambda c: (mean_with(c), c)))
    return chosen


def learn(quick: bool, workers: int = 1) -> list[Table]:
    """Learn the portfolio; written to ``tune/portfolio.json`` (a quick run only reports what it would write)."""
    from tune.portfolio import BUILTIN, Portfolio, PortfolioEntry, save_portfolio

    names = [t.name for t in dev_tasks()][: 1 if quick else None]
    factor = 1 / 6 if quick else 1.0
    size = TuneSettings().portfolio_size
    with tempfile.TemporaryDirectory(prefix="autoglm-bench-portfolio-") as tmp, \
            ProcessPoolExecutor(max(1, workers), mp_context=get_context("spawn")) as pool:
        found = list(pool.map(_study, [(n, tmp, factor) for n in names]))
        candidates = [{"source": "the task's configured run"}] + [e for entries in found for e in entries]
        jobs = [(i, c, n, tmp, factor) for n in names for i, c in enumerate(candidates)]
        scores = list(pool.map(_score, jobs))
    values = {n: scores[k * len(candidates):(k + 1) * len(candidates)] for k, n in enumerate(names)}
    directions = {n: _direction(n) for n in names}
    regret = regrets(values, directions)
    chosen = greedy(regret, size)
    portfolio = Portfolio(tuple(PortfolioEntry.from_dict(candidates[i]) for i in chosen), {
        "learned_from": names, "method": f"greedy portfolio over {len(candidates)} candidates (the configured run "
        f"and each development study's best {PER_TASK}), minimizing the mean normalized regret across the "
        "development tasks", "command": COMMAND})
    if not quick:
        save_portfolio(portfolio, BUILTIN)
    return [_table(candidates, values, regret, chosen, names, quick)]


def _direction(name: str) -> str:
    from autoglm.tasks import task_class

    return task_class(POOL[name].task).direction


def _table(candidates, values, regret, chosen, names, quick) -> Table:
    rows = []
    for i, c in enumerate(candidates):
        rank = chosen.index(i) + 1 if i in chosen else None
        entry = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in c.items()
                          if k != "source")
        rows.append([i, c.get("source", ""), entry or "(configured run)", *[values[n][i] for n in names],
                     statistics.fmean(regret[n][i] for n in names), rank])
    best = statistics.fmean(min(regret[n][i] for i in chosen) for n in names)
    return Table(f"Portfolio learned on the development tasks ({', '.join(names)}; dev only)",
                 ["#", "from", "entry (relative to the task)", *[f"{n} (dev)" for n in names], "mean regret",
                  "portfolio rank"], rows,
                 [f"each cell: the candidate trained once on that task (seed 0, the default's schedule), served "
                  f"metric; regret normalized per task (0 best, 1 worst candidate); the portfolio's mean best "
                  f"regret {best:.3f}",
                  "evaluation tasks took no part: not in the studies, not in the scoring"
                  + ("; quick run: nothing written" if quick else "; written to tune/portfolio.json")])
