"""Where the study lives and how it survives crashes.

Embedded default: an Optuna journal file in the run directory (safe for several processes on one host).
Any SQLAlchemy URL works too (PostgreSQL for many hosts); there, trials send heartbeats and a trial whose
worker died is re-queued by ``RetryHeartbeatStaleTrialCallback``. Journal storages have no heartbeat, so
a trial left RUNNING by a worker of *this* host that no longer exists is failed and re-queued on resume.
"""

from __future__ import annotations

import importlib.util
import logging
import socket
import time
import warnings
from pathlib import Path

import psutil

from autoglm._lazy import require
from autoglm.config import Settings
from autoglm.errors import AutoGLMError, ConfigError, MissingExtraError
from tune import attributes as attrs

log = logging.getLogger(__name__)
JOURNAL = "study.journal"
_EXAMPLES = "postgresql+psycopg2://user:pass@host/db or sqlite:///path/study.db"
# what to install, per dialect, when its driver is missing: the hint must fit the database the URL names
_DRIVER_HINTS = {
    "postgresql": "pip install psycopg2-binary and write postgresql+psycopg2://..., or pip install 'psycopg[binary]'",
    "mysql": "pip install pymysql and write mysql+pymysql://...",
}


def directions(settings: Settings, task_direction: str) -> list[str]:
    return [task_direction if o == "metric" else "minimize" for o in settings.tune.objectives]


def make_storage(settings: Settings, tune_dir: Path):
    """The study's storage: the run's journal file, or the database ``tune.storage`` names, with heartbeats.

    A bad URL, a missing driver or an unreachable database raises one AutoGLMError that never shows a password."""
    optuna = require("optuna", None, "tuning")
    url = settings.tune.storage
    if not url:
        tune_dir.mkdir(parents=True, exist_ok=True)
        _drop_torn_tail(optuna, tune_dir / JOURNAL)
        backend = optuna.storages.journal.JournalFileBackend(str(tune_dir / JOURNAL))
        return optuna.storages.JournalStorage(backend)
    if "://" not in url:
        raise ConfigError(f"tune.storage={url!r} is not a database URL: use e.g. {_EXAMPLES}, "
                          "or leave it unset for a journal file")
    sqlalchemy_exc = require("sqlalchemy.exc", None, "database storages")
    url, parsed = _database_url(url, sqlalchemy_exc)
    port = f":{parsed.port}" if parsed.port else ""
    where = f"{parsed.host}{port}/{parsed.database or ''}" if parsed.host else parsed.database  # never the password
    beat = settings.tune.heartbeat_s
    try:
        with warnings.catch_warnings():  # heartbeats are the design's choice; Optuna still labels them experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return _rdb_storage(optuna, url, beat, sqlalchemy_exc)
    except ImportError as exc:
        hint = _DRIVER_HINTS.get(parsed.get_backend_name(), "pip install the package that provides it")
        raise MissingExtraError(f"tune.storage={url.split('://')[0]}://...@{where} needs a database driver "
                                f"({exc.__cause__ or exc}): {hint}") from None
    except sqlalchemy_exc.OperationalError as exc:
        raise AutoGLMError(f"cannot reach the database at {where} ({_reason(exc, parsed.password)}): start it or "
                           "fix tune.storage") from None
    except sqlalchemy_exc.DBAPIError as exc:  # e.g. no right to create Optuna's tables, or a race outlasting retries
        raise AutoGLMError(f"the database at {where} refused the study ({_reason(exc, parsed.password)}): grant "
                           "tune.storage's user the right to create tables, or use another database") from None


def _drop_torn_tail(optuna, journal: Path) -> None:
    """Cut a last line that a killed writer left half-written: Optuna appends one whole JSON line per operation, so
    the fragment was never committed, and with it in place the next append would make the journal unreadable.
    Under the journal's own lock, so a live worker's append in progress is never taken for one."""
    if not journal.is_file() or journal.stat().st_size == 0:
        return
    lock = optuna.storages.journal.JournalFileSymlinkLock(str(journal))  # the lock Optuna's appends take
    lock.acquire()
    try:
        with journal.open("rb+") as f:
            f.seek(-1, 2)
            if f.read(1) == b"\n":
                return
            f.seek(0)
            whole = f.read().rfind(b"\n") + 1  # 0: not one complete line
            f.truncate(whole)
    finally:
        lock.release()
    log.warning("%s ended in a half-written operation (a killed worker's): dropped it, %d bytes kept", journal, whole)


