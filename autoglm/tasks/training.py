"""The shared training loop: AdamW, linear warmup then cosine decay, accumulation, clipping, evaluation.

Every task trains through :func:`fit`, so tuning compares trials on equal terms and a user's own task
gets the same schedule, logging and early stopping for free.
"""

from __future__ import annotations

import json
import math
import sys
import time
from contextlib import ExitStack, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autoglm.tasks.base import EvalCallback, Task, TrainResult
from autoglm.tasks.predict import torch_predictor

if TYPE_CHECKING:
    import torch

    from autoglm.config import TrainSettings

TRAIN_LOG_EVERY = 10  # steps between "train" lines in the JSON-lines log


def lr_at(step: int, settings: TrainSettings) -> float:
    """Learning rate of optimizer step ``step`` (0-based).

    Linear warmup over ``warmup_frac * max_steps`` steps reaching ``lr`` at the end of warmup, then a
    cosine decay reaching ``lr * min_lr_frac`` at the last step taken (``max_steps - 1``).
    """
    warmup = int(settings.warmup_frac * settings.max_steps)
    if step < warmup:
        return settings.lr * (step + 1) / (warmup + 1)
    min_lr = settings.lr * settings.min_lr_frac
    progress = min(1.0, (step - warmup) / max(1, settings.max_steps - 1 - warmup))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (settings.lr - min_lr)


def make_optimizer(model: torch.nn.Module, settings: TrainSettings) -> torch.optim.AdamW:
    """AdamW decaying only matrices and embeddings (>= 2-D); biases and norm gains are not decayed."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]  # tied weights appear once
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": settings.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=settings.lr, betas=(settings.beta1, settings.beta2))


class _JsonLog:
    """One training's JSON lines, flushed as written, so a crash or a kill keeps everything logged so far."""

    def __init__(self, path: Path | str | None):
        self._fh = None
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(path, "w", encoding="utf-8")  # noqa: SIM115 - closed by close(); one run per log

    def write(self, record: dict[str, Any]) -> None:
        if self._fh is not None:
            self._fh.write(json.dumps(record) + "\n")
            self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()


def _progress_bar(enabled: bool, total: int):
    """A rich progress bar on an interactive stderr; None otherwise."""
    if not (enabled and sys.stderr.isatty()):
        return None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   TextColumn("{task.fields[status]}"), console=Console(stderr=True), transient=True)
    bar.add_task("train", total=total, status="")
    return bar


class OneProcess:
    """How :func:`fit` runs on its own; :class:`autoglm.ddp.ProcessGroup` overrides each hook for DDP ranks."""

    rank, world = 0, 1
    log_fields: dict[str, Any] = {}  # extra fields of every log line (DDP: world_size); never mutated

    def seed(self, task: Task) -> int:
        """Seed of this process's initialization, dropout and training batches."""
        return task.seed

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module the loss runs through."""
        return model

    def batch_size(self, settings: TrainSettings) -> int:
        """Examples this process draws per micro-batch."""
        return settings.batch_size

    def micro_batch(self, module: torch.nn.Module, last: bool):
        """Context of one micro-batch's backward pass (DDP averages gradients on the last only)."""
        return nullcontext()

    def agree(self, values: list[float]) -> list[float]:
        """Rank 0's values on every process (decisions only rank 0 makes)."""
        return values

    def step_loss(self, loss: float) -> float:
        """The logged loss of an optimizer step (DDP: the global batch's)."""
        return loss


