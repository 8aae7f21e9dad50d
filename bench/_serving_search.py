"""The studies of the loadtest search benchmark: ``loadtest --tune``'s sampler, random and the grid, each driven on one
live Triton, and the side-by-side re-measurement of the configs they chose.

Each method runs the stage's own study code (:mod:`loadtest.study`) over the same knob ranges with the same
number of measured windows, on digits' batching knobs (:class:`Search`) or on the charlm generation model's
own knobs (:class:`bench._generate_search.GenerateSearch`: capacity in tokens/s, a streaming SLO). On a shared
host one config's window varies by a factor of two, so :meth:`Search.remeasure` measures chosen configs again
round-robin in one stretch and keeps the median of the rounds; :mod:`bench._serving_fronts` judges the goals on
those figures. ``BENCH_LOADTEST_REPLICATES=3`` makes the sampler re-measure its front within its window budget
(:mod:`loadtest.replicate`; the stage's default is 1, off).
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

SLO_P95_MS = 20.0
ROUNDS = 3  # side-by-side re-measurements per config: the median of three shrugs off one disturbed window


def replicates() -> int:
    """The sampler's ``loadtest.tune.replicates`` in the search: the stage's default, or ``BENCH_LOADTEST_REPLICATES``
    (the ablation of re-measuring the front within the window budget)."""
    from autoglm.config import LoadtestTuneSettings

    value = os.environ.get("BENCH_LOADTEST_REPLICATES")
    return int(value) if value else LoadtestTuneSettings.model_fields["replicates"].default


def _space(quick: bool):
    """The knob ranges every method searches: both variants, max batch 16..64, the queue delay 0..4000 µs and
    1..2 instances; its grid (the ranges' ends) is 16 configs."""
    from autoglm.config import LoadtestTuneSettings

    return LoadtestTuneSettings(variants=["all"], max_batch_size=(16, 64), preferred_batch_sizes=[[]],
                                max_queue_delay_us=(0, 4000), delay_step_us=500,
                                instances=(1, 1) if quick else (1, 2), users=12, steps=3, step_s=1.5,
                                startup_trials=4, verify_s=4 if quick else 8,
                                replicates=replicates())


DEV_TASK = "synthetic-classification"
"""The development batching task (``--search-dev``): the tuning pool's small tabular classifier (an MLP, fp32 and
int8 like digits; :mod:`bench.pool`, a development task there too), served with the same batching knobs."""


def key(params: dict) -> str:
    """A config's identity across studies (the trial parameters, order-free)."""
    return json.dumps(params, sort_keys=True)


class Search:
    """The studies of one bench run: one Triton, one payload file, one energy source, the same baseline."""

    capacity, energy, unit = "capacity_per_instance_rps", "j_per_request", "req/s"  # the objectives' keys

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

    def space(self, tune):
        from loadtest.space import TuneSpace

        return TuneSpace.from_settings(tune, self.models)

    def label(self, row: dict | None) -> str:
        if not row:
            return "—"
        c = row["config"]
        return (f"{c['model']} max batch {c['max_batch_size']}, delay {c['max_queue_delay_us']} µs, "
                f"×{c['instances']}")

    def verified_note(self, verified: dict) -> str:
        return f"{verified['users']} users, p95 {verified['p95_ms']:.1f} ms"

    def notes(self, windows: int) -> list[str]:
        """What the search table's knobs and windows were."""
        return [f"knobs: variant {self.models}, max batch 16..64, queue delay 0..4000 µs (500 µs steps), instances "
                f"{list(self.tune.instances)}; the grid is every variant and instance count with both ends of the "
                f"other ranges ({windows - 1} configs)",
                f"every method starts at the baseline (the repository's config: {self.baseline}); a window is one "
                f"step ladder {self.tune.users // self.tune.steps}..{self.tune.users} users, "
                f"{self.tune.step_s:g} s a step; capacity = the best step's req/s within p95 <= {SLO_P95_MS:g} ms "
                "and 1% errors, per instance, steps out of order pooled (loadtest.space.monotone_rps)"]

    def grid_size(self) -> int:
        grid = self.space(self.tune).grid()
        size = 1
        for values in grid.values():
            size *= len(values)
        return size

    def study(self, method: str, seed: int | None, windows: int) -> list[dict]:
        """``windows`` trials of ``method`` (the baseline first), in order."""
        from loadtest.study import Objective, make_sampler, open_study, replicates_of, run_study, trial_rows

        sampler_name, _, late = method.partition("+late")  # "gp+late0.5": GP with loadtest.tune.late_random 0.5
        tune = self.tune.model_copy(update={"sampler": sampler_name, "seed": seed,
                                            "late_random": float(late) if late else self.tune.late_random})
        space = self.space(tune)
        sampler = make_sampler(tune, space, windows)
        space = space.with_baseline(self.baseline)
        name = f"{method}-{seed}"
        study = open_study(self.workdir / "studies" / f"{name}.journal", name, sampler)
        print(f"bench loadtest: {name}, {windows} windows", flush=True)
        objective = Objective(self.live, space, self.window, self.workdir / "trials" / name, windows,
                              lambda line: print(line, flush=True))
        try:
            run_study(study, objective, windows, self.baseline, replicates_of(tune), tune.verify_candidates,
                      tune.startup_trials)
        finally:
            self.live.restore()
        return trial_rows(study)

    def remeasure(self, configs: list[dict], label: str) -> dict[str, dict]:
        """Each config's ladder measured ``ROUNDS`` times round-robin in one stretch: per config, the median
        capacity per instance (a round that missed the SLO counts 0) and the median J/request (J/token)."""
        space = self.space(self.tune)
        unique = {key(c): c for c in configs}
        rounds: dict[str, list[tuple[float, float | None]]] = {k: [] for k in unique}
        try:
            for r in range(ROUNDS):
                for i, (k, params) in enumerate(unique.items()):
                    config = space.to_config(params)
                    self.live.apply(config)
                    window = self.window.measure(config.model, self.workdir / "remeasure" / label / f"{r}-{i}",
                                                 self.tune.users, self.tune.steps * self.tune.step_s, shape="step")
                    result = space.result(window["phases"], self.window.slo, config.instances or 1)
                    capacity = result[self.capacity] if result["feasible"] else 0.0
                    rounds[k].append((capacity, _energy(window, self.energy)))
        finally:
            self.live.restore()
        out = {}
        for k, measured in rounds.items():
            joules = [j for _, j in measured if j is not None]
            out[k] = {self.capacity: statistics.median(c for c, _ in measured),
                      self.energy: statistics.median(joules) if joules else None,
                      "rounds": [c for c, _ in measured]}
        print(f"bench loadtest: re-measured {len(unique)} configs x {ROUNDS} ({label})", flush=True)
        return out

    def verify(self, rows: list[dict], candidates: int = 1) -> dict | None:
        """The stage's verification of ``rows`` (its ``candidates`` best feasible configs, and the baseline
        beside them when ``rows`` hold it): the verified config, or None."""
        from loadtest.study import verify

        try:
            verified, _ = verify(self.live, rows, self.window, self.tune.verify_s, candidates, self.workdir / "verify",
                                 space=self.space(self.tune))
        finally:
            self.live.restore()
        return verified


def _energy(window: dict, energy: str) -> float | None:
    """A window's J/request, or J/token for a stream window."""
    if energy == "j_per_token":
        from loadtest.generate_space import j_per_token

        return j_per_token(window)
    return (window.get("energy") or {}).get(energy)
