"""``autoglm compress``: the selected model -> ONNX variants -> a Triton model repository.

Reads ``tune/selected.json`` (or ``train/model.pt``, or ``compress.checkpoint``), writes
``runs/<run>/compress/`` (every variant, ``parity.json``, ``variants.json``, manifest) and
``runs/<run>/repository/`` (``python/`` for the Triton bundled on pip-only hosts, ``native/`` for the
NGC container; manifest). Nothing is published when the parity gate fails.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autoglm.artifacts import Manifest, RunDir, StageWriter, sha256_file, write_atomic
from autoglm.config import CompressSettings, Settings
from autoglm.errors import AutoGLMError, ConfigError
from autoglm.tracking import track_stage
from compress.recommend import recommend
from compress.registry import check_settings
from compress.repository import write_repository
from compress.variants import Variant, build_variants


@dataclass
class Source:
    checkpoint: Path
    parent: str | None  # the stage whose manifest it comes from, for lineage
    overrides: dict[str, Any]  # compression settings chosen by tune for this model
    trial: int | None = None  # tune's trial that made it, for the published version's lineage


def resolve_source(run: RunDir, settings: Settings) -> Source:
    """What to compress: an explicit checkpoint, else tune's selection, else the trained baseline."""
    if settings.compress.checkpoint:
        path = Path(settings.compress.checkpoint)
        if not path.is_file():
            raise AutoGLMError(f"compress.checkpoint={path} does not exist: give a model.pt written by "
                               "`autoglm train` or `autoglm tune`")
        return Source(path, None, {})
    selected = run.stage_dir("tune") / "selected.json"
    states = {stage: run.state(stage) for stage in ("tune", "train")}
    if states["tune"] == "complete" and selected.is_file():  # tune's selection first
        choice = json.loads(selected.read_text())
        return Source(run.stage_dir("tune") / choice["checkpoint"], "tune", choice.get("compress", {}),
                      choice.get("trial"))
    for stage, state in states.items():  # never fall back past a stage in a doubtful state
        if state in ("tampered", "stale", "incomplete"):
            raise AutoGLMError(f"{stage} is {state} in {run.path}{_why(run, stage, state)}: redo it with `autoglm "
                               f"{stage} --force`, or name the model to compress with compress.checkpoint")
    if states["train"] == "complete":
        return Source(run.stage_dir("train") / "model.pt", "train", {})
    raise AutoGLMError(f"nothing to compress in {run.path}: run `autoglm tune` or `autoglm train` first, "
                       "or set compress.checkpoint=path/to/model.pt")


def _why(run: RunDir, stage: str, state: str) -> str:
    """What makes a stage's state doubtful, for the message: the changed file, or what is missing."""
    if state == "incomplete":
        return " (it started but never wrote its manifest)"
    if state == "stale":
        return " (an input it was made from changed)"
    changed = run.changed_output(stage)
    return f" ({changed})" if changed else ""


