"""What a run releases, read from its artifacts: models, version, image tags, capacity.

Deploy never looks inside a model: it reads ``repository/task.json`` (task, models, recommended one),
the repository manifest (its sha256 names the model image; the Triton settings the models run with),
the native flavour's version directories, and, when ``autoglm loadtest`` measured it for what the overlay
serves, the capacity per model instance within the SLO (:mod:`deploy.capacity`) and the CPU and memory the
serving processes used there (:mod:`deploy.resources`).

Every image is tagged by its content, so nothing changed can ship under an old tag: the model image by
the repository manifest's sha256, the gateway and tune images by the code's version and a digest of
the files their Dockerfile copies (:data:`IMAGE_SOURCES`), read from the code doing the render.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from autoglm import __version__
from autoglm.artifacts import RunDir, sha256_file, verify_outputs
from autoglm.errors import AutoGLMError, IntegrityError
from deploy.capacity import Capacity, Target, capacity_for, generation_capacity, serving_target, workload_record
from deploy.resources import Usage, measured_usage

# the NGC Triton each overlay runs unless deploy.triton_image names one. CPU: Triton 2.51, the server version
# bundled in nvidia-pytriton and tested here; GPU: a current release, whose CUDA and TensorRT know current GPUs
# (the 2.51 container's CUDA 12.6 predates Blackwell) and whose ONNX Runtime backend reads the same config.pbtxt
TRITON_IMAGES = {"cpu": "nvcr.io/nvidia/tritonserver:24.10-py3", "gpu": "nvcr.io/nvidia/tritonserver:25.11-py3"}
SOURCE_ROOT = Path(__file__).resolve().parents[1]  # the checkout (or site-packages) the packages come from
BUILD_FILES = ("pyproject.toml", "constraints.txt", "README.md")  # what each Dockerfile copies besides packages
# image -> the packages its Dockerfile (deploy/images/Dockerfile.<image>) copies; tests hold the two together
IMAGE_SOURCES = {"gateway": ("autoglm", "serve"), "tune": ("autoglm", "tune", "compress", "serve")}


def code_tag(image: str, root: Path = SOURCE_ROOT) -> str:
    """``<autoglm version>-<sha12>``: the code's version and a digest of the files ``image`` is built from
    (its Dockerfile, the build files and packages it copies; files absent from an installed tree are skipped)."""
    paths = [root / "deploy" / "images" / f"Dockerfile.{image}", *(root / name for name in BUILD_FILES)]
    for package in IMAGE_SOURCES[image]:
        paths += (p for p in (root / package).rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc")
    digest = hashlib.sha256()
    for path in sorted(p for p in paths if p.is_file()):
        digest.update(f"{path.relative_to(root).as_posix()}\0{sha256_file(path)}\n".encode())
    return f"{__version__}-{digest.hexdigest()[:12]}"


@dataclass(frozen=True)
class Images:
    """Container images of a release; kustomize's ``images:`` and compose use the same references."""

    gateway: str
    models: str  # the native repository baked into a data-only image, copied out by an initContainer
    triton: str
    tune: str

    @classmethod
    def for_release(cls, registry: str, run: str, repository_sha: str, root: Path = SOURCE_ROOT, *,
                    triton: str = TRITON_IMAGES["cpu"]) -> Images:
        registry = registry.rstrip("/")
        return cls(gateway=f"{registry}/autoglm-gateway:{code_tag('gateway', root)}",
                   models=f"{registry}/autoglm-models:{run}-{repository_sha[:12]}",
                   triton=triton,
                   tune=f"{registry}/autoglm-tune:{code_tag('tune', root)}")


