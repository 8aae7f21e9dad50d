"""``loadtest --tune --scenario generate`` without Triton: the generation model's knobs, the streaming SLO, a trial's
capacity in tokens/s, the live override of model parameters, and the study and verification over them (Triton
and locust replaced by fakes)."""

import math

import optuna
import pytest

from autoglm.config import LoadtestTuneSettings, load_settings
from autoglm.errors import AutoGLMError, ConfigError
from loadtest.control import ServingConfig, override
from loadtest.generate_space import GenerateSpace, StreamSlo, j_per_token
from loadtest.space import MISS
from loadtest.study import Objective, Window, make_sampler, open_study, run_study, trial_rows, verify

SLO = StreamSlo.of(ttft_p95_ms=100, itl_p95_ms=10, error_rate=0.01)
GENERATE_CONFIG = {"name": "lm-generate", "max_batch_size": 0, "model_transaction_policy": {"decoupled": True},
                   "parameters": {"max_sequences": {"string_value": "32"}, "stream_interval_ms": {"string_value": "10"},
                                  "intra_op_spinning": {"string_value": "run"}, "max_waiting": {"string_value": "256"}},
                   "instance_group": [{"kind": "KIND_CPU", "count": 1}]}


def _step(users, tokens_per_s, ttft, itl, errors=0.0, requests=50, seconds=2.0):
    return {"phase": f"users={users}", "requests": requests, "rps": requests / seconds, "seconds": seconds,
            "p95_ms": 900.0, "error_rate": errors, "tokens": tokens_per_s * seconds, "tokens_per_s": tokens_per_s,
            "stream": {"time to first token": {"p95_ms": ttft}, "inter-token": {"p95_ms": itl}}}


def _space(**tune):
    return GenerateSpace.from_settings(LoadtestTuneSettings(**tune), "lm-generate")


def test_capacity_is_tokens_per_second_at_the_best_step_within_the_streaming_slo():
    steps = [_step(8, 3000, 40, 2), _step(16, 5000, 90, 6), _step(24, 5500, 180, 9)]  # the top step: TTFT too slow
    result = _space().result(steps, SLO, instances=2)
    assert result["feasible"] and result["users"] == 16 and result["capacity_tps"] == 5000
    assert result["capacity_per_instance_tps"] == 2500 and result["capacity_per_instance_rps"] == 12.5
    assert result["ttft_p95_ms"] == 90 and result["itl_p95_ms"] == 6 and all(c <= 0 for c in result["constraints"])
    # the whole stream's p95 (900 ms here) is no part of a streaming SLO; the inter-token latency is
    assert SLO.breaches(steps[0]) == [] and "inter-token p95 12.00 ms > SLO 10 ms" in SLO.breaches(_step(8, 1, 1, 12))


def test_a_stream_missing_the_slo_everywhere_says_which_limit_it_missed_least():
    result = _space().result([_step(8, 3000, 150, 2), _step(16, 5000, 300, 20, errors=0.5)], SLO, instances=1)
    assert not result["feasible"] and result["capacity_per_instance_tps"] == 0 and result["users"] == 8
    assert result["constraints"] == pytest.approx([0.5, -0.8, -0.01])
    assert SLO.violation({"phase": "users=4", "requests": 0}) == [MISS, MISS, MISS]
    no_tokens = {**_step(8, 0, None, None), "stream": {}}
    assert "no time to first token measured" in SLO.breaches(no_tokens)[0]


def test_the_space_suggests_model_parameters_and_lists_a_grid_of_the_ranges_ends():
    space = _space(max_sequences=(4, 64), stream_interval_ms=(0, 22), stream_interval_step_ms=5, instances=(1, 2))
    assert space.interval == (0, 20)  # whole steps only
    assert space.grid() == {"max_sequences": [4, 64], "stream_interval_ms": [0.0, 20.0],
                            "intra_op_spinning": ["off", "run"], "instances": [1, 2]}
    config = space.suggest(optuna.trial.FixedTrial({"max_sequences": 8, "stream_interval_ms": 5.0,
                                                    "intra_op_spinning": "off", "instances": 2}))
    parameters = {"max_sequences": "8", "stream_interval_ms": "5", "intra_op_spinning": "off"}
    assert config == ServingConfig("lm-generate", instances=2, parameters=parameters)
    assert config.to_dict()["parameters"] == parameters
    assert space.baseline_params(GENERATE_CONFIG) == {"max_sequences": 32, "stream_interval_ms": 10.0,
                                                      "intra_op_spinning": "run", "instances": 1}
    with pytest.raises(ValueError, match="'on' not in"):  # a mode outside the choices is no proposal
        space.suggest(optuna.trial.FixedTrial({"max_sequences": 8, "stream_interval_ms": 5.0,
                                               "intra_op_spinning": "on", "instances": 2}))


def test_the_spinning_modes_are_the_users_choices_and_take_in_the_baselines():
    space = _space(intra_op_spinning=["run", "run"])
    assert space.spinning == ("run",) and space.grid()["intra_op_spinning"] == ["run"]
    assert space.with_baseline({"intra_op_spinning": "run"}) is space
    widened = space.with_baseline({"intra_op_spinning": "on"})  # a repository serving "on" is the first trial
    assert widened.spinning == ("run", "on") and widened.describe()["intra_op_spinning"] == ["run", "on"]
    with pytest.raises(ConfigError, match="intra_op_spinning"):
        load_settings(None, ["loadtest.tune.intra_op_spinning=['spin']"])
    with pytest.raises(ConfigError, match="intra_op_spinning"):
        load_settings(None, ["loadtest.tune.intra_op_spinning=[]"])


