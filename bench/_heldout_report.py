"""The held-out benchmark's tables, goals and plot (:mod:`bench._heldout` measures)."""

from __future__ import annotations

import math
import os
import statistics
from pathlib import Path

from bench._heldout import ABLATIONS, BASELINES, GRID, HORIZON, MULTIPLES, PRIORS, Pair, wins
from bench._tuning import better
from bench.harness import Table
from bench.pool import POOL, split_label

def _where(pairs: list[Pair]) -> str:
    names = list(dict.fromkeys(p.task for p in pairs))
    return f"tasks: {split_label(names)}"


def anytime_table(pairs: list[Pair]) -> Table:
    """A row per (task, seed, method): best metric and hypervolume at 1B, 2B, 4B, and compute to reach the
    default's final metric."""
    rows = []
    for pair in pairs:
        volumes = {m: pair.volumes(m) for m in MULTIPLES}
        for i, o in enumerate(pair.outcomes):
            best = [pair.at(o.method, m).best() for m in MULTIPLES]
            reached = pair.reach(o.method) if o.method != "default" else 1.0
            states = [t.state.name for t in o.trials]
            rows.append([f"{pair.task} ({POOL[pair.task].split})" if i == 0 else "",
                         f"{pair.seed} (B = {pair.budget:.1f} CPU-s)" if i == 0 else "", o.method,
                         *[None if math.isnan(b) else b for b in best], *[volumes[m][o.method] for m in MULTIPLES],
                         None if reached is None else f"{reached:.2f}B",
                         f"{states.count('COMPLETE')}/{states.count('PRUNED')}/{states.count('FAIL')}"])
    metric = ", ".join(sorted({f"{p.task}: {p.metric} ({p.direction})" for p in pairs}))
    columns = ["task (split)", "seed (budget)", "method", *[f"best metric at {m}B" for m in MULTIPLES],
               *[f"hypervolume at {m}B" for m in MULTIPLES], "compute to reach the default's metric",
               "trials done/stopped/failed (to 4B)"]
    return Table(f"Held-out tuning: best metric and hypervolume at 1B, 2B, 4B ({_where(pairs)})", columns, rows, [
        _where(pairs) + "; the goals are judged on evaluation tasks only, nothing was fitted to them (bench.pool)",
        f"metrics: {metric}; '—': no trial completed within that compute",
        "B = the default's CPU-seconds (trained, exported, scored, timed once) on that seed; each method runs until "
        f"it has spent {HORIZON}B and a trial counts from the compute at which it ended",
        "hypervolume over (served metric, p50 latency at batch 32, J/inference), re-measured side by side after the "
        "pair's searches, min-max normalized over all of the pair's points at 4B (so 1B, 2B and 4B compare), "
        "reference 1.1 per objective, divided by 1.1^3",
        "the portfolio 'AutoGLM with priors' queued: " + "; ".join(sorted({p.portfolio for p in pairs})),
        "random search, TPE and TPE + Hyperband serve FP32 (they search no compression); the AutoGLM rows search "
        "INT8 and pruning too; 'AutoGLM with priors' queues the portfolio (tune.portfolio) first, nothing else",
        "schedules: random search, TPE and the AutoGLM rows search max_steps (an AutoGLM rung judges a trial against "
        "schedules at least as long; a portfolio entry carries its length); TPE + Hyperband trains every trial on "
        "the longest and its pruner decides how far each gets"])


