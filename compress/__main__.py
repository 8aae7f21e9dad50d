"""``python -m compress`` / ``autoglm compress``: build, check and publish the compressed variants."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from autoglm.cli import add_common_args, run_main, run_stage


def main(argv: Sequence[str] | None = None) -> int:
    parser = add_common_args(argparse.ArgumentParser(prog="autoglm compress", description=__doc__))
    parser.add_argument("--variants", help="comma-separated, e.g. fp32,int8,pruned-int8 (sets compress.variants)")
    parser.add_argument("--checkpoint", help="compress this model.pt instead of tune's selection")
    args = parser.parse_args(argv)
    if args.variants:
        names = [v.strip() for v in args.variants.split(",") if v.strip()]
        args.overrides.append(f"compress.variants={json.dumps(names)}")  # JSON lists and strings are TOML ones
    if args.checkpoint:
        args.overrides.append(f"compress.checkpoint={json.dumps(args.checkpoint)}")  # a quote stays text
    from compress.stage import compress_run

    return run_stage(args, compress_run)


if __name__ == "__main__":
    sys.exit(run_main(main))
