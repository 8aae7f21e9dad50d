"""``python -m compress`` / ``autoglm compress``: build, check and publish the compressed variants."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from autoglm.cli import Flag, run_main, stage_main

FLAGS = {
    "--variants": Flag("compress.variants", "variants to build, e.g. fp32,int8,pruned-int8 or fp32 int8", many=True),
    "--checkpoint": Flag("compress.checkpoint", "compress this model.pt instead of tune's selection"),
}


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main(argv, "autoglm compress", __doc__, FLAGS, "compress.stage:compress_run",
                      check="compress:check_settings")


if __name__ == "__main__":
    sys.exit(run_main(main))
