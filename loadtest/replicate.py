"""Replicated windows for a study on a noisy host: a config's value is the mean of its windows.

On a shared host one config's capacity varies by a factor of two from window to window, so a study that keeps
each config's single best window reports a winner's-cursed front: its best configs are partly the ones that
drew a lucky window. The remedy for noisy black-box search is replication (SMAC's intensification: a challenger
replaces the incumbent only once it has matched it on as many windows; noisy Bayesian optimization re-measures
the promising configs). Here, within the study's own window budget, a window may re-measure a config on the
current front instead of drawing a new one (:func:`next_replicate`), and the front, the best config and the
verification's finalists come from the per-config means (:func:`config_means`), not from single windows.
"""

from __future__ import annotations

import json
import statistics
from typing import Any

from loadtest.front import dominates


def params_key(params: dict[str, Any]) -> str:
    """A config's identity across windows and studies: its trial parameters, order-free."""
    return json.dumps(params, sort_keys=True)


def config_means(rows: list[dict[str, Any]], capacity: str, energy: str) -> list[dict[str, Any]]:
    """One row per config (trial rows grouped by their parameters), in first-measured order.

    ``capacity`` is the mean over the config's windows, a window that missed the SLO counting 0 (a config that
    holds the SLO only sometimes is worth less than one that always does); ``energy`` is the mean of the windows'
    readings. The row is otherwise the window nearest that mean among those that met the SLO (its concurrency is
    where the verification measures), with ``windows``, ``feasible_windows``, ``window_capacities`` and
    ``trials`` added; ``feasible`` when some window met the SLO."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(params_key(row["params"]), []).append(row)
    out = []
    for members in groups.values():
        values = [r[capacity] if r.get("feasible") else 0.0 for r in members]
        joules = [r[energy] for r in members if r.get(energy) is not None]
        mean = statistics.fmean(values)
        feasible = [r for r in members if r.get("feasible")]
        nearest = min(feasible or members, key=lambda r: abs(r[capacity] - mean))
        out.append({**nearest, capacity: mean, energy: statistics.fmean(joules) if joules else None,
                    "feasible": bool(feasible), "trial": members[0]["trial"], "trials": [r["trial"] for r in members],
                    "windows": len(members), "feasible_windows": len(feasible), "window_capacities": values,
                    "baseline": any(r.get("baseline") for r in members)})
    return out


def front(configs: list[dict[str, Any]], capacity: str, energy: str) -> list[dict[str, Any]]:
    """The feasible configs no other feasible config dominates on (``capacity`` ↑, ``energy`` ↓), highest
    capacity first."""
    feasible = [c for c in configs if c.get("feasible") and c[capacity] > 0 and c.get(energy) is not None]
    point = {id(c): (-c[capacity], c[energy]) for c in feasible}  # both minimized
    kept = [c for c in feasible if not any(dominates(point[id(o)], point[id(c)]) for o in feasible)]
    return sorted(kept, key=lambda c: c[capacity], reverse=True)


def next_replicate(rows: list[dict[str, Any]], capacity: str, energy: str, replicates: int,
                   front_size: int, explore_first: int = 0) -> dict[str, Any] | None:
    """The parameters the next window re-measures, or None to draw a new config.

    The candidates are the ``front_size`` highest-capacity configs of the per-config front: the first of them
    measured fewer than ``replicates`` times is measured again. A new config whose one window puts it on the
    front is therefore re-measured before the study trusts it, and drops off if its mean does not hold. At most
    every other window is a re-measurement (never two in a row), and none comes before ``explore_first`` windows
    (the sampler's random start), so at least half the budget still explores."""
    if replicates <= 1 or len(rows) < max(1, explore_first) or rows[-1].get("replicate"):
        return None
    for config in front(config_means(rows, capacity, energy), capacity, energy)[:front_size]:
        if config["windows"] < replicates:
            return dict(config["params"])
    return None
