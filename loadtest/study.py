"""``loadtest --tune``: an Optuna study over the live Triton's serving knobs, then a verification window.

Each trial applies its config through model control (:class:`loadtest.control.LiveModels`: no restart, and
Triton must report the config back), measures one step window (:mod:`loadtest.space`: capacity on a
concurrency ladder) and records Triton's own mean batch and queue time. Objectives: capacity per instance
within the SLO (max) and J/request (min), or for the generation model (:mod:`loadtest.generate_space`) tokens/s
per instance and J/token; the SLO's limits are Optuna constraints (``trial.set_constraint``, which
replaces the ``constraints_func`` Optuna 5 deprecates; every sampler reads them). The first trial is
the baseline, the config Triton serves now. The study lives in a journal file: a rerun continues it up to
``n_trials`` and ``optuna-dashboard <journal>`` shows it. With ``loadtest.tune.replicates`` > 1 (opt-in) a
Bayesian study spends some of its windows re-measuring the configs on its front (:mod:`loadtest.replicate`);
either way a config's value is the mean of its windows. After the trials, the best feasible configs by those
means (:func:`loadtest.front.ranked`) are measured again in a longer steady window at their capacity
concurrency, the baseline beside them: the best of them that holds the SLO is the verified config.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autoglm._lazy import require
from autoglm.config import LoadtestTuneSettings
from autoglm.errors import AutoGLMError
from loadtest.control import LiveModels, ServingConfig
from loadtest.front import ranked
from loadtest.generate_space import GenerateSpace, j_per_token
from loadtest.late_draws import late_draws
from loadtest.latency import Slo
from loadtest.replicate import config_means, next_replicate
from loadtest.runner import LoadSpec, run_window
from loadtest.space import TuneSpace, ladder

JOURNAL = "study.journal"
DIRECTIONS = ("maximize", "minimize")  # capacity per instance within the SLO, J/request (J/token for streams)
Space = TuneSpace | GenerateSpace  # the batching models' knobs, or the generation model's


class TrialFailed(AutoGLMError):
    """A trial whose config could not be served or measured: recorded as failed, and the study goes on."""


def constraints(trial) -> list[float]:
    """The SLO violations a trial recorded (<= 0 each when it met the SLO)."""
    return list(trial.constraints.values())


def make_sampler(tune: LoadtestTuneSettings, space: Space, n_trials: int | None = None):
    """The study's sampler; ``n_trials``: the windows it will run (default ``tune.n_trials``), which place
    ``tune.late_random``'s draws."""
    optuna = require("optuna", purpose="loadtest --tune")
    late = {"seed": tune.seed, "n_trials": n_trials or tune.n_trials, "share": tune.late_random}
    if tune.sampler == "tpe":
        return late_draws(optuna.samplers.TPESampler(seed=tune.seed, n_startup_trials=tune.startup_trials,
                                                     multivariate=True), **late)
    if tune.sampler == "gp":  # Optuna's GP runs on torch and scipy
        require("torch", purpose="loadtest --tune's GP sampler (--sampler tpe needs neither)")
        require("scipy", extra="tune", purpose="loadtest --tune's GP sampler (--sampler tpe needs neither)")
        return late_draws(optuna.samplers.GPSampler(seed=tune.seed, n_startup_trials=tune.startup_trials), **late)
    if tune.sampler == "grid":
        return _grid_sampler(optuna)(space.grid(), seed=tune.seed)
    return optuna.samplers.RandomSampler(seed=tune.seed)


def _grid_sampler(optuna):
    class BaselineOffTheGrid(optuna.samplers.GridSampler):
        """Optuna's grid sampler, except that the enqueued baseline, which need not be a grid point, does not end
        the study when it finishes (Optuna 5 looks up the grid point of every finished trial)."""

        def after_trial(self, study, trial, state, values) -> None:
            if "grid_id" in trial.system_attrs:
                super().after_trial(study, trial, state, values)

    return BaselineOffTheGrid


def open_study(journal: Path, name: str, sampler):
    """The study ``name`` in ``journal`` (created, or loaded to continue). Trials a killed run left RUNNING are
    failed: only one process measures a live Triton at a time, so none of them is still running."""
    optuna = require("optuna", purpose="loadtest --tune")
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the stage prints its own line per trial
    journal.parent.mkdir(parents=True, exist_ok=True)
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    study = optuna.create_study(storage=storage, study_name=name, directions=list(DIRECTIONS), sampler=sampler,
                                load_if_exists=True)
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)  # no public id accessor
    return study


def counted(study) -> int:
    """Trials that count toward n_trials: measured ones, and those whose config Triton could not serve."""
    return sum(t.state.name == "COMPLETE" or (t.state.name == "FAIL" and "failed" in t.user_attrs)
               for t in study.get_trials(deepcopy=False))


