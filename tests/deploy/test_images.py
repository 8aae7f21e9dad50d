"""The Dockerfiles, checked statically (no Docker engine here): base, non-root user, healthcheck, sources,
and a gateway image whose dependencies cover what the gateway imports and nothing heavy."""

from __future__ import annotations

import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
IMAGES = ROOT / "deploy" / "images"
HEAVY = {"torch", "onnx", "onnxruntime", "onnxscript", "optuna", "tritonclient", "scikit-learn", "locust"}


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per Dockerfile instruction; continuation lines joined, comments dropped."""
    out, pending = [], ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, f"{path} ends inside a continued line"
    return out


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@pytest.mark.parametrize("dockerfile", ["Dockerfile.gateway", "Dockerfile.tune"])
def test_slim_base_non_root_user_and_existing_sources(dockerfile):
    steps = instructions(IMAGES / dockerfile)
    assert steps[0] == ("FROM", "python:3.11-slim")
    users = [i for i, (word, _) in enumerate(steps) if word == "USER"]
    assert users, "no USER: the container would run as root"
    user = steps[users[-1]][1].split(":")[0]
    assert user not in ("root", "0") and user.isdigit()  # numeric: runAsNonRoot can verify it
    assert all(i > users[-1] for i, (word, _) in enumerate(steps) if word in ("CMD", "ENTRYPOINT"))
    for word, args in steps:
        if word == "COPY":
            for source in args.split()[:-1]:
                if not source.startswith("--"):
                    assert (ROOT / source).exists(), f"{dockerfile}: COPY source {source} is not in the repository"
        if word == "RUN" and "pip install" in args:
            assert "-c constraints.txt" in args  # the pinned environment


def test_gateway_image_has_a_healthcheck_on_healthz_and_exposes_8080():
    steps = dict(instructions(IMAGES / "Dockerfile.gateway"))
    assert "/healthz" in steps["HEALTHCHECK"] and "--interval" in steps["HEALTHCHECK"]
    assert steps["EXPOSE"] == "8080"
    assert "app_from_env" in steps["CMD"]


def _requirements() -> list[str]:
    lines = (IMAGES / "requirements-gateway.txt").read_text().splitlines()
    return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]


def _closure(requirements: list[str]) -> set[str]:
    """Every distribution that installing ``requirements`` brings in (from the installed metadata)."""
    from packaging.requirements import Requirement

    seen: set[str] = set()
    todo = [(Requirement(r).name, frozenset(Requirement(r).extras)) for r in requirements]
    while todo:
        name, extras = todo.pop()
        key = _norm(name)
        if key in seen and not extras:
            continue
        seen.add(key)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue  # an optional dependency not installed here
        for spec in requires:
            req = Requirement(spec)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in (extras or {""})):
                todo.append((req.name, frozenset(req.extras)))
    return seen


def test_gateway_requirements_cover_its_imports_and_nothing_heavy():
    constraints = {_norm(line.split("==")[0]) for line in (ROOT / "constraints.txt").read_text().splitlines()
                   if "==" in line}
    from packaging.requirements import Requirement

    for requirement in _requirements():
        assert _norm(Requirement(requirement).name) in constraints, f"{requirement} is not pinned in constraints.txt"
    closure = _closure(_requirements())
    assert not closure & HEAVY
    listing = "print('\\n'.join(sorted({m.split('.')[0] for m in sys.modules})))"

    def loaded(imports: str) -> set[str]:
        code = f"import sys{imports}; {listing}"
        return set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True,
                                  timeout=120).stdout.split())

    # what the interpreter loads by itself (site hooks of this environment) is not the gateway's doing
    modules = loaded(", serve.gateway.app, serve.settings, uvicorn, uvloop, httptools") - loaded("")
    owners = metadata.packages_distributions()
    used = {_norm(dist) for module in modules for dist in owners.get(module, [])} - {"autoglm"}
    assert not used & HEAVY, f"the gateway imports {sorted(used & HEAVY)}"
    assert used <= closure, f"the gateway imports distributions the image does not install: {sorted(used - closure)}"
