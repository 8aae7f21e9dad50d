"""``autoglm status --run RUN``: each stage's state in a run directory, as a table."""

from __future__ import annotations

import argparse
import datetime as dt
import json
from collections.abc import Sequence
from pathlib import Path

from autoglm.artifacts import STAGES, RunDir
from autoglm.errors import AutoGLMError
from autoglm.local_http import answers_ok

STYLE = {"complete": "green", "stale": "yellow", "tampered": "red", "incomplete": "red", "missing": "dim",
         "running": "green", "stopped": "dim"}


def stage_states(run: RunDir) -> dict[str, str]:
    """Each stage's state; serve's is "running" or "stopped" once it has come up (see :func:`serve_state`)."""
    return {stage: serve_state(run) if stage == "serve" else run.state(stage) for stage in STAGES}


def serve_state(run: RunDir, timeout_s: float = 0.5) -> str:
    """Serving is a process, not an artifact, so it writes no manifest: once it has come up it records its URLs
    (``serve/serving.json``), and it is "running" while the gateway there answers ``/healthz``, else "stopped"
    (the normal state after Ctrl-C or after ``make demo``). Before that record: missing / incomplete."""
    record = run.stage_dir("serve") / "serving.json"
    try:
        gateway = json.loads(record.read_text())["urls"]["gateway"]
    except FileNotFoundError:
        return run.state("serve")
    except (ValueError, KeyError, TypeError):
        return "incomplete"  # a record cut short: the stage died while writing it
    try:
        return "running" if answers_ok(f"{gateway}/healthz", timeout_s) else "stopped"
    except ValueError:  # not a URL: a record from something else
        return "incomplete"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="autoglm status", description="show each stage's state in a run")
    parser.add_argument("--run", help="run name or path (default: default), as every command takes it")
    parser.add_argument("run_given", nargs="?", metavar="RUN", help="the same, written without --run")
    parser.add_argument("--root", default="runs", help="directory holding runs (default: runs)")
    args = parser.parse_args(argv)
    if args.run and args.run_given and args.run != args.run_given:
        parser.error(f"two runs given ({args.run_given!r} and --run {args.run!r}): give one")
    name = args.run or args.run_given or "default"
    path = Path(name)
    run = RunDir(path.parent, path.name) if path.is_dir() else RunDir(args.root, name)
    if not run.path.is_dir():
        raise AutoGLMError(f"no run directory {run.path}: run `make demo` or `autoglm train --run {name}`")

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"run {run.path}")
    for column in ("stage", "state", "finished", "metrics"):
        table.add_column(column)
    for stage, state in stage_states(run).items():
        finished, metrics = "", ""
        if state in ("complete", "stale"):
            manifest = run.manifest(stage)
            finished = dt.datetime.fromtimestamp(manifest.created).strftime("%Y-%m-%d %H:%M:%S")
            metrics = ", ".join(f"{k}={v:.4g}" for k, v in manifest.metrics.items() if isinstance(v, float))
        elif state == "running":
            metrics = json.loads((run.stage_dir(stage) / "serving.json").read_text())["urls"]["gateway"]
        table.add_row(stage, f"[{STYLE[state]}]{state}[/]", finished, metrics)
    Console().print(table)
    return 0
