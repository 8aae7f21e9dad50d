"""`python -m loadtest` flags -> the config's loadtest section, validation that names the fix, and the stage's CLI
contract."""

import argparse
from pathlib import Path

import pytest

import loadtest.__main__ as cli
from autoglm.cli import build_parser, comma_list, settings_from_args
from autoglm.errors import ConfigError
from autoglm.config import LoadtestSettings, SweepGrid
from loadtest.runner import LoadSpec, locust_command


def _options(*argv) -> LoadtestSettings:
    args = build_parser("autoglm loadtest", None, cli.FLAGS).parse_args(list(argv))
    return settings_from_args(args, cli.FLAGS).loadtest


def test_sweep_flags_become_the_grid():
    options = _options("--sweep", "--variants", "fp32,int8", "--delays", "0,2000", "--preferred", "none;8,16",
                       "--instances", "1,2", "--queue-sizes", "none,0", "--concurrency", "1,16", "--window", "4")
    assert options.sweep and options.grid == SweepGrid(
        variants=["fp32", "int8"], max_queue_delay_us=[0, 2000], preferred_batch_sizes=[None, [8, 16]],
        instances=[1, 2], max_queue_size=[None, 0], users=[1, 16], window_s=4)


def test_bad_values_are_refused_with_the_fix():
    with pytest.raises(ConfigError, match="becomes \\[max_batch_size\\]"):
        _options("--sweep", "--preferred", "none;")
    with pytest.raises(ConfigError, match=r"drop --sweep \(loadtest.sweep\) or use --shape steady"):
        _options("--sweep", "--shape", "spike")
    with pytest.raises(argparse.ArgumentTypeError, match="comma-separated list of integers"):
        comma_list(int)("0,fast")


def test_flags_override_the_config_file_and_the_rest_of_it_stands(tmp_path):
    config = tmp_path / "lt.toml"
    config.write_text("[loadtest]\nscenario = 'v2'\nsamples = 64\nusers = 8\n"
                      "[loadtest.grid]\nmax_queue_size = ['none', 0]\nusers = [1, 8]\n")
    options = _options("--config", str(config), "--users", "4", "--no-overhead")
    assert (options.scenario, options.samples, options.users, options.overhead) == ("v2", 64, 4, False)
    assert options.grid.max_queue_size == [None, 0] and options.grid.users == [1, 8]  # "none": TOML has no null
    assert _options().overhead is True and _options().scenario == "task"


def test_dry_run_prints_config_and_options(capsys, tmp_path):
    code = cli.main(["--dry-run", "--set", f"run.root='{tmp_path}'", "--users", "4", "--slo-p95-ms", "50"])
    out = capsys.readouterr().out
    assert code == 0 and '"slo_p95_ms": 50.0' in out and '"users": 4' in out and '"scenario": "task"' in out


def test_default_urls_come_from_serve_settings(settings_in):
    settings = settings_in("serve.gateway_port=9080", "serve.triton_http_port=9000", "serve.triton_metrics_port=9002")
    assert LoadtestSettings().urls(settings.serve) == ("http://127.0.0.1:9080", "http://127.0.0.1:9000",
                                                       "http://127.0.0.1:9002/metrics")
    assert LoadtestSettings(target="http://gw:80/").host_for("task", settings.serve) == "http://gw:80"
    assert LoadtestSettings().host_for("triton", settings.serve) == "http://127.0.0.1:9000"


def test_locust_command_runs_the_scenario_file_and_the_shape(tmp_path):
    spec = LoadSpec("v2", "http://127.0.0.1:8080", "m", users=8, duration_s=5, warmup_s=1, shape="step")
    cmd = locust_command(spec, tmp_path / "p.json", tmp_path / "w.jsonl", tmp_path / "locust")
    files = cmd[cmd.index("-f") + 1].split(",")
    assert [f.rsplit("/", 1)[1] for f in files] == ["v2_infer.py", "shape_step.py"]
    assert cmd[cmd.index("-t") + 1] == "6s"  # a shape has no separate ramp: warm-up + duration
    steady = LoadSpec("task", "http://h:1", "m", users=8, duration_s=5, warmup_s=1)
    assert steady.run_time_s == 7  # one second of ramp (all users within 1 s), warm-up, duration
    with pytest.raises(Exception, match="scenario 'grpc' is unknown"):
        LoadSpec("grpc", "http://h:1", "m", users=1, duration_s=1)


def test_locust_command_paths_are_absolute_because_locust_runs_in_the_point_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = LoadSpec("task", "http://127.0.0.1:8080", "m", users=1, duration_s=5, warmup_s=1)
    cmd = locust_command(spec, Path("runs/r/loadtest/payloads.json"), Path("w.jsonl"), Path("points/p00/locust"))
    for flag in ("--payloads", "--window-file", "--csv"):
        value = cmd[cmd.index(flag) + 1]
        assert Path(value).is_absolute() and value.startswith(str(tmp_path))


def test_tune_flags_become_the_study_settings():
    from autoglm.config import LoadtestTuneSettings

    options = _options("--tune", "--trials", "5", "--sampler", "random", "--seed", "3", "--tune-variants", "fp32,int8",
                       "--max-batch", "16,32", "--delay-range", "0,2000", "--instance-range", "1,3",
                       "--preferred-options", "none;4;8,16", "--step", "2", "--verify", "6", "--no-write-back")
    assert options.tune == LoadtestTuneSettings(
        enabled=True, n_trials=5, sampler="random", seed=3, variants=["fp32", "int8"], max_batch_size=(16, 32),
        max_queue_delay_us=(0, 2000), instances=(1, 3), preferred_batch_sizes=[[], [4], [8, 16]], step_s=2,
        verify_s=6, write_back=False)
    assert _options("--rollback").rollback
    with pytest.raises(argparse.ArgumentTypeError, match="range LOW,HIGH"):
        cli._pair("8")


def test_generate_tune_flags_set_the_generation_models_ranges_and_streaming_slo():
    options = _options("--tune", "--scenario", "generate", "--slots-range", "8,32", "--interval-range", "0,10",
                       "--spinning-choices", "off,on", "--slo-ttft-ms", "300", "--slo-itl-ms", "25")
    assert options.scenario == "generate" and options.tune.enabled
    assert options.tune.max_sequences == (8, 32) and options.tune.stream_interval_ms == (0, 10)
    assert options.tune.intra_op_spinning == ["off", "on"]
    assert options.slo_ttft_p95_ms == 300 and options.slo_itl_p95_ms == 25
