"""Can this host decide the digits search goals? A few configs' ladder windows repeated, several estimators.

The search benchmark judges TPE against the grid on capacities whose windows vary by more than the configs
differ. Here three configs (the repository default and two ends of the knob ranges) are each measured
``repeats`` times round-robin with the study's own window (one step ladder), and every window is read by
several capacity estimators:

* the study's (:func:`loadtest.space.trial_result`: the best step within the SLO, out-of-order steps pooled);
* the top step alone, unpooled;
* the top two steps within the SLO pooled (requests over seconds);
* requests per CPU-second of Triton's processes over the whole window (the energy meter's CPU-seconds: a cost,
  not a throughput, and less exposed to the load generator and other jobs taking the cores).

For each: the spread of one config (coefficient of variation, highest / lowest), and how many windows per config
a two-sided 5% test with 80% power would need to tell two configs apart at the difference measured here.
"""

from __future__ import annotations

import math
import statistics

from bench.harness import Table

ESTIMATORS = ("study's capacity (pooled ladder)", "top step alone", "top two steps pooled",
              "requests per CPU-second of Triton")


def _top(steps: list[dict], n: int) -> float:
    top = sorted(steps, key=lambda s: s["users"])[-n:]
    seconds = sum(s.get("seconds") or 0.0 for s in top)
    return sum(s.get("requests") or 0 for s in top) / seconds if seconds > 0 else 0.0


def estimates(window: dict, slo, watts_per_core: float) -> dict[str, float]:
    """Every estimator's reading of one step-ladder window (0 where nothing met the SLO)."""
    from loadtest.space import ladder_steps, trial_result

    study = trial_result(window["phases"], slo, 1)
    passing = [s for s in ladder_steps(window["phases"]) if not slo.breaches(s)]
    j = (window.get("energy") or {}).get("j_per_request")
    return {ESTIMATORS[0]: study["capacity_rps"] if study["feasible"] else 0.0,
            ESTIMATORS[1]: _top(passing, 1) if passing else 0.0, ESTIMATORS[2]: _top(passing, 2) if passing else 0.0,
            ESTIMATORS[3]: watts_per_core / j if j else 0.0}


def windows_needed(a: list[float], b: list[float]) -> float:
    """Windows per config for a two-sided 5% test with 80% power to separate means this far apart."""
    delta = abs(statistics.mean(a) - statistics.mean(b))
    var = (statistics.variance(a) + statistics.variance(b)) / 2
    return math.inf if delta == 0 else max(2.0, 2 * (1.96 + 0.84) ** 2 * var / delta ** 2)


def noise_tables(search, repeats: int, watts_per_core: float) -> list[Table]:
    """Measure the configs ``repeats`` times round-robin with ``search``'s window and tabulate the estimators."""
    from loadtest.space import to_config

    base = search.baseline
    other = next((m for m in search.models if m != base["model"]), base["model"])
    configs = {"repository default": base,
               "other variant, max batch 16": {**base, "model": other, "max_batch_size": 16},
               "queue delay 4000 µs": {**base, "max_queue_delay_us": 4000}}
    readings: dict[str, list[dict[str, float]]] = {name: [] for name in configs}
    try:
        for r in range(repeats):
            for i, (name, params) in enumerate(configs.items()):
                config = to_config(params)
                search.live.apply(config)
                window = search.window.measure(config.model, search.workdir / "noise" / f"{r}-{i}", search.tune.users,
                                               search.tune.steps * search.tune.step_s, shape="step")
                readings[name].append(estimates(window, search.window.slo, watts_per_core))
    finally:
        search.live.restore()
    rows, decide = [], []
    for est in ESTIMATORS:
        cvs = []
        for name, values in ((n, [w[est] for w in ws]) for n, ws in readings.items()):
            mean = statistics.mean(values)
            cv = statistics.stdev(values) / mean if mean and len(values) > 1 else math.inf
            cvs.append(cv)
            rows.append([est, name, f"{statistics.median(values):,.0f}",
                         f"{max(values) / min(values):.2f}×" if min(values) > 0 else "∞ (a window missed the SLO)",
                         f"{cv:.1%}", " ".join(f"{v:,.0f}" for v in values)])
        names = list(readings)
        pairs = [(names[0], n) for n in names[1:]]
        needs = [windows_needed([w[est] for w in readings[a]], [w[est] for w in readings[b]]) for a, b in pairs]
        decide.append([est, f"{statistics.median(cvs):.1%}",
                       *[f"{n:.0f}" if math.isfinite(n) else "∞" for n in needs]])
    spread = Table(f"Repeated windows: one config's capacity, {repeats} windows each, round-robin",
                   ["estimator", "config", "median", "highest / lowest", "CV", "windows"], rows,
                   [f"configs: {configs}", "req/s on one instance; the CPU estimator divides the window's "
                    "estimated joules back into CPU-seconds (÷ watts per core) of Triton and its stubs",
                    f"a window is the study's: a {search.tune.steps}-step ladder up to {search.tune.users} users, "
                    f"{search.tune.step_s:g} s a step, SLO p95 <= {search.window.slo.p95_ms:g} ms"])
    decision = Table("Windows per config to tell the default from each other config (5% two-sided, 80% power)",
                     ["estimator", "median CV", *[f"default vs {n}" for n in list(configs)[1:]]], decide,
                     ["from the differences and variances measured above; the search benchmark measures each front "
                      "config 3 times: a goal that needs more windows than that is decided by noise here"])
    return [spread, decision]
