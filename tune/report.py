"""``tune/report.html``: one self-contained, offline page about the study.

Pareto front plots, hypervolume over trials, best metric against compute spent, each trial's training curve
(stopped trials end at their rung), the selected trial's feedback signals (gradient noise scale, top Hessian
eigenvalue) when its training log has them, parameter importances per objective (Optuna's fANOVA), the trial
table and the selected point. Plots are matplotlib PNGs inlined as data URIs, so the file opens anywhere.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from autoglm.artifacts import write_atomic
from tune import attributes as attrs
from tune.select import Point

FEEDBACK = ("noise_scale", "hessian_top")  # what train.jsonl's "feedback" lines hold (train.feedback_every > 0)
MIN_IMPORTANCE_TRIALS = 3  # fANOVA fits a forest over completed trials: below this it says nothing


def _minimized(values: Sequence[float], dirs: Sequence[str]) -> np.ndarray:
    return np.array([-v if d == "maximize" else v for v, d in zip(values, dirs, strict=True)], dtype=float)


def hypervolume(points: np.ndarray, reference: np.ndarray) -> float:
    """The volume that ``points`` (rows, every objective minimized) dominate within the box up to ``reference``.

    Exact, by slicing along the last objective (2-D: one sweep); quick for the few objectives and the fronts
    of tens of points that studies have. Optuna's own implementation is private to it."""
    points = np.asarray(points, dtype=float)
    points = points[(points < reference).all(axis=1)]  # a point on or past the box dominates none of it
    if not len(points):
        return 0.0
    if points.shape[1] == 1:
        return float(reference[0] - points[:, 0].min())
    if points.shape[1] == 2:  # the staircase, left to right: each step down adds a rectangle
        volume, floor = 0.0, reference[1]
        for x, y in points[np.lexsort((points[:, 1], points[:, 0]))]:
            if y < floor:
                volume += (reference[0] - x) * (floor - y)
                floor = y
        return float(volume)
    points = points[np.argsort(points[:, -1], kind="stable")]
    tops = np.append(points[1:, -1], reference[-1])  # each slice lasts until the next point's last objective
    return float(sum((top - p[-1]) * hypervolume(points[:i + 1, :-1], reference[:-1])
                     for i, (p, top) in enumerate(zip(points, tops, strict=True)) if top > p[-1]))


def hypervolume_history(study) -> list[tuple[int, float]]:
    """(trial number, hypervolume of the front so far), objectives min-max normalized over the study and
    measured against the reference point 1.1 in every objective (so later studies compare only to themselves)."""
    dirs = [d.name.lower() for d in study.directions]
    done = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if not done:
        return []
    pts = np.array([_minimized(t.values, dirs) for t in done])
    low, high = pts.min(axis=0), pts.max(axis=0)
    norm = (pts - low) / np.where(high > low, high - low, 1.0)
    # the front so far, kept incrementally: a point some front point weakly dominates changes nothing, so the
    # hypervolume is recomputed only when the front does (linear in trials, not a full sort per trial)
    reference, front, volume, history = np.full(pts.shape[1], 1.1), norm[:0], 0.0, []
    for point, trial in zip(norm, done, strict=True):
        if not (front <= point).all(axis=1).any():
            front = np.vstack([front[~((point <= front).all(axis=1))], point])
            volume = hypervolume(front, reference)
        history.append((trial.number, volume))
    return history


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _plots(study, points: list[Point], chosen: Point, objectives: list[str], metric: str,
           direction: str) -> list[tuple[str, str]]:
    plt = _pyplot()
    done = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    plots = []
    if len(objectives) >= 2 and done:
        x_name, y_name = objectives[1], objectives[0]
        fig, ax = plt.subplots(figsize=(6, 4))
        values = {o: [attrs.OBJECTIVES.get(t)[o] for t in done] for o in objectives}
        color = values.get("energy") if "energy" in objectives and x_name != "energy" else None
        sc = ax.scatter(values[x_name], values[y_name], c=color, cmap="viridis", s=28, label="trials")
        if color is not None:
            fig.colorbar(sc, ax=ax, label="J / inference")
        front = sorted(points, key=lambda p: p.objectives[x_name])
        ax.plot([p.objectives[x_name] for p in front], [p.objectives[y_name] for p in front], "r.-",
                label="Pareto front")
        ax.plot(chosen.objectives[x_name], chosen.objectives[y_name], "k*", ms=16, label=f"selected #{chosen.trial}")
        ax.set_xlabel(f"{x_name} ({'p95 ms' if x_name == 'latency' else 'J/inference'})")
        ax.set_ylabel(metric if y_name == "metric" else y_name)
        ax.legend()
        plots.append(("Pareto front", _png(fig)))
    history = hypervolume_history(study)
    if history:
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.plot([n for n, _ in history], [h for _, h in history], "o-")
        ax.set_xlabel("trial")
        ax.set_ylabel("hypervolume (normalized)")
        plots.append(("Hypervolume over trials", _png(fig)))
    finished = [t for t in study.get_trials(deepcopy=False) if attrs.COMPUTE.on(t)]
    scored = [t for t in finished if t.state.name == "COMPLETE"]
    if scored:
        sign = -1 if direction == "maximize" else 1  # the metric's own: it need not be the first objective
        cpu, best, spent, current = [], [], 0.0, None
        for t in finished:
            spent += attrs.cpu_s(t)
            if t.state.name == "COMPLETE":
                value = attrs.metric(t)
                current = value if current is None or sign * value < sign * current else current
            if current is not None:
                cpu.append(spent)
                best.append(current)
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.step(cpu, best, where="post")
        ax.set_xlabel("CPU-seconds spent (all trials, stopped ones included)")
        ax.set_ylabel(f"best {metric}")
        plots.append(("Best metric against compute", _png(fig)))
    return plots


