"""``bench tune --learn-portfolio``: learn ``tune/portfolio.json`` on the development tasks of the pool, and only there.

1. **Candidates**, all relative to the task (:class:`tune.portfolio.PortfolioEntry`): the task's configured run
   (the empty entry); a scrambled Sobol sample (:data:`SOBOL` points) of :data:`DIMENSIONS`, the multipliers and
   absolute knobs an entry may set (the schedule's length among them), so the candidates cover the space evenly
   rather than cluster where one study looked; and the entries of the portfolio shipped before
   (:func:`previous_entries`: Sobol points and the best trials of AutoGLM-cold studies on development tasks,
   expressed relative to their task with :func:`tune.portfolio.from_params`), which compete again rather than
   being searched for anew.
2. **Every candidate on every development task** (:func:`tune.portfolio.to_params`: the candidate as that task's
   concrete values, trained on its own schedule like a trial, compressed and scored), giving its served metric
   and its **cost** in units of that task's B (the default's CPU-seconds, measured in the same run).
3. **Regret** per task: 0 for the best candidate, 1 for the median one, clipped at :data:`WORST` (a diverged or
   failed run), so a handful of wild Sobol points do not squeeze the good ones together.
4. **A cost-aware greedy portfolio** (auto-sklearn 2.0's greedy construction, scored as Wistuba et al.'s
   sequential model-free HPO scores an ordered set): entry by entry, the candidate that lowers the mean over
   tasks and over the budgets 1B, 2B, 4B of the best regret among the entries *finished within that budget*
   (entries run one after another, each costing what it cost on that task; nothing finished: :data:`MISSING`).
   The first entry must fit inside :data:`FIRST_WITHIN` x B on every development task, so a study has a result
   at 1B; an entry that lowers it no further is not added (the search behind the portfolio gets the compute).

The provenance names the development tasks; ``tests/bench/test_pool.py`` fails if it names an evaluation task.
"""

from __future__ import annotations

import math
import os
import statistics
import tempfile
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from autoglm.config import TuneSettings
from bench._heldout import MULTIPLES, method_settings, warm_up
from bench._tuning import cpu_spent, search
from bench.harness import Table
from bench.pool import POOL, dev_tasks, scaled

SOBOL = 16  # Sobol candidates (a power of two keeps the sample balanced; 16: the learning run fits 20 min)
# what a Sobol candidate sets: field or dotted knob -> (low, high, log); the ranges keep a candidate within a few
# B on every task (width and depth multiply an LM's cost, batch every task's). ``steps_frac``: an entry carries
# its schedule's length, from a tenth of the configured one (clipped into the searched range) to all of it: on a
# small table a short schedule is both cheaper and better (a long one overfits), on a corpus the whole one wins
DIMENSIONS = {"steps_frac": (0.1, 1.0, True), "lr_mult": (0.05, 4.0, True), "width_mult": (0.35, 1.5, True),
              "depth_mult": (0.5, 1.5, True),
              "batch_mult": (0.5, 2.0, True), "warmup_frac": (0.0, 0.2, False), "weight_decay": (0.0, 0.1, False),
              "model.dropout": (0.0, 0.3, False)}
WORST, MISSING = 2.0, 3.0  # regret: a failed or diverged candidate; no entry finished within the budget
FIRST_WITHIN = 0.85  # the first entry's largest cost over the development tasks, in units of B (margin for load)
COMMAND = 'make bench ARGS="tune --learn-portfolio --workers 4"'


def sobol_candidates(n: int = SOBOL, seed: int = 0) -> list[dict]:
    """``n`` portfolio entries (JSON form) spread over :data:`DIMENSIONS` by a scrambled Sobol sequence."""
    from scipy.stats import qmc

    names = list(DIMENSIONS)
    points = qmc.Sobol(len(names), scramble=True, seed=seed).random(n)
    out = []
    for k, point in enumerate(points):
        entry: dict = {"knobs": {}}
        for name, u in zip(names, point):
            low, high, log = DIMENSIONS[name]
            value = math.exp(math.log(low) + u * (math.log(high) - math.log(low))) if log else low + u * (high - low)
            (entry["knobs"] if "." in name else entry)[name] = round(value, 4)
        out.append(entry | {"source": f"Sobol point {k}"})
    return out


