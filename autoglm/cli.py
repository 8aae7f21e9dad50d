"""``autoglm <command>``: one entry point for every stage, and the umbrella that finds them by name.

A stage declares its flags as a table of :class:`Flag` (flag -> the setting it sets). :func:`stage_main` builds
the parser from that table and the common flags, turns the flags given into ``--set`` overrides (values written
as TOML literals by :func:`toml_literal`), resolves the config, then prints it (``--dry-run``) or runs the stage.
:func:`run_main` reports every user error as one ``error: ...`` line (exit 2). Stage commands are found by name
with importlib, so the core never imports stage code.
"""

from __future__ import annotations

import argparse
import importlib
import json
import numbers
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from autoglm._lazy import extra_for
from autoglm.config import Settings, load_settings
from autoglm.errors import AutoGLMError

STAGES = ("tune", "compress", "serve", "loadtest", "deploy")
CORE = {  # command -> ("module:function", help)
    "train": ("autoglm.train:main", "train the configured task once (the untuned baseline)"),
    "status": ("autoglm.status:main", "show each stage's state in a run directory"),
    "config": ("autoglm.cli:config_main", "print the resolved configuration"),
    "bench": ("bench.__main__:main", "run benchmarks and write bench/results/"),
    "release": ("serve.release:main", "promote, roll back or watch a canary of the run's model versions"),
    "demo": ("autoglm.demo:main", "the whole release end to end: tune, compress, serve, request, loadtest, deploy"),
}
ITEMS = {int: "integers, e.g. 0,2000", float: "numbers, e.g. 0.5,2"}  # how a list's error names its items

StageFunction = Callable[..., Any]  # stage(settings, force=...): an int result is the exit code


class Flag:
    """A stage flag and the setting it sets: given, it becomes ``--set key=<its value as a TOML literal>``.

    ``options`` go to argparse (type, choices, metavar, action). ``switch``: a flag without a value that sets the
    key to this (``--no-overhead``: False). ``many``: a list, comma-separated, space-separated or both
    (``fp32,int8`` or ``fp32 int8``), ``type`` reading one item. ``pairs``: repeatable ``KEY=VALUE``, each one
    ``--set key.KEY=VALUE``. ``implies``: overrides that come with the flag whenever it is given. ``group``: the
    heading it is listed under in ``--help``.
    """

    def __init__(self, key: str, help: str, *, short: str | None = None, switch: bool | None = None,
                 many: bool = False, pairs: bool = False, implies: Sequence[str] = (), group: str = "",
                 **options: Any):
        self.key, self.help, self.short, self.switch = key, help, short, switch
        self.many, self.pairs, self.implies, self.group, self.options = many, pairs, tuple(implies), group, options

    def argparse_options(self) -> dict[str, Any]:
        """The keywords of ``add_argument`` that read this flag, its help naming the setting."""
        if self.switch is not None:
            return {"action": "store_const", "const": self.switch, "default": None,
                    "help": f"{self.help} (sets {self.key}={toml_literal(self.switch)})"}
        if self.pairs:
            return {"action": "append", "default": [], "metavar": "KEY=VALUE",
                    "help": f"{self.help} (sets {self.key}.KEY; repeatable)"}
        options = {"help": f"{self.help} (sets {self.key})", **self.options}
        if self.many:
            options |= {"nargs": "+", "type": comma_list(self.options.get("type", str))}
        return options

    def overrides(self, value: Any) -> list[str]:
        """``section.key=value`` overrides for the value parsed; none when the flag was not given."""
        if value is None or (self.pairs and not value):
            return []
        if self.pairs:
            return [f"{self.key}.{pair}" for pair in value] + list(self.implies)
        if self.many:  # one list per word given; a blank list is not given (a scripted `--variants ""`)
            value = [item for word in value for item in word]
            if not value:
                return []
        return [f"{self.key}={toml_literal(value)}", *self.implies]


def comma_list(item: Callable[[str], Any] = str) -> Callable[[str], list[Any]]:
    """A reader of ``"a, b,c"`` -> ``[item("a"), item("b"), item("c")]`` (blank items skipped), for argparse."""

    def read(text: str) -> list[Any]:
        try:
            return [item(piece.strip()) for piece in text.split(",") if piece.strip()]
        except ValueError:
            what = ITEMS.get(item, f"{getattr(item, '__name__', 'value')} values")
            raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of {what}") from None

    return read