def eval_curve(trial, tune_dir: Path | None) -> list[tuple[int, float]]:
    """(step, validation metric) of the trial's training: recorded on the trial, else (DDP ranks, a cached
    model) the ``eval`` lines of ``trials/<n>/train.jsonl``."""
    if attrs.HISTORY.get(trial):
        return [(int(s), float(v)) for s, v in attrs.HISTORY.get(trial)]
    log = tune_dir / "trials" / f"{trial.number:04d}" / "train.jsonl" if tune_dir is not None else None
    if log is None or not log.is_file():
        return []
    curve = []
    for line in log.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut short by a kill
        if record.get("event") == "eval" and isinstance(record.get("value"), int | float):
            curve.append((int(record["step"]), float(record["value"])))
    return curve


def training_curves(study, chosen: Point, metric: str, tune_dir: Path | None = None):
    """(step, validation metric) of every trial that trained, stopped trials marked at the step they were
    stopped (their rung), the rungs drawn: a matplotlib figure, or None before any evaluation. A trial whose
    model came from the cache repeats another's curve: drawn only if it is the selected one."""
    plt = _pyplot()
    curves = {t.number: eval_curve(t, tune_dir) for t in study.get_trials(deepcopy=False)
              if not attrs.CACHE_HIT.get(t) or t.number == chosen.trial}
    trials = [t for t in study.get_trials(deepcopy=False) if curves.get(t.number)]
    if not trials:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    rungs = sorted({int(k[len("rung_"):]) for t in trials for k in t.user_attrs
                    if k.startswith("rung_") and k[len("rung_"):].isdigit()})
    for step in rungs:
        ax.axvline(step, color="#bbb", ls=":", lw=1)
    labelled = set()
    for t in trials:
        steps, values = zip(*curves[t.number], strict=True)
        if t.state.name == "PRUNED":
            kind, style = "stopped early", {"color": "#999", "ls": "--", "lw": 1}
        elif t.number == chosen.trial:
            kind, style = f"selected #{t.number}", {"color": "k", "lw": 2.2, "zorder": 3}
        else:
            kind, style = "completed", {"color": "tab:blue", "lw": 1, "alpha": 0.6}
        ax.plot(steps, values, marker=".", ms=4, label=None if kind in labelled else kind, **style)
        labelled.add(kind)
        if t.state.name == "PRUNED":
            at = attrs.STOPPED_AT.get(t, steps[-1])
            ax.plot([at], [values[-1]], "x", color="tab:red", ms=7,
                    label=None if "stop" in labelled else "stopped at its rung")
            labelled.add("stop")
    ax.set_xlabel("training step" + (" (dotted: early-stopping rungs)" if rungs else ""))
    ax.set_ylabel(f"validation {metric}")
    ax.legend(fontsize=8)
    return fig


def feedback_log(train_log: Path) -> dict[str, list[tuple[int, float]]]:
    """The feedback signals a training log recorded: {key: [(step, value)]}, only the keys it has."""
    series: dict[str, list[tuple[int, float]]] = {}
    if not train_log.is_file():
        return series
    for line in train_log.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut short by a kill
        if not isinstance(record, dict) or record.get("event") != "feedback":
            continue
        for key in FEEDBACK:
            if isinstance(record.get(key), int | float) and "step" in record:
                series.setdefault(key, []).append((int(record["step"]), float(record[key])))
    return series


def _feedback_plot(series: dict[str, list[tuple[int, float]]]):
    fig, axes = _pyplot().subplots(1, len(series), figsize=(5 * len(series), 3), squeeze=False)
    for ax, (key, points) in zip(axes[0], series.items(), strict=True):
        ax.plot([s for s, _ in points], [v for _, v in points], "o-")
        ax.set_xlabel("training step")
        ax.set_ylabel(key.replace("_", " "))
    return fig


