"""Real model repositories for the serve integration tests (tests/integration/test_serve_*.py), built
once per test process and shared by their modules, and helpers to run the stack on free ports.

Training is tiny (seconds): these tests check serving, not accuracy. Runs live in one temporary
directory removed at exit.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from autoglm.local_http import DIRECT
from serve.runner import on_free_ports  # noqa: F401 - the tests import it from here


os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: busy-waiting OpenMP is 2-10x slower here

FAST = ["compress.variants=['fp32']", "compress.exporter='legacy'", "measure.repeats=5", "measure.warmup=1",
        "measure.batch_sizes=[1]", "compress.triton.intra_op_threads=1", "compress.generate.int8=false",
        "compress.generate.int4=false"]
RECIPES = {
    "digits": ["train.lr=3e-3", "train.max_steps=250", "train.eval_every=250", "train.batch_size=64",
               "train.weight_decay=0.01", "train.eval_batches=2"],
    "charlm": ["task.name=charlm", "task.model={n_layer=1, n_head=2, n_embd=32, block_size=32}",
               "train.max_steps=100", "train.eval_every=100", "train.batch_size=16", "train.eval_batches=2",
               "train.lr=3e-3", "compress.generate.max_new_tokens=100000"],
    "linreg": ["task.name='tests.autoglm.tasks.user_task:LinearRegressionTask'", "train.max_steps=200",  # a user's task
               "train.eval_every=200", "train.batch_size=32", "train.lr=5e-2", "train.weight_decay=0.0",
               "train.eval_batches=2"],
}


@functools.cache
def _root() -> Path:
    root = Path(tempfile.mkdtemp(prefix="autoglm-serve-tests-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return root


@functools.cache
def published_run(kind: str):
    """Settings of a run named ``kind`` whose repository is published (``<kind>-fp32``)."""
    from autoglm.config import load_settings
    from autoglm.train import train_run
    from compress.stage import compress_run

    root = _root()
    settings = load_settings(None, [f"run.root='{root}'", f"run.cache_dir='{root / 'cache'}'", f"run.name={kind}",
                                    *FAST, *RECIPES[kind]])
    train_run(settings, progress=False)
    compress_run(settings, progress=False)
    return settings


def require_triton():
    """The bundled Triton install; the calling test or fixture is skipped, with the reason, where it is missing."""
    import pytest

    from autoglm.errors import MissingExtraError
    from serve.triton import find_tritonserver

    try:
        return find_tritonserver()
    except MissingExtraError as exc:
        pytest.skip(str(exc))


def get(url: str, timeout: float = 5) -> tuple[int, bytes]:
    try:
        with DIRECT.open(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def post(url: str, body: bytes, headers: dict | None = None, timeout: float = 10) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, headers={"content-type": "application/json", **(headers or {})})
    try:
        with DIRECT.open(request, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_until(predicate, timeout: float = 30.0, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return False


def zip_bomb(mib: int) -> bytes:
    """``mib`` MiB of zeros gzipped (≈1 KB per MiB), made a MiB at a time: the test process never holds it."""
    import zlib

    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zeros = bytes(2**20)
    return b"".join([*(packer.compress(zeros) for _ in range(mib)), packer.flush()])
