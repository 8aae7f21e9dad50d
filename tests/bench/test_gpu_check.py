"""The GPU proof refuses cleanly where it cannot run: a message and exit status 2, no traceback, no results file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench import gpu, gpu_check
from bench.harness import discover
from tests.autoglm.test_device import fake_torch

REPO = Path(__file__).resolve().parents[2]


def test_refuses_without_cuda(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "torch", fake_torch(0, cuda_build=None))

    assert gpu_check.main(["--out", str(tmp_path)]) == 2

    err = capsys.readouterr().err
    assert err.startswith("gpu_check: refused: torch 2.13.0 (a CPU-only build) sees no CUDA device")
    assert "Traceback" not in err and not list(tmp_path.iterdir())


def test_steps_needing_the_cuda_provider_say_why_they_did_not_run(monkeypatch, tmp_path):
    monkeypatch.setattr("onnxruntime.get_available_providers", lambda: ["CPUExecutionProvider"])
    torch = fake_torch(1)
    torch.cuda.get_device_name = lambda index: "a fake GPU"
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setattr(gpu_check, "_nvml_status", lambda: "unavailable: a test")
    facts = gpu_check.preflight()
    proof = gpu_check.Proof(tmp_path, True, facts)
    ran = []

    proof.step("train", lambda: ran.append("train") or [])
    proof.step("parity", lambda: ran.append("parity") or [], needs=("train",), cuda_ep=True)
    proof.step("broken", lambda: 1 / 0)
    proof.step("after", lambda: ran.append("after") or [], needs=("broken",))

    assert ran == ["train"] and proof.failed == ["parity", "broken", "after"]
    text = proof.path.read_text()
    assert "not run: onnxruntime" in text and "install onnxruntime-gpu" in text
    assert "FAILED: ZeroDivisionError" in text and "not run: broken failed" in text


def test_make_bench_gpu_reports_why_it_did_not_run(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", fake_torch(0))
    assert "gpu" in discover() and "gpu_check" not in discover()

    (table,) = gpu.run(quick=True)

    assert table.rows[0][0].startswith("not run: torch 2.13.0 (CUDA 12.8) sees no CUDA device")


def test_the_script_refuses_on_this_cpu_host(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this host has CUDA: the proof would run instead of refusing")
    done = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--out", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "gpu_check: refused:" in done.stderr and "Traceback" not in done.stderr
