"""``python -m tune`` / ``autoglm tune``: run or resume the study, select the release point, report."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from autoglm.cli import Flag, run_main, stage_main

FLAGS = {
    "--trials": Flag("tune.n_trials", "total trials in the study", type=int),
    "--storage": Flag("tune.storage", "SQLAlchemy URL of a shared study"),
    "--mlflow": Flag("tune.mlflow_uri", "MLflow tracking store for the trials, manifest and report",
                     metavar="URI"),
}


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main(argv, "autoglm tune", __doc__, FLAGS, "tune.stage:tune_run",
                      check="compress:check_settings")


if __name__ == "__main__":
    sys.exit(run_main(main))
