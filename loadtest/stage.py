"""``autoglm loadtest``: measure the running stack, sweep or tune serving configs, report, and gate on the SLO.

Reads ``repository/task.json`` (models, I/O, serving metadata) and the task's validation split;
writes ``runs/<run>/loadtest/`` (payloads, per-point locust CSVs, ``points.csv``, ``report.json``,
``tradeoff.png``, manifest with the capacity deploy scales on and where it was measured) and the release
page ``runs/<run>/report.html``; ``--tune`` (:mod:`loadtest.tuning`) adds its study in ``loadtest/tune/``
and writes the verified config back into the repository. Returns the manifest and the gate's exit code
(0 passed, 1 failed).
"""

from __future__ import annotations

import json
import shutil
from typing import Any

from autoglm.artifacts import Manifest, RunDir, StageWriter
from autoglm.config import LoadtestSettings, Settings
from autoglm.energy import ensure_comparable
from autoglm.errors import AutoGLMError, ConfigError
from autoglm.tracking import track_stage
from autoglm.versions import now
from loadtest.control import ModelControl, ServingConfig, serving_knobs
from loadtest.energy_join import EnergySource
from loadtest.front import CONFIG_FIELDS, capacities, pareto_front, point_row, recommend
from loadtest.latency import Slo
from loadtest.payloads import build_payloads, write_payloads
from loadtest.records import earlier_records, keep_report, workload_records
from loadtest.release import write_release_page
from loadtest.report import energy_label, plot_tradeoff, write_points_csv, write_report_json
from loadtest.runner import LoadSpec, run_window
from loadtest.sweep import run_sweep, serving_configs, sweep_models


def resolve_model(task_info: dict[str, Any], name: str | None) -> str:
    """A variant name or Triton model name -> the Triton model; None -> the recommended one."""
    models = task_info["models"]
    if name is None:
        return task_info["recommended"]
    if name in models:
        return models[name]
    if name in models.values() or name == task_info.get("generate"):
        return name
    raise AutoGLMError(f"model '{name}' is not in repository/task.json: choose a variant from {sorted(models)} "
                       f"or a Triton model from {sorted(models.values())}")


def _printer(progress: bool):
    def show(point: dict[str, Any]) -> None:
        if not progress:
            return
        r = point_row(point)
        energy = f"{r['j_per_request']:.3g} J/req" if r["j_per_request"] is not None else "no energy"
        batch = f"batch {r['mean_batch']:.2f}" if r["mean_batch"] is not None else "batch ?"
        print(f"  {r['id']} {ServingConfig(**point['config']).label()} users={r['users']}: {r['rps']:.0f} req/s, "
              f"p95 {r['p95_ms'] or 0:.2f} ms, errors {r['error_rate']:.2%}, {energy}, {batch}, "
              f"{'meets the SLO' if r['passed'] else 'MISSES THE SLO'}"
              + (" (the load generator ran out of CPU: a client limit)" if r["generator_saturated"] else ""),
              flush=True)
        for name, stats in (point.get("stream") or {}).items():
            print(f"      {name}: p50 {stats['p50_ms'] or 0:.2f} ms, p95 {stats['p95_ms'] or 0:.2f} ms "
                  f"({stats['requests']} samples)", flush=True)
    return show


def _current(control: ModelControl, model: str) -> dict[str, Any]:
    """The model's serving knobs as Triton reports them now (None each when Triton is not reachable)."""
    try:
        return {"model": model, **serving_knobs(control.config(model))}
    except AutoGLMError:
        return {**dict.fromkeys(CONFIG_FIELDS), "model": model}


def _overhead(gateway: dict[str, Any], direct: dict[str, Any]) -> dict[str, Any]:
    """The gateway's cost: the same load through the gateway and straight to Triton, back to back."""
    g, d = point_row(gateway), point_row(direct)
    ratio = g["rps"] / d["rps"] if d["rps"] else None
    added = g["p50_ms"] - d["p50_ms"] if g["p50_ms"] is not None and d["p50_ms"] is not None else None
    summary = (f"{gateway['scenario']} scenario through the gateway at {g['users']} users: {ratio:.2f}x the "
               f"Triton-direct throughput, p50 {added:+.2f} ms" if ratio and added is not None
               else "no comparable requests")
    return {"users": g["users"], "gateway": g, "direct": d, "throughput_ratio": ratio, "added_p50_ms": added,
            "summary": summary}


