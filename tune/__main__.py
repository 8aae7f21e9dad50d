"""``python -m tune`` / ``autoglm tune``: run or resume the study, select the release point, report."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from autoglm.cli import add_common_args, run_main, run_stage

BUILT = True


def main(argv: Sequence[str] | None = None) -> int:
    parser = add_common_args(argparse.ArgumentParser(prog="autoglm tune", description=__doc__))
    parser.add_argument("--trials", type=int, help="total trials in the study (sets tune.n_trials)")
    parser.add_argument("--storage", help="SQLAlchemy URL of a shared study (sets tune.storage)")
    args = parser.parse_args(argv)
    args.overrides += [f"tune.n_trials={args.trials}"] if args.trials else []
    args.overrides += [f"tune.storage='{args.storage}'"] if args.storage else []
    from tune.stage import tune_run

    return run_stage(args, tune_run)


if __name__ == "__main__":
    sys.exit(run_main(main))