def test_the_override_sets_parameters_the_model_has_and_refuses_others():
    config = ServingConfig("lm-generate", instances=3, parameters={"max_sequences": "8"})
    out = override(GENERATE_CONFIG, config)
    assert out["parameters"]["max_sequences"] == {"string_value": "8"} and out["instance_group"][0]["count"] == 3
    assert GENERATE_CONFIG["parameters"]["max_sequences"] == {"string_value": "32"}  # the base is not modified
    with pytest.raises(AutoGLMError, match=r"no parameters \['slots'\]"):
        override(GENERATE_CONFIG, ServingConfig("lm-generate", parameters={"slots": "8"}))


def test_only_a_streaming_model_with_those_parameters_is_tuned_as_one():
    space = _space()
    space.check_model_limits("lm-generate", GENERATE_CONFIG)
    with pytest.raises(ConfigError, match="does not stream"):
        space.check_model_limits("lm-fp32", {"max_batch_size": 64, "parameters": {}})
    with pytest.raises(ConfigError, match="compress --force"):
        space.check_model_limits("lm-generate", {**GENERATE_CONFIG, "parameters": {}})
    older = {k: v for k, v in GENERATE_CONFIG["parameters"].items() if k != "intra_op_spinning"}
    with pytest.raises(ConfigError, match=r"no \['intra_op_spinning'\] parameters.*compress --force"):
        space.check_model_limits("lm-generate", {**GENERATE_CONFIG, "parameters": older})


def test_generate_tuning_is_accepted_and_its_slo_is_typed():
    settings = load_settings(None, ["loadtest.tune.enabled=true", "loadtest.scenario='generate'",
                                    "loadtest.slo_ttft_p95_ms=250", "loadtest.slo_itl_p95_ms=25"])
    assert settings.loadtest.slo_ttft_p95_ms == 250 and settings.loadtest.tune.max_sequences == (4, 64)
    with pytest.raises(ConfigError, match="slo_itl_p95_ms"):
        load_settings(None, ["loadtest.slo_itl_p95_ms=0"])


def test_energy_per_token_charges_the_meters_span_its_own_tokens():
    assert j_per_token({"energy": {"joules": 3.0, "seconds": 2.0}, "window": {"tokens_per_s": 1000}}) == 0.0015
    assert j_per_token({"energy": {"unavailable": "no meter"}, "window": {"tokens_per_s": 1000}}) is None
    assert j_per_token({"energy": {"joules": 3.0}, "window": {"tokens_per_s": 0}}) is None


class FakeLive:
    """LiveModels without Triton: records what was applied."""

    def __init__(self):
        self.applied = []

    def apply(self, config):
        self.applied.append(config)
        return {"applied": {"instances": config.instances}, "load_s": 0.0}


def _window(tmp_path, measure):
    window = Window("generate", "http://gw", tmp_path / "p.json", None, None, SLO, users=16, steps=2, step_s=1.0,
                    warmup_s=0.0)
    window.measure = measure
    return window


def test_a_generate_study_maximizes_tokens_per_instance_and_verifies_the_best(tmp_path):
    space = _space(max_sequences=(4, 64), instances=(1, 2))

    def measure(model, out_dir, users, seconds, shape="steady"):
        # more slots: more tokens/s, but TTFT grows where slots are few (requests wait)
        config = live.applied[-1]
        slots, instances = int(dict(config.parameters)["max_sequences"]), config.instances
        tps = 400 * min(slots, users) ** 0.5
        ttft = 20 + 200 * max(0, users - slots) / users
        steps = [_step(u, tps * u / 16, ttft, 3) for u in (8, 16)]
        window = {**_step(users, tps, ttft, 3), "tokens_per_s": tps, "rps": tps / 64}
        return {"phases": steps, "window": window, "stream": window["stream"], "triton": None,
                "energy": {"joules": 1.0 * instances, "seconds": seconds, "method": "estimated",
                           "j_per_request": 0.01}, "slo": {"passed": True, "breaches": []}, "memory": {}}

    live = FakeLive()
    window = _window(tmp_path, measure)
    tune = LoadtestTuneSettings(max_sequences=(4, 64), instances=(1, 2), seed=0, startup_trials=2)
    study = open_study(tmp_path / "s.journal", "gen", make_sampler(tune, space))
    objective = Objective(live, space, window, tmp_path / "trials", 5)
    baseline = {"max_sequences": 32, "stream_interval_ms": 10.0, "intra_op_spinning": "run", "instances": 1}
    run_study(study, objective, 5, baseline)
    rows = trial_rows(study)
    assert len(rows) == 5 and rows[0]["baseline"] and rows[0]["params"] == baseline
    assert all(set(t.constraints) == {"ttft_p95", "itl_p95", "error_rate"} for t in study.trials)
    best = max(rows, key=lambda r: r["capacity_per_instance_tps"])
    assert study.best_trials and all(t.values[0] <= best["capacity_per_instance_tps"] for t in study.best_trials)
    verified, attempts = verify(live, rows, window, 2.0, 1, tmp_path / "verify", space=space)
    assert verified["trial"] == best["trial"] and verified["passed"] and math.isfinite(verified["capacity_tps"])
    assert live.applied[-1] == space.to_config(best["params"]) and verified["j_per_token"] is not None
