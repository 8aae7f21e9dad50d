"""`python -m loadtest`: not built yet; exits with a clear message."""

import sys

from autoglm.cli import not_built, run_main

BUILT = False
main = not_built("loadtest")

if __name__ == "__main__":
    sys.exit(run_main(main))