def compress_run(settings: Settings, force: bool = False, progress: bool = True) -> Manifest:
    """Run the stage; skipped when its manifest matches the same source and config."""
    from autoglm.measure import fixed_threads
    from autoglm.tasks import get_task
    from autoglm.tasks.checkpoint import load_checkpoint

    from compress.quantize import PRESETS

    check_settings(settings)  # the variants as configured, before anything is read
    preset = settings.compress.quantize.preset
    if preset and preset not in PRESETS:  # refused before any export
        raise ConfigError(f"compress.quantize.preset={preset!r} is unknown: use one of {sorted(PRESETS)}, or leave "
                          "it unset to choose by the graph")
    run = RunDir(settings.run.root, settings.run.name)
    source = resolve_source(run, settings)
    if source.overrides:  # tune's choice: its variant first, with the compression settings it was tuned with
        merged = _merge(settings.compress.model_dump(mode="json"), source.overrides)
        merged["variants"] = list(dict.fromkeys([*source.overrides.get("variants", []), *settings.compress.variants]))
        settings = settings.model_copy(update={"compress": CompressSettings.model_validate(merged)})
        check_settings(settings)  # and with tune's choice over them
    config = {"compress": settings.section("compress"), "measure": settings.section("measure"),
              "task": settings.section("task"), "train": settings.section("train"),  # fine-tunes, gate batches
              "threads": settings.run.threads, "source": str(source.checkpoint),
              "source_sha256": sha256_file(source.checkpoint)}
    writer = StageWriter(run, "compress", config, inputs=[source.parent] if source.parent else [])
    if writer.up_to_date() and not force and run.state("repository") == "complete":
        print(f"compress: up to date in {writer.dir} (use --force to redo)")
        return run.manifest("compress")
    # the inputs are checked before anything is invalidated: a bad checkpoint must not cost the last good release
    task = get_task(settings)
    task.prepare()
    checkpoint = load_checkpoint(source.checkpoint)
    model = checkpoint.build_model(task)
    writer.invalidate()
    run.manifest_path("repository").unlink(missing_ok=True)
    for stale in (*writer.dir.glob("*.onnx"), *writer.dir.glob("*.plan"), *writer.dir.glob("decode/*/*.onnx")):
        stale.unlink()  # a redo must never pick up a model file from an earlier configuration
    report = _printer(task) if progress else None
    with fixed_threads(settings.run.threads):
        variants = build_variants(task, model, checkpoint.model_args, settings, writer.dir, on_variant=report)
        graphs = None
        if settings.compress.generate.enabled:  # KV-cache decode graphs, for decoder tasks only
            from compress.decode import PRECISIONS, build_decode_graphs
            from compress.int4 import Int4Recipe

            generate = settings.compress.generate
            graphs = build_decode_graphs(task, model, checkpoint.model_args, writer.dir / "decode",
                                         settings.compress.max_metric_loss,
                                         precisions=[p for p in PRECISIONS if getattr(generate, p)],
                                         int4=Int4Recipe.of(settings.compress.int4), kv_cache=generate.kv_cache,
                                         threads=generate.intra_op_threads, spinning=generate.intra_op_spinning,
                                         small_step=generate.small_batch_step)
    choice = recommend(task, variants, settings.tune.serving_batch,
                       preferred=source.overrides.get("variants", [None])[0])
    recommended, why = choice.variant, choice.why
    rows = [v.to_dict(writer.dir) for v in variants]
    write_atomic(writer.dir / "variants.json", (json.dumps({"variants": rows, "recommended": recommended, "why": why,
                                                            "recommendation": choice.record()}, indent=2)
                                                + "\n").encode())
    settings.save(writer.path("config.json"))
    for variant in variants:
        if variant.path:
            writer.add_output(variant.path.name)
        for batch, p in variant.profile.items():
            writer.add_energy(f"{variant.name}@batch{batch}", p["j_per_item"], p["energy_method"])
    for rel in ("parity.json", "variants.json", "config.json"):
        writer.add_output(rel)
    if graphs is not None:
        for path in sorted((writer.dir / "decode").rglob("*")):
            if path.is_file():
                writer.add_output(str(path.relative_to(writer.dir)))
    writer.manifest.metrics = {"recommended": recommended, "why": why, "recommendation": choice.record(),
                               "metric": task.metric, "variants": {v["name"]: _summary(v) for v in rows}}
    if graphs is not None:
        writer.manifest.metrics["generate"] = {"precision": graphs.precision, "candidates": graphs.candidates,
                                               "small_step": graphs.to_dict(writer.dir / "decode")["small_step"]}
    manifest = writer.commit()
    track_stage(settings, writer.dir, ("manifest.json", "variants.json", "parity.json", "config.json"))
    lineage = {"stage": source.parent or "checkpoint", "trial": source.trial, "checkpoint": str(source.checkpoint),
               "checkpoint_sha256": config["source_sha256"]}
    repository = write_repository(run, settings, task, checkpoint.model_args, variants, choice, graphs, lineage)
    generation = f"; generation model {task.name}-generate ({graphs.describe()})" if graphs else ""
    replaced = f" in place of {choice.replaced['variant']}: {why}" if choice.replaced else ""
    print(f"compress: {len([v for v in variants if v.status == 'ok'])} variants published as version "
          f"{repository.metrics['version']}; recommended {recommended}{replaced}{generation} -> "
          f"{run.stage_dir('repository')}")
    return manifest


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _summary(row: dict[str, Any]) -> dict[str, Any]:
    out = {k: row[k] for k in ("status", "reason", "metric_loss", "size_bytes")} | row["metrics"]
    for batch, p in row["profile"].items():
        out[f"p50_ms@{batch}"] = p["p50_ms"]
        out[f"j_per_item@{batch}"] = p["j_per_item"]
    return out


def _printer(task):
    from rich.console import Console
    from rich.markup import escape

    console = Console(stderr=True)

    def report(v: Variant) -> None:
        timing = ", ".join(f"b{b} p50 {p['p50_ms']:.3f} ms" for b, p in v.profile.items())
        value = v.metrics.get(task.metric)
        shown = f"{task.metric}={value:.4f}" if value is not None else escape(v.reason)
        console.print(f"  [bold]{v.name:<12}[/] {v.status:<9} {shown}  {timing}")

    return report