@dataclass(frozen=True)
class Release:
    run: str
    task: str
    models: dict[str, str]  # variant -> Triton model name
    recommended: str
    version: int  # the model version directory every model serves
    instances_per_pod: int  # instance_group.count each Triton pod starts with
    repository_sha: str  # sha256 of the repository manifest
    autoglm_version: str  # the version that wrote the repository (the images carry the rendering code's)
    task_json: bytes
    capacity: Capacity
    inputs: list[str] = field(default_factory=list)  # stages this render depends on
    run_config: dict[str, Any] = field(default_factory=dict)  # the run's resolved config (for tune workers)
    target: Target | None = None  # where the rendered overlay serves the recommended model
    usage: Usage | None = None  # CPU and memory loadtest measured at the deployed config (None: not measured)

    def images(self, registry: str, triton: str = TRITON_IMAGES["cpu"]) -> Images:
        return Images.for_release(registry, self.run, self.repository_sha, triton=triton)


def read_release(run: RunDir, env: str = "cpu", allow_capacity_mismatch: bool = False) -> Release:
    """The release of ``run`` for the ``env`` overlay; AutoGLMError naming the stage to run when something is
    missing. Loadtest's capacity is taken as :func:`deploy.capacity.capacity_for` says (measured on another
    flavour or device kind only with ``allow_capacity_mismatch``)."""
    state = run.state("repository")
    if state != "complete":
        hint = {"missing": "run `autoglm compress` first (it writes the model repository)",
                "incomplete": "`autoglm compress` did not finish: run it again",
                "stale": "compress changed after the repository was written: run `autoglm compress --force`",
                "tampered": f"{run.changed_output('repository')} (`autoglm compress --force` writes it)"}[state]
        raise AutoGLMError(f"the model repository of run '{run.name}' is {state} ({run.stage_dir('repository')}): "
                           f"{hint}")
    repo_dir, manifest = run.stage_dir("repository"), run.manifest("repository")
    verify_outputs(repo_dir, manifest)
    task_file = repo_dir / "task.json"
    if not task_file.is_file():
        raise AutoGLMError(f"{task_file} is missing (the repository predates task.json): re-run "
                           "`autoglm compress --force`")
    task_json = task_file.read_bytes()
    info = json.loads(task_json)
    models = dict(info["models"])
    versions = {_native_version(repo_dir / "native", name) for name in models.values()}
    if len(versions) != 1:
        raise IntegrityError(f"the native models in {repo_dir / 'native'} serve different versions {sorted(versions)}:"
                             " re-run `autoglm compress --force`")
    inputs = ["repository"]
    target = serving_target(repo_dir, info["recommended"], env)
    capacity = capacity_for(run, manifest.config["triton"], target, allow_capacity_mismatch)
    if info.get("generate"):  # the generation model streams tokens/s: sized by its own verified capacity
        capacity = replace(capacity, generation=generation_capacity(run, repo_dir, info["generate"], env,
                                                                    allow_capacity_mismatch))
    usage = None
    if capacity.measured:  # the same checks hold for what the serving processes used at that capacity
        usage = measured_usage(workload_record(run.manifest("loadtest").metrics, "predict") or {})
    if capacity.measured or (capacity.generation and capacity.generation.measured):
        inputs.append("loadtest")
    return Release(run=run.name, task=info["task"], models=models, recommended=info["recommended"],
                   version=versions.pop(), instances_per_pod=int(manifest.config["triton"]["instances"]),
                   repository_sha=sha256_file(run.manifest_path("repository")),
                   autoglm_version=manifest.libraries.get("autoglm", "0.0.0"), task_json=task_json,
                   capacity=capacity, inputs=inputs, run_config=_run_config(run), target=target, usage=usage)


def _native_version(native: Path, model: str) -> int:
    model_dir = native / model
    if not (model_dir / "config.pbtxt").is_file():
        raise AutoGLMError(f"{model_dir} has no config.pbtxt: the NGC Triton serves the native flavour; re-run "
                           "`autoglm compress --force` to write it")
    versions = sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())
    if not versions:
        raise IntegrityError(f"{model_dir} has no version directory: re-run `autoglm compress --force`")
    return versions[-1]


def _run_config(run: RunDir) -> dict[str, Any]:
    """The run's resolved config as its stages saved it (tune's first: the study config)."""
    for stage in ("tune", "compress"):
        path = run.stage_dir(stage) / "config.json"
        if path.is_file():
            return json.loads(path.read_text())
    return {}
