"""The umbrella CLI and the train command, as a user runs them."""

import json
import subprocess
import sys

import pytest

from autoglm.artifacts import RunDir
from autoglm.cli import Flag, cli, run_main, stage_main
from autoglm.errors import ConfigError

TABLE = {  # one flag of each kind, over settings every stage has
    "--steps": Flag("train.max_steps", "training steps", type=int),
    "--no-simplify": Flag("compress.simplify", "keep the export as it is", switch=False),
    "--rule": Flag("serve.autoscale_rules", "a rule", short="-r", pairs=True, implies=["serve.autoscale=true"]),
    "--sizes": Flag("measure.batch_sizes", "batch sizes", type=int, many=True),
    "--data": Flag("task.data", "a data file"),
}


def test_help_lists_commands(capsys):
    assert cli(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("train", "status", "tune", "compress", "serve", "loadtest", "deploy", "bench"):
        assert command in out


def test_unknown_command_is_a_clear_error(capsys):
    assert cli(["tunne"]) == 2
    assert "unknown command 'tunne'" in capsys.readouterr().err


def test_stage_module_runs_as_python_dash_m():
    done = subprocess.run([sys.executable, "-m", "compress", "--dry-run", "--set", "train.lr=0.5"],
                          capture_output=True, text=True)
    assert done.returncode == 0 and "0.5" in done.stdout


STAGE_WITH_A_CHILD = """
import os, subprocess, sys, time
from pathlib import Path
from autoglm.cli import run_main

def main(argv):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:  # the pid appears whole (renamed into place) and only once a signal reaches the cleanup below
        Path(sys.argv[1] + ".tmp").write_text(str(child.pid))
        os.replace(sys.argv[1] + ".tmp", sys.argv[1])
        time.sleep(60)
    finally:
        child.kill()
        child.wait()
        Path(sys.argv[1] + ".cleaned").write_text("yes")

sys.exit(run_main(main))
"""


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
def test_sigterm_and_sighup_stop_a_stage_like_ctrl_c_so_it_stops_its_children(tmp_path, sig):
    import os
    import signal
    import time

    marker = tmp_path / "child.pid"
    proc = subprocess.Popen([sys.executable, "-c", STAGE_WITH_A_CHILD, str(marker)], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not marker.is_file() and time.monotonic() < deadline:
        time.sleep(0.05)
    child = int(marker.read_text())

    proc.send_signal(getattr(signal, sig))

    assert proc.wait(timeout=30) == 128 + getattr(signal, sig)
    assert f"stopped by {sig}" in proc.stderr.read()
    assert (tmp_path / "child.pid.cleaned").read_text() == "yes"
    with pytest.raises(ProcessLookupError):  # the stage's cleanup reaped it: no orphan left running
        os.kill(child, 0)


def test_bad_flag_value_prints_one_line_and_exits_2(capsys):
    assert cli(["train", "--dry-run", "--set", "train.lr=-1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: invalid configuration") and "Traceback" not in err


def test_dry_run_prints_resolved_config(capsys):
    assert cli(["config", "--set", "train.lr=0.0123", "--run", "x"]) == 0
    out = capsys.readouterr().out
    assert "0.0123" in out and '"x"' in out


@pytest.mark.slow
def test_train_writes_a_complete_run_then_skips_then_forces(tmp_path, capsys):
    flags = ["--set", f"run.root='{tmp_path}'", "--set", f"run.cache_dir='{tmp_path / 'cache'}'",
             "--set", "train.max_steps=60", "--set", "train.eval_every=30", "--run", "t"]
    assert cli(["train", *flags]) == 0
    run = RunDir(tmp_path, "t")
    assert run.state("train") == "complete"
    manifest = run.manifest("train")
    assert set(manifest.outputs) == {"model.pt", "train.jsonl", "config.json"}
    assert 0.0 <= manifest.metrics["val_accuracy"] <= 1.0
    assert manifest.energy["training"]["method"]

    first = run.manifest_path("train").stat().st_mtime_ns
    assert cli(["train", *flags]) == 0
    assert "up to date" in capsys.readouterr().out
    assert run.manifest_path("train").stat().st_mtime_ns == first

    assert cli(["train", *flags, "--force"]) == 0
    assert run.manifest_path("train").stat().st_mtime_ns != first
    log = [json.loads(line) for line in (run.stage_dir("train") / "train.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["event"] == "eval"] == [30, 60]  # --force replaced the log, not appended

    assert cli(["status", "--run", "t", "--root", str(tmp_path)]) == 0
    assert "complete" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["1e3", "true", "2024"])
def test_a_run_name_that_reads_as_a_toml_value_stays_the_name_given(capsys, name):
    assert cli(["train", "--run", name, "--dry-run"]) == 0  # not the run "1000.0", nor a boolean refused
    assert f'"name": "{name}"' in capsys.readouterr().out


def test_a_checkpoint_path_with_a_quote_reaches_compress_as_given(capsys):
    assert cli(["compress", "--checkpoint", "it's.pt", "--variants", "fp32, int8", "--dry-run"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert '"checkpoint": "it\'s.pt"' in out and '"variants": [ "fp32", "int8" ]' in out


def test_bench_through_the_umbrella_reads_its_own_arguments(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["autoglm", "bench", "--list"])  # as the console script sees them

    assert cli(["bench", "--list"]) == 0
    assert "energy" in capsys.readouterr().out


def test_status_takes_the_run_as_every_command_does_and_as_it_did(tmp_path, capsys):
    RunDir(tmp_path, "r").path.mkdir(parents=True)

    assert cli(["status", "--run", "r", "--root", str(tmp_path)]) == 0
    assert "missing" in capsys.readouterr().out  # the run found, no stage in it yet
    assert cli(["status", "r", "--root", str(tmp_path)]) == 0  # the positional form of old scripts
    assert "missing" in capsys.readouterr().out
    assert cli(["status", "--run", "nosuch", "--root", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith(f"error: no run directory {tmp_path / 'nosuch'}")
    with pytest.raises(SystemExit):
        cli(["status", "r", "--run", "other", "--root", str(tmp_path)])
    assert "two runs given" in capsys.readouterr().err


def test_a_stage_table_turns_the_flags_given_into_settings():
    ran = []
    argv = ["--steps", "7", "--no-simplify", "-r", "max_instances=3", "--sizes", "1,2", "4", "--data",
            'it\'s "x".txt', "--set", "train.max_steps=9", "--force"]

    assert stage_main(argv, "t", None, TABLE, lambda settings, force: ran.append((settings, force)) or 3) == 3

    [(settings, force)] = ran
    assert force and settings.train.max_steps == 7  # a flag beats --set of the same key
    assert settings.compress.simplify is False
    assert settings.serve.autoscale_rules == {"max_instances": 3} and settings.serve.autoscale is True
    assert settings.measure.batch_sizes == [1, 2, 4] and settings.task.data == 'it\'s "x".txt'
    assert stage_main([], "t", None, TABLE, lambda settings, force: ran.append(settings)) == 0
    defaults = ran[-1]  # flags not given leave the config as it is
    assert (defaults.train.max_steps, defaults.compress.simplify, defaults.serve.autoscale) == (2000, True, False)


def test_a_stage_check_refuses_before_dry_run_prints_or_the_stage_runs(capsys):
    def check(settings):
        raise ConfigError(f"max_steps={settings.train.max_steps} refused by the stage")

    def stage(settings, force):
        raise AssertionError("the stage ran")

    for argv in (["--steps", "7", "--dry-run"], ["--steps", "7"]):
        with pytest.raises(ConfigError, match="max_steps=7 refused"):
            stage_main(argv, "t", None, TABLE, stage, check=check)
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("spelling", [["fp32,int8"], ["fp32", "int8"], ["fp32,", "int8"]])
def test_a_list_flag_takes_commas_or_spaces(capsys, spelling):
    assert cli(["compress", "--variants", *spelling, "--dry-run"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert '"variants": [ "fp32", "int8" ]' in out


def test_a_library_missing_from_its_extra_is_named_with_the_extra(capsys):
    def stage(argv):
        raise ModuleNotFoundError("No module named 'fastapi'", name="fastapi")

    assert run_main(stage) == 2
    assert capsys.readouterr().err == "error: fastapi is not installed: pip install 'autoglm[serve]'\n"


def test_a_missing_module_no_extra_brings_is_not_hidden():
    def stage(argv):
        raise ModuleNotFoundError("No module named 'mytask'", name="mytask")

    with pytest.raises(ModuleNotFoundError, match="mytask"):
        run_main(stage)
