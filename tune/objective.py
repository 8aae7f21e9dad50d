"""One trial: (time the untrained graph) -> train (early-stoppable) -> compress -> score -> objectives.

Latency and energy depend on the architecture and the compression settings, not on the weights, so with
early stopping on they are measured first, on the untrained model compressed the trial's way: that is what
lets the rule compare trials while they train. Those timings stand for the trained model too when its
compressed graph is the untrained one's, op for op and shape for shape (checked, see :func:`compress.graph_signature`);
otherwise, and without early stopping or with a cached model, the trained model is timed after it is
scored. So a trial times one graph once: a second timing of the same graph would spend compute on a figure
already known. Trained checkpoints are cached by a hash of everything that shapes training, so trials that
differ only in compression settings never retrain.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import resource
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import psutil

from autoglm.artifacts import data_fingerprint, write_atomic
from autoglm.config import Settings
from autoglm.errors import AutoGLMError
from autoglm.measure import energy_meter
from autoglm.tasks import Knob, Task
from compress import (Timing, Variant, apply_knobs, evaluate_variant, time_variant, untrained_settings, variant_for,
                      variant_settings)
from tune import attributes as attrs
from tune.early_stop import ParetoHalving, RungCallback, auto_min_resource
from tune.space import compression_params, split_params, suggest


def trial_settings(settings: Settings, groups: dict[str, dict[str, Any]], variant: str) -> Settings:
    """The run's settings with one trial's knobs applied (validated like any config)."""
    compress = apply_knobs(settings.compress, groups).model_copy(update={
        "variants": [variant],
        # trials only rank candidates: the TorchScript exporter is ~30x quicker here (both are parity-gated);
        # the release export in the compress stage uses compress.exporter
        "exporter": "legacy",
    })
    train = settings.train.model_copy(update=groups["train"])
    # evaluate at least as often as the first rung, or early stopping never gets to look
    train = train.model_copy(update={"eval_every": min(train.eval_every, settings.tune.early_stop.min_resource)})
    task = settings.task.model_copy(update={"model": {**settings.task.model, **groups["model"]}})
    return settings.model_copy(update={"compress": compress, "train": train, "task": task})


def with_first_rung(settings: Settings, space: dict[str, Any]) -> Settings:
    """``settings`` with ``tune.early_stop.min_resource = "auto"`` resolved from the budget into steps
    (:func:`tune.early_stop.auto_min_resource`): the longest schedule the space holds, ``budget_trials`` (else
    ``tune.n_trials``) whole schedules, no rung inside the configured warm-up; then raised to
    ``first_rung_frac`` of that longest schedule when set (the same settings object when nothing changes)."""
    es = settings.tune.early_stop
    if es.min_resource != "auto" and es.first_rung_frac is None:
        return settings
    knob = space.get("train.max_steps", settings.train.max_steps)
    longest = int(knob.high) if isinstance(knob, Knob) else int(knob)
    first = es.min_resource if es.min_resource != "auto" else auto_min_resource(
        longest, es.budget_trials or settings.tune.n_trials, es.reduction_factor,
        math.ceil(settings.train.warmup_frac * longest))
    if es.first_rung_frac is not None:  # no earlier than that share of the longest schedule
        first = max(first, math.ceil(es.first_rung_frac * longest))
    if first == es.min_resource:
        return settings
    tune = settings.tune.model_copy(update={"early_stop": es.model_copy(update={"min_resource": first})})
    return settings.model_copy(update={"tune": tune})


def training_key(task: Task, settings: Settings, model_args: dict[str, Any]) -> str:
    """Everything that shapes a trained model; equal keys share one checkpoint. A data file counts by its size
    and modification time too (a regenerated file retrains); DDP ranks sample with seeds of their own."""
    shape = {"task": task.name, "data": data_fingerprint(settings.task.data), "model": model_args,
             "seed": settings.run.seed, "train": settings.train.model_dump(mode="json"),
             "ddp_procs": settings.tune.ddp_procs}
    if settings.tune.metric is not None:  # its evaluations and final metric are that metric's
        shape["metric"] = settings.tune.metric
    return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:16]


def _children_cpu_s() -> float:
    """CPU-seconds of this process's finished children and theirs (torchrun and its ranks, once waited for)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _trial_device(settings: Settings) -> str:
    """Where a trial trains (run.device): one GPU, every visible GPU under DDP (NCCL there), or the CPU."""
    from autoglm.device import resolve_device

    device = resolve_device(settings.run.device)
    if not device.is_cuda:
        return "cpu"
    return "cuda" if settings.tune.ddp_procs > 1 else device.torch


