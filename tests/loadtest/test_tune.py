"""``loadtest --tune`` without Triton: the knob space, a trial's capacity from its step window, the study's
baseline, resumption and constraints, and the verification order (Triton and locust replaced by fakes)."""

import optuna
import pytest

from autoglm.config import LoadtestTuneSettings, load_settings
from autoglm.errors import AutoGLMError, ConfigError
from loadtest.control import ServingConfig
from loadtest.latency import Slo
from loadtest.space import (MISS, TuneSpace, baseline_params, decode_preferred, encode_preferred, ladder,
                            monotone_rps, to_config, trial_result)
from loadtest.study import Objective, Window, constraints, counted, make_sampler, open_study, run_study, trial_rows, \
    verify
from loadtest.tuning import recommended_of

SLO = Slo(p95_ms=10, error_rate=0.01)


def _phase(users, rps, p95, errors=0.0, requests=100):
    return {"phase": f"users={users}", "requests": requests, "rps": rps, "p50_ms": p95 and p95 / 2, "p95_ms": p95,
            "error_rate": errors}


def test_capacity_is_the_best_step_within_the_slo_per_instance():
    result = trial_result([_phase(4, 400, 3), _phase(8, 700, 8), _phase(12, 800, 14)], SLO, instances=2)
    assert result["feasible"] and result["users"] == 8 and result["capacity_rps"] == 700
    assert result["capacity_per_instance_rps"] == 350 and all(c <= 0 for c in result["constraints"])
    assert [s["users"] for s in result["steps"]] == [4, 8, 12]


def test_steps_that_noise_put_out_of_order_are_pooled_before_the_best_is_taken():
    # a saturated config whose first short step was lucky: 2,600 then 1,950 and 1,350 req/s over 1 s each
    lucky = [_phase(4, 2600, 3, requests=2600), _phase(8, 1950, 5, requests=1950), _phase(12, 1350, 8, requests=1350)]
    assert monotone_rps(lucky) == pytest.approx([5900 / 3] * 3)
    result = trial_result(lucky, SLO, instances=1)
    assert result["capacity_rps"] == pytest.approx(5900 / 3) and result["users"] == 12  # the pool's top step
    # a rising ladder keeps its steps; only the dip is pooled (seconds weigh the pool when the phase has them)
    rising = [{**_phase(4, 400, 3, requests=400), "seconds": 1.0}, {**_phase(8, 900, 5, requests=1800), "seconds": 2.0},
              {**_phase(12, 700, 6, requests=700), "seconds": 1.0}, _phase(16, 1500, 7, requests=1500)]
    assert monotone_rps(rising) == pytest.approx([400, 2500 / 3, 2500 / 3, 1500])
    assert trial_result(rising, SLO, instances=1)["capacity_rps"] == 1500
    assert trial_result(rising[:3], SLO, instances=1)["users"] == 12
    assert monotone_rps([_phase(4, 0, None, requests=0), _phase(8, 100, 3)]) == [0.0, 100]


def test_a_trial_missing_the_slo_everywhere_has_no_capacity_and_says_how_far_it_missed():
    result = trial_result([_phase(4, 400, 15), _phase(8, 500, 30, errors=0.5)], SLO, instances=1)
    assert not result["feasible"] and result["capacity_per_instance_rps"] == 0 and result["users"] == 4
    assert result["constraints"] == pytest.approx([0.5, -0.01])  # the nearest miss: p95 50% over
    empty = trial_result([_phase(4, 0, None, requests=0)], SLO, instances=1)
    assert empty["constraints"] == [MISS, MISS]
    with pytest.raises(ValueError, match="step shape"):
        trial_result([{"phase": "steady", "requests": 1}], SLO, 1)


def test_preferred_options_round_trip_and_none_is_the_max_batch():
    assert encode_preferred([]) == encode_preferred([32], 32) == "none"
    assert encode_preferred([4, 8]) == "4,8" and decode_preferred("4,8", 16) == (4, 8)
    assert decode_preferred("none", 16) == (16,)
    assert ladder(16, 4) == [4, 8, 12, 16]
    with pytest.raises(ConfigError, match="raise loadtest.tune.users"):
        ladder(2, 4)


