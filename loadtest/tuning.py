"""The ``--tune`` mode of the loadtest stage: study, verification, report, write-back and manifest.

Called by :func:`loadtest.stage.loadtest_run` once the target, payloads and energy source are checked.
The study, its trial windows and the verification windows live in ``loadtest/tune/``; they are kept across
reruns (a rerun continues the study; the manifest pins the journal as the run left it).
When no config holds the SLO, the study and the report are still written, the repository is left as it
is, and the exit code is 1 (the SLO gate).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from autoglm.artifacts import RunDir, StageWriter, sha256_file
from autoglm.config import Settings
from autoglm.errors import AutoGLMError
from loadtest.control import LiveModels, ModelControl, model_parameters, serving_knobs
from loadtest.front import CONFIG_FIELDS
from loadtest.generate_space import GenerateSpace, StreamSlo
from loadtest.latency import Slo
from loadtest.replicate import config_means, front
from loadtest.space import TuneSpace, baseline_params
from loadtest.study import (JOURNAL, Objective, Space, Window, make_sampler, open_study, replicates_of, run_study,
                            trial_rows, users_ladder, verify)
from loadtest.sweep import sweep_models
from loadtest.writeback import capacity_record, write_back


def study_name(settings: Settings, space: Space, ladder: list[int], repository_inputs: dict) -> str:
    """Trials are comparable when measured the same way on the same models: a changed range, SLO, ladder, sampler
    or model starts a new study in the same journal (the dashboard lists them all)."""
    o, t = settings.loadtest, settings.loadtest.tune
    key = {"space": space.describe(), "slo": [o.slo_p95_ms, o.slo_error_rate], "scenario": o.scenario,
           "ladder": ladder, "step_s": t.step_s, "sampler": t.sampler, "seed": t.seed, "models": repository_inputs,
           "samples": [o.samples, o.per_request]}
    if replicates_of(t) > 1:  # re-measured windows change what a trial is: a study of its own
        key["replicates"] = t.replicates
    if isinstance(space, GenerateSpace):
        key["slo"] = [o.slo_ttft_p95_ms, o.slo_itl_p95_ms, o.slo_error_rate, o.generate_tokens]
    return "serving-" + hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]


def tune_space(settings: Settings, task_info: dict, model: str) -> Space:
    """The knobs of what is tuned: the generation model's (--scenario generate) or the batching variants'."""
    tune = settings.loadtest.tune
    if settings.loadtest.scenario == "generate":
        return GenerateSpace.from_settings(tune, model)
    return TuneSpace.from_settings(tune, sweep_models(task_info, tune.variants, model))


def tune_slo(settings: Settings, slo: Slo) -> Slo:
    """The SLO trials are judged on: a stream's is time to first token and inter-token latency."""
    o = settings.loadtest
    return StreamSlo.of(o.slo_ttft_p95_ms, o.slo_itl_p95_ms, o.slo_error_rate) if o.scenario == "generate" else slo


def trial_point_row(row: dict[str, Any], scenario: str) -> dict[str, Any]:
    """A trial as an operating-point row (:data:`loadtest.front.ROW_FIELDS`): its capacity step, with the
    window's J/request and Triton figures."""
    step = next((s for s in row["steps"] if s["users"] == row["users"]), {})
    requests = step.get("requests") or 0
    return {"id": f"t{row['trial']:03d}", "scenario": scenario, **{k: row["config"].get(k) for k in CONFIG_FIELDS},
            "users": row["users"], "requests": requests, "failures": round(requests * (step.get("error_rate") or 0)),
            "rps": step.get("rps") or 0.0, "p50_ms": step.get("p50_ms"), "p95_ms": step.get("p95_ms"),
            "p99_ms": None, "error_rate": step.get("error_rate") or 0.0, "j_per_request": row["j_per_request"],
            "energy_method": row["energy_method"], "mean_batch": row["mean_batch"],
            "mean_queue_us": row["mean_queue_us"], "mean_compute_us": None,
            "generator_saturated": row["generator_saturated"], "passed": row["feasible"]}


def _front(rows: list[dict[str, Any]], space: Space) -> list[int]:
    """Trial numbers of the feasible Pareto front by the per-config means (every window of a config on it)."""
    keys = (space.objective_key, space.energy_key)
    return sorted(n for c in front(config_means(rows, *keys), *keys) for n in c["trials"])


def _config_rows(rows: list[dict[str, Any]], space: Space) -> list[dict[str, Any]]:
    """Per config: its windows, their capacities and the means the front and the verification rank by."""
    keys = (space.objective_key, space.energy_key)
    return [{k: c[k] for k in ("params", "trials", "windows", "feasible_windows", "window_capacities", "feasible",
                               *keys)} for c in config_means(rows, *keys)]


