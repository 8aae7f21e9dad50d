"""``autoglm <command>``: a thin umbrella over each stage's own ``python -m <stage>``.

Stage commands are found by name with importlib, so the core never imports stage code. Every stage
shares the same flags (:func:`add_common_args`) and error handling (:func:`run_main`).
"""

from __future__ import annotations

import argparse
import json
import importlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from autoglm.config import Settings, load_settings
from autoglm.errors import AutoGLMError

STAGES = ("tune", "compress", "serve", "loadtest", "deploy")
CORE = {  # command -> ("module:function", help)
    "train": ("autoglm.train:main", "train the configured task once (the untuned baseline)"),
    "status": ("autoglm.status:main", "show each stage's state in a run directory"),
    "config": ("autoglm.cli:config_main", "print the resolved configuration"),
    "bench": ("bench.__main__:main", "run benchmarks and write bench/results/"),
    "demo": ("autoglm.demo:main", "the whole release end to end: tune, compress, serve, request, loadtest, deploy"),
}


def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags every stage takes: config file, overrides, run name, --force, --dry-run."""
    parser.add_argument("-c", "--config", help="TOML config file (see configs/)")
    parser.add_argument("-s", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one setting, e.g. --set train.lr=3e-4 (repeatable; beats env and file)")
    parser.add_argument("--run", help="run name (shorthand for --set run.name=NAME)")
    parser.add_argument("--force", action="store_true", help="redo the stage even if it is complete")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    # a JSON string is a TOML string: a name like 2024 or true stays a name, and a quote in it stays text
    overrides = list(args.overrides) + ([f"run.name={json.dumps(args.run)}"] if args.run else [])
    return load_settings(args.config, overrides)


def run_stage(args: argparse.Namespace, stage: Callable[..., object]) -> int:
    """Resolve the config from parsed common flags, then print it (--dry-run) or run ``stage(settings, force=)``."""
    settings = settings_from_args(args)
    if args.dry_run:
        print_config(settings)
        return 0
    stage(settings, force=args.force)
    return 0


def print_config(settings: Settings) -> None:
    from rich.console import Console
    from rich.syntax import Syntax

    Console().print(Syntax(settings.to_json(), "json", background_color="default"))


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised wherever the process is, like Ctrl-C: ``finally`` blocks and context managers
    run, so child processes (locust, Triton, torchrun) are stopped rather than orphaned. A KeyboardInterrupt,
    so Optuna records the trial it stops as failed, as it does for Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextmanager
def _termination_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into :class:`Terminated` while the block runs (main thread only), then restore."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, _frame) -> None:
        raise Terminated(signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_main(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Call a stage's ``main``; user errors print one clear line (no traceback) and exit 2. SIGTERM and SIGHUP
    stop it the way Ctrl-C does, cleanups included (exit 128 + the signal's number)."""
    try:
        with _termination_as_interrupt():
            return int(main(argv) or 0)
    except AutoGLMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Terminated as exc:
        print(f"stopped by {exc}", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _resolve(ref: str) -> Callable[[Sequence[str] | None], int | None]:
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def config_main(argv: Sequence[str] | None = None) -> int:
    parser = add_common_args(argparse.ArgumentParser(prog="autoglm config", description=CORE["config"][1]))
    print_config(settings_from_args(parser.parse_args(argv)))
    return 0


def cli(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``autoglm`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # before torch loads: OpenMP busy-waiting costs 2-10x per step on small shared machines
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    commands = {**{k: v[1] for k, v in CORE.items()}, **{s: f"the {s} stage" for s in STAGES}}
    if not argv or argv[0] in ("-h", "--help"):
        width = max(map(len, commands))
        lines = [f"  {name:<{width}}  {text}" for name, text in commands.items()]
        print("usage: autoglm <command> [options]   (autoglm <command> --help for its options)\n\n"
              "commands:\n" + "\n".join(lines))
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in commands:
        print(f"error: unknown command '{name}'; choose one of: {', '.join(commands)}", file=sys.stderr)
        return 2
    return run_main(_resolve(CORE[name][0] if name in CORE else f"{name}.__main__:main"), rest)


if __name__ == "__main__":
    sys.exit(cli())