def discard_study(settings: Settings, tune_dir: Path) -> None:
    """Delete the run's study however it is stored (``--force``); a study that does not exist is fine.

    Call it from worker 0 only: a later worker must not delete trials the others already wrote."""
    if not settings.tune.storage:
        (tune_dir / JOURNAL).unlink(missing_ok=True)
        return
    optuna = require("optuna", None, "tuning")
    try:
        optuna.delete_study(study_name=settings.tune.study_name, storage=make_storage(settings, tune_dir))
    except KeyError:  # no such study yet: nothing to discard
        pass


def _database_url(url: str, sqlalchemy_exc):
    """``url`` checked, with a driver that is installed, and its parsed form (for messages)."""
    from sqlalchemy.engine import make_url

    scheme = url.split("://")[0]  # holds no password
    try:
        parsed = make_url(url)
    except (sqlalchemy_exc.ArgumentError, ValueError):
        raise ConfigError(f"tune.storage ({scheme}://...) is not a valid database URL: write it like "
                          f"{_EXAMPLES}") from None
    try:
        parsed.get_dialect()
    except sqlalchemy_exc.NoSuchModuleError:
        raise ConfigError(f"tune.storage has an unknown database scheme {scheme!r}: use e.g. {_EXAMPLES}") from None
    # SQLAlchemy >= 2.1 reads a bare postgresql:// as psycopg 3, but the pinned environment ships psycopg2 only:
    # use the driver that is there rather than fail on the most common URL
    if parsed.drivername == "postgresql" and not _installed("psycopg") and _installed("psycopg2"):
        url = "postgresql+psycopg2" + url[len("postgresql"):]  # the rest untouched: Optuna formats it as a template
        parsed = parsed.set(drivername="postgresql+psycopg2")
    database = parsed.database or ""
    if parsed.get_backend_name() == "sqlite" and database != ":memory:" and not database.startswith("file:"):
        folder = Path(database).parent
        # an error rather than mkdir: a mistyped path would silently start a new, empty study instead of resuming
        if not folder.is_dir():
            raise ConfigError(f"tune.storage names a SQLite file in {folder}, which does not exist: create the "
                              "directory or fix the path")
    return url, parsed


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _reason(exc, password: str | None) -> str:
    """The driver's own words, e.g. 'connection refused', without a password it might echo."""
    lines = str(getattr(exc, "orig", None) or exc).strip().splitlines() or ["unknown error"]
    reason = lines[0].rsplit(": ", 1)[-1].strip()  # psycopg2: 'connection to server at ... failed: Connection refused'
    if password:
        reason = reason.replace(str(password), "***")
    return reason[:1].lower() + reason[1:]


def _rdb_storage(optuna, url: str, beat: int, sqlalchemy_exc):
    """An RDB storage with heartbeats; a failed trial of a dead worker is retried twice at most."""
    retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2)
    for attempt in range(3):
        try:
            return optuna.storages.RDBStorage(url, heartbeat_interval=beat, grace_period=2 * beat,
                                              heartbeat_stale_trial_callback=retry,
                                              engine_kwargs={"pool_pre_ping": True})
        except (sqlalchemy_exc.IntegrityError, sqlalchemy_exc.ProgrammingError):
            # workers starting together on a fresh database race creating Optuna's tables and types: the
            # loser's retry finds them made
            if attempt == 2:
                raise
            time.sleep(1 + attempt)


def open_study(settings: Settings, tune_dir: Path, task_direction: str, metric: str | None = None, sampler=None):
    """Create or resume (``load_if_exists``) the study; its objectives must match the config.

    ``metric``: the task metric of the "metric" objective, recorded on a new study and checked on a resumed one.
    ``sampler``: an Optuna sampler object to use instead of the one ``tune.sampler`` names (AutoTuner's
    ``sampler=``); the config cannot hold an object, so a run resumed by the CLI uses ``tune.sampler``."""
    optuna = require("optuna", None, "tuning")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    wanted = directions(settings, task_direction)
    storage = make_storage(settings, tune_dir)
    # a resumed study must not replay its first trials: a sampler seeded as before draws the same
    # parameters again, so the seed moves on by the number of trials already in the storage
    # workers started together must not draw the same points either: each gets its own stream
    seed = settings.run.seed + _n_trials(storage, settings.tune.study_name) + 7919 * settings.tune.worker_index
    study = optuna.create_study(
        storage=storage, study_name=settings.tune.study_name, load_if_exists=True,
        sampler=study_sampler(settings, seed, len(wanted), sampler), directions=wanted)
    have = [d.name.lower() for d in study.directions]
    names = study.metric_names
    if have != wanted or (names is not None and names != list(settings.tune.objectives)):
        raise ConfigError(f"study '{settings.tune.study_name}' optimizes {names or '?'} {have}, but tune.objectives "
                          f"{settings.tune.objectives} means {wanted}: use another tune.study_name or --force")
    if metric is not None:
        recorded = attrs.METRIC_NAME.get(study)
        if recorded is None:
            attrs.METRIC_NAME.set(study, metric)
        elif recorded != metric:
            raise ConfigError(f"study '{settings.tune.study_name}' optimizes {recorded}, but tune.metric means "
                              f"{metric}: use another tune.study_name or --force")
    with warnings.catch_warnings():  # experimental since 3.2, used by optuna-dashboard to label axes
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(list(settings.tune.objectives))
    return study