def precheck(settings: Settings, task_info: dict, model: str, energy) -> None:
    """What can be refused before the last measurement is invalidated: unknown variants, models that cannot take
    the batching knobs (those Triton has loaded), and no way to measure J/request."""
    tune = settings.loadtest.tune
    space = tune_space(settings, task_info, model)
    users_ladder(tune, settings.loadtest.users)  # a ladder with more steps than users
    if energy.meter() is None:
        raise AutoGLMError(f"--tune minimizes J/request, and no energy can be measured here ({energy.unavailable})")
    control = ModelControl(settings.loadtest.urls(settings.serve)[1])
    for name in dict.fromkeys([model, *space.models]):
        if control.ready(name):  # the others are checked once the study loads them
            space.check_model_limits(name, control.config(name))


def tune_run(run: RunDir, writer: StageWriter, settings: Settings, task_info: dict, model: str, host: str,
             common: dict[str, Any], slo: Slo, api_key: str | None, progress: bool) -> dict[str, Any]:
    """Run the study and the verification; returns the report's parts (study, trials, verification)."""
    options, tune = settings.loadtest, settings.loadtest.tune
    show = print if progress else (lambda *a, **k: None)
    space = tune_space(settings, task_info, model)
    slo = tune_slo(settings, slo)
    control = ModelControl(options.urls(settings.serve)[1])
    live = LiveModels(control)
    users, steps = users_ladder(tune, options.users)
    try:
        for name in dict.fromkeys([model, *space.models]):
            space.check_model_limits(name, live.base(name))
        if isinstance(space, GenerateSpace):
            baseline = space.baseline_params(live.base(model))
        else:
            baseline = baseline_params(model, serving_knobs(live.base(model)))
        sampler = make_sampler(tune, space)  # a grid over the declared ranges only, not the baseline's values
        space = space.with_baseline(baseline)
        live_config = live.base(model)
        name = study_name(settings, space, steps, run.manifest("repository").inputs)
        journal = writer.dir / "tune" / JOURNAL
        study = open_study(journal, name, sampler)
        window = Window(options.scenario, host, common["payloads"], common["metrics_url"], common["energy"], slo,
                        users, tune.steps, tune.step_s, options.warmup_s, api_key)
        show(f"loadtest: tuning {len(space.models)} model(s) on {host}: study {name} in {journal} "
             f"({len(study.trials)} trials so far, {tune.n_trials} wanted; ladder {steps} users, {tune.step_s:g} s "
             f"a step); `optuna-dashboard {journal}` shows it")
        windows = writer.dir / "tune" / name  # per study: another study's windows stay (loadtest.records)
        objective = Objective(live, space, window, windows / "trials", tune.n_trials, show)
        ran = run_study(study, objective, tune.n_trials, baseline, replicates_of(tune), tune.verify_candidates,
                        tune.startup_trials)
        rows = trial_rows(study)
        verified, attempts = verify(live, rows, window, tune.verify_s, tune.verify_candidates,
                                    windows / "verify", show, space)
    except BaseException:
        try:
            live.restore()
        except AutoGLMError as exc:  # the failure that stopped the study is the one to report
            show(f"loadtest: {exc}")
        raise
    live.restore()
    base_row = next((r for r in rows if r["baseline"]), None)
    parts = {"study": {"journal": str(journal.relative_to(writer.dir)), "name": name, "sampler": tune.sampler,
                       "seed": tune.seed, "trials": len(study.trials), "measured": len(rows), "ran_now": ran,
                       "space": space.describe(), "ladder": steps, "step_s": tune.step_s,
                       "replicates": replicates_of(tune), "front": _front(rows, space),
                       "objectives": [space.objective_key, space.energy_key],
                       "slo": {k: v for k, v in vars(slo).items() if v != float("inf")}},
             "trials": rows, "configs": _config_rows(rows, space), "baseline": base_row, "verification": attempts,
             "verified": verified,
             "capacity_record": capacity_record(settings, live_config)}
    return parts