PREVIOUS = "shipped before: "  # the source's prefix of a candidate that was an entry of the previous portfolio


def previous_entries(portfolio) -> list[dict]:
    """The entries of ``portfolio`` (JSON form, the source marked :data:`PREVIOUS`) that set anything, when it was
    learned on development tasks only (a portfolio crossing the split contributes nothing)."""
    from bench.pool import SPLIT

    if any(SPLIT.get(name) != "dev" for name in portfolio.provenance.get("learned_from") or ["none"]):
        return []
    return [e.to_dict() | {"source": e.source if e.source.startswith(PREVIOUS) else PREVIOUS + e.source}
            for e in portfolio.entries if set(e.to_dict()) - {"source"}]


_WARM = []  # this worker process has run its warm-up


def _warm_up(workdir) -> None:
    """One warm-up per worker process: imports and first sessions charge no candidate."""
    if not _WARM:
        warm_up(Path(workdir) / "warm-up" / str(os.getpid()))
        _WARM.append(True)


def candidate_settings(entry: dict, pool_task, workdir: Path):
    """The settings that train ``entry`` (JSON form) on ``pool_task`` as one fixed configuration: every searched
    knob set (:func:`tune.portfolio.to_params`, the schedule's length included), early stopping off."""
    from autoglm.tasks import get_task
    from tune.portfolio import PortfolioEntry, to_params
    from tune.space import build_space

    settings = method_settings(pool_task, 0, workdir, "AutoGLM cold")
    task = get_task(settings)
    task.prepare()
    space = build_space(task, settings.tune.search_space, settings.tune.space)
    params = to_params(PortfolioEntry.from_dict(entry), task, settings, space)
    tune = settings.tune.model_dump()
    tune |= {"space": params, "early_stop": {**tune["early_stop"], "enabled": False}}
    return settings.model_copy(update={"tune": TuneSettings.model_validate(tune)})


def _score(args) -> tuple[float, float]:
    """(served metric, CPU-seconds) of a candidate entry trained on one development task as a fixed configuration;
    entry None: the task's default (its CPU-seconds are B)."""
    index, entry, name, workdir, factor = args
    pool_task = POOL[name] if factor == 1.0 else scaled(POOL[name], factor)
    where = Path(workdir) / name / f"candidate-{index}"
    _warm_up(workdir)
    settings = method_settings(pool_task, 0, where, "default") if entry is None \
        else candidate_settings(entry, pool_task, where)
    _, trials = search(settings, where / "run", 0.0, 1)
    done = [t for t in trials if t.state.name == "COMPLETE"]
    return (done[0].values[0] if done else math.nan), cpu_spent(trials)


def regrets(values: dict[str, list[float]], directions: dict[str, str]) -> dict[str, list[float]]:
    """Per task, each candidate's normalized regret: 0 for the best, 1 for the median, at most :data:`WORST`
    (also a failed run)."""
    out = {}
    for task, row in values.items():
        sign = 1.0 if directions[task] == "maximize" else -1.0
        good = [sign * v for v in row if not math.isnan(v)]
        best, median = (max(good), statistics.median(good)) if good else (0.0, 0.0)
        span = best - median or 1.0
        out[task] = [WORST if math.isnan(v) else min(WORST, (best - sign * v) / span) for v in row]
    return out


def anytime_regret(order: list[int], regret: dict[str, list[float]], cost: dict[str, list[float]],
                   budgets=MULTIPLES) -> float:
    """Mean over tasks and budgets of the best regret among ``order``'s entries finished within the budget, the
    entries run one after another (:data:`MISSING` where none has)."""
    total = []
    for task, row in regret.items():
        for budget in budgets:
            spent, best = 0.0, MISSING
            for c in order:
                spent += cost[task][c]
                if spent > budget:
                    break  # this entry, and every one after it, finishes past the budget
                best = min(best, row[c])
            total.append(best)
    return statistics.fmean(total)