def fit(task: Task, model: torch.nn.Module, settings: TrainSettings, on_eval: EvalCallback | None = None,
        log_path: Path | str | None = None, progress: bool = False,
        replicas: OneProcess | None = None) -> TrainResult:
    """Train ``model`` on ``task`` for ``max_steps`` optimizer steps or ``time_budget_s`` seconds.

    Evaluates on the val split every ``eval_every`` steps and at the end; ``on_eval(step, value)``
    returning True stops at once (``stopped_early``). ``samples`` counts target elements (tokens for
    charlm), over all replicas. The model's train/eval mode is restored on return. ``replicas`` makes
    this one rank of a data-parallel run (:func:`autoglm.ddp.train_ddp`): rank 0 evaluates and logs, and
    every rank follows its decisions so all leave the loop at the same step.
    """
    import torch

    replicas = replicas or OneProcess()
    rank, world = replicas.rank, replicas.world
    torch.manual_seed(replicas.seed(task))
    model_args = getattr(model, "model_args", None)
    device = next(model.parameters()).device
    module = replicas.wrap(model)
    optimizer = make_optimizer(model, settings)
    batches = task.batches("train", replicas.batch_size(settings), settings.max_steps * settings.grad_accum,
                           seed=replicas.seed(task), model_args=model_args)
    log = _JsonLog(log_path if rank == 0 else None)
    bar = _progress_bar(progress and rank == 0, settings.max_steps)
    history: list[tuple[int, float]] = []
    was_training = model.training
    samples = step = 0
    stopped_early = False
    window_samples, window_start = 0, time.perf_counter()
    wall_start, cpu_start = time.perf_counter(), time.process_time()

    def evaluate(at_step: int) -> bool:
        """Rank 0 records one validation score; every rank learns it and whether the callback stops."""
        stop, value = 0.0, math.nan
        if rank == 0:
            metrics = task.evaluate(torch_predictor(model), "val", n_batches=settings.eval_batches,
                                    model_args=model_args)
            value = float(metrics[task.metric])
            log.write({"event": "eval", "step": at_step, "metric": task.metric, "value": value,
                       "metrics": metrics, "time_s": time.perf_counter() - wall_start, **replicas.log_fields})
            if bar is not None:
                bar.update(bar.task_ids[0], status=f"{task.metric} {value:.4f}")
            stop = float(bool(on_eval is not None and on_eval(at_step, value)))
        stop, value = replicas.agree([stop, value])
        history.append((at_step, value))
        return bool(stop)

    with ExitStack() as stack:
        stack.callback(log.close)
        stack.callback(model.train, was_training)
        if bar is not None:
            stack.enter_context(bar)
        module.train()
        while step < settings.max_steps:
            lr = lr_at(step, settings)
            for group in optimizer.param_groups:
                group["lr"] = lr
            step_loss = 0.0
            for micro in range(settings.grad_accum):
                inputs, targets = next(batches)
                feed = {k: torch.from_numpy(v).to(device) for k, v in inputs.items()}
                with replicas.micro_batch(module, last=micro == settings.grad_accum - 1):
                    loss = task.loss(module, feed, torch.from_numpy(targets).to(device)) / settings.grad_accum
                    loss.backward()
                step_loss += loss.item()
                window_samples += targets.size * world
                samples += targets.size * world
            if settings.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if bar is not None:
                bar.advance(bar.task_ids[0])
            if step % TRAIN_LOG_EVERY == 0:
                logged_loss = replicas.step_loss(step_loss)  # a collective under DDP: every rank calls it
                now = time.perf_counter()
                log.write({"event": "train", "step": step, "loss": logged_loss, "lr": lr,
                           "batch_size": settings.batch_size * settings.grad_accum,
                           "samples_per_s": window_samples / max(now - window_start, 1e-9),
                           "time_s": now - wall_start, **replicas.log_fields})
                window_samples, window_start = 0, now
            out_of_time = False
            if settings.time_budget_s is not None:
                # rank 0's clock decides for all: a rank stopping alone would leave the others in an all-reduce
                elapsed = time.perf_counter() - wall_start
                out_of_time = bool(replicas.agree([float(elapsed >= settings.time_budget_s)])[0])
            if step % settings.eval_every == 0 or step == settings.max_steps or out_of_time:
                if evaluate(step):
                    stopped_early = True
                    break
            if out_of_time:
                break

    return TrainResult(steps=step, samples=samples, wall_s=time.perf_counter() - wall_start,
                       cpu_s=time.process_time() - cpu_start, metric=history[-1][1] if history else math.nan,
                       history=history, stopped_early=stopped_early)