@dataclass
class Window:
    """How the study measures: where load goes and the windows' lengths."""

    scenario: str
    host: str
    payloads: Path
    metrics_url: str | None
    energy: Any
    slo: Slo
    users: int
    steps: int
    step_s: float
    warmup_s: float
    api_key: str | None = None

    def spec(self, model: str, users: int, seconds: float, shape: str = "steady") -> LoadSpec:
        return LoadSpec(self.scenario, self.host, model, users, seconds, warmup_s=self.warmup_s, shape=shape,
                        shape_steps=self.steps, slo=self.slo, api_key=self.api_key)

    def measure(self, model: str, out_dir: Path, users: int, seconds: float, shape: str = "steady") -> dict:
        return run_window(self.spec(model, users, seconds, shape), out_dir, payloads=self.payloads,
                          metrics_url=self.metrics_url, triton_model=model, energy=self.energy)


def _summary(config: ServingConfig, window: dict[str, Any]) -> dict[str, Any]:
    energy, triton = window.get("energy") or {}, window.get("triton") or {}
    return {"config": config.to_dict(), "j_per_request": energy.get("j_per_request"),
            "j_per_token": j_per_token(window), "energy_method": energy.get("method"),
            "mean_batch": triton.get("mean_batch") if triton.get("valid") else None,
            "mean_queue_us": triton.get("mean_queue_us") if triton.get("valid") else None,
            "generator_saturated": bool(window.get("generator_saturated"))}


class Objective:
    """One trial: apply, check, warm up, measure the ladder, record; returns (capacity/instance, J/request)."""

    def __init__(self, live: LiveModels, space: Space, window: Window, out_dir: Path, total: int,
                 progress: Callable[[str], None] | None = None):
        self.live, self.space, self.window, self.out_dir, self.total = live, space, window, out_dir, total
        self.progress = progress or (lambda line: None)

    def __call__(self, trial) -> tuple[float, float]:
        config = self.space.suggest(trial)
        again = " (re-measured)" if trial.user_attrs.get("replicate") else ""
        label = f"trial {trial.number + 1}/{self.total} {config.label()}{again}"
        try:
            applied = self.live.apply(config)
        except AutoGLMError as exc:
            trial.set_user_attr("failed", f"Triton could not serve it: {exc}")
            self.progress(f"  {label}: FAILED, {exc}")
            raise TrialFailed(str(exc)) from exc
        seconds = self.window.steps * self.window.step_s
        window = self.window.measure(config.model, self.out_dir / f"{trial.number:03d}", self.window.users, seconds,
                                     shape="step")
        result = self.space.result(window["phases"], self.window.slo, config.instances or 1)
        summary = {**_summary(config, window), **result, "applied": applied["applied"], "load_s": applied["load_s"]}
        for key, value in summary.items():
            trial.set_user_attr(key, value)
        for name, value in zip(self.space.constraint_names, result["constraints"], strict=True):
            trial.set_constraint(name, value)
        if summary[self.space.energy_key] is None:
            trial.set_user_attr("failed", "no energy reading in the window")
            raise TrialFailed(f"trial {trial.number} has no energy reading: {window['energy']}")
        self.progress(f"  {label}: {_result_text(summary)}")
        return summary[self.space.objective_key], summary[self.space.energy_key]


def _result_text(s: dict[str, Any]) -> str:
    if "capacity_per_instance_tps" in s:  # a stream: tokens, and what its reader sees
        head = (f"{s['capacity_per_instance_tps']:.0f} tokens/s per instance at {s['users']} users"
                if s["feasible"] else "MISSES THE SLO at every step; nearest")
        return (f"{head} (TTFT p95 {s['ttft_p95_ms'] or 0:.1f} ms, inter-token p95 {s['itl_p95_ms'] or 0:.2f} ms, "
                f"errors {s['error_rate'] or 0:.2%}), {s['j_per_token'] * 1e3:.3g} mJ/token") + (
            " (the load generator ran out of CPU)" if s.get("generator_saturated") else "")
    batch = f"batch {s['mean_batch']:.2f}" if s.get("mean_batch") is not None else "batch ?"
    queue = f"queue {s['mean_queue_us']:.0f} µs" if s.get("mean_queue_us") is not None else "queue ?"
    head = (f"{s['capacity_per_instance_rps']:.0f} req/s per instance at {s['users']} users (p95 {s['p95_ms']:.2f} ms)"
            if s["feasible"] else f"MISSES THE SLO at every step (best p95 {s['p95_ms'] or 0:.2f} ms, "
            f"errors {s['error_rate'] or 0:.2%})")
    return f"{head}, {s['j_per_request']:.3g} J/request, {batch}, {queue}" + (
        " (the load generator ran out of CPU)" if s.get("generator_saturated") else "")


def replicates_of(tune: LoadtestTuneSettings) -> int:
    """Windows a front config may take in this study: only the Bayesian samplers re-measure (the grid and random
    search are the comparisons, each window a new draw)."""
    return tune.replicates if tune.sampler in ("tpe", "gp") else 1