def goals_table(pairs: list[Pair]) -> Table:
    """The issue's goals over the evaluation pairs, each with its count and verdict."""
    pairs = [p for p in pairs if POOL[p.task].split == "eval"]
    n, rows = len(pairs), []
    for m in MULTIPLES:
        results = [wins(p, m) for p in pairs]
        for base in BASELINES:
            metric_wins = sum(r[base][0] for r in results)
            volume_wins = sum(r[base][1] for r in results)
            rows.append([f"{m}B", f"{PRIORS} vs {base}: better best metric on ≥ 80% of pairs",
                         f"{metric_wins}/{n}", _verdict(n and metric_wins >= 0.8 * n)])
            rows.append([f"{m}B", f"{PRIORS} vs {base}: higher hypervolume on every pair", f"{volume_wins}/{n}",
                         _verdict(n and volume_wins == n)])
    for method in ("AutoGLM cold", PRIORS):
        reached = [p.reach(method) for p in pairs]
        within = {m: sum(r is not None and r <= m for r in reached) for m in (1, 2)}
        rows.append(["≤ 2B", f"{method} reaches the default's final metric on ≥ 2/3 of pairs", f"{within[2]}/{n}",
                     _verdict(n and within[2] >= 2 * n / 3)])
        rows.append(["≤ 1B", f"{method} reaches the default's final metric on ≥ 1/3 of pairs", f"{within[1]}/{n}",
                     _verdict(n and within[1] >= n / 3)])
    kinds = {"text": [p for p in pairs if POOL[p.task].task == "charlm"],
             "non-text": [p for p in pairs if POOL[p.task].task != "charlm"]}
    by_kind = "; ".join(f"{kind} ({len(mine)} pairs): " + ", ".join(
        f"{m}B {'/'.join(str(sum(wins(p, m)[b][0] for p in mine)) for b in BASELINES)}" for m in MULTIPLES)
        for kind, mine in kinds.items() if mine)
    per_pair = "; ".join(f"{p.task}/{p.seed}: " + ", ".join(
        f"{m}B {_short(p, m)}" for m in MULTIPLES) for p in pairs)
    return Table(f"Held-out tuning: goals on the evaluation pairs ({_where(pairs)})",
                 ["compute", "goal", "pairs", "verdict"], rows,
                 [f"{n} (task, seed) pairs of evaluation tasks; 'AutoGLM' in the reach goals is judged on {PRIORS}, "
                  "the cold row is its ablation",
                  "better best metric: strictly better; a method with no completed trial by then loses",
                  f"pairs where {PRIORS} has the better best metric vs random search / TPE + Hyperband, by domain: "
                  + by_kind,
                  f"{PRIORS}'s best metric vs random search / TPE + Hyperband per pair: {per_pair}"])


def _short(pair: Pair, multiple: float) -> str:
    mine = pair.at(PRIORS, multiple).best()
    return f"{mine:.4g} vs " + "/".join(f"{pair.at(b, multiple).best():.4g}" for b in BASELINES)


def _verdict(ok) -> str:
    return "**met**" if ok else "**NOT met**"


