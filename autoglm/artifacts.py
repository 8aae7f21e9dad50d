"""Run directories and stage manifests.

Everything of one release lives in ``runs/<run>/``; each stage writes into ``runs/<run>/<stage>/`` and
writes ``manifest.json`` *last*, atomically, so its presence means the stage completed. A manifest
records what made the outputs (resolved config, parent manifests by sha256) and what they are (path,
sha256, size), so a later stage can refuse inputs that changed and a re-run can skip finished work.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import socket
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from autoglm.errors import AutoGLMError, IntegrityError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
STAGES = ("train", "tune", "compress", "repository", "serve", "loadtest", "deploy")
LIBRARIES = ("torch", "numpy", "onnx", "onnxruntime", "optuna", "tritonclient", "fastapi", "autoglm")
StageState = Literal["complete", "stale", "tampered", "incomplete", "missing"]


_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_output(path: Path | str) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success fsync it and rename it over ``path``.

    A crash or exception leaves ``path`` untouched (old content or absent) and removes the temp file.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise AutoGLMError(f"cannot write {path}: {exc.strerror}; choose a writable run.root") from exc
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; artifacts are read by servers and people
        os.replace(tmp_path, path)
        with contextlib.suppress(OSError):  # persist the rename itself
            dir_fd = os.open(path.parent, os.O_RDONLY)
            os.fsync(dir_fd)
            os.close(dir_fd)
    except OSError as exc:
        raise AutoGLMError(f"cannot write {path}: {exc.strerror or exc}; free space or fix permissions") from exc
    finally:
        tmp_path.unlink(missing_ok=True)


def write_atomic(path: Path | str, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file, fsync, rename)."""
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def sha256_file(path: Path | str, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def library_versions() -> dict[str, str]:
    versions = {}
    for name in LIBRARIES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


@dataclass
class Manifest:
    """What a stage produced and from what. Paths are relative to the stage directory."""

    stage: str
    config: dict[str, Any]
    inputs: dict[str, str] = field(default_factory=dict)  # parent manifest path (run-relative) -> sha256
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)  # rel path -> {sha256, size}
    metrics: dict[str, Any] = field(default_factory=dict)
    energy: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {joules, method, measured}
    libraries: dict[str, str] = field(default_factory=library_versions)
    host: dict[str, Any] = field(default_factory=lambda: {
        "hostname": socket.gethostname(), "platform": platform.platform(), "cpus": os.cpu_count(),
        "python": platform.python_version()})
    created: float = field(default_factory=time.time)
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=2, sort_keys=True, default=str)

    @classmethod
    def load(cls, path: Path) -> Manifest:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise IntegrityError(f"manifest {path} is unreadable ({exc}); re-run the stage with --force") from exc
        if not isinstance(data, dict):
            raise IntegrityError(f"manifest {path} is not a JSON object; re-run the stage with --force")
        if data.get("schema_version") != SCHEMA_VERSION:
            raise IntegrityError(f"manifest {path} has schema {data.get('schema_version')}, expected "
                                 f"{SCHEMA_VERSION}; re-run the stage with --force")
        known = set(cls.__dataclass_fields__)
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as exc:  # a required field is missing
            raise IntegrityError(f"manifest {path} is incomplete ({exc}); re-run the stage with --force") from None