def run_study(study, objective: Objective, n_trials: int, baseline: dict[str, Any], replicates: int = 1,
              front_size: int = 3, explore_first: int = 0) -> int:
    """Run the trials the study still lacks (the baseline first in a new study); returns how many ran. With
    ``replicates`` > 1 each window after the first ``explore_first`` is either a new draw or a re-measurement of
    one of the ``front_size`` best front configs (:func:`loadtest.replicate.next_replicate`), within the same
    ``n_trials`` windows."""
    optuna = require("optuna", purpose="loadtest --tune")
    if not study.trials:
        study.enqueue_trial(baseline, user_attrs={"baseline": True})
    remaining = max(0, n_trials - counted(study))
    if hasattr(study.sampler, "is_exhausted") and study.sampler.is_exhausted(study):
        remaining = 0  # a grid measured in full: another trial would repeat a point
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # GPSampler, multi-objective
        warnings.filterwarnings("ignore", message=".*(out of range|not contained|is not in).*")  # the baseline
        if replicates <= 1:
            study.optimize(objective, n_trials=remaining, catch=(TrialFailed,))
            return remaining
        keys = (objective.space.objective_key, objective.space.energy_key)
        for _ in range(remaining):
            again = next_replicate(trial_rows(study), *keys, replicates, front_size, explore_first)
            if again is not None:
                study.enqueue_trial(again, user_attrs={"replicate": True}, skip_if_exists=False)
            study.optimize(objective, n_trials=1, catch=(TrialFailed,))
    return remaining


def trial_rows(study) -> list[dict[str, Any]]:
    """One row per measured trial: number, parameters, result and what Triton reported."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.state.name != "COMPLETE":
            continue
        rows.append({"trial": t.number, "baseline": bool(t.user_attrs.get("baseline")), "params": dict(t.params),
                     **{k: v for k, v in t.user_attrs.items() if k != "baseline"}})
    return rows


def verify(live: LiveModels, rows: list[dict[str, Any]], window: Window, seconds: float, candidates: int,
           out_dir: Path, progress: Callable[[str], None] | None = None,
           space: Space | type[TuneSpace] = TuneSpace) -> tuple[dict | None, list[dict]]:
    """Measure the ``candidates`` best feasible configs (by the mean of their windows) again, each in a steady
    ``seconds`` window at its capacity concurrency, with the baseline (the config served before the study) beside
    them when it held the SLO in the study; of those that hold the SLO, the best by verified capacity
    (:func:`loadtest.front.ranked`) is returned with every attempt. A study's best window is partly its luck on
    a shared host: the longer windows, side by side, decide among the finalists, and the served config competes
    in them, so a finalist replaces it only by ranking above it there (capacity, then energy within a tie)."""
    show = progress or (lambda line: None)
    order = {"capacity": space.objective_key, "energy": space.energy_key}
    finalists: dict[ServingConfig, dict[str, Any]] = {}
    means = config_means(rows, order["capacity"], order["energy"])
    for row in ranked([r for r in means if r.get("feasible")], **order):
        finalists.setdefault(space.to_config(row["params"]), row)  # parameters that serve alike are one finalist
    chosen = list(finalists.values())[:candidates]
    base = next((r for r in means if r["baseline"]), None)
    served = finalists.get(space.to_config(base["params"])) if base is not None else None
    if served is not None and served not in chosen:
        chosen.insert(0, served)  # the reference: measured first, as it was in the study
    attempts: list[dict[str, Any]] = []
    for row in chosen:
        config = space.to_config(row["params"])
        applied = live.apply(config)
        result = window.measure(config.model, out_dir / f"verify-{row['trial']:03d}", row["users"], seconds)
        attempt = {**_summary(config, result), "trial": row["trial"], "users": row["users"], "baseline": row is served,
                   **space.steady(result, window.slo, config.instances or 1), "applied": applied["applied"],
                   "window": result["window"], "peak_rss_mib": (result.get("memory") or {}).get("peak_rss_mib")}
        attempts.append(attempt)
        verdict = "holds the SLO" if attempt["passed"] else "MISSES THE SLO: " + "; ".join(attempt["breaches"])
        served_now = " (served before the study)" if row is served else ""
        show(f"  verify trial {row['trial'] + 1} {config.label()}{served_now} at {row['users']} users for "
             f"{seconds:g} s: {attempt[space.objective_key]:.0f} {space.unit} per instance, p95 "
             f"{attempt['p95_ms'] or 0:.2f} ms, {verdict}")
    best = ranked([a for a in attempts if a["passed"]], **order)
    return (best[0] if best else None), attempts


def users_ladder(tune: LoadtestTuneSettings, default_users: int) -> tuple[int, list[int]]:
    users = tune.users or default_users
    return users, ladder(users, tune.steps)
