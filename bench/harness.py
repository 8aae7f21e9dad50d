"""The ``make bench`` harness: discover benchmark modules, run them, write one markdown report.

A benchmark is a module ``bench/<name>.py`` with a one-line docstring (its description) and
``def run(quick: bool) -> list[Table]``, or ``run(quick, args)`` to take options of its own (``python -m bench
tune --heldout``: the words after the one benchmark named). A table's ``figure`` draws a PNG written next to the
report and shown under the table. Reports go to ``bench/results/<date>-<names|all>.md`` and
``bench/results/latest.md``; each starts with the machine it ran on. A benchmark that raises is written
up as failed and makes the run exit non-zero, after the others have run.
"""

from __future__ import annotations

import argparse
import ast
import datetime as dt
import importlib
import importlib.util
import os
import pkgutil
import platform
import sys
import time
import traceback
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
NOT_BENCHMARKS = {"harness", "__main__", "__init__", "gpu_check"}  # gpu_check: `gpu` runs it
SHARED_MACHINE = ("Figures are ratios measured side by side in one run on a shared machine: compare rows "
                  "within a table, not absolute times across runs or hosts.")


@dataclass
class Table:
    """One result table: ``rows`` hold one value per column; ``notes`` are printed under it."""

    title: str
    columns: list[str]
    rows: list[list[Any]]
    notes: list[str] = field(default_factory=list)
    figure: Callable[[Path], None] | None = None  # draws the table's plot into the PNG path it is given

    def __post_init__(self) -> None:
        for i, row in enumerate(self.rows):
            if len(row) != len(self.columns):
                raise ValueError(f"table {self.title!r}: row {i} has {len(row)} cells for "
                                 f"{len(self.columns)} columns {self.columns}")

    def to_markdown(self) -> str:
        lines = [f"### {self.title}", "", _row(self.columns), _row(["---"] * len(self.columns))]
        lines += [_row([_cell(v) for v in row]) for row in self.rows]
        lines += [""] + [f"- {note}" for note in self.notes]
        return "\n".join(lines).rstrip() + "\n"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |"


def _cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            return str(value)
        if abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:.2f}" if abs(value) >= 1 else f"{value:.3g}"
    return str(value)


def cpu_seconds(proc) -> float:
    """User + system CPU-seconds of a psutil process; 0 for one that ended (no longer readable)."""
    try:
        t = proc.cpu_times()
        return t.user + t.system
    except Exception:
        return 0.0


def ratio(a: float, b: float) -> str:
    """``a / b`` as a speed-up style factor, e.g. ``"1.83×"``."""
    if b == 0:
        return "n/a"
    return f"{a / b:.2f}×"


def machine_description() -> str:
    """Markdown bullets: CPU, cores, memory, OS, Python, library versions, GPU, date and time."""
    facts = {
        "CPU": _cpu_model(),
        "cores": _cores(),
        "memory": _memory(),
        "OS": platform.platform(),
        "Python": platform.python_version(),
        **{name: _version(name) for name in ("torch", "onnxruntime", "numpy")},
        "GPU": ", ".join(_gpu_names()) or "none",
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    return "\n".join(f"- **{k}**: {v}" for k, v in facts.items())


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _cores() -> str:
    total = os.cpu_count() or 0
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else total
    return f"{usable} usable of {total}" if usable != total else str(total)


def _memory() -> str:
    try:
        import psutil

        return f"{psutil.virtual_memory().total / 2**30:.1f} GiB"
    except ImportError:
        return "unknown"


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _gpu_names() -> list[str]:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no package, no driver: both mean no usable GPU here
        return []
    try:
        names = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(i))
            names.append(name.decode() if isinstance(name, bytes) else name)
        return names
    except Exception:
        return []
    finally:
        pynvml.nvmlShutdown()


