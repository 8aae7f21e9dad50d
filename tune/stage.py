"""``autoglm tune``: run (or resume) the study, then select and report.

Writes ``runs/<run>/tune/``: the study (a journal file unless ``tune.storage`` names a database),
``trials/<n>/`` (checkpoint, training log, metrics), ``pareto.json``, ``selected.json``, ``report.html``
and, last, the manifest with the study's compute totals. A killed run resumes where it stopped: every
completed trial is in the storage, and a trial its dead worker left running is retried.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from autoglm.artifacts import Manifest, RunDir, StageWriter, write_atomic
from autoglm.config import Settings, TuneSettings
from autoglm.errors import AutoGLMError
from compress import check_settings
from tune import attributes as attrs
from tune.select import pareto_points, select
from tune.siblings import CompressionSiblings
from tune.space import build_space, warm_start_params, with_shared_schedule, without_inapplicable
from tune.storage import directions, discard_study, open_study, queue_first, queue_retry, recover_stale_trials

# what counts toward tune.n_trials: a failed trial does not, so a rerun after fixing its cause runs the trials the
# failures cost, and a trial that was killed or interrupted is retried in its own place (see retry_interrupted)
FINISHED = ("COMPLETE", "PRUNED")
UNTRACKED = ("mlflow_uri",)  # where the study is reported, not what it is: no part of whether the stage is done


def open_search(settings: Settings, tune_dir: Path, sampler=None):
    """(task, search space, study, objective): the task with its data ready, the study created or resumed (the
    trials of dead workers re-queued, its :func:`first_trials` queued once) and the objective that runs its
    trials. ``sampler``: an Optuna sampler object instead of ``tune.sampler``'s (see
    :func:`tune.storage.open_study`)."""
    from autoglm.tasks import get_task
    from tune.objective import Objective

    task = get_task(settings).scored_by(settings.tune.metric)
    task.prepare()
    space = build_space(task, settings.tune.search_space, settings.tune.space)
    space = without_inapplicable(task, space, task.check_model_args(settings.task.model))
    if settings.tune.early_stop.enabled and settings.tune.early_stop.shared_schedule:
        space = with_shared_schedule(space)
    study = open_study(settings, tune_dir, task.direction, task.metric, sampler)
    recover_stale_trials(study)
    retry_interrupted(study, settings.tune.worker_index)
    _quiet_interrupts()
    queue_first(study, settings, first_trials(task, settings, space))
    return task, space, study, Objective(task, settings, space, tune_dir, directions(settings, task.direction))


def first_trials(task, settings: Settings, space) -> list[tuple[dict, dict]]:
    """What a new study runs before the sampler draws: ``tune.warm_start``'s point, then the first
    ``tune.portfolio_size`` entries of ``tune.portfolio`` on this task, as (params, user attributes)."""
    from tune.portfolio import configured_portfolio, portfolio_params

    tune = settings.tune
    first = []
    if tune.warm_start is not None:
        first.append((warm_start_params(task, settings, space, tune.warm_start), attrs.WARM_START.tag(True)))
    portfolio = configured_portfolio(tune)
    if portfolio is not None:
        first += [(params, attrs.PORTFOLIO.tag(index))
                  for index, params in portfolio_params(portfolio, task, settings, space, tune.portfolio_size)]
    return first


class _InterruptsWithoutTraceback(logging.Filter):
    """Optuna logs a failed trial with its traceback; for Ctrl-C or SIGTERM that is noise (the trial is retried,
    and the command says it was stopped), so such a record keeps its one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], KeyboardInterrupt):
            record.exc_info = None
        return True


def _quiet_interrupts() -> None:
    optimize_log = logging.getLogger("optuna.study._optimize")  # where Optuna logs a trial's failure
    if not any(isinstance(f, _InterruptsWithoutTraceback) for f in optimize_log.filters):
        optimize_log.addFilter(_InterruptsWithoutTraceback())


def retry_interrupted(study, worker: int) -> list[int]:
    """Queue again, once, this worker's trials that Ctrl-C or SIGTERM stopped (Optuna failed them), as
    :func:`tune.storage.recover_stale_trials` does for a killed worker's: an interruption is not the trial's
    fault. Returns their numbers."""
    trials = study.get_trials(deepcopy=False)
    retried = {attrs.RETRY_OF.get(t) for t in trials if attrs.RETRY_OF.on(t)}
    again = [t for t in trials if t.state.name == "FAIL" and attrs.INTERRUPTED.get(t)
             and attrs.WORKER.get(t, 0) == worker and t.number not in retried and not attrs.RETRY_OF.on(t)]
    for trial in again:
        queue_retry(study, trial)
    return [t.number for t in again]


def sibling_callbacks(settings: Settings, space, task, room=None) -> list:
    """The compression-siblings callback when ``tune.compression_siblings`` is on (see tune.siblings)."""
    return [CompressionSiblings(space, task.direction, room)] if settings.tune.compression_siblings else []