def plot(pairs: list[Pair], path: Path) -> None:
    """Per task, the best metric (top) and hypervolume (bottom) against compute in units of B, mean over seeds,
    one line per method; the default's single run is the dashed reference."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    tasks = list(dict.fromkeys(p.task for p in pairs))
    fig, axes = plt.subplots(2, len(tasks), figsize=(4.2 * len(tasks), 6.5), squeeze=False)
    for col, name in enumerate(tasks):
        mine = [p for p in pairs if p.task == name]
        top, bottom = axes[0][col], axes[1][col]
        for method in [o.method for o in mine[0].outcomes]:
            best = [_mean(p.at(method, c).best() for p in mine) for c in GRID]
            volume = [_mean(p.volumes(c)[method] for p in mine) for c in GRID]
            style = {"linestyle": "--", "color": "black"} if method == "default" else {}
            top.plot(GRID, best, label=method, **style)
            bottom.plot(GRID, volume, label=method, **style)
        top.set_title(f"{name} ({POOL[name].split}, {len(mine)} seed{'s' * (len(mine) > 1)})")
        top.set_ylabel(f"best {mine[0].metric}")
        bottom.set_ylabel("hypervolume")
        bottom.set_xlabel("compute (× B, the default's CPU-s)")
        for ax in (top, bottom):
            ax.axvline(1.0, color="grey", linewidth=0.5)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _mean(values) -> float:
    present = [v for v in values if not math.isnan(v)]
    return statistics.fmean(present) if present else math.nan


def ablation_wins(pair: Pair, method: str, multiple: float, base: str = PRIORS) -> tuple[bool, bool]:
    """(``method``'s best metric strictly better than ``base``'s, its hypervolume at least ``base``'s) at
    ``multiple``."""
    volumes = pair.volumes(multiple)
    mine, theirs = pair.at(method, multiple).best(), pair.at(base, multiple).best()
    beats = not math.isnan(mine) and (math.isnan(theirs) or better(mine, theirs, pair.direction))
    return beats, volumes[method] >= volumes[base]


def ablation_table(pairs: list[Pair], name: str) -> Table:
    """The method without and with the ablation's change, side by side per pair at 1B, 2B, 4B, and the verdict: the
    change earns its place if its best metric is better on more pairs than it is worse at 2B and at 4B, without a
    lower hypervolume on most pairs there. More than worse, not most pairs: where the portfolio decides (the text
    tasks, whose best trial is a portfolio entry both ways) the two tie, and a tie is evidence for neither."""
    with_, added, changed = ABLATIONS[name]
    without = PRIORS
    change = f"the knobs {', '.join(added)}" if added else "the change"
    rows, n = [], len(pairs)
    for p in pairs:
        best = {m: [p.at(m, k).best() for k in MULTIPLES] for m in (without, with_)}
        volumes = [p.volumes(k) for k in MULTIPLES]
        rows.append([f"{p.task} ({POOL[p.task].split})", f"{p.seed} (B = {p.budget:.1f} CPU-s)", p.metric,
                     *[f"{_fmt(a)} / {_fmt(b)}" for a, b in zip(best[without], best[with_])],
                     *[f"{v[without]:.3f} / {v[with_]:.3f}" for v in volumes]])
    counts = {k: [ablation_wins(p, with_, k, without) for p in pairs] for k in MULTIPLES}
    tally = {k: (sum(w[0] for w in c), sum(w[1] for w in c)) for k, c in counts.items()}
    worse = {k: sum(ablation_wins(p, without, k, with_)[0] for p in pairs) for k in MULTIPLES}
    earn = n > 0 and all(tally[k][0] > worse[k] and tally[k][1] > n / 2 for k in (2, 4))
    subject = "the knobs" if added else "the change"
    verdict = (f"verdict: {subject} {'earn' if earn else 'do NOT earn'} their place in the defaults: better "
               "best metric on " + ", ".join(f"{tally[k][0]}/{n} pairs at {k}B" for k in MULTIPLES)
               + "; hypervolume not lower on " + ", ".join(f"{tally[k][1]}/{n} at {k}B" for k in MULTIPLES)
               + " (the rule: better on more pairs than worse at 2B and 4B without losing hypervolume on most); "
               "best metric "
               "better / equal / worse: " + ", ".join(f"{tally[k][0]}/{n - tally[k][0] - worse[k]}/{worse[k]} at {k}B"
                                                       for k in MULTIPLES))
    if added:
        what = (f"with: the same method and seed with {added} added to tune.space (the knobs conditional on them "
                "come along: betas, momentum, step decay, adaptive_batch and max_grad_accum)")
    else:
        what = f"with: the same method and seed with tune settings {changed}"
    columns = ["task (split)", "seed (budget)", "metric", *[f"best metric at {k}B: without / with" for k in MULTIPLES],
               *[f"hypervolume at {k}B: without / with" for k in MULTIPLES]]
    return Table(f"Ablation {name}: {without} / {with_} ({_where(pairs)})", columns, rows, [
        verdict, f"{what}; same budget 4B, same seeds ({change})",
        "metric directions: " + ", ".join(sorted({f"{p.metric} ({p.direction})" for p in pairs}))
        + "; '—': no trial completed by then; hypervolume as in the anytime table, normalized over the pair's "
        "points (default, without, with) at 4B"])


def _fmt(value: float) -> str:
    return "—" if math.isnan(value) else f"{value:.4g}"


QUICK = 1 / 6  # a smoke run's schedules: the MLP's default trains 500 steps, charlm's 67


def heldout(quick: bool, tasks: list[str] | None, seeds: int, workers: int, wall_min: float | None = None,
            ablation: str | None = None) -> list[Table]:
    """The held-out benchmark's tables; ``quick``: one task, one seed, a tiny default. ``ablation`` (a name in
    :data:`bench._heldout.ABLATIONS`): PRIORS without and with its knobs instead of every method, on the
    development tasks unless ``tasks`` says otherwise (a decision about the default space is made there)."""
    import tempfile

    from bench._heldout import METHODS, run_pairs
    from bench.pool import dev_tasks, eval_tasks

    if ablation is not None and ablation not in ABLATIONS:
        raise ValueError(f"unknown ablation {ablation!r}: known are {sorted(ABLATIONS)}")
    pool = dev_tasks() if ablation else eval_tasks()
    names = tasks or ([pool[-1].name] if quick else [t.name for t in pool])
    unknown = [n for n in names if n not in POOL]
    if unknown:
        raise ValueError(f"unknown pool task(s) {unknown}: known are {sorted(POOL)}")
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="autoglm-bench-heldout-") as tmp:
        methods = (PRIORS, ABLATIONS[ablation][0]) if ablation else tuple(METHODS)
        pairs, cut = run_pairs(names, list(range(1 if quick else seeds)), Path(tmp), workers,
                               QUICK if quick else 1.0, None if wall_min is None else 60 * wall_min, methods)
    if not pairs:
        raise RuntimeError(f"no (task, seed) pair finished within {wall_min} minutes: raise --wall-min")
    table = anytime_table(pairs)
    goals = ablation_table(pairs, ablation) if ablation else goals_table(pairs)
    if cut:
        for t in (goals, table):
            t.notes.append(f"cut by the run's wall limit ({wall_min:g} min on this machine), not run: "
                           + ", ".join(f"{n}/{s}" for n, s in cut))
    table.notes.append(f"machine load (1-min load average, {os.cpu_count()} cores) at the start / end of the run: "
                       f"{load:.1f} / {os.getloadavg()[0]:.1f}; each method is charged its own CPU-seconds, so a "
                       "busy machine slows the run, not the comparison")
    table.figure = lambda path: plot(pairs, path)
    return [goals, table]