def greedy(regret: dict[str, list[float]], cost: dict[str, list[float]], size: int,
           first_within: float = FIRST_WITHIN) -> list[int]:
    """Candidate indices in order, each the one that lowers :func:`anytime_regret` the most (ties: the cheaper),
    at most ``size`` and none that lowers it no further; the first among those costing at most ``first_within``
    x B on every task (the cheapest if none does)."""
    n = len(next(iter(regret.values())))

    def worst_cost(c: int) -> float:
        return max(row[c] for row in cost.values())

    chosen: list[int] = []
    for _ in range(min(size, n)):
        pool = [c for c in range(n) if c not in chosen]
        if not chosen:
            pool = [c for c in pool if worst_cost(c) <= first_within] or [min(pool, key=worst_cost)]
        pick = min(pool, key=lambda c: (anytime_regret([*chosen, c], regret, cost), worst_cost(c), c))
        if chosen and anytime_regret([*chosen, pick], regret, cost) >= anytime_regret(chosen, regret, cost):
            break  # an entry that helps on no development task only delays the search behind the portfolio
        chosen.append(pick)
    return chosen


def learn(quick: bool, workers: int = 1) -> list[Table]:
    """Learn the portfolio; written to ``tune/portfolio.json`` (a quick run only reports what it would write)."""
    from tune.portfolio import BUILTIN, Portfolio, PortfolioEntry, load_portfolio, save_portfolio

    names = [t.name for t in dev_tasks()][: 1 if quick else None]
    factor = 1 / 6 if quick else 1.0
    size = TuneSettings().portfolio_size
    candidates = [{"source": "the task's configured run"}, *sobol_candidates(4 if quick else SOBOL),
                  *previous_entries(load_portfolio())]
    with tempfile.TemporaryDirectory(prefix="autoglm-bench-portfolio-") as tmp, \
            ProcessPoolExecutor(max(1, workers), mp_context=get_context("spawn")) as pool:
        jobs = [(i, c, n, tmp, factor) for n in names for i, c in [(-1, None), *enumerate(candidates)]]
        scores = dict(zip([(i, n) for i, _, n, _, _ in jobs], pool.map(_score, jobs)))
    budget = {n: scores[(-1, n)][1] for n in names}
    values = {n: [scores[(i, n)][0] for i in range(len(candidates))] for n in names}
    cost = {n: [scores[(i, n)][1] / budget[n] for i in range(len(candidates))] for n in names}
    regret = regrets(values, {n: _direction(n) for n in names})
    chosen = greedy(regret, cost, size)
    portfolio = Portfolio(tuple(PortfolioEntry.from_dict(candidates[i]) for i in chosen), {
        "learned_from": names, "method": f"cost-aware greedy portfolio over {len(candidates)} candidates (the "
        f"configured run, {SOBOL} Sobol points, the entries of the portfolio shipped before), minimizing the "
        f"mean over the development tasks and over {', '.join(f'{m}B' for m in MULTIPLES)} of the best regret "
        f"among the entries finished within that compute; the first fits inside {FIRST_WITHIN}B",
        "command": COMMAND})
    if not quick:
        save_portfolio(portfolio, BUILTIN)
    return [_table(candidates, values, cost, regret, chosen, names, quick)]


def _direction(name: str) -> str:
    from autoglm.tasks import task_class

    return task_class(POOL[name].task).direction


def _table(candidates, values, cost, regret, chosen, names, quick) -> Table:
    rows = []
    for i, c in enumerate(candidates):
        rank = chosen.index(i) + 1 if i in chosen else None
        entry = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in c.items()
                          if k != "source")
        rows.append([i, c.get("source", ""), entry or "(configured run)",
                     *[f"{values[n][i]:.4g} ({cost[n][i]:.2f}B)" for n in names],
                     statistics.fmean(regret[n][i] for n in names), rank])
    steps = {m: anytime_regret(chosen, regret, cost, (m,)) for m in MULTIPLES}
    return Table(f"Portfolio learned on the development tasks ({', '.join(names)}; dev only)",
                 ["#", "from", "entry (relative to the task)", *[f"{n} (dev)" for n in names], "mean regret",
                  "portfolio rank"], rows,
                 ["each cell: the candidate trained once on that task (seed 0, its own schedule), served metric "
                  "(its CPU-seconds in units of that task's B); regret per task: 0 best, 1 the median candidate, "
                  f"at most {WORST}",
                  "the portfolio's mean best regret among the entries finished within "
                  + ", ".join(f"{m}B: {v:.3f}" for m, v in steps.items()) + f" (nothing finished: {MISSING})",
                  "evaluation tasks took no part: not in the studies, not in the scoring"
                  + ("; quick run: nothing written" if quick else "; written to tune/portfolio.json")])
