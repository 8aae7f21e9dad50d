"""The release page: every stage's part, energy labels, self-contained, and it renders in headless Chromium."""

import json
import re
import struct

import pytest

from autoglm.artifacts import RunDir
from autoglm.errors import MissingExtraError
from loadtest.front import pareto_front, recommend
from loadtest.latency import Slo
from loadtest.release import write_release_page
from loadtest.report import energy_label, plot_tradeoff, write_points_csv, write_report_json
from tests.loadtest.test_front import row

EST = "estimated:cpu-s×10W"


@pytest.fixture
def release(tmp_path):
    """A run directory holding tune, compress and loadtest outputs in their real formats."""
    run = RunDir(tmp_path / "runs", "rel")
    tune, compress, lt = (run.stage_dir(s) for s in ("tune", "compress", "loadtest"))
    for d in (tune, compress, lt):
        d.mkdir(parents=True)
    points = [{"trial": t, "objectives": {"metric": m, "latency": lat, "energy": e}, "variant": v,
               "compute": {"energy_method": EST}} for t, m, lat, e, v in
              [(3, 0.985, 0.27, 8e-5, "pruned-int8"), (5, 0.990, 0.41, 1.2e-4, "fp32")]]
    (tune / "pareto.json").write_text(json.dumps({"objectives": ["metric", "latency", "energy"], "points": points}))
    (tune / "selected.json").write_text(json.dumps({**points[0], "why": {"rule": "constraints, then weights"}}))
    profile = {"1": {"p50_ms": 0.035, "j_per_item": 0.0011, "energy_method": EST},
               "32": {"p50_ms": 0.3, "j_per_item": 0.0002, "energy_method": EST}}
    variants = [{"name": n, "status": "ok", "metrics": {"accuracy": a}, "metric_loss": 0.0, "size_bytes": 140_000,
                 "profile": profile, "reason": ""} for n, a in (("fp32", 0.985), ("int8", 0.983))]
    (compress / "variants.json").write_text(json.dumps({"variants": variants, "recommended": "int8", "why": "fastest"}))
    slo = Slo(20, 0.01)
    rows = [row("p00", 300, 2, users=1), row("p01", 1200, 12), row("p02", 1300, 15, instances=2)]
    front, chosen = pareto_front(rows), recommend(rows, slo)
    plot_tradeoff(lt / "tradeoff.png", rows, front, slo.p95_ms, chosen["point"])
    write_points_csv(lt / "points.csv", rows)
    write_report_json(lt / "report.json", {
        "scenario": "task", "slo": {"p95_ms": 20, "error_rate": 0.01}, "gate": {"passed": True, "reasons": []},
        "energy_method": EST, "energy_note": "CPU-seconds of the serving processes", "rows": rows, "front": front,
        "recommended": chosen, "points": [],
        "overhead": {"users": 8, "summary": "0.70x", "gateway": rows[1], "direct": rows[2]}})
    return run


def test_page_ties_the_release_together_and_labels_energy(release):
    page = write_release_page(release, "digits").read_text()
    assert page.count("<h2>") == 3
    assert "Tuning: Pareto front (2 points)" in page and "Compression: 2 variants" in page
    assert "Serving: 3 operating points" in page and "PASSED" in page
    assert "m-fp32, delay 0 µs, ×1" in page  # the recommended serving config, by name
    assert page.count("estimated (cpu-s×10W)") >= 4  # tune, compress (per batch), serving table and plot
    assert not re.search(r"measured \((rapl|nvml)", page)  # nothing here came from a hardware counter


def test_page_is_self_contained(release):
    page = write_release_page(release).read_text()
    images = re.findall(r'<img [^>]*src="([^"]{0,40})', page)
    assert len(images) == 2 and all(src.startswith("data:image/png;base64,") for src in images)
    assert not re.search(r'(src|href)="(https?:)?//', page)  # no remote scripts, styles or images


def test_missing_stages_are_stated_not_fatal(tmp_path):
    page = write_release_page(RunDir(tmp_path, "bare")).read_text()
    assert "tune has not run" in page and "compress has not run" in page and "loadtest has not run" in page


def test_energy_labels():
    assert energy_label(EST) == "estimated (cpu-s×10W)"
    assert energy_label("rapl") == "measured (rapl)" and energy_label(None) == "unavailable"


def test_page_renders_in_headless_chromium(release, tmp_path):
    from loadtest.render_check import screenshot

    page = write_release_page(release, "digits")
    try:
        png = screenshot(page, tmp_path / "shot.png", width=1200, height=2000)
    except MissingExtraError as exc:
        pytest.skip(f"{exc} (the CI image installs it)")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", data[16:24]) == (1200, 2000)
    import matplotlib.image

    pixels = matplotlib.image.imread(str(png))[..., :3]
    drawn = (pixels < 0.9).any(axis=-1).mean()
    assert len(data) > 50_000 and drawn > 0.05, f"the screenshot looks blank ({drawn:.1%} of pixels drawn)"
