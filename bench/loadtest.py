"""Serving knobs on a live Triton: the queue-bound sweep; --tune's sampler vs grid vs random, digits and charlm
:generate.

A tiny digits model is trained and compressed (fp32 and int8), Triton serves it, and every serving
config is applied live through model control (no restart) and measured with locust, Triton direct.

1. The sweep (``loadtest --sweep``): queue bound × delay × instances at concurrency 1 and 16. Triton 2.51's
   batcher stalls ≈500 ms at a time under any queue policy: goal, the unbounded queue ≥ 3× the bounded one
   at concurrency 1.
2. The search (``loadtest --tune``'s own study code): its default sampler, random and the grid over the same knob
   ranges, each with the same number of measured windows (the baseline, then one step-ladder window per
   trial), several seeds, each seed's fronts then re-measured side by side (:mod:`bench._serving_search`; the
   fronts and goals: :mod:`bench._serving_fronts`).
   Goals: the sampler's best feasible capacity per instance within half the windows ≥ the grid's best over all
   of them, and the highest hypervolume of the three on every seed. Then its best config against the
   repository's default, both re-measured side by side and verified in steady windows.
3. The same search on charlm ``:generate`` (:mod:`bench._generate_search`): the generation model's own knobs,
   streaming through the gateway, capacity in tokens/s per instance within a TTFT / inter-token SLO.
4. Whether this host can decide the digits goals at all (:mod:`bench._capacity_noise`): three configs' windows
   repeated, read by several capacity estimators, and the windows a test would need to tell them apart.
5. Which sampler the stage should use (:mod:`bench._sampler_choice`, asked for alone): TPE and GP on development
   serving tasks the goals are not judged on, a generation model's knobs and a classifier's batching knobs; and
   on the latter GP with and without ``loadtest.tune.late_random``.

``python -m bench loadtest --search`` runs part 2 alone, ``--generate`` part 3, ``--noise`` part 4,
``--generate-dev``, ``--search-dev`` and ``--late-dev`` part 5 (any of them together in one report).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from bench._serving_fronts import search_tables
from bench._serving_search import Search
from bench.harness import Table, ratio

TINY = ["train.max_steps=60", "train.eval_every=60", "train.batch_size=64", "train.eval_batches=2",
        "measure.repeats=3", "measure.warmup=1", "measure.batch_sizes=[1]", "compress.exporter='legacy'",
        "compress.variants=['fp32', 'int8']", "compress.max_metric_loss=1.0", "compress.quantize.calibration_batches=2",
        "run.name=bench", "loadtest.users=16", "loadtest.slo_p95_ms=50"]


def _release(workdir: Path, dev: bool = False):
    """Train and compress the digits model, fp32 and int8, briefly (speed does not depend on the weights); ``dev``:
    the development batching task's classifier (:data:`bench._serving_search.DEV_TASK`) instead."""
    from autoglm.config import load_settings
    from autoglm.train import train_run
    from compress.stage import compress_run

    if dev:
        from bench._serving_search import DEV_TASK
        from bench.pool import POOL

        settings = POOL[DEV_TASK].settings(0, workdir, TINY)
    else:
        settings = load_settings(None, [f"run.root='{workdir / 'runs'}'", f"run.cache_dir='{workdir / 'cache'}'",
                                        "task.model={channels=8, hidden=32, dropout=0.0}", *TINY])
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


PARTS = ("--search", "--search-dev", "--late-dev", "--generate", "--generate-dev", "--noise")
NOISE_REPEATS = 6


def _batching(quick: bool, parts: set[str], dev: bool = False) -> list[Table]:
    """The batching knobs' parts: the sweep, search and noise on digits; ``dev``: the samplers compared on the
    development batching task instead (``--late-dev`` in ``parts``: GP with and without late random draws)."""
    from bench._capacity_noise import noise_tables
    from bench._sampler_choice import BATCHING_RULE, LATE_RULE, LATE_SAMPLERS, sampler_tables
    from serve.triton import TritonServer, free_ports

    with tempfile.TemporaryDirectory(prefix="autoglm-bench-loadtest-") as tmp:
        workdir = Path(tmp)
        settings = _release(workdir, dev)
        http, grpc, metrics = free_ports(3)
        triton = TritonServer(workdir / "runs" / "bench" / "repository" / "python", workdir=workdir / "triton",
                              http_port=http, grpc_port=grpc, metrics_port=metrics)
        tables = []
        with triton.start(timeout_s=90):
            if "sweep" in parts:
                tables += _sweep_tables(_sweep(settings, triton, quick), quick)
            search = Search(settings, triton, workdir, quick)
            if dev and "--late-dev" in parts:
                return sampler_tables(search, LATE_RULE, LATE_SAMPLERS)
            if dev:
                return sampler_tables(search, BATCHING_RULE)
            if "search" in parts:
                tables += search_tables(search)
            if "--noise" in parts:
                tables += noise_tables(search, 2 if quick else NOISE_REPEATS, settings.measure.watts_per_core)
    return tables


def _generate(quick: bool, dev: bool = False) -> list[Table]:
    """The generation model's search; ``dev``: the samplers compared on the development serving task instead."""
    from bench._generate_search import GenerateSearch, release
    from bench._sampler_choice import GENERATE_RULE, sampler_tables
    from serve import GatewaySettings, start_serving

    with tempfile.TemporaryDirectory(prefix="autoglm-bench-loadtest-generate-") as tmp:
        workdir = Path(tmp)
        settings = release(workdir, quick, dev)
        gateway = GatewaySettings(port=settings.serve.gateway_port, max_in_flight=256, request_timeout_s=120)
        with start_serving(settings, gateway) as serving:
            search = GenerateSearch(settings, serving, workdir / "search", quick)
            return sampler_tables(search, GENERATE_RULE) if dev else search_tables(search)


def run(quick: bool, args: list[str] | None = None) -> list[Table]:
    unknown = [a for a in args or [] if a not in PARTS]
    if unknown:
        raise SystemExit(f"bench loadtest: unknown option {unknown}; options: {' '.join(PARTS)} (none: every part)")
    parts = {"search" if a == "--search" else a for a in args or []} or {"sweep", "search", "--generate", "--noise"}
    # --search-dev, --late-dev, --generate-dev: asked for alone
    tables = _batching(quick, parts) if parts & {"sweep", "search", "--noise"} else []
    tables += _batching(quick, parts, dev=True) if "--search-dev" in parts else []
    tables += _batching(quick, {"--late-dev"}, dev=True) if "--late-dev" in parts else []
    tables += _generate(quick) if "--generate" in parts else []
    return tables + (_generate(quick, dev=True) if "--generate-dev" in parts else [])
