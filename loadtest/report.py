"""``loadtest/report.json``, ``points.csv`` and ``tradeoff.png``: the served latency / energy / throughput picture.

Every energy figure carries its method; a measured and an estimated figure never share an axis
(:func:`autoglm.energy.ensure_comparable` refuses the mix upstream).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from autoglm.artifacts import atomic_output, write_atomic
from loadtest.front import ROW_FIELDS, config_key


def energy_label(method: str | None) -> str:
    """How an energy figure is labelled everywhere: 'measured (rapl)' or 'estimated (cpu-s×10W)'."""
    if not method:
        return "unavailable"
    if method.startswith("estimated"):
        return f"estimated ({method.partition(':')[2] or method})"
    return f"measured ({method})"


def write_report_json(path: Path, report: dict[str, Any]) -> Path:
    return write_atomic(path, (json.dumps(report, indent=2, sort_keys=True, default=str) + "\n").encode())


def write_points_csv(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    """One line per operating point (preferred batch sizes as '8;16')."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=ROW_FIELDS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        out = dict(row)
        if isinstance(out.get("preferred_batch_sizes"), list):
            out["preferred_batch_sizes"] = ";".join(map(str, out["preferred_batch_sizes"]))
        writer.writerow(out)
    return write_atomic(path, buffer.getvalue().encode())


def config_label(key: tuple) -> str:
    """A serving config (in CONFIG_FIELDS order) as a legend entry."""
    model, delay, preferred, instances, queue, max_batch = key
    parts = [model]
    if delay is not None:
        parts.append(f"delay {delay} µs")
    if preferred is not None:
        parts.append(f"pref {list(preferred)}")
    if instances is not None:
        parts.append(f"×{instances}")
    if queue is not None:
        parts.append(f"queue {queue or 'unbounded'}")
    if max_batch is not None:
        parts.append(f"max batch {max_batch}")
    return ", ".join(parts)


def plot_tradeoff(path: Path, rows: Sequence[dict[str, Any]], front: Sequence[str], slo_p95_ms: float,
                  recommended_point: str | None = None) -> Path:
    """Three panels against throughput: p95 latency (SLO line), J/request, mean batch; one line per
    serving config through its concurrencies, the Pareto front ringed, the recommended point starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    usable = [r for r in rows if r["requests"]]
    method = next((r["energy_method"] for r in usable if r["energy_method"]), None)
    panels = [("p95_ms", "p95 latency (ms)"), ("j_per_request", f"J/request, {energy_label(method)}"),
              ("mean_batch", "mean batch (Triton)")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in usable:
        groups.setdefault(config_key(row), []).append(row)
    for (field, label), ax in zip(panels, axes, strict=True):
        for key, members in groups.items():
            pts = sorted((r["rps"], r[field]) for r in members if r[field] is not None)
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=config_label(key))
        for row in usable:
            if row[field] is None:
                continue
            if row["id"] in front:
                ax.scatter(row["rps"], row[field], s=160, facecolors="none", edgecolors="black", linewidths=1.2)
            if row["id"] == recommended_point:
                ax.scatter(row["rps"], row[field], s=260, marker="*", color="gold", edgecolors="black", zorder=5)
        if field == "p95_ms":
            ax.axhline(slo_p95_ms, color="red", linestyle="--", linewidth=1, label=f"SLO p95 {slo_p95_ms:g} ms")
            ax.set_yscale("log")
        ax.set_xlabel("throughput (req/s)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="best")
    fig.suptitle("served trade-off: one line per serving config through its client concurrencies "
                 "(ringed: Pareto front, star: recommended)", fontsize=10)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path