def test_the_space_suggests_serving_configs_and_lists_a_grid_of_the_ranges_ends():
    tune = LoadtestTuneSettings(max_batch_size=(8, 32), preferred_batch_sizes=[[], [4]], max_queue_delay_us=(0, 1700),
                                delay_step_us=500, instances=(1, 3))
    space = TuneSpace.from_settings(tune, ["m-fp32", "m-int8", "m-fp32"])
    assert space.models == ("m-fp32", "m-int8") and space.delay == (0, 1500)  # whole steps only
    assert space.grid() == {"model": ["m-fp32", "m-int8"], "max_batch_size": [8, 32], "preferred": ["none", "4"],
                            "max_queue_delay_us": [0, 1500], "instances": [1, 2, 3]}
    params = {"model": "m-int8", "max_batch_size": 16, "preferred": "4", "max_queue_delay_us": 500, "instances": 2}
    assert space.suggest(optuna.trial.FixedTrial(params)) == ServingConfig("m-int8", 500, (4,), 2, 0, 16)
    assert to_config({**params, "preferred": "none"}).preferred_batch_sizes == (16,)


def test_the_baseline_joins_the_choices_it_is_not_already_in():
    space = TuneSpace.from_settings(LoadtestTuneSettings(preferred_batch_sizes=[[4]]), ["m-int8"])
    knobs = {"max_batch_size": 64, "preferred_batch_sizes": [64], "max_queue_delay_us": 100, "instances": 1,
             "max_queue_size": 0}
    base = baseline_params("m-fp32", knobs)
    assert base == {"model": "m-fp32", "max_batch_size": 64, "preferred": "none", "max_queue_delay_us": 100,
                    "instances": 1}
    wider = space.with_baseline(base)
    assert wider.models == ("m-int8", "m-fp32") and wider.preferred == ("4", "none")


