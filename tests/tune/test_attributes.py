"""Trial attributes: the keys studies on disk hold never change, and the accessors read and write them."""

import optuna
import pytest

from tune import attributes as attrs

# what a study written before holds: renaming any of these would stop it from resuming as it did
STORED = {
    "HOST": "host", "PID": "pid", "STARTED": "started", "WORKER": "worker", "ERROR": "error",
    "INTERRUPTED": "interrupted", "RETRY_OF": "retry_of", "WARM_START": "warm_start", "SIBLING_OF": "sibling_of",
    "TRAINING_KEY": "training_key", "CACHE_HIT": "cache_hit", "DDP_PROCS": "ddp_procs", "HISTORY": "history",
    "STEPS": "steps", "STOPPED_AT": "stopped_at", "TRAIN_METRIC": "train_metric", "SCHEDULE_STEPS": "schedule_steps",
    "PROBE": "probe", "TIMED": "timed", "COMPUTE": "compute", "VARIANT": "variant", "COMPRESS": "compress",
    "OBJECTIVES": "objectives", "METRIC_NAME": "metric_name", "MLFLOW_RUN": "mlflow_run_id",
    "PORTFOLIO": "portfolio", "FORECAST": "forecast", "PROPOSED_FOR": "proposed_for",
}


def test_every_attribute_keeps_its_stored_key():
    declared = {name: a.key for name, a in vars(attrs).items() if isinstance(a, attrs.Attr)}

    assert declared == STORED
    assert attrs.rung(300).key == "rung_300" and attrs.worker_stopped(2).key == "worker_2_stopped"


def test_accessors_write_and_read_a_live_and_a_frozen_trial():
    study = optuna.create_study(directions=["maximize", "minimize"])
    trial = study.ask()

    attrs.OBJECTIVES.set(trial, {"metric": 0.9, "latency": 2.0})
    attrs.COMPUTE.set(trial, {"cpu_s": 3.5})
    attrs.RETRY_OF.set(trial, 0)
    study.tell(trial, [0.9, 2.0])
    frozen = study.trials[0]

    assert frozen.user_attrs["objectives"] == {"metric": 0.9, "latency": 2.0}
    assert attrs.metric(frozen) == 0.9 and attrs.cpu_s(frozen) == 3.5
    assert attrs.RETRY_OF.on(frozen) and attrs.RETRY_OF.get(frozen) == 0  # trial 0: present though falsy
    assert attrs.STEPS.get(frozen) is None and attrs.STEPS.get(frozen, 7) == 7 and not attrs.STEPS.on(frozen)


@pytest.mark.parametrize(("tag", "placed"), [({}, False), ({"warm_start": True}, True), ({"sibling_of": 3}, True),
                                             ({"retry_of": 1}, False)])
def test_queued_trials_are_told_from_drawn_ones(tag, placed):
    study = optuna.create_study()
    study.enqueue_trial({}, user_attrs=tag)

    trial = study.ask()

    assert attrs.placed(trial) is placed
    assert attrs.metric(trial) is None and attrs.cpu_s(trial) == 0.0


def test_a_study_attribute_is_set_and_read_like_a_trial_one():
    study = optuna.create_study()

    attrs.worker_stopped(1).set(study, True)

    assert study.user_attrs == {"worker_1_stopped": True} and attrs.worker_stopped(1).get(study)
    assert attrs.worker_stopped(0).get(study) is None
