"""Compression: every variant of each built-in task against torch eager FP32, measured side by side.

For each task a model is trained with its shipped config (charlm: nanoGPT's CPU shakespeare_char
settings; fewer steps with --quick), then compress's own builder makes every variant, scores it with
the task metric on validation data and times it at batch 1 and 32 in the same process, one after the
other. Goals: digits' best variant ≥ 3× faster than torch eager at batch 32 within 0.5 accuracy points;
charlm's best variant at least as fast as torch eager at batch 1 and 32 within 1% perplexity.

A last table sets the article's figures for INT8 and 50% channel pruning beside the same measurements, relative
to the FP32 ONNX export and to torch eager (the article names neither its baseline nor its batch size).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from autoglm.config import load_settings
from autoglm.measure import fixed_threads
from autoglm.tasks import get_task
from bench.harness import Table, ratio
from compress.variants import Variant, build_variants

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
VARIANTS = {
    "digits": ["fp32", "int8-static", "int8-dynamic", "pruned", "pruned-int8", "qat"],
    "charlm": ["fp32", "int8-dynamic", "int8-static", "pruned", "pruned-int8"],
}
QUICK_STEPS = {"digits": 300, "charlm": 400}

# The AutoGLM article's figures, relative change in % (quality as it states it: accuracy)
ARTICLE = {"INT8": {"quality": -1.2, "latency": -35.0, "energy": -40.0},
           "50% channel pruning": {"quality": -3.8, "latency": -52.0, "energy": -58.0}}
CLAIMS = {"INT8": ("int8-static", "int8-dynamic"), "50% channel pruning": ("pruned",)}  # our variants for each
BASELINES = {"fp32": "FP32 ONNX", "torch": "torch eager FP32"}
QUALITY = {"charlm": "perplexity"}  # the metric the quality column compares (else the task's): lower is better


def _variants(task_name: str, quick: bool, workdir: Path) -> tuple[object, list[Variant], float]:
    overrides = [f"run.cache_dir='{workdir / 'cache'}'", "measure.batch_sizes=[1, 32]", "measure.repeats=50",
                 "compress.max_metric_loss=1.0"]  # report every variant; the goals below judge the losses
    if quick:
        overrides += [f"train.max_steps={QUICK_STEPS[task_name]}", "compress.prune.finetune_steps=100",
                      "compress.qat.steps=100", "measure.repeats=20"]
    settings = load_settings(CONFIGS / f"{task_name}.toml", overrides)
    task = get_task(settings)
    task.prepare()
    args = task.check_model_args(settings.task.model)
    with fixed_threads(settings.run.threads):
        model = task.build_model(args)
        task.train(model, settings.train)
        variants = build_variants(task, model, args, settings, workdir / task_name, VARIANTS[task_name])
        return task, variants, settings.compress.prune.ratio


def _table(task, variants: list[Variant]) -> tuple[Table, list[str]]:
    torch_row = variants[0]
    base = torch_row.metrics[task.metric]
    rows = []
    for v in variants:
        if v.status == "skipped":
            rows.append([v.name, "skipped", "", "", "", "", "", "", v.reason])
            continue
        p1, p32 = v.profile[1], v.profile[32]
        value = v.metrics[task.metric]
        delta = (value - base) * (100 if task.direction == "maximize" else 1)
        rows.append([
            v.name, f"{value:.4f}", f"{delta:+.2f}{' pt' if task.direction == 'maximize' else ''}",
            f"{v.size_bytes / 1024:.0f}" if v.path else "—",
            f"{p1['p50_ms']:.3f}", ratio(torch_row.profile[1]["p50_ms"], p1["p50_ms"]),
            f"{p32['p50_ms']:.3f}", ratio(torch_row.profile[32]["p50_ms"], p32["p50_ms"]),
            f"{p32['j_per_item'] * 1e3:.3f} mJ ({p32['energy_method']})"])
    columns = ["variant", task.metric, "Δ vs torch", "size KiB", "p50 ms @1", "speed-up @1", "p50 ms @32",
               "speed-up @32", "energy / inference @32"]
    return Table(f"{task.name}: compressed variants vs torch eager FP32", columns, rows), _goal(task, variants)


def _goal(task, variants: list[Variant]) -> list[str]:
    torch_row, rest = variants[0], [v for v in variants[1:] if v.status != "skipped"]
    if task.name == "digits":
        ok = [v for v in rest if torch_row.metrics["accuracy"] - v.metrics["accuracy"] <= 0.005]
        best = min(ok, key=lambda v: v.profile[32]["p50_ms"])
        speed = torch_row.profile[32]["p50_ms"] / best.profile[32]["p50_ms"]
        return [f"goal: best variant within 0.5 pt is **{best.name}**, {speed:.2f}× torch eager at batch 32 "
                f"(goal ≥ 3×): {'met' if speed >= 3 else 'NOT met'}"]
    ok = [v for v in rest if v.metrics["perplexity"] <= torch_row.metrics["perplexity"] * 1.01]
    if not ok:
        return ["goal: no variant within 1% perplexity of torch: NOT met"]
    best = min(ok, key=lambda v: v.profile[32]["p50_ms"])
    s1 = torch_row.profile[1]["p50_ms"] / best.profile[1]["p50_ms"]
    s32 = torch_row.profile[32]["p50_ms"] / best.profile[32]["p50_ms"]
    met = "met" if s1 >= 1 and s32 >= 1 else "NOT met"
    return [f"goal: best variant within 1% perplexity is **{best.name}**: {s1:.2f}× torch at batch 1, {s32:.2f}× "
            f"at batch 32 (goal ≥ 1× at both): {met}"]


def measurement(task, variants: list[Variant], prune_ratio: float) -> dict:
    """What the article table reads of one task's variants: plain numbers, keyed by variant name."""
    metric = QUALITY.get(task.name, task.metric)
    return {"metric": metric, "prune_ratio": prune_ratio, "variants": {
        v.name: {"metric": v.metrics[metric], "p50_ms": {b: v.profile[b]["p50_ms"] for b in (1, 32)},
                 "j_per_item": v.profile[32]["j_per_item"], "energy_method": v.profile[32]["energy_method"]}
        for v in variants if v.status != "skipped" and {1, 32} <= set(v.profile)}}