class Objective:
    """Callable given to ``study.optimize``; writes ``trials/<n>/`` and the checkpoint cache."""

    def __init__(self, task: Task, settings: Settings, space: dict[str, Any], tune_dir: Path,
                 directions: list[str]):
        settings = with_first_rung(settings, space)
        self.task, self.settings, self.space = task, settings, space
        self.trials_dir, self.cache_dir = tune_dir / "trials", tune_dir / "cache"
        es = settings.tune.early_stop
        self.rule = ParetoHalving(tuple(directions), es.reduction_factor, es.min_resource,
                                  es.warmup_trials, es.extrapolate, es.portfolio_grace) if es.enabled else None

    def __call__(self, trial) -> tuple[float, ...]:
        """Run one trial; a failure records why (``error``), an interruption that it was one (``interrupted``:
        the stage retries it on resume), and both re-raise for Optuna to fail the trial."""
        import optuna

        try:
            return self._run(trial)
        except optuna.TrialPruned:
            raise
        except KeyboardInterrupt:
            attrs.INTERRUPTED.set(trial, True)
            raise
        except Exception as exc:
            attrs.ERROR.set(trial, f"{type(exc).__name__}: {exc}"[:500])
            raise

    def _run(self, trial) -> tuple[float, ...]:
        import optuna

        started, cpu0, children0 = time.time(), time.process_time(), _children_cpu_s()
        attrs.HOST.set(trial, socket.gethostname())
        attrs.PID.set(trial, os.getpid())
        attrs.WORKER.set(trial, self.settings.tune.worker_index)
        attrs.STARTED.set(trial, psutil.Process().create_time())
        groups = split_params(suggest(trial, self.space))
        variant_name = variant_for(groups)
        settings = trial_settings(self.settings, groups, variant_name)
        model_args = self.task.check_model_args(settings.task.model)
        out = self.trials_dir / f"{trial.number:04d}"
        meter = energy_meter(settings.measure.energy, settings.measure.watts_per_core, device=_trial_device(settings))
        meter.start()
        try:
            key = training_key(self.task, settings, model_args)
            timing, cost = None, None
            # only the rule looks at the cost while training (a DDP trial trains under torchrun, without it)
            if self.rule is not None and settings.tune.ddp_procs == 1 and not self._cached(key):
                timing = self._timing(settings, model_args, variant_name, out / "probe")
                serving = timing.profile[settings.tune.serving_batch]
                cost = {"latency": serving["p95_ms"], "energy": serving["j_per_item"]}
                attrs.PROBE.set(trial, cost)
            model, result = self._train(trial, settings, model_args, key, cost, out)
            if result is None:
                raise optuna.TrialPruned(f"dominated at step {attrs.STOPPED_AT.get(trial)}")
            variant, timed = self._compressed(settings, model, model_args, variant_name, out, timing)
            attrs.TIMED.set(trial, timed)
        finally:
            reading = meter.stop()
            # a DDP trial trains in torchrun's ranks: their CPU time is the trial's too, and an estimate from CPU
            # time must include it (a hardware counter measured the device the ranks ran on already)
            children = _children_cpu_s() - children0
            joules = reading.joules + (children * settings.measure.watts_per_core
                                       if reading.method.startswith("estimated") else 0.0)
            attrs.COMPUTE.set(trial, {"wall_s": time.time() - started,
                                            "cpu_s": time.process_time() - cpu0 + children,
                                            "joules": joules, "energy_method": reading.method,
                                            "device": _trial_device(settings)})
            shutil.rmtree(out / "probe", ignore_errors=True)
        serving = variant.profile[settings.tune.serving_batch]
        objectives = {"metric": variant.metrics[self.task.metric], "latency": serving["p95_ms"],
                      "energy": serving["j_per_item"]}
        attrs.VARIANT.set(trial, variant.to_dict(out))
        # what compress needs to rebuild this variant, over the run's config: only the passes the variant applies
        chosen = variant_settings(variant_name, settings.compress)
        attrs.COMPRESS.set(trial, chosen)
        attrs.OBJECTIVES.set(trial, objectives)
        write_atomic(out / "metrics.json", (json.dumps({"params": trial.params, "objectives": objectives,
                                                       "variant": variant.to_dict(out), "model_args": model_args,
                                                       "train": settings.section("train")}, indent=2) + "\n").encode())
        return tuple(objectives[o] for o in settings.tune.objectives)

    def _cached(self, key: str) -> bool:
        return (self.cache_dir / key / "model.pt").is_file() and (self.cache_dir / key / "result.json").is_file()

    def _timing(self, settings: Settings, model_args, variant_name: str, out: Path) -> Timing:
        """The untrained model compressed the trial's way (each pass's training skipped: pruned without fine-tune,
        QAT ranges calibrated only), timed at the batches a trial reports, as compress times its variants."""
        quick = settings.model_copy(update={"compress": untrained_settings(settings.compress)})
        return time_variant(self.task, untrained_model(self.task, model_args), model_args, quick, out, variant_name,
                            **_timed(settings))

    def _train(self, trial, settings: Settings, model_args, key: str, cost, out: Path):
        """(model, TrainResult-as-dict) from the cache or from training; (None, None) when stopped early."""
        from autoglm.tasks.checkpoint import load_checkpoint, save_checkpoint

        cached, result_file = self.cache_dir / key / "model.pt", self.cache_dir / key / "result.json"
        out.mkdir(parents=True, exist_ok=True)
        attrs.TRAINING_KEY.set(trial, key)
        cached_log = self.cache_dir / key / "train.jsonl"  # the training's log, for every trial that reuses it
        if self._cached(key):
            model = load_checkpoint(cached).build_model(self.task)
            result = json.loads(result_file.read_text())
            attrs.CACHE_HIT.set(trial, True)
            if cached_log.is_file():
                _link(cached_log, out / "train.jsonl")
        elif settings.tune.ddp_procs > 1:
            model, result = self._train_ddp(settings, out)
            attrs.DDP_PROCS.set(trial, settings.tune.ddp_procs)
            _link(out / "ddp" / "model.pt", cached)
            for log in (out / "train.jsonl", cached_log):
                _link(out / "ddp" / "train.jsonl", log)
            write_atomic(result_file, json.dumps(result).encode())
        else:
            model = self.task.build_model(model_args).to(_trial_device(settings))
            hook = RungCallback(self.rule, self._study(trial), trial, settings.tune.objectives, cost,
                                settings.train.max_steps, compression_params(trial.params)) if self.rule else None
            trained = self.task.train(model, settings.train, on_eval=hook, log_path=out / "train.jsonl")
            # compressed from the CPU like a cached or DDP-trained model: the torch reference and the parity gate
            # then compare like with like in every trial (a GPU's TF32 convolutions would move them)
            model = model.cpu()
            attrs.HISTORY.set(trial, trained.history)
            if trained.stopped_early:
                attrs.STOPPED_AT.set(trial, trained.steps)
                attrs.STEPS.set(trial, trained.steps)
                return None, None
            result = {"steps": trained.steps, "samples": trained.samples, "metric": trained.metric,
                      "wall_s": trained.wall_s, "cpu_s": trained.cpu_s}
            save_checkpoint(cached, self.task.name, model, metrics=result)
            _link(out / "train.jsonl", cached_log)
            write_atomic(result_file, json.dumps(result).encode())
        attrs.STEPS.set(trial, result["steps"])
        attrs.TRAIN_METRIC.set(trial, result["metric"])
        _link(cached, out / "model.pt")
        return model, result

    def _train_ddp(self, settings: Settings, out: Path):
        """Train under torchrun (``autoglm.ddp``); rank 0 writes the checkpoint and result into out/ddp."""
        from autoglm.ddp import RESULT, launch
        from autoglm.tasks.checkpoint import load_checkpoint

        config = settings.save(out / "trial_config.json")
        done = launch(settings.tune.ddp_procs, ["--config", str(config), "--out", str(out / "ddp")])
        if done.returncode != 0:  # torchrun's summary names the rank; the ranks' own errors are above it
            log = out / "ddp" / "torchrun.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text(f"{done.stdout}\n--- stderr ---\n{done.stderr}")
            tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-8:])
            raise AutoGLMError(f"DDP training of this trial failed (exit {done.returncode}; every rank's output: "
                               f"{log}):\n{tail}")
        summary = json.loads((out / "ddp" / RESULT).read_text())
        result = {k: summary[k] for k in ("steps", "samples", "metric", "wall_s", "cpu_s")}
        return load_checkpoint(out / "ddp" / "model.pt").build_model(self.task), result

    @staticmethod
    def _study(trial):
        return trial.study

    def _compressed(self, settings: Settings, model, model_args, variant_name: str, out: Path,
                    timing: Timing | None) -> tuple[Variant, str]:
        """The trained model compressed and scored, and which model its timings come from: ``timing``'s
        (``"untrained"``) when that is of the same graph, else its own (``"trained"``)."""
        variant, reused = evaluate_variant(self.task, model, model_args, settings, out / "compress", variant_name,
                                           timing=timing, **_timed(settings))
        return variant, "untrained" if reused else "trained"


def untrained_model(task: Task, model_args: dict[str, Any]):
    """The task's freshly initialized model, its constant parameters (zero biases, unit norm gains) jittered:
    the ONNX simplifier folds away an Add of zeros or a Mul by ones, which a trained model's graph keeps, so
    the untrained graph would otherwise run fewer ops than the one it stands for."""
    import torch

    model = task.build_model(model_args)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() > 1 and bool((p == p.flatten()[0]).all()):
                p.add_(0.02 * torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device))
    return model


def _timed(settings: Settings) -> dict[str, Any]:
    """How a trial times its graph: at batch 1 (a lone request) and the serving batch (the objectives'), and the
    way Triton will run it: one ORT session per instance with compress.triton.intra_op_threads threads."""
    return {"batch_sizes": sorted({1, settings.tune.serving_batch}), "repeats": settings.tune.probe_repeats,
            "threads": settings.compress.triton.intra_op_threads}


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)  # the cache and the trial share one file
    except OSError:
        shutil.copy2(src, dst)
