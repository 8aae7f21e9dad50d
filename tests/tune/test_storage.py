"""Where the study lives: journal file by default, any SQLAlchemy URL, heartbeats, resume and recovery."""

import socket
import threading
import time

import optuna
import psutil
import pytest

from autoglm.errors import AutoGLMError, ConfigError, MissingExtraError
from tests.tune import _tiny
from tune import storage as storage_module
from tune.stage import tune_run
from tune.storage import discard_study, make_storage, open_study, recover_stale_trials


def _values(trial):
    x = trial.suggest_float("x", 0.0, 1.0)
    return x, 1.0 - x, 0.5


def test_a_sqlite_url_runs_the_study_in_a_database_with_heartbeats(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    settings = _tiny.settings(tmp_path, f"tune.storage='{url}'", "tune.n_trials=2", "tune.heartbeat_s=7")

    tune_run(settings, progress=False)

    storage = make_storage(settings, tmp_path)
    study = optuna.load_study(study_name="autoglm", storage=url)
    assert isinstance(storage, optuna.storages.RDBStorage)
    assert storage.heartbeat_interval == 7 and storage.grace_period == 14
    assert isinstance(storage.heartbeat_stale_trial_callback, optuna.storages.RetryHeartbeatStaleTrialCallback)
    assert len(study.trials) == 2 and study.metric_names == ["metric", "latency", "energy"]
    assert not (tmp_path / "runs" / "t" / "tune" / "study.journal").exists()


# the test plays a dead worker by hand (ask outside optimize) and reads the retry link with Optuna's experimental API
@pytest.mark.filterwarnings("ignore:Heartbeat of storage:UserWarning",
                            "ignore::optuna.exceptions.ExperimentalWarning")
def test_a_trial_whose_heartbeat_stopped_is_failed_and_retried(tmp_path):
    settings = _tiny.settings(tmp_path, f"tune.storage='sqlite:///{tmp_path / 'hb.db'}'", "tune.heartbeat_s=1")
    study = open_study(settings, tmp_path, "maximize")
    dead = study.ask()
    dead.suggest_float("x", 0.0, 1.0)
    study._storage.record_heartbeat(dead._trial_id)  # its worker beat once, then died
    time.sleep(3.5)  # past the grace period (2 x heartbeat_s; SQLite keeps whole seconds)

    study.optimize(_values, n_trials=1)

    trials = study.get_trials(deepcopy=False)
    assert trials[0].state.name == "FAIL"
    retry = trials[1]
    assert optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(retry) == 0
    assert retry.params == trials[0].params and retry.state.name == "COMPLETE"


def test_a_url_that_is_not_a_database_is_refused(tmp_path):
    settings = _tiny.settings(tmp_path, "tune.storage='study.db'")

    with pytest.raises(ConfigError, match="is not a database URL"):
        make_storage(settings, tmp_path)



def test_an_unknown_database_scheme_is_a_config_error_with_examples(tmp_path):
    settings = _tiny.settings(tmp_path, "tune.storage='foo://bar'")

    with pytest.raises(ConfigError, match="unknown database scheme 'foo'.*postgresql\\+psycopg2://.*sqlite:///"):
        make_storage(settings, tmp_path)


def _closed_port() -> int:
    with socket.socket() as probe:  # a port just freed: nothing listens there
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("scheme", ["postgresql+psycopg2", "postgresql"])  # the README's bare form too
def test_an_unreachable_database_is_one_clear_error_without_the_password(tmp_path, scheme):
    port = _closed_port()
    settings = _tiny.settings(tmp_path, f"tune.storage='{scheme}://u:s3cret@127.0.0.1:{port}/db'")

    with pytest.raises(AutoGLMError) as error:
        make_storage(settings, tmp_path)

    message = str(error.value)
    assert message == (f"cannot reach the database at 127.0.0.1:{port}/db (connection refused): start it or fix "
                       "tune.storage")
    assert type(error.value) is AutoGLMError and "s3cret" not in message


def test_workers_racing_to_create_the_tables_retry_instead_of_failing(tmp_path, monkeypatch):
    import sqlalchemy.exc

    made = optuna.storages.RDBStorage
    calls = []

    def racing(*args, **kwargs):  # the first attempt loses the race creating Optuna's tables
        calls.append(1)
        if len(calls) == 1:
            raise sqlalchemy.exc.IntegrityError("CREATE TABLE studies", {}, Exception("duplicate key"))
        return made(*args, **kwargs)

    monkeypatch.setattr(optuna.storages, "RDBStorage", racing)
    monkeypatch.setattr(storage_module.time, "sleep", lambda s: None)
    settings = _tiny.settings(tmp_path, f"tune.storage='sqlite:///{tmp_path / 'race.db'}'")

    assert isinstance(make_storage(settings, tmp_path), made) and len(calls) == 2


def test_a_sqlite_file_in_a_missing_directory_names_the_directory(tmp_path):
    settings = _tiny.settings(tmp_path, f"tune.storage='sqlite:///{tmp_path / 'nodir' / 'x.db'}'")

    with pytest.raises(ConfigError, match=f"SQLite file in {tmp_path / 'nodir'}, which does not exist"):
        make_storage(settings, tmp_path)
    assert not (tmp_path / "nodir").exists()


def test_a_missing_driver_gets_the_hint_for_its_own_database(tmp_path):
    mysql = _tiny.settings(tmp_path, "tune.storage='mysql://u:s3cret@db.example/optuna'")

    with pytest.raises(MissingExtraError) as error:
        make_storage(mysql, tmp_path)

    assert "pip install pymysql and write mysql+pymysql://" in str(error.value)
    assert "psycopg" not in str(error.value) and "s3cret" not in str(error.value)


@pytest.mark.parametrize("installed, driver", [({"psycopg2"}, "postgresql+psycopg2"),
                                               ({"psycopg", "psycopg2"}, "postgresql")])
def test_a_bare_postgresql_url_uses_psycopg2_when_only_it_is_installed(monkeypatch, installed, driver):
    import sqlalchemy.exc

    monkeypatch.setattr(storage_module, "_installed", lambda module: module in installed)

    url, parsed = storage_module._database_url("postgresql://u:p%40ss@host:5432/db", sqlalchemy.exc)

    assert url == f"{driver}://u:p%40ss@host:5432/db" and parsed.drivername == driver


def test_discard_study_deletes_a_database_study_so_other_objectives_can_start_afresh(tmp_path):
    url = f"tune.storage='sqlite:///{tmp_path / 'study.db'}'"
    open_study(_tiny.settings(tmp_path, url), tmp_path, "maximize")  # metric, latency, energy
    other = _tiny.settings(tmp_path, url, "tune.objectives=['metric', 'latency']")

    discard_study(other, tmp_path)
    discard_study(other, tmp_path)  # none left: not an error

    assert open_study(other, tmp_path, "maximize").metric_names == ["metric", "latency"]


def test_discard_study_deletes_the_journal_file(tmp_path):
    settings = _tiny.settings(tmp_path)
    open_study(settings, tmp_path, "maximize")
    assert (tmp_path / "study.journal").exists()

    discard_study(settings, tmp_path)
    discard_study(settings, tmp_path)  # none left: not an error

    assert not (tmp_path / "study.journal").exists()


def test_force_starts_a_database_study_afresh_as_the_refusal_says(tmp_path):
    url = f"tune.storage='sqlite:///{tmp_path / 'study.db'}'"
    open_study(_tiny.settings(tmp_path, url, "tune.objectives=['metric', 'latency']"), tmp_path, "maximize")
    settings = _tiny.settings(tmp_path, url, "tune.n_trials=1", "tune.compression_siblings=false")
    with pytest.raises(ConfigError, match="use another tune.study_name or --force"):
        tune_run(settings, progress=False)

    tune_run(settings, force=True, progress=False)

    study = optuna.load_study(study_name="autoglm", storage=f"sqlite:///{tmp_path / 'study.db'}")
    assert study.metric_names == ["metric", "latency", "energy"] and len(study.trials) == 1


@pytest.mark.parametrize("objectives", [["metric", "latency"], ["metric", "energy", "latency"]])
def test_a_study_with_other_objectives_under_the_same_name_is_refused(tmp_path, objectives):
    open_study(_tiny.settings(tmp_path), tmp_path, "maximize")  # metric, latency, energy
    other = _tiny.settings(tmp_path, "tune.objectives=[" + ", ".join(f"'{o}'" for o in objectives) + "]")

    with pytest.raises(ConfigError) as error:
        open_study(other, tmp_path, "maximize")

    assert "use another tune.study_name or --force" in str(error.value)


def test_a_resumed_study_does_not_replay_the_first_trials_parameters(tmp_path):
    settings = _tiny.settings(tmp_path, "tune.sampler='random'")
    open_study(settings, tmp_path, "maximize").optimize(_values, n_trials=2)

    resumed = open_study(settings, tmp_path, "maximize")
    resumed.optimize(_values, n_trials=2)

    xs = [t.params["x"] for t in resumed.trials]
    assert len(set(xs)) == 4


def test_running_trials_of_dead_workers_are_failed_and_requeued_once(tmp_path):
    study = open_study(_tiny.settings(tmp_path), tmp_path, "maximize")
    me, host = psutil.Process(), socket.gethostname()
    dead = study.ask()  # same pid as ours, but not our start time: a dead worker whose pid was reused
    dead.suggest_float("x", 0.0, 1.0)
    dead.set_user_attr("host", host), dead.set_user_attr("pid", me.pid), dead.set_user_attr("started", 0.0)
    alive = study.ask()
    alive.set_user_attr("host", host), alive.set_user_attr("pid", me.pid)
    alive.set_user_attr("started", me.create_time())

    first = recover_stale_trials(study)
    retry = study.ask()  # takes the re-queued trial, with the dead one's parameters
    retried_x = retry.suggest_float("x", 0.0, 1.0)
    retry.set_user_attr("pid", me.pid), retry.set_user_attr("started", 0.0), retry.set_user_attr("host", host)
    second = recover_stale_trials(study)

    states = [t.state.name for t in study.get_trials(deepcopy=False)]
    assert first == [dead.number] and second == [retry.number]
    assert retry.user_attrs["retry_of"] == dead.number and retried_x == dead.params["x"]
    assert states == ["FAIL", "RUNNING", "FAIL"]  # the retry of a retry is not queued again


def test_two_workers_recovering_the_same_dead_trial_leave_one_retry_and_no_error(tmp_path):
    settings = _tiny.settings(tmp_path)
    first, second = open_study(settings, tmp_path, "maximize"), open_study(settings, tmp_path, "maximize")
    dead = first.ask()
    dead.suggest_float("x", 0.0, 1.0)
    dead.set_user_attr("host", socket.gethostname()), dead.set_user_attr("pid", 2**22 + 7)  # no such process
    stale_view = second.get_trials(deepcopy=False)  # the second worker saw it RUNNING too
    assert recover_stale_trials(first) == [dead.number]
    second.get_trials = lambda **kw: [t for t in stale_view if t.state.name == "RUNNING"]  # racing: stale read
    assert recover_stale_trials(second) == []  # the trial is finished already: skipped, not a crash
    assert [t.state.name for t in first.get_trials(deepcopy=False)] == ["FAIL", "WAITING"]


def test_worker_zero_waits_for_the_other_shares_until_they_are_done_or_stopped(tmp_path):
    from tune import attributes as attrs
    from tune.stage import wait_for_workers

    settings = _tiny.settings(tmp_path, "tune.workers=2", "tune.n_trials=4")
    study = open_study(settings, tmp_path, "maximize")
    attrs.worker_stopped(0).set(study, True)
    attrs.worker_stopped(1).set(study, False)  # worker 1 runs, none of its 2 trials finished yet
    waiter = threading.Thread(target=wait_for_workers, args=(settings, study, 0.01))
    waiter.start()
    time.sleep(0.2)
    assert waiter.is_alive()
    attrs.worker_stopped(1).set(study, True)  # it stopped early (tune.timeout_s): stop waiting
    waiter.join(5)
    assert not waiter.is_alive()


def test_a_warm_started_study_runs_the_configured_point_first_and_only_once(tmp_path):
    settings = _tiny.settings(tmp_path, "tune.n_trials=1", "tune.warm_start={'quantize.mode' = 'static'}",
                              "train.lr=2e-3")

    tune_run(settings, progress=False)
    tune_run(settings.model_copy(update={"tune": settings.tune.model_copy(update={"n_trials": 2})}),
             force=False, progress=False)

    study = _tiny.journal_study(tmp_path / "runs" / "t" / "tune")
    first, second = study.trials
    assert first.params == {"train.lr": 2e-3, "quantize.mode": "static", "prune.ratio": 0.0}
    assert first.user_attrs["warm_start"] and "compute" in first.user_attrs  # charged like any trial
    assert "warm_start" not in second.user_attrs  # a resumed study queues it no more


def test_a_journal_line_a_killed_writer_left_half_written_is_dropped_and_the_study_resumes(tmp_path):
    settings = _tiny.settings(tmp_path)
    study = open_study(settings, tmp_path, "maximize")
    study.optimize(_values, n_trials=2)
    journal = tmp_path / "study.journal"
    whole = journal.read_bytes()
    journal.write_bytes(whole + b'{"op_code": 5, "worker_id": "x", "trial_id": 1, "sta')  # SIGKILL mid-append

    resumed = open_study(settings, tmp_path, "maximize")
    resumed.optimize(_values, n_trials=1)

    assert journal.read_bytes().startswith(whole)
    assert [t.state.name for t in _tiny.journal_study(tmp_path).trials] == ["COMPLETE"] * 3