def _change(value: float, base: float) -> str:
    """``value`` relative to ``base`` in %, signed, as the article writes it (−35%)."""
    if not base:
        return "n/a"
    return f"{(value / base - 1) * 100:+.1f}%".replace("-", "−")


def article_table(measured: dict[str, dict]) -> Table:
    """The article's claims beside ours: per claim, its figures, then each of our variants that makes the claim
    on each task, relative to each baseline. ``measured``: {task: :func:`measurement`}."""
    rows = []
    for claim, figures in ARTICLE.items():
        rows.append([claim, "article", "not stated", f"accuracy {_change(100 + figures['quality'], 100)}",
                     *[_change(100 + figures["latency"], 100)] * 2, f"{_change(100 + figures['energy'], 100)} "
                     "(method not stated)"])
        for task_name, m in measured.items():
            for name in CLAIMS[claim]:
                ours = m["variants"].get(name)
                if ours is None:
                    continue
                label = f"{task_name} {name}" + (f" (ratio {m['prune_ratio']:g})" if name == "pruned" else "")
                for base_name, base_label in BASELINES.items():
                    base = m["variants"].get(base_name)
                    if base is None:
                        continue
                    methods = (ours["energy_method"], base["energy_method"])
                    kind = "estimated" if any(str(x).startswith("estimated") for x in methods) else "measured"
                    rows.append([claim, label, base_label, f"{m['metric']} {_change(ours['metric'], base['metric'])}",
                                 _change(ours["p50_ms"][1], base["p50_ms"][1]),
                                 _change(ours["p50_ms"][32], base["p50_ms"][32]),
                                 f"{_change(ours['j_per_item'], base['j_per_item'])} ({kind})"])
    columns = ["claim", "source", "relative to", "Δ quality", "Δ p50 latency @1", "Δ p50 latency @32",
               "Δ energy / inference @32"]
    notes = ["The article states no baseline, batch size, model or hardware: its latency figure stands under "
             "both batch sizes. Quality is the relative change of the named metric (perplexity: higher is worse).",
             "Energy 'estimated' is CPU-seconds × W/core (no NVML/RAPL on the host); 'measured' is a hardware "
             "counter. Same measurements as the tables above: no model is run again."]
    return Table("The article's compression claims beside ours", columns, rows, notes)


def run(quick: bool) -> list[Table]:
    tables, measured = [], {}
    with tempfile.TemporaryDirectory(prefix="autoglm-bench-") as tmp:
        for task_name in VARIANTS:
            task, variants, prune_ratio = _variants(task_name, quick, Path(tmp))
            table, goals = _table(task, variants)
            table.notes.extend(goals + ["ONNX Runtime with all graph optimizations; energy is the estimate "
                                        "(CPU-seconds × W/core) on hosts without NVML/RAPL, labelled as such"])
            tables.append(table)
            measured[task_name] = measurement(task, variants, prune_ratio)
    return [*tables, article_table(measured)]
