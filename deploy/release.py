"""What a run releases, read from its artifacts: models, version, image tags, capacity.

Deploy never looks inside a model: it reads ``repository/task.json`` (task, models, recommended one),
the repository manifest (its sha256 names the model image; the Triton settings the models run with),
the native flavour's version directories, and, when ``autoglm loadtest`` completed, the capacity per
model instance it measured within the SLO.

Every image is tagged by its content, so nothing changed can ship under an old tag: the model image by
the repository manifest's sha256, the gateway and tune images by the code's version and a digest of
the files their Dockerfile copies (:data:`IMAGE_SOURCES`), read from the code doing the render.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autoglm import __version__
from autoglm.artifacts import RunDir, sha256_file, verify_outputs
from autoglm.errors import AutoGLMError, IntegrityError

TRITON_NGC_TAG = "24.10-py3"  # Triton 2.51, the server version bundled in nvidia-pytriton and tested here
DEFAULT_CAPACITY_RPS = 50.0  # per model instance, when no loadtest measured one: deliberately low (scales out early)
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
    def for_release(cls, registry: str, run: str, repository_sha: str, root: Path = SOURCE_ROOT) -> Images:
        registry = registry.rstrip("/")
        return cls(gateway=f"{registry}/autoglm-gateway:{code_tag('gateway', root)}",
                   models=f"{registry}/autoglm-models:{run}-{repository_sha[:12]}",
                   triton=f"nvcr.io/nvidia/tritonserver:{TRITON_NGC_TAG}",
                   tune=f"{registry}/autoglm-tune:{code_tag('tune', root)}")


@dataclass(frozen=True)
class Capacity:
    """Requests per second one model instance serves within the SLO, and where the figure comes from."""

    rps_per_instance: float
    measured: bool
    source: str  # a sentence for the rendered files: what measured it, or why the default is used

    def per_pod(self, instances_per_pod: int) -> float:
        return self.rps_per_instance * instances_per_pod


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

    def images(self, registry: str) -> Images:
        return Images.for_release(registry, self.run, self.repository_sha)


def read_release(run: RunDir) -> Release:
    """The release of ``run``; AutoGLMError naming the stage to run when something is missing."""
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
    capacity = _capacity(run, info["recommended"], manifest.config["triton"])
    if capacity.measured:
        inputs.append("loadtest")
    return Release(run=run.name, task=info["task"], models=models, recommended=info["recommended"],
                   version=versions.pop(), instances_per_pod=int(manifest.config["triton"]["instances"]),
                   repository_sha=sha256_file(run.manifest_path("repository")),
                   autoglm_version=manifest.libraries.get("autoglm", "0.0.0"), task_json=task_json,
                   capacity=capacity, inputs=inputs, run_config=_run_config(run))


def _native_version(native: Path, model: str) -> int:
    model_dir = native / model
    if not (model_dir / "config.pbtxt").is_file():
        raise AutoGLMError(f"{model_dir} has no config.pbtxt: the NGC Triton serves the native flavour; re-run "
                           "`autoglm compress --force` to write it")
    versions = sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())
    if not versions:
        raise IntegrityError(f"{model_dir} has no version directory: re-run `autoglm compress --force`")
    return versions[-1]


def _capacity(run: RunDir, model: str, triton: dict[str, Any]) -> Capacity:
    """Measured capacity when loadtest completed and found a config within the SLO that is the one deployed
    (``model`` with the repository's batching ``triton``), else the default, saying why."""
    state = run.state("loadtest")
    if state != "complete":
        return Capacity(DEFAULT_CAPACITY_RPS, False,
                        f"default {DEFAULT_CAPACITY_RPS:g} req/s per instance (loadtest is {state}: run `autoglm "
                        "loadtest` to measure it)")
    metrics = run.manifest("loadtest").metrics
    value = metrics.get("capacity_per_instance_rps")
    if not value:
        return Capacity(DEFAULT_CAPACITY_RPS, False,
                        f"default {DEFAULT_CAPACITY_RPS:g} req/s per instance (loadtest found no serving config "
                        "within the SLO: see runs/<run>/loadtest/report.json)")
    measured_on = metrics.get("recommended") or {}
    # loadtest records the live config, and Triton's auto-complete turns no preferred sizes into
    # [max_batch_size] (see SweepGrid): the repository's [] is served, and measured, as that
    preferred = triton.get("preferred_batch_sizes")
    if preferred == [] and triton.get("max_batch_size"):
        preferred = [triton["max_batch_size"]]
    deployed = {"model": model, "max_queue_delay_us": triton.get("max_queue_delay_us"),
                "preferred_batch_sizes": preferred}
    differs = {k: (measured_on[k], want) for k, want in deployed.items()
               if measured_on.get(k) is not None and want is not None and measured_on[k] != want}
    if differs:
        what = ", ".join(f"{k} {got} (deployed: {want})" for k, (got, want) in differs.items())
        return Capacity(DEFAULT_CAPACITY_RPS, False,
                        f"default {DEFAULT_CAPACITY_RPS:g} req/s per instance (loadtest measured {float(value):.1f} "
                        f"on another config: {what}; set compress.triton to it and re-run compress and loadtest)")
    p95 = metrics.get("p95_ms")
    at = f" at p95 {p95:.1f} ms" if isinstance(p95, int | float) else ""
    return Capacity(float(value), True, f"measured by loadtest: {float(value):.1f} req/s per instance{at}")


def _run_config(run: RunDir) -> dict[str, Any]:
    """The run's resolved config as its stages saved it (tune's first: the study config)."""
    for stage in ("tune", "compress"):
        path = run.stage_dir(stage) / "config.json"
        if path.is_file():
            return json.loads(path.read_text())
    return {}
