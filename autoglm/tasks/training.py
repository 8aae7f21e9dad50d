"""The shared training loop: an optimizer and a warmup + decay schedule, accumulation, clipping, evaluation.

Every task trains through :func:`fit`, so tuning compares trials on equal terms and a user's own task
gets the same schedule, logging and early stopping for free. Defaults: AdamW, linear warmup then cosine
decay. ``train.feedback_every`` adds measurements of the run itself (gradient noise scale, top Hessian
eigenvalue) to the log, and ``train.adaptive_batch`` grows gradient accumulation from them.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Sequence
from contextlib import ExitStack, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autoglm.errors import ConfigError
from autoglm.tasks.base import EvalCallback, Knob, Task, TrainResult
from autoglm.tasks.predict import torch_predictor

if TYPE_CHECKING:
    import torch

    from autoglm.config import TrainSettings

TRAIN_LOG_EVERY = 10  # steps between "train" lines in the JSON-lines log
HESSIAN_ITERS = 8  # power iterations of the top Hessian eigenvalue: a few suffice for a trend in the log
NOISE_EMA = 0.7  # weight of the past in the running |G|^2 and tr(Sigma) (their ratio is the noise scale)

LOOP_SPACE: dict[str, Knob] = {
    # The loop's own knobs, for every task. No preset searches them (tasks' train_space do not list them): naming
    # one in tune.space adds it with the range below, and the knobs conditional on it come along, e.g.
    # tune.space = {"train.optimizer" = {}, "train.schedule" = {choices = ["cosine", "step"]}}.
    "optimizer": Knob("categorical", "adamw", choices=("adamw", "sgd", "adafactor")),
    "beta1": Knob("float", 0.9, low=0.8, high=0.95, when=("optimizer", ("adamw",))),
    "beta2": Knob("float", 0.99, low=0.95, high=0.999, when=("optimizer", ("adamw",))),
    "momentum": Knob("float", 0.9, low=0.8, high=0.99, when=("optimizer", ("sgd",))),
    "schedule": Knob("categorical", "cosine", choices=("cosine", "linear", "step", "constant")),
    "step_gamma": Knob("float", 0.1, low=0.05, high=0.5, log=True, when=("schedule", ("step",))),
    "step_every": Knob("float", 0.3, low=0.1, high=0.5, when=("schedule", ("step",))),
    "feedback_every": Knob("categorical", 0, choices=(0, 50), minimum=0),
    "adaptive_batch": Knob("categorical", False, choices=(False, True), when=("feedback_every", ())),
    "max_grad_accum": Knob("categorical", 8, choices=(4, 8, 16), when=("adaptive_batch", ())),
}


def lr_at(step: int, settings: TrainSettings) -> float:
    """Learning rate of optimizer step ``step`` (0-based).

    Linear warmup over ``warmup_frac * max_steps`` steps reaching ``lr`` at the end of warmup, then by
    ``schedule``: ``cosine`` or ``linear`` decay reaching ``lr * min_lr_frac`` at the last step taken
    (``max_steps - 1``); ``step``: ``lr * step_gamma**k`` after k intervals of ``step_every * max_steps``
    steps (at least 1) counted from the end of warmup; ``constant``: ``lr``.
    """
    warmup = int(settings.warmup_frac * settings.max_steps)
    if step < warmup:
        return settings.lr * (step + 1) / (warmup + 1)
    if settings.schedule == "constant":
        return settings.lr
    if settings.schedule == "step":
        every = max(1, round(settings.step_every * settings.max_steps))
        return settings.lr * settings.step_gamma ** ((step - warmup) // every)
    min_lr = settings.lr * settings.min_lr_frac
    progress = min(1.0, (step - warmup) / max(1, settings.max_steps - 1 - warmup))
    if settings.schedule == "linear":
        return settings.lr - progress * (settings.lr - min_lr)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (settings.lr - min_lr)


def make_optimizer(model: torch.nn.Module, settings: TrainSettings) -> torch.optim.Optimizer:
    """``settings.optimizer`` decaying only matrices and embeddings (>= 2-D); biases and norm gains are not decayed.

    ``adamw``: betas ``(beta1, beta2)``; ``sgd``: Nesterov momentum ``momentum`` (weight decay as L2);
    ``adafactor``: torch's, with its own second-moment decay (lr is its step-size cap).
    """
    import torch

    params = [p for p in model.parameters() if p.requires_grad]  # tied weights appear once
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": settings.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    if settings.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=settings.lr, momentum=settings.momentum, nesterov=True)
    if settings.optimizer == "adafactor":
        return torch.optim.Adafactor(groups, lr=settings.lr)
    if settings.optimizer != "adamw":
        raise ConfigError(f"train.optimizer={settings.optimizer!r} is unknown: use one of "
                          f"{list(LOOP_SPACE['optimizer'].choices)}")
    return torch.optim.AdamW(groups, lr=settings.lr, betas=(settings.beta1, settings.beta2))


def noise_scale(micro_sq_norms: Sequence[float], big_sq_norm: float, b_small: float,
                b_big: float) -> tuple[float, float]:
    """Unbiased ``(|G|^2, tr(Sigma))`` from gradients at two batch sizes (McCandlish et al. 2018, App. A).

    ``micro_sq_norms``: squared norms of gradients of batches of ``b_small`` examples (averaged: less variance);
    ``big_sq_norm``: that of one gradient of ``b_big`` examples. The simple noise scale is ``tr(Sigma) / |G|^2``:
    the batch size around which a larger batch stops paying (take the ratio of averages, not of one step's).
    """
    if not b_big > b_small > 0:
        raise ValueError(f"noise scale needs b_big > b_small > 0 (got {b_small}, {b_big})")
    small = sum(micro_sq_norms) / len(micro_sq_norms)
    g2 = (b_big * big_sq_norm - b_small * small) / (b_big - b_small)
    trace = (small - big_sq_norm) / (1.0 / b_small - 1.0 / b_big)
    return g2, trace


def top_hessian_eigenvalue(loss: torch.Tensor, params: Sequence[torch.Tensor], iters: int = HESSIAN_ITERS,
                           seed: int = 0) -> float:
    """The Hessian of ``loss`` w.r.t. ``params``: its eigenvalue of largest magnitude, by ``iters`` power
    iterations of Hessian-vector products (double backward). Leaves ``.grad`` untouched."""
    import torch

    params = list(params)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    live = [i for i, g in enumerate(grads) if g.requires_grad]  # a gradient constant in the parameters: H = 0
    if not live:
        return 0.0
    generator = torch.Generator().manual_seed(seed)
    v = [torch.randn(p.shape, generator=generator).to(p.device, p.dtype) for p in params]
    eigenvalue = 0.0
    for _ in range(iters):
        norm = math.sqrt(sum(float((u * u).sum()) for u in v))
        if norm == 0.0:
            return 0.0
        v = [u / norm for u in v]
        hv = torch.autograd.grad([grads[i] for i in live], params, grad_outputs=[v[i] for i in live],
                                 retain_graph=True, allow_unused=True)
        hv = [torch.zeros_like(p) if h is None else h.detach() for p, h in zip(params, hv)]
        eigenvalue = sum(float((h * u).sum()) for h, u in zip(hv, v))  # Rayleigh quotient, |v| = 1
        v = hv
    return eigenvalue


class _Feedback:
    """Running noise-scale estimate and the adaptive accumulation it sets (``train.feedback_every``)."""

    def __init__(self, settings: TrainSettings):
        self.every = settings.feedback_every
        self.adaptive = settings.adaptive_batch and self.every > 0
        self.low = settings.grad_accum
        self.high = max(settings.grad_accum, settings.max_grad_accum)
        self.g2 = self.trace = 0.0  # moving averages from 0: their ratio needs no bias correction

    def due(self, step: int) -> bool:
        """Whether 0-based optimizer step ``step`` is measured."""
        return self.every > 0 and (step + 1) % self.every == 0

    def measure(self, micro_sq: list[float], total_sq: float, b_small: int, pieces: int) -> dict[str, Any]:
        """A feedback line's noise fields from one step's ``pieces`` micro-batch gradients (squared norms) of
        ``b_small`` examples each and their mean (``total_sq``); ``noise_scale`` is the running estimate."""
        if pieces < 2:
            return {"noise_scale": None}  # one micro-batch that does not halve (one example, or odd)
        g2, trace = noise_scale(micro_sq, total_sq, b_small, b_small * pieces)
        return {"grad_sq_norm": g2, "trace_sigma": trace, "noise_scale_step": trace / g2 if g2 > 0 else None,
                "noise_scale": self.update(g2, trace)}

    def update(self, g2: float, trace: float) -> float | None:
        """Fold in one step's estimates; the smoothed noise scale (None while |G|^2 is not positive)."""
        self.g2 = NOISE_EMA * self.g2 + (1 - NOISE_EMA) * g2
        self.trace = NOISE_EMA * self.trace + (1 - NOISE_EMA) * trace
        return self.trace / self.g2 if self.g2 > 0 else None

    def grad_accum(self, current: int, noise: float | None, batch_size: int) -> int:
        """Micro-batches per step: grown toward ``noise / batch_size``, within [grad_accum, max_grad_accum]."""
        if not self.adaptive or noise is None or not math.isfinite(noise):
            return current
        return max(current, min(self.high, max(self.low, math.ceil(noise / batch_size))))


def _curvature(task: Task, module: torch.nn.Module, feed: dict, targets: torch.Tensor, seed: int) -> float | None:
    """The top Hessian eigenvalue of the loss of one micro-batch; None where the model has no double backward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    params = [p for p in module.parameters() if p.requires_grad]
    try:
        with sdpa_kernel(SDPBackend.MATH):  # the fused attention kernels have no double backward
            return top_hessian_eigenvalue(task.loss(module, feed, targets), params, seed=seed)
    except RuntimeError as exc:  # an op without a second derivative: log the rest, not fail the run
        if "not implemented" not in str(exc):
            raise
        return None


def _sq_norm(tensors) -> float:
    return sum(float((t.detach().float() ** 2).sum()) for t in tensors)


def _halves(inputs: dict, targets) -> list[tuple[dict, Any]] | None:
    """A micro-batch as two equal halves along the batch axis (noise scale without accumulation); None if odd."""
    n = len(targets)
    if n < 2 or n % 2:
        return None
    h = n // 2
    return [({k: v[:h] for k, v in inputs.items()}, targets[:h]), ({k: v[h:] for k, v in inputs.items()}, targets[h:])]


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
    if world > 1 and (settings.feedback_every or settings.adaptive_batch):
        raise ConfigError("train.feedback_every and train.adaptive_batch measure one process's gradients: set "
                          "them to 0/false under data-parallel training (tune.ddp_procs = 1 keeps them)")
    torch.manual_seed(replicas.seed(task))
    model_args = getattr(model, "model_args", None)
    device = next(model.parameters()).device
    module = replicas.wrap(model)
    optimizer = make_optimizer(model, settings)
    feedback = _Feedback(settings)
    accum = settings.grad_accum  # micro-batches per step; adaptive_batch grows it
    most = feedback.high if feedback.adaptive else settings.grad_accum  # micro-batches a step may take
    batches = task.batches("train", replicas.batch_size(settings), settings.max_steps * most,
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
            measuring = feedback.due(step)
            micro_batches = [next(batches) for _ in range(accum)]
            if measuring and accum == 1:  # two half batches: the same gradient, and two batch sizes to compare
                micro_batches = _halves(*micro_batches[0]) or micro_batches
            pieces, cost, micro_sq = len(micro_batches), 0.0, []
            step_loss = 0.0
            for micro, (inputs, targets) in enumerate(micro_batches):
                feed = {k: torch.from_numpy(v).to(device) for k, v in inputs.items()}
                if measuring:
                    start = time.perf_counter()
                    before = [p.grad.detach().clone() if p.grad is not None else None for p in model.parameters()]
                    cost += time.perf_counter() - start
                with replicas.micro_batch(module, last=micro == pieces - 1):
                    loss = task.loss(module, feed, torch.from_numpy(targets).to(device)) / pieces
                    loss.backward()
                if measuring:
                    start = time.perf_counter()
                    # this micro-batch's own gradient, un-scaled: (accumulated now - accumulated before) x pieces
                    micro_sq.append(pieces ** 2 * _sq_norm(
                        p.grad - b if b is not None else p.grad
                        for p, b in zip(model.parameters(), before) if p.grad is not None))
                    cost += time.perf_counter() - start
                step_loss += loss.item()
                window_samples += targets.size * world
                samples += targets.size * world
            if measuring:
                start = time.perf_counter()
                total_sq = _sq_norm(p.grad for p in model.parameters() if p.grad is not None)
                record = {"event": "feedback", "step": step + 1, "grad_accum": accum,
                          **feedback.measure(micro_sq, total_sq, len(micro_batches[0][1]), pieces),
                          "hessian_top": _curvature(task, module, feed, torch.from_numpy(targets).to(device), step)}
                record["feedback_s"] = cost + time.perf_counter() - start
                log.write(record | replicas.log_fields)
                grown = feedback.grad_accum(accum, record["noise_scale"], settings.batch_size)
                if grown != accum:
                    log.write({"event": "batch", "step": step + 1, "grad_accum": grown,
                               "batch_size": settings.batch_size * grown, "noise_scale": record["noise_scale"]})
                    accum = grown
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
                           "batch_size": settings.batch_size * accum,
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
