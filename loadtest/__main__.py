"""``python -m loadtest`` / ``autoglm loadtest``: load-test the running stack, optionally sweep serving configs.

Exit code 0 when the SLO gate passes (a single run within loadtest.slo_p95_ms and slo_error_rate; a
sweep with at least one serving config within them; a --tune study whose best config held the SLO in its
verification window), 1 when it fails, 2 for a usage or setup error. --tune writes the verified config
into the run's repository; --rollback restores the one it replaced.
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


def _pair(text: str) -> list[int]:
    values = comma_list(int)(text)
    if len(values) != 2:
        raise argparse.ArgumentTypeError(f"'{text}' is not a range LOW,HIGH of two integers")
    return values


def _options(text: str) -> list[list[int]]:
    """'none;4;8,16' -> [[], [4], [8, 16]]: 'none' prefers the largest batch."""
    return [[] if group.strip().lower() == "none" else comma_list(int)(group) for group in text.split(";")]


TARGET, LOAD, SWEEP, TUNE = "target", "load", "sweep (with --sweep)", "tune (with --tune)"
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
    "--tune": Flag("loadtest.tune.enabled", "a Bayesian study over the live serving knobs, the best config verified "
                   "and written into the repository", switch=True, group=TUNE),
    "--trials": Flag("loadtest.tune.n_trials", "trials in the study (the baseline first)", type=int, group=TUNE),
    "--sampler": Flag("loadtest.tune.sampler", "gp (the default) or tpe: Bayesian; random, grid",
                      choices=["tpe", "gp", "random", "grid"], group=TUNE),
    "--seed": Flag("loadtest.tune.seed", "the sampler's seed", type=int, group=TUNE),
    "--tune-variants": Flag("loadtest.tune.variants", "variants to choose among, or 'all'", many=True, group=TUNE),
    "--max-batch": Flag("loadtest.tune.max_batch_size", "max batch size range LOW,HIGH", type=_pair, group=TUNE),
    "--delay-range": Flag("loadtest.tune.max_queue_delay_us", "queue delay range LOW,HIGH in µs", type=_pair,
                          group=TUNE),
    "--instance-range": Flag("loadtest.tune.instances", "instance count range LOW,HIGH", type=_pair, group=TUNE),
    "--preferred-options": Flag("loadtest.tune.preferred_batch_sizes", "preferred batch size options, ';'-separated,"
                                " e.g. 'none;4;8,16' (none: prefer the largest batch)", type=_options, group=TUNE),
    "--step": Flag("loadtest.tune.step_s", "measured seconds per step of a trial's concurrency ladder", type=float,
                   group=TUNE),
    "--verify": Flag("loadtest.tune.verify_s", "seconds of the verification window", type=float, group=TUNE),
    "--no-write-back": Flag("loadtest.tune.write_back", "leave the repository as it is", switch=False, group=TUNE),
    "--rollback": Flag("loadtest.rollback", "restore the repository config the last --tune write-back replaced",
                       switch=True, group=TUNE),
    "--slots-range": Flag("loadtest.tune.max_sequences", "with --scenario generate: decode slots range LOW,HIGH",
                          type=_pair, group=TUNE),
    "--interval-range": Flag("loadtest.tune.stream_interval_ms", "with --scenario generate: stream interval range "
                             "LOW,HIGH in ms", type=_pair, group=TUNE),
    "--spinning-choices": Flag("loadtest.tune.intra_op_spinning", "with --scenario generate: the ways the decode "
                               "step's idle threads may wait to choose among (off, run, on)", many=True, group=TUNE),
    "--slo-ttft-ms": Flag("loadtest.slo_ttft_p95_ms", "with --scenario generate: the p95 time to first token the "
                          "SLO allows", type=float, group=TUNE),
    "--slo-itl-ms": Flag("loadtest.slo_itl_p95_ms", "with --scenario generate: the p95 inter-token latency the SLO "
                         "allows", type=float, group=TUNE),
}


def loadtest(settings: Settings, force: bool = False) -> int:
    """Run the stage; the exit code is its SLO gate's (--rollback: 0 once restored)."""
    if settings.loadtest.rollback:
        from loadtest.writeback import rollback_run

        return rollback_run(settings)
    from loadtest.stage import loadtest_run

    return loadtest_run(settings, force=force)[1]


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main(argv, "autoglm loadtest", __doc__, FLAGS, loadtest)


if __name__ == "__main__":
    sys.exit(run_main(main))
