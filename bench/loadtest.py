"""Serving knobs on a live Triton: the queue-bound sweep, and loadtest --tune's Bayesian search vs grid and random.

A tiny digits model is trained and compressed (fp32 and int8), Triton serves it, and every serving
config is applied live through model control (no restart) and measured with locust, Triton direct.

1. The sweep (``loadtest --sweep``): queue bound × delay × instances at concurrency 1 and 16. Triton 2.51's
   batcher stalls ≈500 ms at a time under any queue policy: goal, the unbounded queue ≥ 3× the bounded one
   at concurrency 1.
2. The search (``loadtest --tune``'s own study code): TPE (Bayesian), random and the grid over the same knob
   ranges, each with the same number of measured windows (the baseline, then one step-ladder window per
   trial), several seeds. Goals: TPE's best feasible capacity per instance within half the windows ≥ the
   grid's best over all of them, and the highest hypervolume of the three on every seed. Then the best TPE
   config against the repository's default, both re-measured side by side and verified in steady windows.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from bench.harness import Table, ratio

TINY = ["train.max_steps=60", "train.eval_every=60", "train.batch_size=64", "train.eval_batches=2",
        "task.model={channels=8, hidden=32, dropout=0.0}", "measure.repeats=3", "measure.warmup=1",
        "measure.batch_sizes=[1]", "compress.exporter='legacy'", "compress.variants=['fp32', 'int8']",
        "compress.max_metric_loss=1.0", "compress.quantize.calibration_batches=2"]
SLO_P95_MS = 20.0
SEEDS = (0, 1, 2)


def _release(workdir: Path):
    from autoglm.config import load_settings
    from autoglm.train import train_run
    from compress.stage import compress_run

    settings = load_settings(None, [f"run.root='{workdir / 'runs'}'", f"run.cache_dir='{workdir / 'cache'}'",
                                    "run.name=bench", "loadtest.users=16", "loadtest.slo_p95_ms=50", *TINY])
    train_run(settings, progress=False)
    compress_run(settings, progress=False)
    return settings


def _sweep(settings, triton, quick: bool) -> dict:
    from autoglm.config import SweepGrid
    from loadtest.stage import loadtest_run

    grid = SweepGrid(max_queue_size=[256, 0], max_queue_delay_us=[0, 2000], instances=[1] if quick else [1, 2],
                     users=[1, 16], window_s=3 if quick else 6)
    sweep = settings.loadtest.model_copy(update={"triton_url": triton.http_url, "metrics_url": triton.metrics_url,
                                                 "scenario": "triton", "sweep": True, "grid": grid, "overhead": False})
    loadtest_run(settings.model_copy(update={"loadtest": sweep}), force=True, progress=False)
    return json.loads((Path(settings.run.root) / "bench" / "loadtest" / "report.json").read_text())


def _fmt(value, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def _sweep_tables(report: dict, quick: bool) -> list[Table]:
    rows, front = report["rows"], set(report["front"])
    recommended = (report["recommended"] or {}).get("point")
    energy = report["energy_label"]
    table = [[r["id"], r["max_queue_size"] or "unbounded", r["max_queue_delay_us"], r["instances"], r["users"],
              f"{r['rps']:,.0f}", _fmt(r["p50_ms"]), _fmt(r["p95_ms"]), _fmt(r["p99_ms"]), _fmt(r["mean_batch"]),
              _fmt(r["mean_queue_us"]), _fmt(r["j_per_request"] * 1e3 if r["j_per_request"] else None),
              ("front" if r["id"] in front else "") + (" ★" if r["id"] == recommended else "")] for r in rows]
    points = Table("Operating points (Triton direct, one digits image per request)",
                   ["point", "queue bound", "delay µs", "instances", "users", "req/s", "p50 ms", "p95 ms", "p99 ms",
                    "mean batch", "queue µs", f"mJ/request ({energy})", "front / ★"], table,
                   [f"{'3' if quick else '6'} s measured per point after spawning and a 1 s warm-up; each config "
                    "applied to the running Triton through model control (no restart)",
                    f"★ recommended: {(report['recommended'] or {}).get('why', 'nothing met the SLO')}",
                    f"energy: {report['energy_note']}"])

    def rps(queue, users, delay=0, instances=1):
        match = [r["rps"] for r in rows if r["max_queue_size"] == queue and r["users"] == users
                 and r["max_queue_delay_us"] == delay and r["instances"] == instances]
        return match[0] if match else None

    comparisons = []
    for users in (1, 16):
        bounded, unbounded = rps(256, users), rps(0, users)
        if bounded and unbounded:
            comparisons.append([f"unbounded / bounded (256) queue, throughput @{users}", ratio(unbounded, bounded),
                                "≥ 3×" if users == 1 else ""])
    delayed, plain = rps(0, 16, delay=2000), rps(0, 16)
    if delayed and plain:
        comparisons.append(["2000 µs / 0 µs queue delay, throughput @16 (unbounded)", ratio(delayed, plain), ""])
    ratios = Table("Ratios", ["comparison", "value", "goal"], comparisons,
                   ["one run on a shared 2-core machine (the load generator shares the cores): compare adjacent "
                    "cells, not absolute figures"])
    return [points, ratios]


def hypervolume(points: list[tuple[float, float]], ref_j: float) -> float:
    """Area dominated by (capacity ↑, J/request ↓) points, bounded by capacity 0 and J/request ``ref_j``."""
    area, reached = 0.0, 0.0
    for capacity, joules in sorted(((c, j) for c, j in points if j < ref_j and c > 0), key=lambda p: p[1]):
        if capacity > reached:
            area += (capacity - reached) * (ref_j - joules)
            reached = capacity
    return area


def _space(quick: bool):
    """The knob ranges every method searches: both variants, max batch 16..64, the queue delay 0..4000 µs and
    1..2 instances; its grid (the ranges' ends) is 16 configs."""
    from autoglm.config import LoadtestTuneSettings

    return LoadtestTuneSettings(variants=["all"], max_batch_size=(16, 64), preferred_batch_sizes=[[]],
                                max_queue_delay_us=(0, 4000), delay_step_us=500,
                                instances=(1, 1) if quick else (1, 2), users=12, steps=3, step_s=1.5,
                                startup_trials=4, verify_s=4 if quick else 8)


class Search:
    """The studies of one bench run: one Triton, one payload file, one energy source, the same baseline."""

    def __init__(self, settings, triton, workdir: Path, quick: bool):
        from loadtest.control import LiveModels, ModelControl, serving_knobs
        from loadtest.energy_join import EnergySource
        from loadtest.latency import Slo
        from loadtest.payloads import build_payloads, write_payloads
        from loadtest.space import baseline_params
        from loadtest.study import Window

        self.workdir, self.quick, self.tune = workdir, quick, _space(quick)
        repository = Path(settings.run.root) / "bench" / "repository"
        self.task_info = json.loads((repository / "task.json").read_text())
        self.models = sorted(set(self.task_info["models"].values()))
        if quick:
            self.models = [self.task_info["recommended"]]
        payloads = write_payloads(workdir / "payloads.json", build_payloads(settings, self.task_info, 128, 1, 8))
        energy = EnergySource(settings.measure.energy, settings.measure.watts_per_core, urls=(triton.http_url,))
        self.window = Window("triton", triton.http_url, payloads, triton.metrics_url, energy,
                             Slo(SLO_P95_MS, 0.01), self.tune.users, self.tune.steps, self.tune.step_s, 0.5)
        self.live = LiveModels(ModelControl(triton.http_url))
        default = self.task_info["recommended"]
        self.baseline = baseline_params(default, serving_knobs(self.live.base(default)))

    def grid_size(self) -> int:
        from loadtest.space import TuneSpace

        grid = TuneSpace.from_settings(self.tune, self.models).grid()
        size = 1
        for values in grid.values():
            size *= len(values)
        return size

    def study(self, method: str, seed: int | None, windows: int) -> list[dict]:
        """``windows`` trials of ``method`` (the baseline first), in order."""
        from loadtest.space import TuneSpace
        from loadtest.study import Objective, make_sampler, open_study, run_study, trial_rows

        tune = self.tune.model_copy(update={"sampler": method, "seed": seed})
        space = TuneSpace.from_settings(tune, self.models)
        sampler = make_sampler(tune, space)
        space = space.with_baseline(self.baseline)
        name = f"{method}-{seed}"
        study = open_study(self.workdir / "studies" / f"{name}.journal", name, sampler)
        print(f"bench loadtest: {name}, {windows} windows", flush=True)
        objective = Objective(self.live, space, self.window, self.workdir / "trials" / name, windows,
                              lambda line: print(line, flush=True))
        try:
            run_study(study, objective, windows, self.baseline)
        finally:
            self.live.restore()
        return trial_rows(study)

    def verify(self, rows: list[dict]) -> dict | None:
        from loadtest.study import verify

        try:
            verified, _ = verify(self.live, rows, self.window, self.tune.verify_s, 1, self.workdir / "verify")
        finally:
            self.live.restore()
        return verified


def _best(rows: list[dict], upto: int | None = None) -> float:
    """The best feasible capacity per instance among the first ``upto`` windows (0 when none was feasible)."""
    return max((r["capacity_per_instance_rps"] for r in rows[:upto] if r.get("feasible")), default=0.0)


def _front_points(rows: list[dict]) -> list[tuple[float, float]]:
    return [(r["capacity_per_instance_rps"], r["j_per_request"]) for r in rows if r.get("feasible")]


def _label(row: dict | None) -> str:
    if not row:
        return "—"
    c = row["config"]
    return (f"{c['model']} max batch {c['max_batch_size']}, delay {c['max_queue_delay_us']} µs, "
            f"×{c['instances']}")


def _search_tables(search: Search) -> list[Table]:
    windows = search.grid_size() + 1  # the baseline, then every grid point
    half = windows // 2
    seeds = SEEDS[:1] if search.quick else SEEDS
    grid = search.study("grid", 0, windows)
    runs = {seed: {"tpe": search.study("tpe", seed, windows), "random": search.study("random", seed, windows)}
            for seed in seeds}
    grid_best = _best(grid)
    rows, goals = [], []
    for seed in seeds:
        methods = {"TPE (Bayesian)": runs[seed]["tpe"], "random": runs[seed]["random"], "grid": grid}
        points = [p for trials in methods.values() for p in _front_points(trials)]
        ref_j = 1.1 * max((j for _, j in points), default=1.0)  # one reference per seed, shared by the methods
        top = max((c for c, _ in points), default=1.0)
        volumes = {name: hypervolume(_front_points(trials), ref_j) / (top * ref_j)
                   for name, trials in methods.items()}
        for name, trials in methods.items():
            best = max((r for r in trials if r.get("feasible")), key=lambda r: r["capacity_per_instance_rps"],
                       default=None)
            rows.append([seed if name != "grid" else f"{seed} (one grid run)", name, len(trials),
                         sum(bool(r.get("feasible")) for r in trials), f"{_best(trials, half):,.0f}",
                         f"{_best(trials):,.0f}", f"{volumes[name]:.3f}", _label(best)])
        tpe = runs[seed]["tpe"]
        goals.append([seed, f"{_best(tpe, half):,.0f} vs {grid_best:,.0f}",
                      "met" if _best(tpe, half) >= grid_best else "NOT met",
                      "met" if volumes["TPE (Bayesian)"] >= max(volumes.values()) else "NOT met"])
    search_table = Table(
        "Search over the same knob ranges, the same number of measured windows each",
        ["seed", "method", "windows", "feasible", f"best cap./inst. in {half} windows", "best cap./inst. (req/s)",
         "hypervolume (norm.)", "best config"], rows,
        [f"knobs: variant {search.models}, max batch 16..64, queue delay 0..4000 µs (500 µs steps), instances "
         f"{list(search.tune.instances)}; the grid is every variant and instance count with both ends of the "
         f"other ranges ({windows - 1} configs)",
         f"every method starts at the baseline (the repository's config: {search.baseline}); a window is one "
         f"step ladder {search.tune.users // search.tune.steps}..{search.tune.users} users, "
         f"{search.tune.step_s:g} s a step; capacity = the best step's req/s within p95 <= {SLO_P95_MS:g} ms and "
         "1% errors, per instance",
         "hypervolume: of the feasible (capacity per instance ↑, J/request ↓) front, normalized by the seed's best "
         "capacity × a reference of 1.1 × the seed's worst J/request (energy estimated: CPU-seconds × watts)",
         "the grid is deterministic, so it ran once and every seed is compared with that run"])
    studies = [grid, *(trials for seed in seeds for trials in runs[seed].values())]
    baselines = [t[0]["capacity_per_instance_rps"] for t in studies if t and t[0]["baseline"]]
    spread = (f"the repository default is every study's first window: measured {len(baselines)} times, feasible "
              f"{sum(c > 0 for c in baselines)} times, capacity per instance {min(baselines):,.0f}..."
              f"{max(baselines):,.0f} req/s (0: missed the SLO at every step)" if baselines else "")
    goal_table = Table("Goals", ["seed", f"TPE best in {half} windows vs grid best in {windows}",
                                 "TPE ≥ grid with ≤ half the windows", "TPE hypervolume highest of three"], goals,
                       ["measured on a shared 2-core machine where the load generator and other jobs compete with "
                        "Triton, so one config's capacity varies from window to window: " + spread,
                        "TPE and random with the same seed draw the same first trials (TPE starts with "
                        f"{search.tune.startup_trials} random ones); they differ from then on"])
    return [search_table, goal_table, _default_vs_verified(search, runs)]


def _default_vs_verified(search: Search, runs: dict) -> Table:
    """The best TPE config over every seed against the repository default, re-measured side by side: one step
    ladder each, then a steady verification window at each one's capacity concurrency."""
    trials = [r for seed in runs for r in runs[seed]["tpe"] if r.get("feasible") and not r["baseline"]]
    best = max(trials, key=lambda r: r["capacity_per_instance_rps"], default=None)
    rows = []
    fresh = search.study("tpe", 99, 1)  # the default's ladder, measured now (the baseline trial)
    for name, row in (("repository default", fresh[0] if fresh else None), ("best TPE config", best)):
        if row is None:
            rows.append([name, "—", "—", "—", "—", "nothing feasible"])
            continue
        verified = search.verify([row]) if row.get("feasible") else None
        rows.append([name, _label(row), f"{row['capacity_per_instance_rps']:,.0f}",
                     f"{verified['capacity_per_instance_rps']:,.0f}" if verified else "misses the SLO",
                     _fmt(verified["j_per_request"] * 1e3) if verified else "—",
                     f"{verified['users']} users, p95 {verified['p95_ms']:.1f} ms" if verified else "—"])
    return Table("Verified config vs the repository default", ["config", "knobs", "ladder cap./inst. (req/s)",
                 "verified cap./inst. (req/s)", "mJ/request (estimated)", "verification window"], rows,
                 [f"steady {search.tune.verify_s:g} s windows at the capacity concurrency; the best TPE config is "
                  "taken from the search above and measured again here"])


def run(quick: bool) -> list[Table]:
    from serve.triton import TritonServer, free_port

    with tempfile.TemporaryDirectory(prefix="autoglm-bench-loadtest-") as tmp:
        workdir = Path(tmp)
        settings = _release(workdir)
        triton = TritonServer(workdir / "runs" / "bench" / "repository" / "python", workdir=workdir / "triton",
                              http_port=free_port(), grpc_port=free_port(), metrics_port=free_port())
        with triton.start(timeout_s=90):
            sweep = _sweep_tables(_sweep(settings, triton, quick), quick)
            search = _search_tables(Search(settings, triton, workdir, quick))
    return [*sweep, *search]