def _measure_overhead(points, options: LoadtestSettings, settings: Settings, model: str, control: ModelControl,
                      common: dict[str, Any], out_dir, slo: Slo) -> dict[str, Any]:
    """The same load through the gateway and straight to Triton, back to back at the model's current config
    (a sweep has restored it by now); a steady single run reuses its own window as the gateway side."""
    gateway_url, triton_url, _ = options.urls(settings.serve)
    users, config = settings.loadtest.users, _current(control, model)
    single = not options.sweep and options.shape == "steady"
    seconds = settings.loadtest.duration_s if single else options.grid.window_s
    energy: EnergySource = common["energy"]
    windows = {"gateway": points[0]} if single else {}
    for name, scenario, host in (("gateway", options.scenario, gateway_url), ("direct", "triton", triton_url)):
        if name in windows:
            continue
        spec = LoadSpec(scenario, host, model, users, seconds, options.spawn_rate, options.warmup_s, slo=slo,
                        api_key=_key(options))
        source = energy if name == "gateway" else EnergySource(energy.kind, energy.watts_per_core, (triton_url,))
        windows[name] = {"id": f"overhead-{name}", "config": config, **run_window(
            spec, out_dir / f"overhead-{name}", payloads=common["payloads"], metrics_url=common["metrics_url"],
            triton_model=model, energy=source)}
    return _overhead(windows["gateway"], windows["direct"])


def loadtest_run(settings: Settings, force: bool = False, progress: bool = True) -> tuple[Manifest, int]:
    """Run the stage as ``settings.loadtest`` says; returns (manifest, exit code of the SLO gate). Skipped when up
    to date unless ``force``."""
    options = settings.loadtest
    run = RunDir(settings.run.root, settings.run.name)
    if run.state("repository") != "complete":
        raise AutoGLMError(f"no complete Triton repository in {run.path}: run `autoglm compress` first (it writes "
                           "repository/), then start the stack with `autoglm serve`")
    config = {"loadtest": settings.section("loadtest"), "serve": settings.section("serve"),
              "measure": settings.section("measure")}
    writer = StageWriter(run, "loadtest", config, inputs=["repository"])
    if writer.up_to_date() and not force:
        manifest = run.manifest("loadtest")
        print(f"loadtest: up to date in {writer.dir} (use --force to measure again)")
        return manifest, 0 if manifest.metrics.get("gate_passed") else 1
    # every input is checked before the last complete measurement is invalidated: a typo must not cost it
    task_info = json.loads((run.stage_dir("repository") / "task.json").read_text())
    model = resolve_model(task_info, options.model)
    if options.scenario == "generate" and options.model is None:
        if "generate" not in task_info:
            raise AutoGLMError("--scenario generate needs a language model with decode graphs (task.json has no "
                               "'generate' model): compress a charlm run with compress.generate.enabled=true")
        model = task_info["generate"]  # the KV-cache model streams; a variant name would recompute
    gateway_url, triton_url, metrics_url = options.urls(settings.serve)
    host = options.host_for(options.scenario, settings.serve)
    _reachable(host, "/v2/health/live" if host == triton_url else "/healthz")
    slo = Slo(settings.loadtest.slo_p95_ms, settings.loadtest.slo_error_rate)
    built = build_payloads(settings, task_info, options.samples, options.per_request, options.generate_tokens)
    urls = (triton_url,) if options.scenario == "triton" else (gateway_url, triton_url)
    energy = EnergySource(settings.measure.energy, settings.measure.watts_per_core, urls=urls, pids=tuple(options.pids),
                          memory_urls=(triton_url,))
    if options.tune.enabled:
        from loadtest.tuning import precheck

        precheck(settings, task_info, model, energy)
    earlier = earlier_records(run)  # the other workload's record survives this run (loadtest.records)
    writer.invalidate()
    shutil.rmtree(writer.dir / "points", ignore_errors=True)  # a re-run must not list an older run's windows
    payloads = write_payloads(writer.path("payloads.json"), built)
    control = ModelControl(triton_url)
    show = _printer(progress)
    common = {"payloads": payloads, "metrics_url": metrics_url, "energy": energy}
    tuned = None
    if options.tune.enabled:
        from loadtest.tuning import tune_run

        tuned = tune_run(run, writer, settings, task_info, model, host, common, slo, _key(options), progress)
        points = []
    elif options.sweep:
        configs = serving_configs(sweep_models(task_info, options.grid.variants, model), options.grid)
        users = options.grid.concurrency(settings.loadtest.users)
        if progress:
            print(f"loadtest: sweeping {len(configs)} serving configs x {len(users)} concurrencies on {host}")
        points = run_sweep(control, configs, users, scenario=options.scenario, host=host, payloads=payloads,
                           out_dir=writer.dir / "points", window_s=options.grid.window_s, warmup_s=options.warmup_s,
                           slo=slo, metrics_url=metrics_url, energy=energy, progress=show, api_key=_key(options))
    else:
        spec = LoadSpec(options.scenario, host, model, settings.loadtest.users, settings.loadtest.duration_s,
                        options.spawn_rate, options.warmup_s, options.shape, options.shape_steps, slo=slo,
                        api_key=_key(options))
        points = [{"id": "p00", "config": _current(control, model),
                   **run_window(spec, writer.dir / "points" / "p00", triton_model=model, **common)}]
        show(points[0])
    overhead = None
    if options.overhead and options.scenario not in ("triton", "generate") and not tuned:
        overhead = _measure_overhead(points, options, settings, model, control, common, writer.dir / "points", slo)
        if progress:
            print(f"  gateway overhead: {overhead['summary']}")
    return _finish(run, writer, settings, options, task_info, points, overhead, slo, energy, progress, tuned, earlier)


