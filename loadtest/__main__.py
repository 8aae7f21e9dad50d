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

BUILT = True


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
    target.add_argument("--pid", type=int, action="append", default=[], help="a serving process to meter (repeatable)")
    load = p.add_argument_group("load")
    load.add_argument("--scenario", choices=["task", "v2", "triton", "generate"], default="task",
                      help="task endpoints or v2 infer through the gateway, v2 straight to Triton, or streaming "
                           ":generate (time to first token, inter-token latency)")
    load.add_argument("--shape", choices=["steady", "step", "spike"], default="steady",
                      help="steady: all users at once; step: --steps equal steps; spike: a quarter, all, a quarter")
    load.add_argument("--steps", type=int, default=4, help="steps of the step shape")
    load.add_argument("--users", type=int, help="client concurrency (sets loadtest.users)")
    load.add_argument("--duration", type=float, help="measured seconds (sets loadtest.duration_s)")
    load.add_argument("--spawn-rate", type=float, help="users started per second (default: all within 1 s)")
    load.add_argument("--warmup", type=float, default=1.0, help="seconds after spawning before measuring")
    load.add_argument("--samples", type=int, default=128, help="distinct validation requests")
    load.add_argument("--per-request", type=int, default=1, help="validation examples per request")
    load.add_argument("--generate-tokens", type=int, default=8, help="max_new_tokens of :generate requests")
    load.add_argument("--no-overhead", action="store_true", help="skip the Triton-direct comparison")
    load.add_argument("--slo-p95-ms", type=float, help="sets loadtest.slo_p95_ms")
    load.add_argument("--slo-error-rate", type=float, help="sets loadtest.slo_error_rate")
    sweep = p.add_argument_group("sweep (with --sweep)")
    sweep.add_argument("--sweep", action="store_true", help="measure every serving config of the grid")
    sweep.add_argument("--variants", help="comma-separated variants, or 'all' (default: the recommended)")
    sweep.add_argument("--delays", type=_ints, help="max_queue_delay_us values, e.g. 0,2000")
    sweep.add_argument("--preferred", type=_preferred, help="preferred batch sizes per config, ';'-separated, "
                       "e.g. 'none;8,16' (none: the model's own)")
    sweep.add_argument("--instances", type=_ints, help="instance counts, e.g. 1,2")
    sweep.add_argument("--queue-sizes", type=_queue_sizes, help="Triton queue bounds, e.g. none,0,256 (0: "
                       "unbounded; none: the model's own)")
    sweep.add_argument("--concurrency", type=_ints, help="client concurrencies, e.g. 1,8,32")
    sweep.add_argument("--window", type=float, help="measured seconds per operating point")
    sweep.add_argument("--keep-recommended", action="store_true", help="leave Triton on the recommended config")
    return p


def options_from_args(args: argparse.Namespace):
    """The :class:`loadtest.options.LoadtestOptions` the flags describe."""
    from pydantic import ValidationError

    from loadtest.options import LoadtestOptions, SweepGrid

    grid = {k: v for k, v in {"variants": args.variants.split(",") if args.variants else None,
                              "max_queue_delay_us": args.delays, "preferred_batch_sizes": args.preferred,
                              "instances": args.instances, "max_queue_size": args.queue_sizes,
                              "users": args.concurrency,
                              "window_s": args.window}.items() if v is not None}
    try:
        return LoadtestOptions(
            target=args.target, triton_url=args.triton_url, metrics_url=args.metrics_url, scenario=args.scenario,
            shape=args.shape, shape_steps=args.steps, spawn_rate=args.spawn_rate, warmup_s=args.warmup,
            model=args.model, pids=args.pid, samples=args.samples, per_request=args.per_request,
            generate_tokens=args.generate_tokens,
            overhead=not args.no_overhead, sweep=args.sweep, grid=SweepGrid(**grid),
            keep_recommended=args.keep_recommended)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'options'}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"invalid load-test options: {problems}") from None


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    for flag, key in (("users", "users"), ("duration", "duration_s"), ("slo_p95_ms", "slo_p95_ms"),
                      ("slo_error_rate", "slo_error_rate")):
        if getattr(args, flag) is not None:
            args.overrides.append(f"loadtest.{key}={getattr(args, flag)}")
    settings = settings_from_args(args)
    options = options_from_args(args)
    if args.dry_run:
        print_config(settings)
        print(options.model_dump_json(indent=2))
        return 0
    from loadtest.stage import loadtest_run

    _, code = loadtest_run(settings, options, force=args.force)
    return code


if __name__ == "__main__":
    sys.exit(run_main(main))
