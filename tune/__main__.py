"""``python -m tune`` / ``autoglm tune``: run or resume the study, select the release point, report."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from autoglm.cli import add_common_args, run_main, run_stage
from tune import _toml


def main(argv: Sequence[str] | None = None) -> int:
    parser = add_common_args(argparse.ArgumentParser(prog="autoglm tune", description=__doc__))
    parser.add_argument("--trials", type=int, help="total trials in the study (sets tune.n_trials)")
    parser.add_argument("--storage", help="SQLAlchemy URL of a shared study (sets tune.storage)")
    args = parser.parse_args(argv)
    # `is not None`: --trials 0 must reach the settings' check, not fall back to the config's n_trials
    args.overrides += [f"tune.n_trials={args.trials}"] if args.trials is not None else []
    args.overrides += [f"tune.storage={_toml(args.storage)}"] if args.storage is not None else []
    from tune.stage import tune_run

    return run_stage(args, tune_run)


if __name__ == "__main__":
    sys.exit(run_main(main))