def _capacity_record(settings: Settings, rows: list[dict]) -> dict[str, Any]:
    """Flavour, device kind and host of the measured model, from the config Triton reports for it now."""
    from loadtest.writeback import capacity_record

    model = next((r["model"] for r in rows if r.get("model")), None)
    live = None
    if model:
        try:
            live = ModelControl(settings.loadtest.urls(settings.serve)[1]).config(model)
        except AutoGLMError:
            live = None  # Triton gone since the window: fall back to what serve was told
    return capacity_record(settings, live)


def recommended_peak_rss(recommended: dict[str, Any], points: list[dict[str, Any]]) -> float | None:
    """The peak RSS of Triton's processes in the recommended config's capacity window (deploy sizes Triton's
    memory from it); None when that window recorded none. A tune study's recommendation carries its verified
    window's figure itself (that window is not among ``points``)."""
    if recommended.get("peak_rss_mib") is not None:
        return recommended["peak_rss_mib"]
    window = next((p for p in points if p["id"] == recommended.get("point")), None)
    return ((window or {}).get("memory") or {}).get("peak_rss_mib")


def _key(options: LoadtestSettings) -> str | None:
    return options.api_key.get_secret_value() if options.api_key else None


def _reachable(base: str, probe: str) -> None:
    """Refuse a target that is not an http(s) URL or where nothing answers, before any load: a window of
    connection errors would otherwise be measured, gated and reported as the serving stack's."""
    from urllib.error import HTTPError
    from urllib.parse import urlsplit

    from autoglm.local_http import DIRECT

    try:
        parts = urlsplit(base)
        ok = parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != -1  # .port parses it
    except ValueError:  # a port that is not a number
        ok = False
    if not ok:
        raise ConfigError(f"loadtest target {base!r} is not an http(s) URL with a host and port: fix "
                          "loadtest.target (--target) or the serve.* ports, e.g. http://127.0.0.1:8080")
    try:
        with DIRECT.open(base + probe, timeout=3.0):
            return
    except HTTPError:  # it answered (e.g. 401 with API keys on): something serves there
        return
    except OSError as exc:
        raise AutoGLMError(f"nothing answers at {base} ({getattr(exc, 'reason', exc)}): start the stack with "
                           "`autoglm serve`, or point loadtest.target (--target) at it") from None


