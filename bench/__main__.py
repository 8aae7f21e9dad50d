"""``python -m bench [names...] [--quick] [--out DIR]``: run benchmarks and write a markdown report."""

import sys

from bench.harness import main

if __name__ == "__main__":  # `autoglm bench` imports this module for `main`: argv is read there, not here
    sys.exit(main())
