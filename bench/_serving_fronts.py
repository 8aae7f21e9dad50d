"""The judging half of the loadtest search benchmark: each method's front, hypervolume and best capacity, in-study
and re-measured side by side, and the tables the goals are read from.

A method's in-study figures are partly its luck (one config's window varies by a factor of two on a shared host):
each seed therefore ends with a side-by-side re-measurement (:meth:`bench._serving_search.Search.remeasure`) of
every method's front configs and of the configs the capacity goal compares. The goals are judged on those
figures; the in-study ones are shown beside them. Every method's in-study figures are per-config means, so how
well each study's reported front predicts its re-measured one is a table of its own (:mod:`bench._front_gap`).
"""

from __future__ import annotations

import statistics

from bench._serving_search import ROUNDS, Search, key
from bench.harness import Table

SEEDS = (0, 1, 2)
FRONT_CAP = 2  # a method's front configs re-measured, highest capacity first (the windows it costs)
BAYESIAN = {"tpe": "TPE (Bayesian)", "gp": "GP (Bayesian)"}
"""``loadtest.tune.sampler``'s Bayesian samplers -> their name in the tables."""
SAMPLER_NOTES = {"tpe": "multivariate TPE", "gp": "Optuna's GPSampler",
                 "gp+late0.5": "Optuna's GPSampler for the first half of the windows, then every other window a "
                               "random draw (loadtest.tune.late_random = 0.5)", "gp+late0": "Optuna's GPSampler"}
"""What each of them is, for the tables' notes."""


def stage_sampler() -> str:
    """``loadtest --tune``'s default sampler (``loadtest.tune.sampler``): the method the goals judge."""
    from autoglm.config import LoadtestTuneSettings

    return LoadtestTuneSettings.model_fields["sampler"].default


def hypervolume(points: list[tuple[float, float]], ref_j: float) -> float:
    """Area dominated by (capacity ↑, J/request ↓) points, bounded by capacity 0 and J/request ``ref_j``."""
    area, reached = 0.0, 0.0
    for capacity, joules in sorted(((c, j) for c, j in points if j < ref_j and c > 0), key=lambda p: p[1]):
        if capacity > reached:
            area += (capacity - reached) * (ref_j - joules)
            reached = capacity
    return area


def _best_row(search: Search, rows: list[dict], upto: int | None = None) -> dict | None:
    """The feasible config with the best in-study capacity per instance (the mean of its windows) among the
    first ``upto`` windows."""
    from loadtest.replicate import config_means

    means = config_means(rows[:upto], search.capacity, search.energy)
    return max((r for r in means if r.get("feasible")), key=lambda r: r[search.capacity], default=None)


def _cap(search: Search, row: dict | None) -> float:
    return row[search.capacity] if row else 0.0


def front_rows(rows: list[dict], cap: str = "capacity_per_instance_rps", energy: str = "j_per_request") -> list[dict]:
    """A method's front as it reports it: by the per-config means of its windows, feasible, not dominated on
    capacity ↑ and energy ↓, its ``FRONT_CAP`` highest-capacity configs."""
    from loadtest.replicate import config_means, front

    return front(config_means(rows, cap, energy), cap, energy)[:FRONT_CAP]


def _volumes(fronts: dict[str, list[tuple[float, float]]]) -> dict[str, float]:
    """Each method's hypervolume with one reference per seed: 1.1 × the worst energy figure and the best capacity
    among every method's points."""
    points = [p for front in fronts.values() for p in front]
    ref_j = 1.1 * max((j for _, j in points), default=1.0)
    top = max((c for c, _ in points), default=1.0) or 1.0
    return {name: hypervolume(front, ref_j) / (top * ref_j) for name, front in fronts.items()}


def _points(search: Search, rows: list[dict]) -> list[tuple[float, float]]:
    """A study's feasible configs as (capacity, energy), each the mean of its windows."""
    from loadtest.replicate import config_means

    return [(r[search.capacity], r[search.energy]) for r in config_means(rows, search.capacity, search.energy)
            if r.get("feasible") and r.get(search.energy) is not None]