def _finish(run: RunDir, writer: StageWriter, settings: Settings, options: LoadtestSettings, task_info: dict,
            points: list[dict], overhead: dict | None, slo: Slo, energy: EnergySource,
            progress: bool, tuned: dict | None = None, earlier: dict | None = None) -> tuple[Manifest, int]:
    from loadtest import tuning

    rows = [point_row(p) for p in points] if tuned is None else [
        tuning.trial_point_row(r, options.scenario) for r in tuned["trials"]]
    try:
        method = ensure_comparable([{"method": r["energy_method"]} for r in rows if r["energy_method"]])
        front = pareto_front(rows)
    except ValueError as exc:  # a meter changed mid-run (e.g. NVML lost): the joules are not comparable
        raise AutoGLMError(f"{exc}; the windows are kept in {writer.dir / 'points'}") from exc
    recommended = recommend(rows, slo) if tuned is None else tuning.recommended_of(
        tuned["verified"], tuning.tune_slo(settings, slo), options.tune)
    if tuned is not None:
        front = [f"t{n:03d}" for n in tuned["study"]["front"]]
        reasons = [] if recommended else [tuning.no_config_reason(tuned)]
    elif options.sweep:
        reasons = [] if recommended else ["no serving config met the SLO at any measured concurrency"]
    else:
        reasons = points[0]["slo"]["breaches"]
    if options.sweep and recommended and options.keep_recommended:
        control = ModelControl(options.urls(settings.serve)[1])
        chosen = ServingConfig(**recommended["config"])
        control.apply(chosen, control.config(chosen.model))
        if progress:
            print(f"loadtest: Triton left on the recommended config {chosen.label()}")
    estimated = method is not None and method.startswith("estimated")
    gateway = "" if options.scenario == "triton" else ", the gateway with its workers"
    processes = f"Triton with its model stubs{gateway}"
    note = (f"the CPU-seconds of the serving processes ({processes}) x measure.watts_per_core; the load generator "
            "is not counted" if estimated
            else "a hardware counter over each measured window (the whole device or host)" if method
            else f"unavailable: {energy.unavailable}")
    mode = "tune" if tuned is not None else "sweep" if options.sweep else "single"
    source = {"tune": "the tune study: the verified config's steady window at its capacity concurrency",
              "sweep": "the sweep: the best SLO-compliant window of the recommended config",
              "single": f"one window at {settings.loadtest.users} users: a lower bound (run --sweep or --tune for "
                        "the capacity)"}[mode]
    record = tuned["capacity_record"] if tuned is not None else _capacity_record(settings, rows)
    report = {"run": run.name, "task": task_info["task"], "mode": mode, **record, "tune": tuned,
              "scenario": options.scenario, "shape": options.shape, "slo": {"p95_ms": slo.p95_ms,
              "error_rate": slo.error_rate}, "gate": {"passed": not reasons, "reasons": reasons},
              "energy_method": method, "energy_label": energy_label(method), "energy_note": note,
              "energy_unavailable": energy.unavailable, "capacity_source": source, "rows": rows, "front": front,
              "capacities": capacities(rows, slo), "recommended": recommended, "overhead": overhead,
              "points": points}
    write_report_json(writer.dir / "report.json", report)
    write_points_csv(writer.dir / "points.csv", rows)
    plot_tradeoff(writer.dir / "tradeoff.png", rows, front, slo.p95_ms,
                  recommended["point"] if recommended else None)
    page = write_release_page(run, task_info["task"])
    written = None
    if tuned is not None and recommended and options.tune.write_back:
        written = tuning.write_back_verified(run, writer, recommended, tuned["study"], settings, progress)
    kept = keep_report(writer.dir, options.scenario)
    for path in sorted(writer.dir.rglob("*")):
        if path.is_file() and path.name != "manifest.json":
            writer.add_output(str(path.relative_to(writer.dir)))
    for row in rows:
        if row["j_per_request"] is not None:
            writer.add_energy(f"{row['id']}/request", row["j_per_request"], row["energy_method"])
    rec = recommended or {}
    writer.manifest.metrics = {
        "mode": report["mode"], "scenario": options.scenario, "slo": report["slo"], "gate_passed": not reasons,
        "gate_reasons": reasons, "recommended": rec.get("config"), "capacity_rps": rec.get("capacity_rps"),
        "capacity_per_instance_rps": rec.get("capacity_per_instance_rps"), "capacity_source": source,
        "instances": (rec.get("config") or {}).get("instances"), "p95_ms": rec.get("p95_ms"),
        "j_per_request": rec.get("j_per_request"), "energy_method": method, "front": front,
        "points": len(rows), "release_page": str(page.relative_to(run.path)),
        "peak_rss_mib": recommended_peak_rss(rec, points), **record,
        **{k: rec[k] for k in ("capacity_tps", "capacity_per_instance_tps", "ttft_p95_ms", "itl_p95_ms",
                               "j_per_token") if k in rec}}
    writer.manifest.metrics["workloads"] = workload_records(earlier or {}, options.scenario, writer.manifest.metrics,
                                                            kept, now())
    if tuned is not None:
        writer.manifest.metrics |= {"study": tuned["study"], "written_back": written,
                                    "baseline": tuning.baseline_summary(tuned["baseline"])}
    manifest = writer.commit()
    track_stage(settings, writer.dir, ("manifest.json", "report.json", "../report.html"))  # and the release page
    if progress:
        verdict = "passed" if not reasons else "FAILED: " + "; ".join(reasons)
        print(f"loadtest: SLO gate {verdict}; report {writer.dir / 'report.json'}; release page {page}")
    return manifest, 0 if not reasons else 1
