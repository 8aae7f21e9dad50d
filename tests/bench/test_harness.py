"""The bench harness: tables, discovery, the report file, failures and the exit status."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from bench import harness
from bench.harness import SHARED_MACHINE, Table, discover, machine_description, main, ratio

REPO = Path(__file__).resolve().parents[2]

GOOD = '''"""A benchmark that works.

More text that is not the description.
"""
from bench.harness import Table


def run(quick):
    return [Table("speed", ["variant", "ms"], [["fp32", 1.5], ["int8", 0.8]], notes=["quick" if quick else "full"])]
'''
BAD = '''"""A benchmark that breaks."""


def run(quick):
    raise RuntimeError("boom: the model file is missing")
'''


@pytest.fixture
def fake_bench(tmp_path, monkeypatch):
    """A package with one good and one failing benchmark, plus modules discovery must skip."""
    name = f"fakebench_{uuid.uuid4().hex[:8]}"
    pkg = tmp_path / name
    pkg.mkdir()
    for module, text in {"__init__": "", "good": GOOD, "bad": BAD, "harness": "", "_helpers": ""}.items():
        (pkg / f"{module}.py").write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def test_table_renders_markdown():
    table = Table("Speed", ["variant", "ms", "note"], [["fp32", 1234.5, None], ["a|b", 0.01234, "x"]], ["n1"])

    md = table.to_markdown()

    assert md.splitlines()[:5] == ["### Speed", "", "| variant | ms | note |", "| --- | --- | --- |",
                                   "| fp32 | 1,234 | — |"]
    assert "| a\\|b | 0.0123 | x |" in md and md.rstrip().endswith("- n1")


def test_table_rows_must_match_columns():
    with pytest.raises(ValueError, match="row 0 has 1 cells for 2 columns"):
        Table("t", ["a", "b"], [[1]])


def test_ratio_formats_a_factor():
    assert ratio(1.83, 1.0) == "1.83×"
    assert ratio(1, 3) == "0.33×"
    assert ratio(1, 0) == "n/a"


def test_machine_description_names_the_host(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # no NVML: GPU must read "none"

    text = machine_description()

    for key in ("CPU", "cores", "memory", "OS", "torch", "onnxruntime", "numpy", "date"):
        assert f"**{key}**" in text
    assert f"**Python**: {platform.python_version()}" in text
    assert "**GPU**: none" in text


def test_discover_skips_harness_and_private_modules(fake_bench):
    assert discover(fake_bench) == {"bad": "A benchmark that breaks.", "good": "A benchmark that works."}


def test_discover_finds_the_real_energy_benchmark():
    found = discover("bench")
    assert "energy" in found and "harness" not in found and found["energy"].startswith("Energy meters")


def test_report_has_machine_tables_and_failures_and_exits_nonzero(fake_bench, tmp_path):
    out = tmp_path / "results"

    status = main(["--quick", "--out", str(out)], package=fake_bench)

    assert status == 1
    [report] = out.glob("*-all.md")
    text = report.read_text()
    assert (out / "latest.md").read_text() == text
    assert text.startswith("# Benchmarks: all (quick)\n\n- **CPU**")
    assert SHARED_MACHINE in text
    assert "## good: A benchmark that works." in text
    assert "| fp32 | 1.50 |" in text and "- quick" in text
    assert "## bad: A benchmark that breaks. (FAILED)" in text
    assert "RuntimeError: boom: the model file is missing" in text


def test_named_run_writes_its_own_file_and_succeeds(fake_bench, tmp_path):
    status = main(["good", "--out", str(tmp_path)], package=fake_bench)

    assert status == 0
    [report] = tmp_path.glob("*-good.md")
    assert "- full" in report.read_text() and "FAILED" not in report.read_text()


def test_unknown_name_lists_known_benchmarks(fake_bench, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["nosuch", "--out", str(tmp_path)], package=fake_bench)

    assert exc.value.code == 2
    assert "unknown benchmark nosuch; known: bad, good" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.md"))


def test_python_dash_m_bench_rejects_unknown_names():
    proc = subprocess.run([sys.executable, "-m", "bench", "nosuch"], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2 and "known: " in proc.stderr and "energy" in proc.stderr


def test_energy_benchmark_runs_quick_and_labels_the_estimate():
    from bench import energy

    tables = energy.run(quick=True)

    md = "\n".join(t.to_markdown() for t in tables)
    assert [t.title for t in tables] == ["Energy meters available here", "CPU estimate on a fixed numpy workload"]
    assert "estimated:cpu-s×10W" in md and "picks **" in md


def test_run_one_rejects_a_benchmark_that_returns_no_tables(fake_bench, tmp_path):
    (tmp_path / fake_bench / "nothing.py").write_text('"""Returns nothing."""\n\ndef run(quick):\n    return None\n')

    outcome = harness.run_one(fake_bench, "nothing", "Returns nothing.", quick=True)

    assert outcome.error and "must return a list of Table" in outcome.error


OPTIONS = '''"""A benchmark with options of its own and a figure."""
from bench.harness import Table


def run(quick, args=None):
    def draw(path):
        path.write_bytes(b"png")
    return [Table("opts", ["args"], [[" ".join(args or [])]], figure=draw)]
'''


def test_options_after_one_benchmark_reach_it_and_name_the_report_and_its_figure(tmp_path, fake_bench):
    pkg = Path(__import__(fake_bench).__file__).parent
    (pkg / "opts.py").write_text(OPTIONS)

    assert main(["opts", "--heldout", "--seeds", "2", "--out", str(tmp_path)], package=fake_bench) == 0

    report = next(tmp_path.glob("*-opts-heldout.md"))
    text = report.read_text()
    assert "| --heldout --seeds 2 |" in text
    figure = report.with_name(f"{report.stem}-1.png")
    assert figure.read_bytes() == b"png" and f"![opts]({figure.name})" in text
    assert main(["good", "--heldout", "--out", str(tmp_path)], package=fake_bench) == 1  # good takes no options
    with pytest.raises(SystemExit):
        main(["good", "opts", "--heldout", "--out", str(tmp_path)], package=fake_bench)  # whose options?
