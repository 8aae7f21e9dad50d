"""The Dockerfiles, checked statically (no Docker engine here): base, non-root user, healthcheck, sources,
and a gateway image whose dependencies cover what the gateway imports and nothing heavy."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from deploy.k8s.serving import GATEWAY_COMMAND
from deploy.release import BUILD_FILES, IMAGE_SOURCES
from tests.extras import closure, norm, requirements

ROOT = Path(__file__).parents[2]
IMAGES = ROOT / "deploy" / "images"
HEAVY = {"torch", "onnx", "onnxruntime", "onnxscript", "onnxslim", "torch-pruning", "optuna", "tritonclient",
         "nvidia-pytriton", "scikit-learn", "matplotlib", "locust"}
# imported only when installed (anyio's event-loop detection tries sniffio; starlette's form parser tries
# python-multipart): a dev dependency or another extra brings them here
OPTIONAL = {"sniffio", "python-multipart"}


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


def test_gateway_image_has_a_healthcheck_on_healthz_and_exposes_8080_and_8081():
    steps = dict(instructions(IMAGES / "Dockerfile.gateway"))
    assert "/healthz" in steps["HEALTHCHECK"] and "--interval" in steps["HEALTHCHECK"]
    assert steps["EXPOSE"] == "8080 8081"  # HTTP and KServe v2 over gRPC
    assert json.loads(steps["CMD"]) == GATEWAY_COMMAND  # the image starts the gateway as the manifests do


def test_the_gateway_image_installs_the_serve_extra_and_nothing_else():
    installs = [args for word, args in instructions(IMAGES / "Dockerfile.gateway")
                if word == "RUN" and "pip install" in args]
    assert installs == ['pip install --no-compile -c constraints.txt ".[serve]"']  # one list: pyproject.toml's


def test_the_serve_extra_covers_the_gateways_imports_and_nothing_heavy():
    constraints = {norm(line.split("==")[0]) for line in (ROOT / "constraints.txt").read_text().splitlines()
                   if "==" in line}
    listed = {norm(Requirement(requirement).name) for requirement in requirements("serve")}
    assert listed <= constraints, f"not pinned in constraints.txt: {sorted(listed - constraints)}"
    assert not listed & HEAVY
    installed = closure(requirements("serve"))
    assert not installed & HEAVY
    listing = "print('\\n'.join(sorted({m.split('.')[0] for m in sys.modules})))"

    def loaded(imports: str) -> set[str]:
        code = f"import sys{imports}; {listing}"
        return set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True,
                                  timeout=120).stdout.split())

    # what the interpreter loads by itself (site hooks of this environment) is not the gateway's doing
    modules = loaded(", serve.gateway.app, serve.settings, uvicorn, uvloop, httptools") - loaded("")
    owners = metadata.packages_distributions()
    used = {norm(dist) for module in modules for dist in owners.get(module, [])} - {"autoglm"}
    assert not used & HEAVY, f"the gateway imports {sorted(used & HEAVY)}"
    # a namespace package (opentelemetry) has many owners: one of them installed covers it
    uncovered = [{norm(d) for d in owners.get(module, [])} - {"autoglm"} for module in modules]
    missing = sorted({d for dists in uncovered if dists and not dists & (installed | OPTIONAL) for d in dists})
    assert not missing, f"the gateway imports distributions its image does not install: {missing}"


@pytest.mark.parametrize("image", sorted(IMAGE_SOURCES))
def test_the_image_tag_digests_exactly_what_the_dockerfile_copies(image):
    copied = {source.rstrip("/") for word, args in instructions(IMAGES / f"Dockerfile.{image}") if word == "COPY"
              for source in args.split()[:-1] if not source.startswith("--")}
    assert copied == set(BUILD_FILES) | set(IMAGE_SOURCES[image])
