"""The HTTP gateway imports tasks: importing them must not pull in torch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def test_task_modules_do_not_import_torch():
    code = ("import sys, autoglm.tasks, autoglm.tasks.digits, autoglm.tasks.charlm, autoglm.tasks.corpus, "
            "autoglm.tasks.predict, autoglm.tasks.checkpoint, autoglm.tasks.training\n"
            "print(sorted(m for m in ('torch', 'onnxruntime', 'sklearn') if m in sys.modules))")
    env = os.environ | {"PYTHONPATH": str(REPO)}

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=60)

    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
