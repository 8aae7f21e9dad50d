"""``autoglm status <run>``: each stage's state in a run directory, as a table."""

from __future__ import annotations

import argparse
import datetime as dt
from collections.abc import Sequence
from pathlib import Path

from autoglm.artifacts import STAGES, RunDir
from autoglm.errors import AutoGLMError

STYLE = {"complete": "green", "stale": "yellow", "tampered": "red", "incomplete": "red", "missing": "dim"}


def stage_states(run: RunDir) -> dict[str, str]:
    return {stage: run.state(stage) for stage in STAGES}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="autoglm status", description="show each stage's state in a run")
    parser.add_argument("run", nargs="?", default="default", help="run name or path (default: default)")
    parser.add_argument("--root", default="runs", help="directory holding runs (default: runs)")
    args = parser.parse_args(argv)
    path = Path(args.run)
    run = RunDir(path.parent, path.name) if path.is_dir() else RunDir(args.root, args.run)
    if not run.path.is_dir():
        raise AutoGLMError(f"no run directory {run.path}: run `make demo` or `autoglm train --run {args.run}`")

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
        table.add_row(stage, f"[{STYLE[state]}]{state}[/]", finished, metrics)
    Console().print(table)
    return 0