def recommended_of(verified: dict[str, Any] | None, slo: Slo, tune) -> dict[str, Any] | None:
    """The verified config in the shape a sweep recommends (config, capacity, point, why)."""
    if verified is None:
        return None
    config = {k: verified["config"].get(k) for k in CONFIG_FIELDS}
    stream = "capacity_per_instance_tps" in verified  # the generation model: its parameters, tokens/s, J/token
    if stream:
        config["parameters"] = verified["config"].get("parameters")
    held = (f"TTFT p95 <= {slo.ttft_p95_ms:g} ms, inter-token p95 <= {slo.itl_p95_ms:g} ms"
            if isinstance(slo, StreamSlo) else f"p95 <= {slo.p95_ms:g} ms")
    capacity = (f"{verified['capacity_per_instance_tps']:.0f} tokens/s ({verified['capacity_per_instance_rps']:.1f} "
                "req/s) per instance" if stream else f"{verified['capacity_per_instance_rps']:.0f} req/s per instance")
    return {"config": config, "point": f"t{verified['trial']:03d}", "capacity_rps": verified["capacity_rps"],
            "capacity_per_instance_rps": verified["capacity_per_instance_rps"], "p95_ms": verified["p95_ms"],
            "j_per_request": verified["j_per_request"], "users": verified["users"],
            "peak_rss_mib": verified.get("peak_rss_mib"),
            **({k: verified[k] for k in ("capacity_tps", "capacity_per_instance_tps", "ttft_p95_ms", "itl_p95_ms",
                                         "j_per_token")} if stream else {}),
            "why": (f"the best feasible trial that held the SLO ({held}, errors <= {slo.error_rate:.2%}) over a "
                    f"{tune.verify_s:g} s verification window at {verified['users']} users: {capacity}"
                    + ("; it is the config served before the study, which no trial beat when verified beside it"
                       if verified.get("baseline") else ""))}


def write_back_verified(run: RunDir, writer: StageWriter, recommended: dict[str, Any], study: dict[str, Any],
                        settings: Settings, progress: bool) -> dict[str, Any]:
    """Write the verified config into the repository, reload it on the live Triton from the files just written
    and check Triton reports it; the loadtest manifest then names the new repository manifest as its input."""
    lineage = {"loadtest": {"report": "loadtest/report.json", "sha256": sha256_file(writer.dir / "report.json"),
                            "study": f"loadtest/{study['journal']}", "study_name": study["name"]}}
    record = write_back(run, recommended["config"], lineage)
    rel = str(run.manifest_path("repository").relative_to(run.path))
    writer.manifest.inputs[rel] = sha256_file(run.manifest_path("repository"))
    record["live"] = _reload(settings, recommended["config"])
    if progress:
        print(f"loadtest: wrote {recommended['config']['model']} with {record['verified']} into "
              f"{run.stage_dir('repository')} ({len(record['changed'])} files; `autoglm loadtest --rollback` "
              f"restores the previous config); live Triton: {record['live']}")
    return record


def _reload(settings: Settings, verified: dict[str, Any]) -> str:
    """Reload the verified model from the repository on disk (unload, then load: an override would otherwise
    stay) and compare what Triton reports with what was written."""
    control = ModelControl(settings.loadtest.urls(settings.serve)[1])
    model = verified["model"]
    try:
        control.unload(model)
        control.load(model)
        config = control.config(model)
    except AutoGLMError as exc:
        return f"not reloaded ({exc})"
    knobs = {**serving_knobs(config), "parameters": model_parameters(config)}
    names = ("instances", "parameters") if verified.get("parameters") is not None else (
        "max_queue_delay_us", "preferred_batch_sizes", "instances", "max_batch_size")
    knobs["parameters"] = {k: knobs["parameters"].get(k) for k in verified.get("parameters") or {}}
    differs = {k: (knobs[k], verified[k]) for k in names if knobs[k] != verified[k]}
    if differs:
        raise AutoGLMError(f"Triton reloaded '{model}' from the written repository but reports {differs} "
                           "(reported, written): roll back with `autoglm loadtest --rollback` and check Triton's log")
    return f"reloaded {model} from the repository and it reports the written config"


def no_config_reason(tuned: dict[str, Any]) -> str:
    """The SLO gate's reason when nothing was verified."""
    feasible = sum(1 for r in tuned["trials"] if r.get("feasible"))
    missed = len(tuned["verification"])
    return (f"no serving config held the SLO: {feasible} of {len(tuned['trials'])} measured trials met it at some "
            f"step" + (f", and {missed} verification window(s) missed it" if missed else "")
            + "; relax loadtest.slo_p95_ms / slo_error_rate, or widen loadtest.tune's ranges")


def baseline_summary(row: dict[str, Any] | None) -> dict[str, Any] | None:
    """The baseline trial (the config served before the study) as the manifest records it."""
    if row is None:
        return None
    return {"config": {k: row["config"].get(k) for k in CONFIG_FIELDS}, "feasible": row["feasible"],
            "capacity_per_instance_rps": row["capacity_per_instance_rps"], "users": row["users"],
            "p95_ms": row["p95_ms"], "j_per_request": row["j_per_request"]}