def _seed_result(search: Search, seed: int, methods: dict[str, list[dict]], half: int,
                 judged: tuple[str, ...]) -> dict:
    """One seed's figures: in-study (each method's own windows) and re-measured side by side; ``judged``: the
    methods whose best in their first ``half`` windows the capacity goal compares with the grid's best."""
    cap, energy = search.capacity, search.energy
    fronts = {name: front_rows(trials, cap, energy) for name, trials in methods.items()}
    halves = {name: _best_row(search, methods[name], half) for name in judged}
    grid_best = _best_row(search, methods["grid"])
    extra = [r["params"] for r in (*halves.values(), grid_best) if r]
    again = search.remeasure([r["params"] for front in fronts.values() for r in front] + extra, f"seed-{seed}")

    def measured(row: dict | None) -> dict | None:
        return again[key(row["params"])] if row else None

    re_points = {name: [(m[cap], m[energy]) for m in map(measured, front) if m[cap] > 0 and m[energy] is not None]
                 for name, front in fronts.items()}
    re_best = {name: max(front, key=lambda r: measured(r)[cap], default=None) for name, front in fronts.items()}
    from bench._front_gap import front_gaps

    return {"fronts": fronts, "again": again, "gap": front_gaps(search, fronts, again),
            "study_volumes": _volumes({n: _points(search, t) for n, t in methods.items()}),
            "volumes": _volumes(re_points), "best": re_best,
            "best_cap": {n: _cap(search, measured(r)) for n, r in re_best.items()},
            "halves": {name: (row, _cap(search, measured(row))) for name, row in halves.items()},
            "grid_best": (grid_best, _cap(search, measured(grid_best)))}


def search_tables(search: Search) -> list[Table]:
    from bench._front_gap import gap_tables

    windows = search.grid_size() + 1  # the baseline, then every grid point
    half = windows // 2
    seeds = SEEDS[:1] if search.quick else SEEDS
    grid = search.study("grid", 0, windows)
    rows, goals, spreads, gaps = [], [], [], []
    studies = [grid]
    unit, energy_name = search.unit, "J/token" if search.energy == "j_per_token" else "J/request"
    sampler = stage_sampler()
    bayes = BAYESIAN[sampler]
    short = bayes.split()[0]
    for seed in seeds:
        methods = {bayes: search.study(sampler, seed, windows),
                   "random": search.study("random", seed, windows), "grid": grid}
        studies += [methods[bayes], methods["random"]]
        res = _seed_result(search, seed, methods, half, (bayes,))
        gaps.append((seed, res["gap"]))
        spreads += [max(m["rounds"]) / min(m["rounds"]) for m in res["again"].values() if min(m["rounds"]) > 0]
        for name, trials in methods.items():
            rows.append([seed if name != "grid" else f"{seed} (one grid run)", name, len(trials),
                         len({key(r["params"]) for r in trials}), sum(bool(r.get("feasible")) for r in trials),
                         f"{_cap(search, _best_row(search, trials, half)):,.0f}",
                         f"{_cap(search, _best_row(search, trials)):,.0f}", f"{res['study_volumes'][name]:.3f}",
                         len(res["fronts"][name]), f"{res['best_cap'][name]:,.0f}", f"{res['volumes'][name]:.3f}",
                         search.label(res["best"][name])])
        (_, own_cap), (_, grid_cap) = res["halves"][bayes], res["grid_best"]
        volumes, study_volumes = res["volumes"], res["study_volumes"]
        goals.append([seed, f"{own_cap:,.0f} vs {grid_cap:,.0f}", "met" if own_cap >= grid_cap else "NOT met",
                      " / ".join(f"{volumes[n]:.3f}" for n in methods),
                      "met" if volumes[bayes] >= max(volumes.values()) else "NOT met",
                      "met" if study_volumes[bayes] >= max(study_volumes.values()) else "not met"])
    search_table = Table(
        "Search over the same knob ranges, the same number of measured windows each",
        ["seed", "method", "windows", "configs", "feasible", f"in-study best cap./inst. ({unit}) in {half} windows",
         "in-study best cap./inst.", "in-study hypervolume", "front configs re-measured",
         f"re-measured best cap./inst. (median of {ROUNDS})", "re-measured hypervolume", "best config (re-measured)"],
        rows,
        [*search.notes(windows),
         f"re-measured: per seed, each method's front (its {FRONT_CAP} highest-capacity non-dominated configs as it "
         f"measured them) plus the two configs the capacity goal compares, measured {ROUNDS} times round-robin in one "
         "stretch after that seed's studies; median per config (a round missing the SLO counts 0)",
         f"hypervolume: of the feasible (capacity per instance ↑, {energy_name} ↓) points, normalized by the "
         f"seed's best capacity × a reference of 1.1 × the seed's worst {energy_name} (energy estimated: "
         "CPU-seconds × watts)",
         "the grid is deterministic, so it ran once and its front is re-measured with every seed's"])
    baselines = [t[0][search.capacity] for t in studies if t and t[0]["baseline"]]
    spread = (f"the repository default is every study's first window: measured {len(baselines)} times, feasible "
              f"{sum(c > 0 for c in baselines)} times, capacity per instance {min(baselines):,.0f}..."
              f"{max(baselines):,.0f} {unit}" if baselines else "")
    goal_table = Table(
        "Goals (judged on the side-by-side re-measurement)",
        ["seed", f"{short}'s best in {half} windows vs the grid's best in {windows} (re-measured)",
         f"{short} ≥ grid with ≤ half the windows", f"hypervolume {short} / random / grid (re-measured)",
         f"{short} hypervolume highest of three", "(in-study hypervolume highest)"], goals,
        ["measured on a shared 2-core machine where the load generator and other jobs compete with Triton, so one "
         "config's capacity varies from window to window: " + spread
         + (f"; a re-measured config's highest round / lowest: median {statistics.median(spreads):.2f}×, up to "
            f"{max(spreads):.2f}×" if spreads else ""),
         f"{short}: the stage's default sampler ({SAMPLER_NOTES[sampler]}), {search.tune.startup_trials} startup "
         f"trials (the baseline and {search.tune.startup_trials - 1} random ones), so it and random with the same "
         "seed can share their first trials; "
         + (f"after those {search.tune.startup_trials}, a window that follows a new draw may re-measure one of its "
            f"{search.tune.verify_candidates} best front configs that has fewer than {search.tune.replicates} windows "
            "(loadtest.replicate); " if search.tune.replicates > 1
            else "every window a new draw (loadtest.tune.replicates 1); ")
         + "every in-study figure is a config's mean over its windows (a window missing the SLO counts 0), for "
         "every method"])
    return [search_table, goal_table, *gap_tables(gaps, unit),
            _default_vs_verified(search, studies[1::2], sampler)]