def run_study(settings: Settings, tune_dir: Path, progress: bool = True, sampler=None, callbacks=()):
    """Create or resume the study and run trials until ``tune.n_trials`` have finished (or the timeout).

    ``callbacks``: more ``study.optimize`` callbacks, each called ``(study, frozen_trial)`` once per finished
    trial (Optuna's signature: optuna-integration's MLflowCallback, a stopping rule calling ``study.stop()``)."""
    from autoglm.measure import fixed_threads

    task, space, study, objective = open_search(settings, tune_dir, sampler)
    tracker = tracking_callbacks(settings, study, task)
    tune = settings.tune
    mine = None if tune.workers == 1 else tune.worker_index

    def room(study) -> int:  # trials this worker will still run
        return share(tune, tune.worker_index) - finished_by(study.get_trials(deepcopy=False), mine)

    stopped = attrs.worker_stopped(tune.worker_index)
    if tune.workers > 1:
        stopped.set(study, False)  # running (again): worker 0 waits for this share
    remaining = room(study)
    if remaining > 0:
        siblings = sibling_callbacks(settings, space, task, room)
        done = share(tune, tune.worker_index) - remaining
        with fixed_threads(settings.run.threads), _progress(progress, settings.tune.n_trials, done) as tick:
            study.optimize(objective, n_trials=remaining, timeout=settings.tune.timeout_s,
                           callbacks=[tick, *siblings, *tracker, *callbacks], catch=(Exception,),
                           gc_after_trial=True)
    if tune.workers > 1:
        stopped.set(study, True)  # its share may be unfinished (tune.timeout_s): worker 0 stops waiting
    return task, study


def tracking_callbacks(settings: Settings, study, task) -> list:
    """The MLflow tracker when ``tune.mlflow_uri`` is set (see tune.tracking): opened now, so a wrong URI is
    refused before any trial trains."""
    if not settings.tune.mlflow_uri:
        return []
    from tune.tracking import MLflowTracker

    return [MLflowTracker(settings.tune.mlflow_uri, study, settings.run.name, task.metric)]


def _track_stage(settings: Settings, study, task, tune_dir: Path, metrics: dict[str, Any]) -> None:
    """The completed stage into the study's MLflow parent run; the stage is done whatever the store does."""
    from tune.tracking import MLflowTracker

    try:
        MLflowTracker(settings.tune.mlflow_uri, study, settings.run.name, task.metric).log_stage(tune_dir, metrics)
    except Exception as exc:
        logging.getLogger(__name__).warning("MLflow tracking at %s: the tune stage not logged: %s",
                                            settings.tune.mlflow_uri, exc)


def share(tune: TuneSettings, index: int) -> int:
    """Worker ``index``'s part of ``tune.n_trials``: N workers started together make exactly n_trials."""
    return tune.n_trials // tune.workers + (index < tune.n_trials % tune.workers)


def finished_by(trials, index: int | None) -> int:
    """Trials of worker ``index`` (None: of every worker) that count toward tune.n_trials: completed or stopped
    early. A failed one does not; a killed or interrupted trial is retried, and its retry counts."""
    return sum(t.state.name in FINISHED and (index is None or attrs.WORKER.get(t, 0) == index)
               for t in trials)


def _nothing_completed(study) -> str:
    """Why selection has no point, and the fix."""
    trials = study.get_trials(deepcopy=False)
    failed = [t for t in trials if t.state.name == "FAIL" and not attrs.INTERRUPTED.get(t)]
    if failed:
        return (f"no trial completed: {len(failed)} of {len(trials)} failed (trial {failed[-1].number}: "
                f"{attrs.ERROR.get(failed[-1], 'see the log above')}); fix that and rerun: failed trials "
                "do not count toward tune.n_trials (--force starts the study afresh)")
    return ("no trial completed, so there is nothing to select: raise tune.n_trials or tune.timeout_s, or loosen "
            "early stopping (tune.early_stop.enabled = false)")


def wait_for_workers(settings: Settings, study, poll_s: float = 5.0) -> None:
    """Worker 0 selects once every worker finished its share (the others exit after theirs); a worker
    that never comes back is bounded by the Job's activeDeadlineSeconds."""
    tune = settings.tune

    def busy(i: int) -> bool:
        return not attrs.worker_stopped(i).get(study) and \
            finished_by(study.get_trials(deepcopy=False), i) < share(tune, i)

    while any(busy(i) for i in range(tune.workers)):
        time.sleep(poll_s)