def importances(study, objectives: list[str], seed: int = 0) -> tuple[dict[str, dict[str, float]], str]:
    """{objective: {parameter: fANOVA importance}} over the completed trials, and a note (why it is empty)."""
    import optuna
    from optuna.importance import FanovaImportanceEvaluator

    done = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if len(done) < MIN_IMPORTANCE_TRIALS:
        return {}, (f"{len(done)} completed trial(s): fANOVA needs at least {MIN_IMPORTANCE_TRIALS}, so no "
                    "importances yet")
    result = {}
    for i, name in enumerate(objectives):
        try:
            result[name] = optuna.importance.get_param_importances(
                study, evaluator=FanovaImportanceEvaluator(seed=seed), target=lambda t, i=i: t.values[i])
        except (ValueError, RuntimeError) as exc:  # no parameter common to every completed trial, ...
            return {}, f"fANOVA could not rank the parameters: {exc}"
    return result, ("fANOVA (Optuna's FanovaImportanceEvaluator) over the parameters every completed trial has; "
                    "each column sums to 1")


def _importance_table(scores: dict[str, dict[str, float]]) -> str:
    names = sorted({p for s in scores.values() for p in s}, key=lambda p: -max(s.get(p, 0) for s in scores.values()))
    head = "".join(f"<th>{html.escape(o)}</th>" for o in scores)
    rows = "".join(f"<tr><td>{html.escape(p)}</td>" + "".join(f"<td>{s.get(p, 0.0):.3f}</td>"
                                                             for s in scores.values()) + "</tr>" for p in names)
    return f"<table class='importances'><tr><th>parameter</th>{head}</tr>{rows}</table>"


def _training_sections(study, chosen: Point, objectives: list[str], metric: str, tune_dir: Path) -> str:
    """The training curves, the selected trial's feedback signals and the parameter importances."""
    parts = ["<h2>Training curves</h2>"]
    fig = training_curves(study, chosen, metric, tune_dir)
    parts.append(f"<img src='{_png(fig)}' alt='training curves'>" if fig is not None else
                 "<p>No trial recorded a validation curve.</p>")
    series = feedback_log(tune_dir / "trials" / f"{chosen.trial:04d}" / "train.jsonl")
    parts.append(f"<h2>Feedback signals: trial {chosen.trial}</h2>")
    parts.append(f"<img src='{_png(_feedback_plot(series))}' alt='feedback signals'>" if series else
                 "<p>The selected trial's training log has no feedback signals (gradient noise scale, top Hessian "
                 "eigenvalue): they are logged when training measures them.</p>")
    scores, note = importances(study, objectives)
    parts.append(f"<h2>Parameter importances</h2><p>{html.escape(note)}</p>")
    if scores:
        parts.append(_importance_table(scores))
    return "".join(parts)


def _table(study, objectives: list[str], front: set[int]) -> str:
    rows = []
    for t in study.get_trials(deepcopy=False):
        obj = attrs.OBJECTIVES.get(t, {})
        compute = attrs.COMPUTE.get(t, {})
        cells = [str(t.number) + (" ★" if t.number in front else ""), t.state.name.lower(),
                 *[f"{obj[o]:.4g}" if o in obj else "" for o in objectives],
                 str(attrs.STEPS.get(t, "")), f"{compute.get('cpu_s', 0):.1f}",
                 html.escape(", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                       for k, v in t.params.items()))]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    head = ["trial", "state", *objectives, "steps", "CPU-s", "parameters"]
    return "<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>" + "".join(rows) + "</table>"


def write_report(study, points: list[Point], chosen: Point, settings, task, path: Path) -> Path:
    """Write the report; energy figures carry their method (measured or estimated)."""
    objectives = list(settings.tune.objectives)
    method = chosen.compute.get("energy_method", "")
    plots = "".join(f"<h2>{title}</h2><img src='{src}' alt='{title}'>" for title, src in
                    _plots(study, points, chosen, objectives, task.metric, task.direction))
    selected = "".join(f"<li>{html.escape(k)}: {v:.5g}</li>" for k, v in chosen.objectives.items())
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>AutoGLM tune: {task.name}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:3px 6px;text-align:left}}img{{max-width:100%}}</style></head><body>
<h1>Tuning report: {task.name}</h1>
<p>Study <code>{html.escape(settings.tune.study_name)}</code>, sampler {settings.tune.sampler}, objectives
{", ".join(objectives)} ({task.metric} {task.direction}; latency = p95 ms at batch {settings.tune.serving_batch};
energy = J/inference, <b>{html.escape(method or "n/a")}</b>{" (an estimate, not a measurement)"
if method.startswith("estimated") else ""}).</p>
<h2>Selected: trial {chosen.trial} ({html.escape(chosen.variant)})</h2><ul>{selected}</ul>
{plots}{_training_sections(study, chosen, objectives, task.metric, Path(path).parent)}
<h2>Trials</h2>{_table(study, objectives, {p.trial for p in points})}</body></html>"""
    return write_atomic(path, page.encode())