def discover(package: str = "bench") -> dict[str, str]:
    """Benchmark names -> one-line descriptions, read without importing (benchmarks import heavy things)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"{package!r} is not an importable package")
    found = {}
    for info in sorted(pkgutil.iter_modules(spec.submodule_search_locations), key=lambda i: i.name):
        if info.name in NOT_BENCHMARKS or info.name.startswith("_") or info.ispkg:
            continue
        path = Path(info.module_finder.path) / f"{info.name}.py"
        doc = ast.get_docstring(ast.parse(path.read_text())) if path.is_file() else None
        found[info.name] = (doc or "").strip().splitlines()[0] if doc else ""
    return found


@dataclass
class Outcome:
    name: str
    description: str
    seconds: float
    tables: list[Table]
    error: str | None = None


def run_one(package: str, name: str, description: str, quick: bool, args: list[str] | None = None) -> Outcome:
    """Import and run one benchmark; any exception becomes a failed outcome, never a crash."""
    t0 = time.perf_counter()
    try:
        run = importlib.import_module(f"{package}.{name}").run
        if args and len(inspect.signature(run).parameters) < 2:
            raise TypeError(f"benchmark {name} takes no options of its own, got {' '.join(args)}")
        tables = run(quick, args) if args else run(quick)
        if not isinstance(tables, list) or not all(isinstance(t, Table) for t in tables):
            raise TypeError(f"{name}.run() must return a list of Table, got {type(tables).__name__}")
        return Outcome(name, description, time.perf_counter() - t0, tables)
    except Exception as exc:
        return Outcome(name, description, time.perf_counter() - t0, [], "".join(traceback.format_exception(exc)))


def render(outcomes: list[Outcome], label: str, quick: bool) -> str:
    parts = [f"# Benchmarks: {label}{' (quick)' if quick else ''}", "", machine_description(), "", SHARED_MACHINE]
    for o in outcomes:
        status = "FAILED" if o.error else f"{o.seconds:.1f} s"
        parts += ["", f"## {o.name}: {o.description or '(no description)'} ({status})", ""]
        if o.error:
            last = o.error.strip().splitlines()[-1]
            parts += [f"**Failed**: `{last}`", "", "```", o.error.rstrip(), "```"]
        parts += [t.to_markdown() for t in o.tables]
    return "\n".join(parts).rstrip() + "\n"


def draw_figures(outcomes: list[Outcome], report: Path) -> None:
    """Each table's figure as ``<report>-<n>.png`` beside the report, linked under the table; a figure that
    fails to draw is noted there instead (the numbers stand without it)."""
    tables = [t for o in outcomes for t in o.tables if t.figure is not None]
    for n, table in enumerate(tables, 1):
        path = report.with_name(f"{report.stem}-{n}.png")
        try:
            table.figure(path)
            table.notes.append(f"![{table.title}]({path.name})")
        except Exception as exc:
            table.notes.append(f"figure not drawn: {type(exc).__name__}: {exc}")


def main(argv: list[str] | None = None, package: str = "bench") -> int:
    """``python -m bench [names...] [--quick] [--out DIR]``; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="benchmarks to run (default: all)")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="report folder (default: bench/results)")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args, options = parser.parse_known_args(argv)
    if options and len(args.names) != 1:
        parser.error(f"options {' '.join(options)} belong to one benchmark: name exactly one")

    known = discover(package)
    if args.list:
        print("\n".join(f"{n:20} {d}" for n, d in known.items()))
        return 0
    unknown = [n for n in args.names if n not in known]
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)}; known: {', '.join(known) or '(none)'}")
    names = list(dict.fromkeys(args.names)) or list(known)

    from rich.console import Console  # the progress line only; reports do not need rich

    console = Console(stderr=True)
    outcomes = []
    for i, name in enumerate(names, 1):
        with console.status(f"[{i}/{len(names)}] {name}: {known[name]}"):
            outcome = run_one(package, name, known[name], args.quick, options)
        mark = "[red]FAILED[/red]" if outcome.error else "[green]ok[/green]"
        console.print(f"[{i}/{len(names)}] {name} {mark} ({outcome.seconds:.1f} s)")
        outcomes.append(outcome)

    # a benchmark's first option names what it ran (tune --heldout): its report stands beside the plain one's
    flag = [re.sub(r"[^A-Za-z0-9]+", "-", o).strip("-") for o in options[:1]]
    label = "-".join(names + flag) if args.names else "all"
    args.out.mkdir(parents=True, exist_ok=True)
    report = args.out / f"{dt.date.today().isoformat()}-{label}.md"
    draw_figures(outcomes, report)
    text = render(outcomes, label, args.quick)
    report.write_text(text)
    (args.out / "latest.md").write_text(text)
    console.print(f"wrote {report}")
    failed = [o.name for o in outcomes if o.error]
    if failed:
        console.print(f"[red]failed: {', '.join(failed)}[/red]")
    return 1 if failed else 0


if __name__ == "__main__":  # pragma: no cover - `python -m bench` is the entry point
    sys.exit(main())
