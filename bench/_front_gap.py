"""How well a search's reported front predicts its re-measurement: the in-study vs re-measured gap.

On a shared host a study that trusts single windows reports a winner's-cursed front (its best configs partly
the ones that drew lucky windows), so its front looks better in the study than when measured again. Per method
and seed: each front config's re-measured / in-study capacity and the front's hypervolume both ways under one
reference; then the same over the seeds.
"""

from __future__ import annotations

import statistics

from bench._serving_fronts import FRONT_CAP, hypervolume
from bench._serving_search import Search, key
from bench.harness import Table


def front_gaps(search: Search, fronts: dict[str, list[dict]], again: dict[str, dict]) -> dict[str, dict]:
    """Per method, how its reported front (per-config means) compares with the same configs re-measured: each
    config's re-measured / in-study capacity, their mean |error|, and the front's hypervolume both ways under one
    reference (the seed's worst energy figure × 1.1 and best capacity among every front, reported or
    re-measured)."""
    cap, energy = search.capacity, search.energy
    reported = {n: [(r[cap], r[energy]) for r in front] for n, front in fronts.items()}
    measured = {n: [(again[key(r["params"])][cap], again[key(r["params"])][energy]) for r in front
                    if again[key(r["params"])][cap] > 0 and again[key(r["params"])][energy] is not None]
                for n, front in fronts.items()}
    points = [p for group in (reported, measured) for front in group.values() for p in front]
    ref_j = 1.1 * max((j for _, j in points), default=1.0)
    scale = (max((c for c, _ in points), default=1.0) or 1.0) * ref_j
    out = {}
    for name, front in fronts.items():
        ratios = [again[key(r["params"])][cap] / r[cap] for r in front if r[cap] > 0]
        out[name] = {"windows": [r.get("windows", 1) for r in front], "ratios": ratios,
                     "error": statistics.fmean(abs(x - 1) for x in ratios) if ratios else None,
                     "reported": hypervolume(reported[name], ref_j) / scale,
                     "measured": hypervolume(measured[name], ref_j) / scale}
    return out


def gap_tables(gaps: list[tuple[int, dict[str, dict]]], unit: str) -> list[Table]:
    """The in-study vs re-measured gap of every method's front, per seed and over the seeds."""
    rows = []
    for seed, per_method in gaps:
        for name, g in per_method.items():
            rows.append([seed, name, " ".join(map(str, g["windows"])) or "—",
                         " ".join(f"{x:.2f}" for x in g["ratios"]) or "—",
                         "—" if g["error"] is None else f"{g['error']:.0%}", f"{g['reported']:.3f}",
                         f"{g['measured']:.3f}", f"{g['measured'] / g['reported']:.2f}" if g["reported"] else "—"])
    names = list(gaps[0][1]) if gaps else []
    summary = []
    for name in names:
        errors = [g[name]["error"] for _, g in gaps if g[name]["error"] is not None]
        kept = [g[name]["measured"] / g[name]["reported"] for _, g in gaps if g[name]["reported"]]
        summary.append([name, len(gaps), f"{statistics.median(errors):.0%}" if errors else "—",
                        f"{max(errors):.0%}" if errors else "—", f"{statistics.median(kept):.2f}" if kept else "—",
                        f"{min(kept):.2f}" if kept else "—"])
    return [Table("How well each study's reported front predicts its re-measurement",
                  ["seed", "method", "windows per front config (in study)",
                   f"re-measured / in-study cap./inst. ({unit}), per front config",
                   "mean |error|", "front hypervolume, in-study", "front hypervolume, re-measured",
                   "re-measured / in-study hypervolume"], rows,
                  [f"a method's reported front: its {FRONT_CAP} highest-capacity non-dominated configs by the mean of "
                   "their in-study windows; re-measured: the same configs' medians in the side-by-side rounds above",
                   "both hypervolumes of a seed under one reference (1.1 × the worst energy figure and the best "
                   "capacity among every method's front, reported or re-measured), so a ratio near 1 means the study "
                   "reported what a re-measurement finds; below 1, its front was partly lucky windows"]),
            Table("In-study vs re-measured gap over the seeds", ["method", "seeds", "median of the seeds' mean "
                  "|error|", "worst seed's mean |error|", "median re-measured / in-study hypervolume",
                  "lowest re-measured / in-study hypervolume"], summary,
                  ["with loadtest.tune.replicates > 1 (BENCH_LOADTEST_REPLICATES) the Bayesian sampler re-measures "
                   "the configs on its front within its window budget; random and the grid draw a new config every "
                   "window"])]
