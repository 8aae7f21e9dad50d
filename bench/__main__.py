"""``python -m bench [names...] [--quick] [--out DIR]``: run benchmarks and write a markdown report."""

import sys

from bench.harness import main

sys.exit(main())
