"""Deploy fixtures: a run with a published repository (no training needed) and a real PostgreSQL."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from autoglm.artifacts import RunDir, StageWriter, write_atomic
from autoglm.config import load_settings
from serve.triton import free_port

MODELS = {"fp32": "digits-fp32", "int8": "digits-int8"}
TASK_INFO = {"task": "digits", "metric": "accuracy", "direction": "maximize", "model_args": {},
             "io": {"inputs": [{"name": "image", "dtype": "float32", "shape": [1, 8, 8]}],
                    "outputs": [{"name": "logits", "dtype": "float32", "shape": [10]}]},
             "metadata": {"classes": [str(i) for i in range(10)]}, "models": MODELS, "recommended": "digits-int8"}
TRITON = {"instances": 2, "intra_op_threads": 1, "max_batch_size": 64, "max_queue_delay_us": 0,
          "max_queue_size": 256, "preferred_batch_sizes": []}
KEY_LINE = "ci:" + "ab" * 32 + "\n"


def publish_repository(root: Path, run: str = "rel") -> RunDir:
    """compress + repository stages as compress writes them (model files are placeholders: deploy never reads them)."""
    rundir = RunDir(root, run)
    settings = load_settings(None, [f"run.root='{root}'", f"run.name='{run}'"])
    compress = StageWriter(rundir, "compress", {"variants": list(MODELS)})
    settings.save(compress.path("config.json"))
    compress.add_output("config.json")
    compress.commit()
    writer = StageWriter(rundir, "repository", {"triton": TRITON}, inputs=["compress"])
    for name in MODELS.values():
        write_atomic(writer.dir / "native" / name / "1" / "model.onnx", b"onnx placeholder")
        write_atomic(writer.dir / "native" / name / "config.pbtxt", f'name: "{name}"\n'.encode())
    write_atomic(writer.dir / "task.json", (json.dumps(TASK_INFO, indent=2) + "\n").encode())
    for path in sorted(p for p in writer.dir.rglob("*") if p.is_file() and p.name != "manifest.json"):
        writer.add_output(str(path.relative_to(writer.dir)))
    writer.manifest.metrics = {"models": MODELS, "recommended": "digits-int8", "task": "digits"}
    writer.commit()
    return rundir


def complete_loadtest(rundir: RunDir, capacity: float | None, recommended: dict | None = None,
                      outputs: tuple[str, ...] = (), **record) -> None:
    """A loadtest manifest as loadtest writes it, listing ``outputs`` (files already in its directory); ``record``:
    more metrics, e.g. the capacity record's ``capacity_flavour``, ``device_kind`` and ``host`` (a loadtest older
    than those omits them)."""
    writer = StageWriter(rundir, "loadtest", {"scenario": "steady"}, inputs=["repository"])
    for rel in outputs:
        writer.add_output(rel)
    writer.manifest.metrics = {"capacity_per_instance_rps": capacity, "p95_ms": 41.5, "instances": 2,
                               "recommended": recommended, **record}
    writer.commit()


@pytest.fixture
def published(tmp_path):
    """(settings, RunDir, API key file) of a run whose repository is complete."""
    root = tmp_path / "runs"
    rundir = publish_repository(root)
    keys = tmp_path / "keys.txt"
    keys.write_text(KEY_LINE)
    return load_settings(None, [f"run.root='{root}'", "run.name='rel'"]), rundir, keys


# ---- a real PostgreSQL ----------------------------------------------------------------------------

def _pg_bin() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    return versions[-1].parent if versions else None


@pytest.fixture(scope="session")
def postgres_url():
    """A throw-away PostgreSQL cluster on a free port; yields a SQLAlchemy URL of an empty database.

    initdb refuses root, so as root the cluster belongs to the ``postgres`` system user (Debian's
    package creates it) and lives in a directory of its own under the temp dir.
    """
    bindir = _pg_bin()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (Debian: apt-get install -y postgresql): no initdb found")
    as_root = os.geteuid() == 0
    if as_root:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and no 'postgres' user to own the cluster (initdb refuses root)")
    workdir = Path(tempfile.mkdtemp(prefix="autoglm-pg-"))
    if as_root:
        os.chown(workdir, owner.pw_uid, owner.pw_gid)
    prefix = ["runuser", "-u", "postgres", "--"] if as_root else []

    def pg(tool: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*prefix, str(bindir / tool), *args], capture_output=True, text=True, timeout=120,
                              check=True)

    port = free_port()
    data = workdir / "data"
    try:
        pg("initdb", "-D", str(data), "-A", "trust", "-U", "autoglm", "--no-sync", "-E", "UTF8")
        pg("pg_ctl", "-D", str(data), "-l", str(workdir / "log"), "-w", "-t", "60", "start", "-o",
           f"-p {port} -k {workdir} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=50")
        pg("createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "autoglm", "study")
    except subprocess.CalledProcessError as exc:
        shutil.rmtree(workdir, ignore_errors=True)
        pytest.fail(f"could not start PostgreSQL: {exc.stderr or exc.stdout}")
    try:
        yield f"postgresql+psycopg2://autoglm@127.0.0.1:{port}/study"
    finally:
        subprocess.run([*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
                       capture_output=True, timeout=60, check=False)
        shutil.rmtree(workdir, ignore_errors=True)
