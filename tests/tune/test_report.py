"""The report's hypervolume and its curve over trials (Optuna's private implementation as the oracle)."""

import numpy as np
import optuna
import pytest
from optuna._hypervolume import compute_hypervolume

from tune.early_stop import pareto_fronts
from tune.report import hypervolume, hypervolume_history


def _study(points, directions):
    study = optuna.create_study(directions=directions)
    for values in points:
        study.add_trial(optuna.trial.create_trial(values=list(values)))
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL))  # not a point
    return study


def test_the_curve_equals_the_hypervolume_of_each_prefix_front_and_never_falls():
    rng = np.random.default_rng(0)
    points = rng.random((60, 3))
    points[10] = points[9]  # a repeat changes nothing
    directions = ["maximize", "minimize", "minimize"]

    history = hypervolume_history(_study(points, directions))

    signed = points * np.array([-1.0, 1.0, 1.0])
    norm = (signed - signed.min(axis=0)) / np.ptp(signed, axis=0)
    expected = [compute_hypervolume(norm[:i + 1][pareto_fronts(norm[:i + 1].tolist())[0]], np.full(3, 1.1))
                for i in range(len(points))]
    assert [n for n, _ in history] == list(range(60))
    assert [v for _, v in history] == pytest.approx(expected)
    assert all(b >= a for (_, a), (_, b) in zip(history, history[1:]))


def test_the_hypervolume_of_a_hand_drawn_staircase():
    points = np.array([[0.0, 0.5], [0.5, 0.0], [0.6, 0.6], [1.2, -1.0]])  # one dominated, one outside the box

    assert hypervolume(points, np.array([1.0, 1.0])) == pytest.approx(0.75)
    assert hypervolume(points[:0], np.array([1.0, 1.0])) == 0.0
    assert hypervolume(np.array([[0.2], [0.4]]), np.array([1.0])) == pytest.approx(0.8)


@pytest.mark.parametrize("dims", [2, 3, 4])
def test_the_hypervolume_equals_optunas_with_dominated_and_repeated_points(dims):
    rng = np.random.default_rng(dims)
    points = rng.random((40, dims))
    points[5] = points[4]
    reference = np.full(dims, 1.1)
    front = points[pareto_fronts(points.tolist())[0]]

    assert hypervolume(points, reference) == pytest.approx(compute_hypervolume(front, reference))
    assert hypervolume(front, reference) == pytest.approx(compute_hypervolume(front, reference))


def _trained_study(n_complete, tune_dir=None, feedback=True):
    """A study as the objective leaves it: curves on every trial, one stopped at its rung; the selected (first)
    trial's train.jsonl under ``tune_dir`` with the feedback signals when ``feedback``."""
    import json

    study = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    dists = {"train.lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True),
             "prune.ratio": optuna.distributions.FloatDistribution(0.0, 0.5)}
    rng = np.random.default_rng(0)
    for i in range(n_complete):
        lr, ratio = float(10 ** rng.uniform(-4, -1)), float(rng.uniform(0, 0.5))
        accuracy, latency, energy = 0.9 - ratio / 4, 2.0 - 2 * ratio, 1.0 + lr
        study.add_trial(optuna.trial.create_trial(
            values=[accuracy, latency, energy], params={"train.lr": lr, "prune.ratio": ratio}, distributions=dists,
            user_attrs={"objectives": {"metric": accuracy, "latency": latency, "energy": energy},
                        "history": [[20, accuracy - 0.3], [40, accuracy - 0.1], [60, accuracy]], "steps": 60,
                        "rung_20": [accuracy - 0.3, latency, energy], "compute": {"cpu_s": 1.0 + i},
                        "variant": {"name": "fp32"}}))
    study.add_trial(optuna.trial.create_trial(
        state=optuna.trial.TrialState.PRUNED, params={"train.lr": 0.09, "prune.ratio": 0.1}, distributions=dists,
        user_attrs={"history": [[20, 0.2]], "stopped_at": 20, "rung_20": [0.2, 1.8, 1.1]}))
    if tune_dir is not None:
        log = tune_dir / "trials" / "0000" / "train.jsonl"
        log.parent.mkdir(parents=True)
        rows = [{"event": "train", "step": s, "loss": 1.0 / s} for s in (10, 20, 30)]
        rows += [{"event": "feedback", "step": s, "noise_scale": 10.0 * s, "hessian_top": 5.0 / s}
                 for s in (10, 20, 30) if feedback]
        log.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return study


def _write(study, tune_dir):
    from types import SimpleNamespace

    from autoglm.config import load_settings
    from tune.report import write_report
    from tune.select import pareto_points

    points = pareto_points(study)
    chosen = next(p for p in points if p.trial == 0)  # the trial whose train.jsonl the study wrote
    task = SimpleNamespace(name="digits", metric="accuracy", direction="maximize")
    return write_report(study, points, chosen, load_settings(None, []), task, tune_dir / "report.html").read_text()


def test_the_report_shows_curves_feedback_and_importances(tmp_path):
    study = _trained_study(6, tmp_path)

    page = _write(study, tmp_path)

    assert "<h2>Training curves</h2><img src='data:image/png;base64," in page
    assert "<h2>Feedback signals: trial 0</h2><img src='data:image/png;base64," in page
    assert "<h2>Parameter importances</h2>" in page and "<table class='importances'>" in page
    table = page.split("<table class='importances'>")[1].split("</table>")[0]
    assert "<th>metric</th><th>latency</th><th>energy</th>" in table
    assert "train.lr" in table and "prune.ratio" in table


def test_a_small_study_says_why_it_has_no_importances_and_no_feedback(tmp_path):
    study = _trained_study(2, tmp_path, feedback=False)

    page = _write(study, tmp_path)

    assert "2 completed trial(s): fANOVA needs at least 3" in page and "class='importances'" not in page
    assert "has no feedback signals" in page
    assert "<h2>Training curves</h2><img" in page


def test_importances_rank_the_parameter_that_drives_each_objective():
    from tune.report import importances

    scores, _ = importances(_trained_study(12), ["metric", "latency", "energy"])

    assert max(scores["latency"], key=scores["latency"].get) == "prune.ratio"
    assert max(scores["energy"], key=scores["energy"].get) == "train.lr"
    assert sum(scores["metric"].values()) == pytest.approx(1.0)


def test_the_feedback_log_keeps_only_the_signals_present(tmp_path):
    from tune.report import feedback_log

    log = tmp_path / "train.jsonl"
    log.write_text('{"event": "feedback", "step": 5, "noise_scale": 3.0, "hessian_top": null}\n'
                   '{"event": "batch", "step": 5, "noise_scale": 4.0}\n{"step": 6, "loss": 1}\n{"cut')

    assert feedback_log(log) == {"noise_scale": [(5, 3.0)]}
    assert feedback_log(tmp_path / "missing.jsonl") == {}


def test_a_trial_without_a_recorded_curve_is_read_from_its_training_log(tmp_path):
    import json

    from tune.report import eval_curve

    study = optuna.create_study()
    study.add_trial(optuna.trial.create_trial(value=0.5))  # a DDP trial: its ranks trained, the log has the curve
    log = tmp_path / "trials" / "0000" / "train.jsonl"
    log.parent.mkdir(parents=True)
    log.write_text("\n".join(json.dumps(r) for r in [{"event": "train", "step": 10, "loss": 2.0},
                                                     {"event": "eval", "step": 20, "metric": "accuracy",
                                                      "value": 0.7}]) + "\n")

    assert eval_curve(study.trials[0], tmp_path) == [(20, 0.7)]
    assert eval_curve(study.trials[0], None) == []
