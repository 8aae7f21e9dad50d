"""deploy reads artifacts only: it imports the core and itself, never a stage's code."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]
STAGES = {"tune", "compress", "serve", "loadtest", "bench"}


def _imported(path: Path) -> set[str]:
    """Top-level names of every module ``path`` imports, in functions too."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_no_deploy_module_imports_a_stage():
    offenders = {str(path.relative_to(ROOT)): sorted(_imported(path) & STAGES)
                 for path in sorted((ROOT / "deploy").rglob("*.py")) if _imported(path) & STAGES}
    assert offenders == {}


def test_rendering_a_run_loads_no_stage_module(published):
    settings, rundir, keys = published
    overrides = [f"run.root={json.dumps(str(settings.run.root))}", "run.name='rel'", "deploy.kustomize=false",
                 f"deploy.api_keys_file={json.dumps(str(keys))}"]
    code = ("import json, sys\nfrom autoglm.config import load_settings\nfrom deploy.render import render_run\n"
            f"render_run(load_settings(None, {overrides!r}))\n"
            f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {sorted(STAGES)!r})))")

    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)

    assert proc.returncode == 0, proc.stderr
    assert rundir.state("deploy") == "complete"
    assert json.loads(proc.stdout.splitlines()[-1]) == []
