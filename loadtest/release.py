"""``runs/<run>/report.html``: the release page that ties one run together, self-contained and offline.

Tune's Pareto front and selected point (``tune/pareto.json``, ``selected.json``), compress's variants
table (``compress/variants.json``), the served trade-off and the recommended serving config
(``loadtest/report.json``, ``tradeoff.png``). Every energy figure says whether it is measured or
estimated. Images are inlined as data URIs; links to the stage reports are relative and optional.
Stages that have not run are shown as such, so the page is useful at any point of the pipeline.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from autoglm.artifacts import RunDir, write_atomic
from loadtest.front import CONFIG_FIELDS
from loadtest.report import config_label, energy_label

STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1150px;color:#222}
h1{margin-bottom:.2em}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;font-size:13px;margin:.6em 0}
td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}.ok{color:#070;font-weight:bold}
.bad{color:#b00;font-weight:bold}.note{color:#666;font-size:13px}img{max-width:100%;border:1px solid #eee}
.card{background:#f7f9fc;border:1px solid #dde;padding:.8em 1.2em;border-radius:6px}tr.hi td{background:#fff7d6}"""


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return html.escape(str(value))


def _table(headers: list[str], rows: list[list[Any]], highlight: set[int] = frozenset()) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(f"<tr{' class=hi' if i in highlight else ''}>" + "".join(f"<td>{_fmt(v)}</td>" for v in row)
                   + "</tr>" for i, row in enumerate(rows))
    return f"<table><tr>{head}</tr>{body}</table>"


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _tune_plot(points: list[dict], selected_trial: int | None, energy: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    xs = [p["objectives"].get("latency") for p in points]
    ys = [p["objectives"].get("metric") for p in points]
    cs = [p["objectives"].get("energy", 0.0) for p in points]
    scatter = ax.scatter(xs, ys, c=cs, cmap="viridis", s=50)
    fig.colorbar(scatter, ax=ax, label=f"J/inference, {energy}")
    for p, x, y in zip(points, xs, ys, strict=True):
        if p["trial"] == selected_trial:
            ax.scatter([x], [y], s=260, marker="*", color="gold", edgecolors="black", zorder=5, label="selected")
    ax.set_xlabel("p95 latency at the serving batch (ms)")
    ax.set_ylabel("metric")
    ax.grid(alpha=0.3)
    if selected_trial is not None:
        ax.legend(fontsize=8)
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()


def _tune_section(run: RunDir) -> str:
    pareto = _read(run.stage_dir("tune") / "pareto.json")
    if not pareto or not pareto.get("points"):
        return "<h2>1. Tuning</h2><p class=note>tune has not run for this release (the model came from " \
               "`autoglm train` or compress.checkpoint).</p>"
    selected = _read(run.stage_dir("tune") / "selected.json") or {}
    points = pareto["points"]
    methods = {p.get("compute", {}).get("energy_method") for p in points} - {None}
    energy = _shared_energy_label(methods)
    objectives = pareto.get("objectives", ["metric", "latency", "energy"])
    rows = [[p["trial"], *(p["objectives"].get(o) for o in objectives), p.get("variant")] for p in points]
    chosen = {i for i, p in enumerate(points) if p["trial"] == selected.get("trial")}
    headers = ["trial", *[f"energy (J/inference, {energy})" if o == "energy" else o for o in objectives], "variant"]
    why = selected.get("why", {}).get("rule", "")
    link = '<a href="tune/report.html">tune/report.html</a>' if (run.stage_dir("tune") / "report.html").is_file() \
        else "no tune report"
    return (f"<h2>1. Tuning: Pareto front ({len(points)} points)</h2>"
            f"{_img(_tune_plot(points, selected.get('trial'), energy), 'tune Pareto front')}"
            f"{_table(headers, rows, chosen)}<p class=note>selected trial {_fmt(selected.get('trial'))} "
            f"(highlighted): {html.escape(why)}. Full study: {link}.</p>")


def _shared_energy_label(methods: set[str]) -> str:
    """The label of the one energy method a table's figures share; a warning when they mix methods."""
    return energy_label(next(iter(methods))) if len(methods) == 1 else "mixed methods: do not compare"


def _compress_section(run: RunDir) -> str:
    table = _read(run.stage_dir("compress") / "variants.json")
    if not table:
        return "<h2>2. Compression</h2><p class=note>compress has not run for this release.</p>"
    variants = table["variants"]
    batches = sorted({int(b) for v in variants for b in v.get("profile", {})})
    methods = {p.get("energy_method") for v in variants for p in v.get("profile", {}).values()} - {None}
    energy = _shared_energy_label(methods)
    metric_names = sorted({k for v in variants for k in v.get("metrics", {})})
    headers = ["variant", "status", *metric_names, "metric loss", "size (KB)",
               *[f"p50 ms @{b}" for b in batches], *[f"J/item @{b} ({energy})" for b in batches], "reason"]
    rows, chosen = [], set()
    for i, v in enumerate(variants):
        profile = {int(b): p for b, p in v.get("profile", {}).items()}
        rows.append([v["name"], v["status"], *(v.get("metrics", {}).get(m) for m in metric_names),
                     v.get("metric_loss"), v.get("size_bytes", 0) / 1024 if v.get("size_bytes") else None,
                     *(profile.get(b, {}).get("p50_ms") for b in batches),
                     *(profile.get(b, {}).get("j_per_item") for b in batches), v.get("reason") or ""])
        if v["name"] == table.get("recommended"):
            chosen.add(i)
    return (f"<h2>2. Compression: {len(variants)} variants</h2>{_table(headers, rows, chosen)}"
            f"<p class=note>recommended variant {_fmt(table.get('recommended'))} (highlighted): "
            f"{html.escape(table.get('why', ''))}. Offline timing in one process, not served.</p>")


def _serving_section(run: RunDir) -> str:
    report = _read(run.stage_dir("loadtest") / "report.json")
    if not report:
        return "<h2>3. Serving</h2><p class=note>loadtest has not run for this release.</p>"
    energy = energy_label(report.get("energy_method"))
    slo, gate, rec = report["slo"], report["gate"], report.get("recommended")
    verdict = "<span class=ok>PASSED</span>" if gate["passed"] else "<span class=bad>FAILED</span>"
    reasons = "".join(f"<li>{html.escape(r)}</li>" for r in gate.get("reasons", []))
    card = "<p class=bad>no serving config met the SLO</p>"
    if rec:
        key = tuple(rec["config"].get(k) for k in CONFIG_FIELDS)
        card = (f"<p><b>{html.escape(config_label(key))}</b>: capacity {_fmt(rec['capacity_rps'])} req/s within the "
                f"SLO ({_fmt(rec['capacity_per_instance_rps'])} req/s per instance), p95 {_fmt(rec['p95_ms'])} ms, "
                f"{_fmt(rec['j_per_request'])} J/request ({energy}).</p><p class=note>{html.escape(rec['why'])}</p>")
    rows = report.get("rows", [])
    front = set(report.get("front", []))
    headers = ["point", "model", "delay µs", "preferred", "instances", "queue bound", "users", "req/s", "p50 ms",
               "p95 ms", "p99 ms", "errors", f"J/request ({energy})", "mean batch", "queue µs", "front", "SLO"]
    table = [[r["id"], r["model"], r["max_queue_delay_us"], r["preferred_batch_sizes"], r["instances"],
              "unbounded" if r.get("max_queue_size") == 0 else r.get("max_queue_size"), r["users"],
              r["rps"], r["p50_ms"], r["p95_ms"], r["p99_ms"], r["error_rate"], r["j_per_request"], r["mean_batch"],
              r["mean_queue_us"], r["id"] in front, r["passed"]] for r in rows]
    chosen = {i for i, r in enumerate(rows) if rec and r["id"] == rec.get("point")}
    plot = run.stage_dir("loadtest") / "tradeoff.png"
    overhead = report.get("overhead")
    extra = ""
    if overhead:
        extra = (f"<h3>Gateway overhead at {overhead['users']} users</h3>"
                 + _table(["path", "req/s", "p50 ms", "p95 ms", f"J/request ({energy})"],
                          [[name, o["rps"], o["p50_ms"], o["p95_ms"], o["j_per_request"]]
                           for name, o in (("through the gateway", overhead["gateway"]),
                                           ("Triton direct", overhead["direct"]))])
                 + f"<p class=note>{html.escape(overhead['summary'])}</p>")
    saturated = [r["id"] for r in rows if r.get("generator_saturated")]
    if saturated:
        extra += (f"<p class=bad>The load generator ran out of CPU in {', '.join(saturated)}: throughput there is "
                  "a client limit, not the server's capacity.</p>")
    phases = [(p["id"], ph) for p in report.get("points", []) for ph in p.get("phases", []) if len(p["phases"]) > 1]
    if phases:
        extra += "<h3>Load-shape phases</h3>" + _table(
            ["point", "phase", "requests", "req/s", "p50 ms", "p95 ms", "errors"],
            [[pid, ph["phase"], ph["requests"], ph["rps"], ph["p50_ms"], ph["p95_ms"], ph["error_rate"]]
             for pid, ph in phases])
    plural = "s" if len(rows) != 1 else ""
    return (f"<h2>3. Serving: {len(rows)} operating point{plural} ({html.escape(report['scenario'])} scenario)</h2>"
            f"<div class=card><p>SLO p95 ≤ {_fmt(slo['p95_ms'])} ms, error rate ≤ {_fmt(slo['error_rate'])}: "
            f"{verdict}</p><ul>{reasons}</ul>{card}</div>"
            f"{_img(plot.read_bytes(), 'served trade-off') if plot.is_file() else ''}"
            f"{_table(headers, table, chosen)}{extra}<p class=note>Energy: {energy}; "
            f"{html.escape(report.get('energy_note', ''))}</p>")


def write_release_page(run: RunDir, task: str | None = None) -> Path:
    """Write ``runs/<run>/report.html`` from whatever stages have completed; returns its path."""
    title = f"AutoGLM release {html.escape(run.name)}" + (f": {html.escape(task)}" if task else "")
    body = _tune_section(run) + _compress_section(run) + _serving_section(run)
    page = (f"<!doctype html><html><head><meta charset=utf-8><title>{title}</title><style>{STYLE}</style></head>"
            f"<body><h1>{title}</h1><p class=note>tune → compress → serve. Energy figures are labelled measured "
            f"(a hardware counter) or estimated (CPU-seconds × watts per core); the two are never compared.</p>"
            f"{body}</body></html>")
    return write_atomic(run.path / "report.html", page.encode())