@pytest.mark.parametrize(("overrides", "message"), [
    (["loadtest.tune.preferred_batch_sizes=[[16]]", "loadtest.tune.max_batch_size=[8, 64]"],
     r"do not fit every max_batch_size in \[8, 64\]: keep them between 1 and 8"),
    (["loadtest.tune.instances=[0, 2]"], "zero instances serves nothing"),
    (["loadtest.tune.max_queue_delay_us=[2000, 0]"], r"has low > high: write it as \[low, high\]"),
    (["loadtest.tune.enabled=true", "loadtest.sweep=true"], "pick one"),
    (["loadtest.tune.max_sequences=[64, 4]"], r"max_sequences \[64, 4\] has low > high"),
    (["loadtest.tune.max_sequences=[0, 4]"], "max_sequences must be >= 1"),
    (["loadtest.tune.users=2", "loadtest.tune.steps=4"], "cannot make 4 steps"),
])
def test_ranges_the_model_cannot_take_are_refused_with_the_fix(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_settings(None, overrides)


def test_a_model_that_batches_by_itself_is_refused():
    space = TuneSpace.from_settings(LoadtestTuneSettings(), ["lm-generate"])
    with pytest.raises(ConfigError, match="leave it out of loadtest.tune.variants"):
        space.check_model_limits("lm-generate", {"max_batch_size": 0})
    with pytest.raises(ConfigError, match="enable it in the repository"):
        space.check_model_limits("m", {"max_batch_size": 8})


class FakeLive:
    """Model control that records what was applied; a config with ``instances`` 3 is refused."""

    def __init__(self):
        self.applied = []

    def apply(self, cfg):
        if cfg.instances == 3:
            raise AutoGLMError("Triton refused it")
        self.applied.append(cfg)
        return {"applied": cfg.to_dict(), "load_s": 0.01}


class FakeWindow(Window):
    """A window whose throughput falls with the queue delay and whose p95 rises with it (a made-up server)."""

    def __init__(self, verify_passes=lambda cfg: True):
        super().__init__("triton", "http://x", None, None, None, SLO, users=8, steps=2, step_s=1, warmup_s=0)
        self.verify_passes = verify_passes
        self.current = None
        self.calls = []

    def measure(self, model, out_dir, users, seconds, shape="steady"):
        cfg = self.current
        self.calls.append((model, users, shape))
        rps = 1000 - cfg.max_queue_delay_us / 10
        p95 = 2 + cfg.max_queue_delay_us / 500
        energy = {"j_per_request": 0.01 + cfg.max_queue_delay_us / 1e6, "method": "estimated:cpu"}
        if shape == "step":
            return {"phases": [_phase(4, rps / 2, p95 / 2), _phase(8, rps, p95)], "energy": energy,
                    "triton": {"valid": True, "mean_batch": 2.0, "mean_queue_us": 100.0}}
        passed = self.verify_passes(cfg)
        return {"window": {"rps": rps, "p95_ms": p95, "error_rate": 0.0, "requests": 100}, "energy": energy,
                "triton": None, "slo": {"passed": passed, "breaches": [] if passed else ["p95 too high"]}}


class Tracking(FakeLive):
    def __init__(self, window):
        super().__init__()
        self.window = window

    def apply(self, cfg):
        self.window.current = cfg
        return super().apply(cfg)


def _study(tmp_path, tune, space):
    return open_study(tmp_path / "study.journal", "s", make_sampler(tune, space))


def test_the_study_starts_at_the_baseline_constrains_by_the_slo_and_continues_on_a_rerun(tmp_path):
    tune = LoadtestTuneSettings(max_queue_delay_us=(0, 8000), delay_step_us=500, instances=(1, 3), seed=1,
                                sampler="tpe", startup_trials=2)
    space = TuneSpace.from_settings(tune, ["m-fp32", "m-int8"])
    baseline = {"model": "m-fp32", "max_batch_size": 64, "preferred": "none", "max_queue_delay_us": 0,
                "instances": 1}
    space = space.with_baseline(baseline)
    window = FakeWindow()
    lines = []
    live = Tracking(window)
    study = _study(tmp_path, tune, space)

    ran = run_study(study, Objective(live, space, window, tmp_path, 6, lines.append), 4, baseline)

    first = study.trials[0]
    assert ran == 4 and first.params == baseline and first.user_attrs["baseline"]
    assert live.applied[0] == to_config(baseline) and window.calls[0] == ("m-fp32", 8, "step")
    assert counted(study) == 4 and len(lines) == 4 and lines[0].startswith("  trial 1/6 m-fp32")
    for t in study.trials:
        if t.state.name == "COMPLETE":
            assert constraints(t) == pytest.approx(t.user_attrs["constraints"])
            assert (max(constraints(t)) <= 0) == t.user_attrs["feasible"]  # p95 > 10 ms once the delay > 4000 µs

    again = _study(tmp_path, tune, space)  # a rerun: the same journal and name continue the study
    assert run_study(again, Objective(live, space, window, tmp_path, 6), 6, baseline) == 2
    assert counted(again) == 6 and len(again.trials) >= 6
    assert sum(bool(t.user_attrs.get("baseline")) for t in again.trials) == 1  # enqueued once


def test_a_config_triton_refuses_fails_its_trial_and_the_study_goes_on(tmp_path):
    tune = LoadtestTuneSettings(instances=(3, 3), sampler="random", seed=0)
    space = TuneSpace.from_settings(tune, ["m-fp32"])
    window = FakeWindow()
    lines = []
    study = _study(tmp_path, tune, space)
    run_study(study, Objective(Tracking(window), space, window, tmp_path, 2, lines.append), 2,
              {"model": "m-fp32", "max_batch_size": 64, "preferred": "none", "max_queue_delay_us": 0, "instances": 1})
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE", "FAIL"] and "Triton refused it" in study.trials[1].user_attrs["failed"]
    assert "FAILED" in lines[1] and counted(study) == 2


def test_verification_measures_the_best_feasible_again_and_keeps_the_best_that_holds_the_slo(tmp_path):
    tune = LoadtestTuneSettings(max_queue_delay_us=(0, 2000), sampler="grid", instances=(1, 1),
                                preferred_batch_sizes=[[]], max_batch_size=(64, 64))
    space = TuneSpace.from_settings(tune, ["m-fp32"])
    window = FakeWindow(verify_passes=lambda cfg: cfg.max_queue_delay_us > 0)  # the best one misses when verified
    live = Tracking(window)
    study = _study(tmp_path, tune, space)
    run_study(study, Objective(live, space, window, tmp_path, 3), 3,
              {"model": "m-fp32", "max_batch_size": 64, "preferred": "none", "max_queue_delay_us": 0, "instances": 1})
    rows = trial_rows(study)
    assert {r["config"]["max_queue_delay_us"] for r in rows} == {0, 2000}  # the baseline, then the grid

    verified, attempts = verify(live, rows, window, 5, 3, tmp_path)

    assert [a["passed"] for a in attempts][-1] and not attempts[0]["passed"]
    assert attempts[0]["config"]["max_queue_delay_us"] == 0  # the highest capacity went first
    assert verified["config"]["max_queue_delay_us"] == 2000 and window.calls[-1][2] == "steady"
    assert verified["capacity_per_instance_rps"] == pytest.approx(800)

    # the study's best window was lucky: every finalist is measured again and the best verified one wins
    lucky = FakeWindow()
    lucky_measure = lucky.measure

    def measure(model, out_dir, users, seconds, shape="steady"):
        result = lucky_measure(model, out_dir, users, seconds, shape)
        if shape == "steady" and lucky.current.max_queue_delay_us == 0:
            result["window"]["rps"] = 500  # the in-study best holds the SLO at half its ladder throughput
        result["memory"] = {"peak_rss_mib": 300.0 + lucky.current.max_queue_delay_us / 100}
        return result

    lucky.measure = measure
    chosen, finalists = verify(Tracking(lucky), rows, lucky, 5, 3, tmp_path)
    assert len(finalists) == 2 and all(a["passed"] for a in finalists)
    assert chosen["config"]["max_queue_delay_us"] == 2000 and chosen["capacity_per_instance_rps"] == 800
    assert chosen["peak_rss_mib"] == 320.0  # its own window's memory goes with it (deploy sizes Triton from it)
    assert recommended_of(chosen, SLO, tune)["peak_rss_mib"] == 320.0

    missing = FakeWindow(lambda cfg: False)
    none, tried = verify(Tracking(missing), rows, missing, 5, 1, tmp_path)
    assert none is None and len(tried) == 1  # verify_candidates bounds the tries


@pytest.mark.parametrize("base_delay", [1000, 9500])
def test_the_served_config_is_verified_beside_the_finalists_and_stays_unless_one_beats_it(tmp_path, base_delay):
    """A config whose study window was lucky verifies below the one served before the study: the served one is
    the verified config. A served config that missed the SLO in the study is not measured again."""
    tune = LoadtestTuneSettings(max_queue_delay_us=(0, 0), sampler="grid", instances=(1, 1),
                                preferred_batch_sizes=[[]], max_batch_size=(64, 64))
    space = TuneSpace.from_settings(tune, ["m-fp32"])
    window = FakeWindow()
    steady = window.measure

    def measure(model, out_dir, users, seconds, shape="steady"):
        result = steady(model, out_dir, users, seconds, shape)
        if shape == "steady" and window.current.max_queue_delay_us == 0:
            result["window"]["rps"] = 600  # its 1,000 req/s in the study was a lucky window
        return result

    window.measure = measure
    live = Tracking(window)
    baseline = {"model": "m-fp32", "max_batch_size": 64, "preferred": "none", "max_queue_delay_us": base_delay,
                "instances": 1}
    study = _study(tmp_path, tune, space.with_baseline(baseline))
    run_study(study, Objective(live, space, window, tmp_path, 2), 2, baseline)
    rows = trial_rows(study)
    assert [r["config"]["max_queue_delay_us"] for r in rows] == [base_delay, 0]

    verified, attempts = verify(live, rows, window, 5, 1, tmp_path)  # one finalist, and the served config

    if base_delay == 1000:  # served at 900 req/s in its window, and again when verified
        assert [(a["config"]["max_queue_delay_us"], a["baseline"]) for a in attempts] == [(1000, True), (0, False)]
        assert verified["baseline"] and verified["capacity_per_instance_rps"] == 900
        assert "served before the study" in recommended_of(verified, SLO, tune)["why"]
    else:  # p95 10.5 ms > 10 even at its lowest step: it missed the SLO in the study, so the finalist stands alone
        assert [a["config"]["max_queue_delay_us"] for a in attempts] == [0]
        assert not verified["baseline"] and verified["capacity_per_instance_rps"] == 600
        assert "served before" not in recommended_of(verified, SLO, tune)["why"]


def test_the_default_sampler_is_gp_and_a_missing_library_of_it_names_the_extra(monkeypatch):
    import sys

    from autoglm.errors import MissingExtraError

    tune = LoadtestTuneSettings(seed=0)
    space = TuneSpace.from_settings(tune, ["m"])
    assert tune.sampler == "gp" and tune.late_random == 0.5  # GP, with late random draws
    assert isinstance(make_sampler(tune, space).model, optuna.samplers.GPSampler)
    assert isinstance(make_sampler(tune.model_copy(update={"sampler": "tpe"}), space).model, optuna.samplers.TPESampler)
    monkeypatch.setitem(sys.modules, "scipy", None)  # as if not installed
    with pytest.raises(MissingExtraError, match=r"--sampler tpe.*autoglm\[tune\]"):
        make_sampler(tune, space)
    assert isinstance(make_sampler(tune.model_copy(update={"sampler": "tpe", "late_random": 0.0}), space),
                      optuna.samplers.TPESampler)
