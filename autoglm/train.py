"""``autoglm train``: train the configured task once with the configured (untuned) settings.

This is the baseline every tuned model is compared against, and the quickest way to get a checkpoint
that ``autoglm compress --checkpoint`` can take. Writes ``runs/<run>/train/``: ``model.pt`` (weights +
model args), ``train.jsonl`` (the training log), ``config.json`` (resolved config) and the manifest.
"""

from __future__ import annotations

from collections.abc import Sequence

from autoglm.artifacts import Manifest, RunDir, StageWriter, data_fingerprint
from autoglm.cli import stage_main
from autoglm.config import Settings

STAGE = "train"


def train_run(settings: Settings, force: bool = False, progress: bool = True) -> Manifest:
    """Train, evaluate on val and test, save the checkpoint; skipped when already complete."""
    from autoglm.device import resolve_device
    from autoglm.measure import energy_meter, fixed_threads
    from autoglm.tasks import get_task
    from autoglm.tasks.checkpoint import save_checkpoint
    from autoglm.tasks.predict import torch_predictor

    run = RunDir(settings.run.root, settings.run.name)
    config = {"task": settings.section("task"), "train": settings.section("train"), "seed": settings.run.seed,
              "data": data_fingerprint(settings.task.data)}  # an edited data file retrains
    device = resolve_device(settings.run.device)
    if device.is_cuda:  # a GPU-trained model differs (kernels, TF32): it is its own stage result
        config["device"] = device.torch
    writer = StageWriter(run, STAGE, config)
    if writer.up_to_date() and not force:
        print(f"train: up to date in {writer.dir} (use --force to redo)")
        return run.manifest(STAGE)
    writer.invalidate()

    task = get_task(settings)
    task.prepare()
    model_args = task.check_model_args(settings.task.model)
    # the training's energy: the GPU it runs on (NVML), or the CPU's meters
    meter = energy_meter(settings.measure.energy, settings.measure.watts_per_core, device=device.torch)
    with fixed_threads(settings.run.threads):
        model = task.build_model(model_args).to(device.torch)
        with meter:
            result = task.train(model, settings.train, log_path=writer.path("train.jsonl"), progress=progress)
        predict = torch_predictor(model)
        val = task.evaluate(predict, "val", n_batches=settings.train.eval_batches, model_args=model_args)
        test = task.evaluate(predict, "test", n_batches=settings.train.eval_batches, model_args=model_args)

    metrics = {f"val_{k}" if not k.startswith("val_") else k: v for k, v in val.items()}
    metrics |= {f"test_{k.removeprefix('val_')}": v for k, v in test.items()}
    metrics |= {"steps": result.steps, "samples": result.samples, "wall_s": result.wall_s,
                "cpu_s": result.cpu_s, "stopped_early": result.stopped_early, "device": device.torch}
    save_checkpoint(writer.path("model.pt"), task.name, model, metrics=metrics)
    settings.save(writer.path("config.json"))
    for rel in ("model.pt", "train.jsonl", "config.json"):
        writer.add_output(rel)
    writer.manifest.metrics = metrics
    reading = meter.reading
    writer.add_energy("training", reading.joules, reading.method)
    manifest = writer.commit()
    print(f"train: {task.name} {task.metric}={val[task.metric]:.4f} after {result.steps} steps "
          f"({result.wall_s:.1f} s on {device.torch}) -> {writer.dir}")
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main(argv, "autoglm train", __doc__, {}, train_run)