def _default_vs_verified(search: Search, studies: list[list[dict]], sampler: str) -> Table:
    """The best config the stage's ``sampler`` found over every seed against the repository default, re-measured
    side by side: one step ladder each, then a steady verification window at each one's capacity concurrency."""
    from loadtest.replicate import config_means

    cap, energy = search.capacity, search.energy
    configs = [c for study in studies for c in config_means(study, cap, energy)
               if c.get("feasible") and not c["baseline"]]  # each study's configs by the mean of their windows
    best = max(configs, key=lambda r: r[cap], default=None)
    rows = []
    fresh = search.study(sampler, 99, 1)  # the default's ladder, measured now (the baseline trial)
    short = BAYESIAN[sampler].split()[0]
    label, stage = f"best {short} config", f"what loadtest --tune verifies (seed 0's {short} study)"
    candidates = search.tune.verify_candidates
    for name, row in (("repository default", fresh[0] if fresh else None), (label, best), (stage, studies[0])):
        if not row:
            rows.append([name, "—", "—", "—", "—", "nothing feasible"])
            continue
        if name == stage:  # the stage's own verification of the study: its finalists and the served config
            verified = search.verify(row, candidates)
            row = next((c for c in config_means(row, cap, energy) if verified and c["trial"] == verified["trial"]),
                       None)
        else:
            verified = search.verify([row]) if row.get("feasible") else None
        served = name == stage and verified is not None and verified["baseline"]
        rows.append([name, search.label(row) + (" (the config served before the study)" if served else ""),
                     f"{row[cap]:,.0f}" if row else "—", f"{verified[cap]:,.0f}" if verified else "misses the SLO",
                     f"{verified[energy] * 1e3:.3g}" if verified and verified.get(energy) is not None else "—",
                     search.verified_note(verified) if verified else "—"])
    unit, per = search.unit, "token" if energy == "j_per_token" else "request"
    return Table("Verified config vs the repository default", ["config", "knobs", f"ladder cap./inst. ({unit})",
                 f"verified cap./inst. ({unit})", f"mJ/{per} (estimated)", "verification window"], rows,
                 [f"steady {search.tune.verify_s:g} s windows at the capacity concurrency; the {label} is "
                  "taken from the search above (every seed's study) and measured again here",
                  f"the last row: the stage's verification of one study, as `loadtest --tune` ends: its {candidates} "
                  "best feasible configs by their means and the config served before the study, each in a steady "
                  "window; the best that holds the SLO is the one written back"])