def tune_run(settings: Settings, force: bool = False, progress: bool = True, sampler=None,
             callbacks=()) -> Manifest | None:
    """The stage: skipped when a complete manifest matches the same config.

    ``sampler`` and ``callbacks`` (Python callers only, see :func:`run_study`) are objects, not config: they
    take no part in whether the stage is up to date, and a run resumed by the CLI goes on without them."""
    check_settings(settings)  # compress.variants, as the compress stage will read them
    run = RunDir(settings.run.root, settings.run.name)
    config = {k: settings.section(k) for k in ("task", "train", "tune", "compress", "measure")} | {
        "seed": settings.run.seed}
    config["tune"] = {k: v for k, v in config["tune"].items() if k not in UNTRACKED}
    writer = StageWriter(run, "tune", config)
    if writer.up_to_date() and not force:
        print(f"tune: up to date in {writer.dir} (use --force to redo)")
        return run.manifest("tune")
    from autoglm.tasks import get_task

    # the task and the space are checked before the last run is invalidated: a bad config must not cost it
    build_space(get_task(settings).scored_by(settings.tune.metric), settings.tune.search_space, settings.tune.space)
    from tune.portfolio import configured_portfolio

    configured_portfolio(settings.tune)  # and so is the portfolio file
    if settings.tune.mlflow_uri:  # so is the tracking store: a wrong URI is refused here
        from autoglm.tracking import open_store

        open_store(settings.tune.mlflow_uri, settings.tune.study_name)
    writer.invalidate()
    for derived in ("pareto.json", "selected.json", "report.html"):  # the last run's: none may outlive its manifest
        (writer.dir / derived).unlink(missing_ok=True)
    if force and settings.tune.worker_index == 0:
        # only worker 0 starts the study afresh: a later worker must not delete trials others already wrote
        discard_study(settings, writer.dir)
        for kept in ("cache", "trials"):  # --force redoes the training too, not only the search
            shutil.rmtree(writer.dir / kept, ignore_errors=True)

    task, study = run_study(settings, writer.dir, progress, sampler, callbacks)
    if settings.tune.workers > 1:  # one study, one selection: worker 0 makes it when all shares are done
        if settings.tune.worker_index != 0:
            print(f"tune: worker {settings.tune.worker_index} finished its share; worker 0 selects and reports")
            return None
        wait_for_workers(settings, study)
    points = pareto_points(study)
    if not points:
        raise AutoGLMError(_nothing_completed(study))
    chosen, why = select(points, settings.tune, task.direction)
    write_atomic(writer.dir / "pareto.json", _json({"objectives": settings.tune.objectives,
                                                    "points": [p.to_dict() for p in points]}))
    write_atomic(writer.dir / "selected.json", _json(chosen.to_dict() | {"why": why}))
    from tune.report import write_report

    write_report(study, points, chosen, settings, task, writer.dir / "report.html")
    settings.save(writer.path("config.json"))
    for rel in ("pareto.json", "selected.json", "report.html", "config.json", chosen.checkpoint):
        writer.add_output(rel)
    totals = study_totals(study)
    writer.manifest.metrics = totals | {"selected_trial": chosen.trial} | {
        f"selected_{k}": v for k, v in chosen.objectives.items()}
    writer.add_energy("study", totals["joules"], totals["energy_method"])
    manifest = writer.commit()
    if settings.tune.mlflow_uri:  # the parent run gets the stage's record once it is complete
        _track_stage(settings, study, task, writer.dir, writer.manifest.metrics)
    print(f"tune: {totals['complete']} complete, {totals['pruned']} stopped early, {totals['failed']} failed; "
          f"selected trial {chosen.trial} {chosen.objectives} -> {writer.dir / 'selected.json'}")
    return manifest


def study_totals(study) -> dict[str, Any]:
    """Honest compute accounting over every trial, stopped and failed ones included."""
    trials = study.get_trials(deepcopy=False)
    compute = [attrs.COMPUTE.get(t, {}) for t in trials]
    methods = {c["energy_method"] for c in compute if "energy_method" in c}
    return {"trials": len(trials), "complete": sum(t.state.name == "COMPLETE" for t in trials),
            "pruned": sum(t.state.name == "PRUNED" for t in trials),
            "failed": sum(t.state.name == "FAIL" for t in trials),
            "wall_s": sum(c.get("wall_s", 0.0) for c in compute), "cpu_s": sum(c.get("cpu_s", 0.0) for c in compute),
            "joules": sum(c.get("joules", 0.0) for c in compute),
            "energy_method": methods.pop() if len(methods) == 1 else ("mixed" if methods else "none")}


def _json(data: Any) -> bytes:
    return (json.dumps(data, indent=2, default=str) + "\n").encode()


class _progress:
    """A rich progress bar advanced by Optuna's trial callback (silent when not a terminal)."""

    def __init__(self, enabled: bool, total: int, done: int):
        from rich.progress import Progress

        self.bar = Progress(disable=not enabled)
        self.task = self.bar.add_task("trials", total=total, completed=done)

    def __enter__(self):
        self.bar.start()
        return self.tick

    def __exit__(self, *exc):
        self.bar.stop()

    def tick(self, study, trial) -> None:
        self.bar.advance(self.task)
        state = trial.state.name.lower()
        values = ", ".join(f"{v:.4g}" for v in trial.values) if trial.values else attrs.ERROR.get(trial, "")
        self.bar.console.print(f"trial {trial.number}: {state} {values}")