def study_sampler(settings: Settings, seed: int, n_objectives: int, sampler=None):
    """``sampler``, else the one ``tune.sampler`` names; wrapped to narrow its ranges after its start-up when
    ``tune.search_space`` is the adaptive preset, and to propose ``tune.metric_share`` of its trials for the metric
    alone when TPE or GP models several objectives (:class:`tune.sampler.MetricShare`)."""
    from tune.sampler import MetricShare, Narrowing, make_sampler, startup_of
    from tune.space import is_adaptive

    tune = settings.tune
    chosen = sampler or make_sampler(tune.sampler, seed, n_objectives, tune.startup_trials)
    startup = startup_of(tune.sampler if sampler is None else None, n_objectives, tune.startup_trials)
    if sampler is None and tune.sampler in ("tpe", "gp") and tune.metric_share > 0 and n_objectives > 1 \
            and "metric" in tune.objectives:
        from compress import knobs

        off = {name: knob.default for name, knob in knobs().items()}  # each compression knob's default: off
        chosen = MetricShare(chosen, tune.metric_share, startup, seed, tune.objectives.index("metric"), off)
    return Narrowing(chosen, startup) if is_adaptive(tune.search_space) else chosen


def queue_first(study, settings: Settings, first: list[tuple[dict, dict]]) -> int:
    """Queue ``first`` ((params, user attributes) each: the warm start, then the portfolio's entries) as a new
    study's first trials, in order, each distinct point once; returns how many were queued.

    Once per study: a resumed study has run them already, and of several workers only worker 0 queues them. No more
    than ``tune.n_trials``: a queued trial the study never runs would wait in its storage for the next run."""
    if settings.tune.worker_index != 0 or study.get_trials(deepcopy=False):
        return 0
    queued: list[dict] = []
    for params, tags in first:
        if params not in queued and len(queued) < settings.tune.n_trials:
            study.enqueue_trial(params, user_attrs=tags)
            queued.append(params)
    return len(queued)


def _n_trials(storage, study_name: str) -> int:
    try:
        return len(storage.get_all_trials(storage.get_study_id_from_name(study_name), deepcopy=False))
    except KeyError:  # a new study
        return 0


def recover_stale_trials(study) -> list[int]:
    """Fail and re-queue RUNNING trials whose worker process on this host is gone (journal storages)."""
    optuna = require("optuna", None, "tuning")
    host = socket.gethostname()
    recovered = []
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        pid = attrs.PID.get(trial)
        if attrs.HOST.get(trial) != host or pid is None or _alive(pid, attrs.STARTED.get(trial)):
            continue
        try:
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        # another worker (or a heartbeat) recovered it first: before tell read it (ValueError) or after
        except (ValueError, optuna.exceptions.UpdateFinishedTrialError):
            continue
        if not attrs.RETRY_OF.on(trial):  # retry once
            queue_retry(study, trial)
        recovered.append(trial.number)
        log.warning("trial %d was left running by a dead worker (pid %s): failed and re-queued", trial.number, pid)
    return recovered


def queue_retry(study, trial) -> None:
    """Queue ``trial``'s parameters again as a new trial whose ``retry_of`` names it."""
    study.enqueue_trial(trial.params, user_attrs=attrs.RETRY_OF.tag(trial.number), skip_if_exists=False)


def _alive(pid: int, started: float | None) -> bool:
    """A pid that exists *and* started when the trial's worker did (pids are reused)."""
    try:
        process = psutil.Process(pid)
        return started is None or abs(process.create_time() - started) < 1.0
    except psutil.Error:
        return False