class RunDir:
    """``<root>/<name>/``: one release; stage directories inside."""

    def __init__(self, root: Path | str, name: str):
        self.path = Path(root) / name
        self.name = name

    def stage_dir(self, stage: str) -> Path:
        return self.path / stage

    def manifest_path(self, stage: str) -> Path:
        return self.stage_dir(stage) / MANIFEST

    def manifest(self, stage: str) -> Manifest:
        """The completed manifest of ``stage``; a clear error if that stage has not run."""
        path = self.manifest_path(stage)
        if not path.is_file():
            command = "compress" if stage == "repository" else stage  # compress writes the repository too
            raise AutoGLMError(f"stage '{stage}' has not completed in {self.path}: run `autoglm {command}` first")
        return Manifest.load(path)

    def changed_output(self, stage: str) -> str | None:
        """For a tampered stage: which output changed and how (the IntegrityError's words); else None."""
        try:
            verify_outputs(self.stage_dir(stage), self.manifest(stage))
        except AutoGLMError as exc:  # IntegrityError, or a manifest that cannot be read
            return str(exc)
        return None

    def state(self, stage: str) -> StageState:
        """complete / stale (a parent changed) / tampered (an output changed) / incomplete / missing."""
        sdir = self.stage_dir(stage)
        if not self.manifest_path(stage).is_file():
            return "incomplete" if sdir.is_dir() and any(sdir.iterdir()) else "missing"
        try:
            manifest = self.manifest(stage)
            verify_outputs(sdir, manifest)
        except IntegrityError:
            return "tampered"
        for parent, digest in manifest.inputs.items():
            path = self.path / parent
            if not path.is_file() or sha256_file(path) != digest:
                return "stale"
        return "complete"


def verify_outputs(stage_dir: Path, manifest: Manifest) -> None:
    """Raise IntegrityError naming the first output whose size or sha256 changed."""
    for rel, info in manifest.outputs.items():
        path = stage_dir / rel
        if not path.is_file():
            raise IntegrityError(f"{path} is missing but {stage_dir / MANIFEST} lists it; re-run with --force")
        actual = sha256_file(path)
        if actual != info["sha256"]:
            raise IntegrityError(f"{path} was modified: sha256 {actual[:12]}… but the manifest expects "
                                 f"{info['sha256'][:12]}…; restore it or re-run the stage with --force")


class StageWriter:
    """Collect one stage's outputs and metrics; :meth:`commit` writes the manifest last.

    ``inputs`` are parent manifests; a parent whose outputs changed is refused up front, naming the file.
    """

    def __init__(self, run: RunDir, stage: str, config: Mapping[str, Any], inputs: list[str] = ()):
        self.run, self.stage, self.dir = run, stage, run.stage_dir(stage)
        self.manifest = Manifest(stage=stage, config=dict(config))
        for parent in inputs:
            parent_manifest = run.manifest(parent)
            verify_outputs(run.stage_dir(parent), parent_manifest)
            rel = str(run.manifest_path(parent).relative_to(run.path))
            self.manifest.inputs[rel] = sha256_file(run.manifest_path(parent))

    def up_to_date(self) -> bool:
        """True when a complete manifest exists for the same config and the same parents."""
        if self.run.state(self.stage) != "complete":
            return False
        old = self.run.manifest(self.stage)
        return old.config == self.manifest.config and old.inputs == self.manifest.inputs

    def path(self, rel: str) -> Path:
        target = self.dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def add_output(self, rel: str) -> Path:
        path = self.dir / rel
        self.manifest.outputs[rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
        return path

    def add_energy(self, name: str, joules: float, method: str) -> None:
        self.manifest.energy[name] = {"joules": joules, "method": method,
                                      "measured": not method.startswith("estimated")}

    def commit(self) -> Manifest:
        """Invalidate any old manifest first, then write the new one last."""
        write_atomic(self.run.manifest_path(self.stage), (self.manifest.to_json() + "\n").encode())
        return self.manifest

    def invalidate(self) -> None:
        """Remove the old manifest so a crash part-way leaves the stage 'incomplete', never stale-complete."""
        self.run.manifest_path(self.stage).unlink(missing_ok=True)


def data_fingerprint(data: str | None) -> Any:
    """What stands for a task's data source in an up-to-date check or a cache key: a file's or a directory's
    files' sizes and modification times (a regenerated file counts as changed), else the source as given."""
    if not data:
        return data
    path = Path(data).expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file())
    else:
        files = []
    return [data, *[[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]]
