"""What a fresh interpreter has imported after running some code: import-boundary tests use it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def imported_after(code: str, wanted: str) -> list[str]:
    """Run ``code`` in a new interpreter of this environment (this checkout first on the path), then return the
    sorted names in its ``sys.modules`` for which the expression ``wanted`` (over ``m``) is true."""
    script = f"{code}\nimport sys\nprint(*sorted(m for m in sys.modules if {wanted}))"
    env = os.environ | {"PYTHONPATH": str(REPO)}

    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=60)

    assert done.returncode == 0, done.stderr
    return done.stdout.split()
