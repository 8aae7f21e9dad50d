"""The shared training loop: AdamW, linear warmup then cosine decay, accumulation, clipping, evaluation.

Every task trains through :func:`fit`, so tuning compares trials on equal terms and a user's own task
gets the same schedule, logging and early stopping for free.
"""

from __future__ import annotations

import json
import math
import sys
import time
from contextlib import ExitStack
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
    cosine decay reaching ``lr * min_lr_frac`` at ``max_steps``.
    """
    warmup = int(settings.warmup_frac * settings.max_steps)
    if step < warmup:
        return settings.lr * (step + 1) / (warmup + 1)
    min_lr = settings.lr * settings.min_lr_frac
    progress = min(1.0, (step - warmup) / max(1, settings.max_steps - warmup))
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
    """Append-and-flush JSON lines, so a crash or a kill keeps everything logged so far."""

    def __init__(self, path: Path | str | None):
        self._fh = None
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()

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


def fit(task: Task, model: torch.nn.Module, settings: TrainSettings, on_eval: EvalCallback | None = None,
        log_path: Path | str | None = None, progress: bool = False) -> TrainResult:
    """Train ``model`` on ``task`` for ``max_steps`` optimizer steps or ``time_budget_s`` seconds.

    Evaluates on the val split every ``eval_every`` steps and at the end; ``on_eval(step, value)``
    returning True stops at once (``stopped_early``). ``samples`` counts target elements (tokens for
    charlm). The model's train/eval mode is restored on return.
    """
    import torch

    torch.manual_seed(task.seed)
    model_args = getattr(model, "model_args", None)
    device = next(model.parameters()).device
    optimizer = make_optimizer(model, settings)
    batches = task.batches("train", settings.batch_size, settings.max_steps * settings.grad_accum,
                           seed=task.seed, model_args=model_args)
    log = _JsonLog(log_path)
    bar = _progress_bar(progress, settings.max_steps)
    history: list[tuple[int, float]] = []
    was_training = model.training
    samples = step = 0
    stopped_early = False
    window_samples, window_start = 0, time.perf_counter()
    wall_start, cpu_start = time.perf_counter(), time.process_time()

    def evaluate(at_step: int) -> bool:
        """Record one validation score; True if the callback asks to stop."""
        metrics = task.evaluate(torch_predictor(model), "val", n_batches=settings.eval_batches,
                                model_args=model_args)
        model.train()
        value = float(metrics[task.metric])
        history.append((at_step, value))
        log.write({"event": "eval", "step": at_step, "metric": task.metric, "value": value,
                   "metrics": metrics, "time_s": time.perf_counter() - wall_start})
        if bar is not None:
            bar.update(bar.task_ids[0], status=f"{task.metric} {value:.4f}")
        return bool(on_eval is not None and on_eval(at_step, value))

    with ExitStack() as stack:
        stack.callback(log.close)
        stack.callback(model.train, was_training)
        if bar is not None:
            stack.enter_context(bar)
        model.train()
        while step < settings.max_steps:
            lr = lr_at(step, settings)
            for group in optimizer.param_groups:
                group["lr"] = lr
            step_loss = 0.0
            for _ in range(settings.grad_accum):
                inputs, targets = next(batches)
                feed = {k: torch.from_numpy(v).to(device) for k, v in inputs.items()}
                loss = task.loss(model, feed, torch.from_numpy(targets).to(device)) / settings.grad_accum
                loss.backward()
                step_loss += loss.item()
                window_samples += targets.size
                samples += targets.size
            if settings.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if bar is not None:
                bar.advance(bar.task_ids[0])
            if step % TRAIN_LOG_EVERY == 0:
                now = time.perf_counter()
                log.write({"event": "train", "step": step, "loss": step_loss, "lr": lr,
                           "batch_size": settings.batch_size * settings.grad_accum,
                           "samples_per_s": window_samples / max(now - window_start, 1e-9),
                           "time_s": now - wall_start})
                window_samples, window_start = 0, now
            out_of_time = (settings.time_budget_s is not None
                           and time.perf_counter() - wall_start >= settings.time_budget_s)
            if step % settings.eval_every == 0 or step == settings.max_steps or out_of_time:
                if evaluate(step):
                    stopped_early = True
                    break
            if out_of_time:
                break

    return TrainResult(steps=step, samples=samples, wall_s=time.perf_counter() - wall_start,
                       cpu_s=time.process_time() - cpu_start, metric=history[-1][1] if history else math.nan,
                       history=history, stopped_early=stopped_early)
