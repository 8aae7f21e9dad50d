"""``python -m loadtest`` / ``autoglm loadtest``: load-test the running stack, optionally sweep serving configs.

Exit code 0 when the SLO gate passes (a single run within loadtest.slo_p95_ms and slo_error_rate; a
sweep with at least one serving config within them), 1 when it fails, 2 for a usage or setup error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from autoglm.cli import add_common_args, print_config, run_main, settings_from_args
from autoglm.errors import ConfigError


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of integers, e.g. 0,2000") from None


def _queue_sizes(text: str) -> list[int | None]:
    return [None if item.strip().lower() == "none" else _ints(item)[0] for item in text.split(",") if item.strip()]


def _preferred(text: str) -> list[list[int] | None]:
    """'none;8,16;' -> [None, [8, 16], []]: groups split by ';', 'none' keeps the model's own setting."""
    return [None if group.strip().lower() == "none" else _ints(group) for group in text.split(";")]


def parser() -> argparse.ArgumentParser:
    p = add_common_args(argparse.ArgumentParser(prog="autoglm loadtest", description=__doc__,
                                                formatter_class=argparse.RawDescriptionHelpFormatter))
    target = p.add_argument_group("target")
    target.add_argument("--target", help="gateway base URL (default http://<serve.host>:<serve.gateway_port>)")
    target.add_argument("--triton-url", help="Triton HTTP URL (default from serve settings)")
    target.add_argument("--metrics-url", help="Triton metrics URL (default from serve settings)")
    target.add_argument("--model", help="variant or Triton model name (default: task.json's recommended)")
    target.add_argument("--pid", type=int, action="append", help="a serving process to meter (repeatable)")
    load = p.add_argument_group("load")
    load.add_argument("--scenario", choices=["task", "v2", "triton", "generate"],
                      help="task endpoints or v2 infer through the gateway, v2 straight to Triton, or streaming "
                           ":generate (time to first token, inter-token latency)")
    load.add_argument("--shape", choices=["steady", "step", "spike"],
                      help="steady: all users at once; step: --steps equal steps; spike: a quarter, all, a quarter")
    load.add_argument("--steps", type=int, help="steps of the step shape")
    load.add_argument("--users", type=int, help="client concurrency (sets loadtest.users)")
    load.add_argument("--duration", type=float, help="measured seconds (sets loadtest.duration_s)")
    load.add_argument("--spawn-rate", type=float, help="users started per second (default: all within 1 s)")
    load.add_argument("--warmup", type=float, help="seconds after spawning before measuring")
    load.add_argument("--samples", type=int, help="distinct validation requests")
    load.add_argument("--per-request", type=int, help="validation examples per request")
    load.add_argument("--generate-tokens", type=int, help="max_new_tokens of :generate requests")
    load.add_argument("--no-overhead", action="store_false", dest="overhead", default=None,
                      help="skip the Triton-direct comparison")
    load.add_argument("--slo-p95-ms", type=float, help="sets loadtest.slo_p95_ms")
    load.add_argument("--slo-error-rate", type=float, help="sets loadtest.slo_error_rate")
    sweep = p.add_argument_group("sweep (with --sweep)")
    sweep.add_argument("--sweep", action="store_true", default=None, help="measure every serving config of the grid")
    sweep.add_argument("--variants", help="comma-separated variants, or 'all' (default: the recommended)")
    sweep.add_argument("--delays", type=_ints, help="max_queue_delay_us values, e.g. 0,2000")
    sweep.add_argument("--preferred", type=_preferred, help="preferred batch sizes per config, ';'-separated, "
                       "e.g. 'none;8,16' (none: the model's own)")
    sweep.add_argument("--instances", type=_ints, help="instance counts, e.g. 1,2")
    sweep.add_argument("--queue-sizes", type=_queue_sizes, help="Triton queue bounds, e.g. none,0,256 (0: "
                       "unbounded; none: the model's own)")
    sweep.add_argument("--concurrency", type=_ints, help="client concurrencies, e.g. 1,8,32")
    sweep.add_argument("--window", type=float, help="measured seconds per operating point")
    sweep.add_argument("--keep-recommended", action="store_true", default=None,
                       help="leave Triton on the recommended config")
    return p


# flag -> loadtest key (the flags are the last layer over the config file and environment)
FLAGS = {"target": "target", "triton_url": "triton_url", "metrics_url": "metrics_url", "model": "model",
         "pid": "pids", "scenario": "scenario", "shape": "shape", "steps": "shape_steps", "users": "users",
         "duration": "duration_s", "spawn_rate": "spawn_rate", "warmup": "warmup_s", "samples": "samples",
         "per_request": "per_request", "generate_tokens": "generate_tokens", "overhead": "overhead",
         "slo_p95_ms": "slo_p95_ms", "slo_error_rate": "slo_error_rate", "sweep": "sweep",
         "keep_recommended": "keep_recommended"}
GRID_FLAGS = {"delays": "max_queue_delay_us", "preferred": "preferred_batch_sizes", "instances": "instances",
              "queue_sizes": "max_queue_size", "concurrency": "users", "window": "window_s"}


def settings_with_flags(args: argparse.Namespace):
    """The resolved settings with the load-test flags given applied to ``loadtest`` and validated."""
    from pydantic import ValidationError

    from autoglm.config import LoadtestSettings

    settings = settings_from_args(args)
    values = settings.loadtest.model_dump()
    values |= {key: getattr(args, flag) for flag, key in FLAGS.items() if getattr(args, flag) is not None}
    values["grid"] |= {key: getattr(args, flag) for flag, key in GRID_FLAGS.items() if getattr(args, flag) is not None}
    if args.variants:
        values["grid"]["variants"] = args.variants.split(",")
    try:
        return settings.model_copy(update={"loadtest": LoadtestSettings.model_validate(values)})
    except ValidationError as exc:
        problems = "; ".join(f"loadtest.{'.'.join(map(str, e['loc']))}: {e['msg']}" if e["loc"] else
                             e["msg"].removeprefix("Value error, ") for e in exc.errors())
        raise ConfigError(f"invalid load-test settings: {problems}") from None


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    settings = settings_with_flags(args)
    if args.dry_run:
        print_config(settings)
        return 0
    from loadtest.stage import loadtest_run

    _, code = loadtest_run(settings, force=args.force)
    return code


if __name__ == "__main__":
    sys.exit(run_main(main))