def toml_literal(value: Any) -> str:
    """``value`` as a TOML literal for a ``section.key=value`` override. A JSON string is a TOML basic string,
    so a quote or backslash in user text stays text instead of ending the string (DEL, which TOML wants
    escaped and JSON leaves raw, is escaped by hand)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        return repr(float(value))  # inf and nan spell the same in TOML
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_literal(v) for v in value) + "]"
    return json.dumps(str(value), ensure_ascii=False).replace("\x7f", "\\u007f")


def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags every stage takes: config file, overrides, run name, --force, --dry-run."""
    parser.add_argument("-c", "--config", help="TOML config file (see configs/)")
    parser.add_argument("-s", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one setting, e.g. --set train.lr=3e-4 (repeatable; beats env and file)")
    parser.add_argument("--run", help="run name (shorthand for --set run.name=NAME)")
    parser.add_argument("--force", action="store_true", help="redo the stage even if it is complete")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    return parser


def build_parser(prog: str, description: str | None, flags: Mapping[str, Flag]) -> argparse.ArgumentParser:
    """The parser of a stage: the common flags, then the stage's table (in groups where a flag names one)."""
    parser = add_common_args(argparse.ArgumentParser(prog=prog, description=description,
                                                     formatter_class=argparse.RawDescriptionHelpFormatter))
    groups: dict[str, Any] = {"": parser}
    for name, flag in flags.items():
        if flag.group not in groups:
            groups[flag.group] = parser.add_argument_group(flag.group)
        groups[flag.group].add_argument(*([flag.short] if flag.short else []), name, dest=_dest(name),
                                        **flag.argparse_options())
    return parser


def flag_overrides(args: argparse.Namespace, flags: Mapping[str, Flag]) -> list[str]:
    """The table's flags given on the command line as ``--set`` overrides, in the table's order."""
    return [override for name, flag in flags.items() for override in flag.overrides(getattr(args, _dest(name)))]


def _dest(name: str) -> str:
    return name.lstrip("-").replace("-", "_")


def settings_from_args(args: argparse.Namespace, flags: Mapping[str, Flag] | None = None) -> Settings:
    """The settings the parsed flags resolve to: config file, environment, ``--set``, the table's flags, ``--run``
    (each layer over the one before)."""
    overrides = [*args.overrides, *flag_overrides(args, flags or {})]
    overrides += [f"run.name={toml_literal(args.run)}"] if args.run else []
    return load_settings(args.config, overrides)


def run_stage(args: argparse.Namespace, stage: StageFunction | str, flags: Mapping[str, Flag] | None = None,
              check: Callable[[Settings], Any] | str | None = None,
              show: Callable[[Settings], Any] | None = None) -> int:
    """Resolve the settings, ``check(settings)`` them (a stage's own refusals, before anything prints or runs),
    then ``show`` them (--dry-run; default: the resolved config) or run ``stage(settings, force=)``. ``stage``
    and ``check`` may be ``"module:function"`` references, imported only here (stages import heavy things)."""
    settings = settings_from_args(args, flags)
    if check is not None:
        _resolve(check)(settings)
    if args.dry_run:
        (show or print_config)(settings)
        return 0
    code = _resolve(stage)(settings, force=args.force)
    return code if isinstance(code, int) else 0


def stage_main(argv: Sequence[str] | None, prog: str, description: str | None, flags: Mapping[str, Flag],
               stage: StageFunction | str, check: Callable[[Settings], Any] | str | None = None,
               show: Callable[[Settings], Any] | None = None) -> int:
    """A stage's ``main``: parse ``argv`` with :func:`build_parser`, then :func:`run_stage`."""
    args = build_parser(prog, description, flags).parse_args(argv)
    return run_stage(args, stage, flags, check, show)


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
    except ModuleNotFoundError as exc:  # a library a stage imports at module level, from an extra not installed
        extra = extra_for(exc.name or "")
        if extra is None:
            raise
        print(f"error: {exc.name} is not installed: pip install 'autoglm[{extra}]'", file=sys.stderr)
        return 2
    except Terminated as exc:
        print(f"stopped by {exc}", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _resolve(ref: Callable[..., Any] | str) -> Callable[..., Any]:
    """The function a ``"module:function"`` reference names (imported now), or ``ref`` itself."""
    if callable(ref):
        return ref
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def config_main(argv: Sequence[str] | None = None) -> int:
    print_config(settings_from_args(build_parser("autoglm config", CORE["config"][1], {}).parse_args(argv)))
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
