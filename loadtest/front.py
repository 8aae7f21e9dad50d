"""Operating points as flat rows, the served Pareto front, and the recommended serving config.

A row is one measured window at one serving config and one client concurrency. The front is over
(p95 latency ↓, J/request ↓, throughput ↑). A serving config's capacity is the highest throughput it
reached while meeting the SLO at some measured concurrency; the recommendation is the config with the
highest capacity per model instance (what one more replica adds when deploy scales out), ties within
5% broken by lower J/request, then lower p95.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from autoglm.energy import ensure_comparable
from loadtest.latency import Slo

TIE = 0.05  # capacities within 5% are a tie: run-to-run noise on a shared host is about that size
CONFIG_FIELDS = ("model", "max_queue_delay_us", "preferred_batch_sizes", "instances", "max_queue_size",
                 "max_batch_size")
ROW_FIELDS = ("id", "scenario", *CONFIG_FIELDS, "users",
              "requests", "failures", "rps", "p50_ms", "p95_ms", "p99_ms", "error_rate", "j_per_request",
              "energy_method", "mean_batch", "mean_queue_us", "mean_compute_us", "generator_saturated", "passed")


def point_row(point: dict[str, Any]) -> dict[str, Any]:
    """Flatten a joined window (with its ``config``) into the row the front, CSV and plots use."""
    window, energy = point["window"], point.get("energy") or {}
    triton = point.get("triton") or {}
    config = point.get("config") or {}
    return {
        "id": point["id"], "scenario": point["scenario"], **{key: config.get(key) for key in CONFIG_FIELDS},
        "model": point["model"], "users": point["users"],
        "requests": window["requests"], "failures": window["failures"],
        "rps": window["rps"], "p50_ms": window["p50_ms"], "p95_ms": window["p95_ms"], "p99_ms": window["p99_ms"],
        "error_rate": window["error_rate"], "j_per_request": energy.get("j_per_request"),
        "energy_method": energy.get("method"), "mean_batch": triton.get("mean_batch") if triton.get("valid") else None,
        "mean_queue_us": triton.get("mean_queue_us") if triton.get("valid") else None,
        "mean_compute_us": triton.get("mean_compute_us") if triton.get("valid") else None,
        "generator_saturated": bool(point.get("generator_saturated")), "passed": bool(point["slo"]["passed"]),
    }


def _objectives(row: dict[str, Any], with_energy: bool) -> tuple[float, ...]:
    values = (row["p95_ms"], -row["rps"])  # both minimized
    return (*values, row["j_per_request"]) if with_energy else values


def dominates(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    """Whether ``a`` is no worse than ``b`` in every (minimized) objective and better in one."""
    return all(x <= y for x, y in zip(a, b, strict=True)) and any(x < y for x, y in zip(a, b, strict=True))


def pareto_front(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Ids of the non-dominated rows over (p95 ↓, J/request ↓, throughput ↑).

    Rows without requests are left out. Energy counts only when every row has it, from one method
    (ValueError otherwise: measured and estimated joules are never compared).
    """
    usable = [r for r in rows if r["requests"] and r["p95_ms"] is not None]
    with_energy = bool(usable) and all(r["j_per_request"] is not None for r in usable)
    if with_energy:
        ensure_comparable({"method": r["energy_method"]} for r in usable)
    objectives = {r["id"]: _objectives(r, with_energy) for r in usable}
    return [r["id"] for r in usable
            if not any(dominates(other, objectives[r["id"]]) for oid, other in objectives.items() if oid != r["id"])]


def config_key(row: dict[str, Any]) -> tuple:
    """The serving config a row was measured at (everything but the client side)."""
    return tuple(tuple(row[k]) if isinstance(row.get(k), list) else row.get(k) for k in CONFIG_FIELDS)


def capacities(rows: Sequence[dict[str, Any]], slo: Slo) -> list[dict[str, Any]]:
    """Per serving config: the best row that meets ``slo`` and its throughput (None when no row meets it)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(config_key(row), []).append(row)
    out = []
    for key, members in groups.items():
        passing = [r for r in members if not slo.breaches(r)]
        best = max(passing, key=lambda r: r["rps"], default=None)
        instances = key[CONFIG_FIELDS.index("instances")] or 1
        config = {k: list(v) if isinstance(v, tuple) else v for k, v in zip(CONFIG_FIELDS, key, strict=True)}
        out.append({"config": config, "point": best["id"] if best else None,
                    "capacity_rps": best["rps"] if best else None,
                    "capacity_per_instance_rps": best["rps"] / instances if best else None,
                    "j_per_request": best["j_per_request"] if best else None,
                    "p95_ms": best["p95_ms"] if best else None,
                    "points": [r["id"] for r in members]})
    return out


def ranked(candidates: Sequence[dict[str, Any]], capacity: str = "capacity_per_instance_rps",
           energy: str = "j_per_request") -> list[dict[str, Any]]:
    """Configs with a capacity, best first: the highest ``capacity`` per instance, where capacities within TIE of
    the best remaining one count as equal and the lower ``energy`` (J/request; then p95) goes first."""
    inf = float("inf")
    left = [c for c in candidates if c[capacity]]
    out = []
    while left:
        top = max(c[capacity] for c in left)
        close = [c for c in left if c[capacity] >= (1 - TIE) * top]
        chosen = min(close, key=lambda c: (c[energy] if c.get(energy) is not None else inf,
                                           c["p95_ms"] if c.get("p95_ms") is not None else inf))
        out.append(chosen)
        left.remove(chosen)
    return out


def recommend(rows: Sequence[dict[str, Any]], slo: Slo) -> dict[str, Any] | None:
    """The serving config to deploy (see the module docstring), with its capacity and why; None if none
    meets the SLO."""
    candidates = [c for c in capacities(rows, slo) if c["capacity_rps"] is not None]
    if not candidates:
        return None
    chosen = ranked(candidates)[0]
    top = max(c["capacity_per_instance_rps"] for c in candidates)
    close = [c for c in candidates if c["capacity_per_instance_rps"] >= (1 - TIE) * top]
    why = (f"highest throughput per instance within the SLO (p95 <= {slo.p95_ms:g} ms, errors <= "
           f"{slo.error_rate:.2%}): {chosen['capacity_per_instance_rps']:.0f} req/s per instance"
           + (f"; {len(close)} configs within {TIE:.0%} of it, the lowest J/request chosen" if len(close) > 1 else ""))
    return {**chosen, "why": why}
