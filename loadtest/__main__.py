"""``python -m loadtest`` / ``autoglm loadtest``: load-test the running stack, optionally sweep serving configs.

Exit code 0 when the SLO gate passes (a single run within loadtest.slo_p95_ms and slo_error_rate; a
sweep with at least one serving config within them), 1 when it fails, 2 for a usage or setup error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from autoglm.cli import Flag, comma_list, run_main, stage_main
from autoglm.config import Settings


def _queue_size(text: str) -> int | str:
    if text.lower() == "none":
        return "none"  # the config's spelling of "the model's own"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a queue size: an integer, or none") from None


def _preferred(text: str) -> list[list[int] | str]:
    """'none;8,16;' -> ["none", [8, 16], []]: groups split by ';', 'none' keeps the model's own setting."""
    return ["none" if group.strip().lower() == "none" else comma_list(int)(group) for group in text.split(";")]


TARGET, LOAD, SWEEP = "target", "load", "sweep (with --sweep)"
FLAGS = {
    "--target": Flag("loadtest.target", "gateway base URL (default http://<serve.host>:<serve.gateway_port>)",
                     group=TARGET),
    "--triton-url": Flag("loadtest.triton_url", "Triton HTTP URL (default from serve settings)", group=TARGET),
    "--metrics-url": Flag("loadtest.metrics_url", "Triton metrics URL (default from serve settings)", group=TARGET),
    "--model": Flag("loadtest.model", "variant or Triton model name (default: task.json's recommended)",
                    group=TARGET),
    "--pid": Flag("loadtest.pids", "a serving process to meter (repeatable)", type=int, action="append",
                  group=TARGET),
    "--scenario": Flag("loadtest.scenario", "task endpoints or v2 infer through the gateway, v2 straight to "
                       "Triton, or streaming :generate (time to first token, inter-token latency)",
                       choices=["task", "v2", "triton", "generate"], group=LOAD),
    "--shape": Flag("loadtest.shape", "steady: all users at once; step: --steps equal steps; spike: a quarter, "
                    "all, a quarter", choices=["steady", "step", "spike"], group=LOAD),
    "--steps": Flag("loadtest.shape_steps", "steps of the step shape", type=int, group=LOAD),
    "--users": Flag("loadtest.users", "client concurrency", type=int, group=LOAD),
    "--duration": Flag("loadtest.duration_s", "measured seconds", type=float, group=LOAD),
    "--spawn-rate": Flag("loadtest.spawn_rate", "users started per second (default: all within 1 s)", type=float,
                         group=LOAD),
    "--warmup": Flag("loadtest.warmup_s", "seconds after spawning before measuring", type=float, group=LOAD),
    "--samples": Flag("loadtest.samples", "distinct validation requests", type=int, group=LOAD),
    "--per-request": Flag("loadtest.per_request", "validation examples per request", type=int, group=LOAD),
    "--generate-tokens": Flag("loadtest.generate_tokens", "max_new_tokens of :generate requests", type=int,
                              group=LOAD),
    "--no-overhead": Flag("loadtest.overhead", "skip the Triton-direct comparison", switch=False, group=LOAD),
    "--slo-p95-ms": Flag("loadtest.slo_p95_ms", "the p95 latency the SLO gate allows", type=float, group=LOAD),
    "--slo-error-rate": Flag("loadtest.slo_error_rate", "the error rate the SLO gate allows", type=float,
                             group=LOAD),
    "--sweep": Flag("loadtest.sweep", "measure every serving config of the grid", switch=True, group=SWEEP),
    "--variants": Flag("loadtest.grid.variants", "variants, or 'all' (default: the recommended)", many=True,
                       group=SWEEP),
    "--delays": Flag("loadtest.grid.max_queue_delay_us", "max_queue_delay_us values, e.g. 0,2000", type=int,
                     many=True, group=SWEEP),
    "--preferred": Flag("loadtest.grid.preferred_batch_sizes", "preferred batch sizes per config, ';'-separated, "
                        "e.g. 'none;8,16' (none: the model's own)", type=_preferred, group=SWEEP),
    "--instances": Flag("loadtest.grid.instances", "instance counts, e.g. 1,2", type=int, many=True, group=SWEEP),
    "--queue-sizes": Flag("loadtest.grid.max_queue_size", "Triton queue bounds, e.g. none,0,256 (0: unbounded; "
                          "none: the model's own)", type=_queue_size, many=True, group=SWEEP),
    "--concurrency": Flag("loadtest.grid.users", "client concurrencies, e.g. 1,8,32", type=int, many=True,
                          group=SWEEP),
    "--window": Flag("loadtest.grid.window_s", "measured seconds per operating point", type=float, group=SWEEP),
    "--keep-recommended": Flag("loadtest.keep_recommended", "leave Triton on the recommended config", switch=True,
                               group=SWEEP),
}


def loadtest(settings: Settings, force: bool = False) -> int:
    """Run the stage; the exit code is its SLO gate's."""
    from loadtest.stage import loadtest_run

    return loadtest_run(settings, force=force)[1]


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main(argv, "autoglm loadtest", __doc__, FLAGS, loadtest)


if __name__ == "__main__":
    sys.exit(run_main(main))
