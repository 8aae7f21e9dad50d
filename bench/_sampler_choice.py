"""``bench loadtest --generate-dev`` / ``--search-dev``: which Bayesian sampler ``loadtest --tune`` should use, decided
on a development serving task (a generation model's knobs / a classifier's batching knobs).

The serving goals are judged on digits and the charlm generation model (``bench loadtest``); choosing the sampler
by their tables would fit the tuner to the tasks it is judged on. Here Optuna's TPE and GP samplers
(``loadtest.tune.sampler = "gp"``) each search the knobs of a model the goals never see (the generation model of
:data:`bench._generate_search.DEV_TASK`, or the batching of :data:`bench._serving_search.DEV_TASK`'s
classifier), beside random search and the grid, the same number of windows each,
every seed's fronts re-measured side by side as the goal tables are (:func:`bench._serving_fronts._seed_result`).
Each sampler is judged by the goals' own rules against random search and the grid (not against the other
sampler), then the two head to head. The rules, each fixed before its first run: on the generation task (TPE was
the default then), GP replaces TPE as the stage's default only if it meets more of the goals' seeds than TPE; on
the batching task (:data:`bench._serving_search.DEV_TASK`, GP the default by then), the batching knobs keep GP
unless TPE meets more of them than GP.
"""

from __future__ import annotations

import statistics

from bench._serving_fronts import BAYESIAN, SAMPLER_NOTES, SEEDS, _seed_result
from bench.harness import Table

SAMPLERS = {name: sampler for sampler, name in BAYESIAN.items()}
"""The samplers compared: table name -> ``loadtest.tune.sampler``."""


def _yes(ok: bool) -> str:
    return "met" if ok else "NOT met"


GENERATE_RULE = ("the rule, fixed before the first run (TPE the default then): GP replaces TPE as "
                 "loadtest.tune.sampler's default only if it meets more goal seeds (the first two columns together) "
                 "than TPE on this development task")
BATCHING_RULE = ("the rule, fixed before the first run (GP the default then, chosen on the development generation "
                 "task): the batching knobs' search keeps GP unless TPE meets more goal seeds (the first two columns "
                 "together) than GP on this development task")


LATE_SAMPLERS = {"GP (Bayesian)": "gp+late0", "GP + late random draws": "gp+late0.5"}
"""``bench loadtest --late-dev``: the stage's GP with and without ``loadtest.tune.late_random``."""
LATE_RULE = ("the rule, fixed before the first run: loadtest.tune.late_random = 0.5 earns a default only if GP with "
             "it meets more goal seeds (the first two columns together) than GP without on this development task; "
             "both studies' first halves are drawn by the same seeded GP (their live windows differ, so its "
             "proposals after the startup trials can too)")


def sampler_tables(search, rule: str, samplers: dict[str, str] = SAMPLERS) -> list[Table]:
    """Per seed, each sampler's goals against random search and the grid; then per sampler, over the seeds; ``rule``:
    how the summary decides the stage's sampler, written before the run; ``samplers``: table name -> method."""
    windows = search.grid_size() + 1  # the baseline, then every grid point
    half = windows // 2
    seeds = SEEDS[:1] if search.quick else SEEDS
    grid = search.study("grid", 0, windows)
    rows, tally = [], {name: {"capacity": 0, "volume": 0, "head": 0, "caps": []} for name in samplers}
    for seed in seeds:
        methods = {name: search.study(method, seed, windows) for name, method in samplers.items()}
        methods |= {"random": search.study("random", seed, windows), "grid": grid}
        res = _seed_result(search, seed, methods, half, judged=tuple(samplers))
        volumes, grid_cap = res["volumes"], res["grid_best"][1]
        best_volume = max(volumes[name] for name in samplers)
        for name in samplers:
            cap = res["halves"][name][1]
            rivals = [volumes["random"], volumes["grid"]]
            won = {"capacity": cap >= grid_cap, "volume": volumes[name] >= max(rivals),
                   "head": volumes[name] >= best_volume}
            for goal, ok in won.items():
                tally[name][goal] += ok
            tally[name]["caps"].append(cap)
            rows.append([seed, name, f"{cap:,.0f} vs {grid_cap:,.0f}", _yes(won["capacity"]),
                         f"{volumes[name]:.3f} vs {volumes['random']:.3f} / {volumes['grid']:.3f}",
                         _yes(won["volume"]), f"{res['best_cap'][name]:,.0f}", search.label(res["best"][name])])
    unit = search.unit
    per_seed = Table(
        f"Samplers on the development serving task ({', '.join(search.models)}), each judged by the goals' rules",
        ["seed", "sampler", f"best in {half} windows vs the grid's best in {windows} ({unit}, re-measured)",
         "≥ grid with ≤ half the windows", "hypervolume vs random / grid (re-measured)", "highest of three",
         f"re-measured best cap./inst. ({unit})", "best config (re-measured)"], rows,
        [*search.notes(windows),
         "each sampler's goals are judged as the goal tables judge the stage's (against random search and the grid, "
         "every front re-measured side by side in one stretch per seed), not against the other sampler",
         "; ".join(f"{name.split(' (')[0]}: {SAMPLER_NOTES[sampler]}" for name, sampler in samplers.items())
         + f"; each {search.tune.startup_trials} startup trials (the baseline and random draws)"])
    n = len(seeds)
    summary = Table(
        "Samplers over the seeds: which one the stage should use",
        ["sampler", "capacity goal met", "hypervolume highest vs random and grid", "higher hypervolume of the two",
         f"median best in {half} windows ({unit}, re-measured)"],
        [[name, f"{t['capacity']}/{n}", f"{t['volume']}/{n}", f"{t['head']}/{n}",
          f"{statistics.median(t['caps']):,.0f}"] for name, t in tally.items()],
        [rule])
    return [per_seed, summary]
