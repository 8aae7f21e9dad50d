"""One trial trained data-parallel: torchrun + DistributedDataParallel on the shared loop's schedule.

Run one process per device (gloo on CPU, NCCL on GPU)::

    torchrun --standalone --nproc_per_node 2 -m autoglm.ddp --config configs/charlm.toml --out runs/x/ddp

or :func:`launch` from Python. ``train.batch_size`` is the *global* batch: each of the N ranks draws
``batch_size / N`` examples from its own shard of the random stream (seed ``run.seed + rank``) and DDP
averages the gradients, so an optimizer step sees as many examples as a single-process run of the same
config, with the same warmup/cosine schedule (:func:`lr_at`), AdamW groups, accumulation and clipping.
Rank 0 evaluates, writes the JSON-lines log, ``model.pt`` and ``result.json``; the other ranks follow
its decisions (early stop, time budget) so every rank leaves the loop at the same step.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from contextlib import ExitStack, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

from autoglm.artifacts import write_atomic
from autoglm.errors import ConfigError
from autoglm.tasks.base import EvalCallback, Task, TrainResult
from autoglm.tasks.predict import torch_predictor
from autoglm.tasks.training import TRAIN_LOG_EVERY, _JsonLog, lr_at, make_optimizer

if TYPE_CHECKING:
    import torch

    from autoglm.config import Settings, TrainSettings

RESULT = "result.json"


def backend() -> str:
    """NCCL where CUDA is available, gloo on CPU."""
    import torch

    return "nccl" if torch.cuda.is_available() else "gloo"


def per_rank_batch(settings: TrainSettings, world: int) -> int:
    """The batch each rank draws; ConfigError unless the global batch splits evenly."""
    if settings.batch_size % world:
        raise ConfigError(f"train.batch_size={settings.batch_size} does not split over {world} processes: use a "
                          f"multiple of {world} (the batch size is global under DDP)")
    return settings.batch_size // world


def _agree(values: list[float], device, src: int = 0) -> list[float]:
    """Rank ``src``'s values on every rank (the decisions only rank 0 can make)."""
    import torch
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.broadcast(tensor, src)
    return tensor.tolist()


def train_ddp(task: Task, model: torch.nn.Module, settings: TrainSettings, on_eval: EvalCallback | None = None,
              log_path: Path | str | None = None) -> TrainResult:
    """:func:`autoglm.tasks.training.fit` for an initialized process group; every rank calls it.

    ``model`` is the plain module on this rank's device (identical on every rank: DDP also broadcasts
    rank 0's weights). ``samples`` counts the global batch. ``on_eval`` runs on rank 0 only.
    """
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(task.seed + rank)  # dropout masks differ per rank, like their data
    model_args = getattr(model, "model_args", None)
    device = next(model.parameters()).device
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = make_optimizer(model, settings)
    batches = task.batches("train", per_rank_batch(settings, world), settings.max_steps * settings.grad_accum,
                           seed=task.seed + rank, model_args=model_args)
    log = _JsonLog(log_path if rank == 0 else None)
    history: list[tuple[int, float]] = []
    was_training = model.training
    samples = step = 0
    stopped_early = False
    window_samples, window_start = 0, time.perf_counter()
    wall_start, cpu_start = time.perf_counter(), time.process_time()

    def evaluate(at_step: int) -> bool:
        """Rank 0 scores the val split; every rank learns the value and whether to stop."""
        stop, value = 0.0, math.nan
        if rank == 0:
            metrics = task.evaluate(torch_predictor(model), "val", n_batches=settings.eval_batches,
                                    model_args=model_args)
            value = float(metrics[task.metric])
            log.write({"event": "eval", "step": at_step, "metric": task.metric, "value": value,
                       "metrics": metrics, "time_s": time.perf_counter() - wall_start, "world_size": world})
            stop = float(bool(on_eval is not None and on_eval(at_step, value)))
        stop, value = _agree([stop, value], device)
        history.append((at_step, value))
        return bool(stop)

    with ExitStack() as stack:
        stack.callback(log.close)
        stack.callback(model.train, was_training)
        ddp.train()
        while step < settings.max_steps:
            lr = lr_at(step, settings)
            for group in optimizer.param_groups:
                group["lr"] = lr
            step_loss = 0.0
            for micro in range(settings.grad_accum):
                inputs, targets = next(batches)
                feed = {k: torch.from_numpy(v).to(device) for k, v in inputs.items()}
                # gradients are averaged across ranks once per optimizer step, on the last micro-batch
                sync = ddp.no_sync() if micro < settings.grad_accum - 1 else nullcontext()
                with sync:
                    loss = task.loss(ddp, feed, torch.from_numpy(targets).to(device)) / settings.grad_accum
                    loss.backward()
                step_loss += loss.item()
                window_samples += targets.size * world
                samples += targets.size * world
            if settings.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % TRAIN_LOG_EVERY == 0:
                mean_loss = torch.tensor([step_loss / world], dtype=torch.float64, device=device)
                dist.all_reduce(mean_loss)  # the global batch's loss, as a single process would log it
                now = time.perf_counter()
                log.write({"event": "train", "step": step, "loss": mean_loss.item(), "lr": lr,
                           "batch_size": settings.batch_size * settings.grad_accum,
                           "samples_per_s": window_samples / max(now - window_start, 1e-9),
                           "time_s": now - wall_start, "world_size": world})
                window_samples, window_start = 0, now
            out_of_time = False
            if settings.time_budget_s is not None:
                # rank 0's clock decides for all: a rank stopping alone would leave the others in an all-reduce
                elapsed = time.perf_counter() - wall_start
                out_of_time = bool(_agree([float(elapsed >= settings.time_budget_s)], device)[0])
            due = step % settings.eval_every == 0 or step == settings.max_steps or out_of_time
            if due and evaluate(step):
                stopped_early = True
                break
            if out_of_time:
                break

    return TrainResult(steps=step, samples=samples, wall_s=time.perf_counter() - wall_start,
                       cpu_s=time.process_time() - cpu_start, metric=history[-1][1] if history else math.nan,
                       history=history, stopped_early=stopped_early)


def run(settings: Settings, out_dir: Path | str) -> TrainResult:
    """Train the configured task on this rank (under torchrun); rank 0 writes ``out_dir``."""
    import torch
    import torch.distributed as dist

    from autoglm.measure import fixed_threads
    from autoglm.tasks import get_task
    from autoglm.tasks.checkpoint import save_checkpoint

    if "RANK" not in os.environ:
        raise ConfigError("autoglm.ddp runs one process per rank: start it with `torchrun --standalone "
                          "--nproc_per_node N -m autoglm.ddp ...` or autoglm.ddp.launch(N, argv)")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if backend() == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend())
    try:
        rank = dist.get_rank()
        device = torch.device("cuda", local_rank) if backend() == "nccl" else torch.device("cpu")
        task = get_task(settings)
        if rank == 0:  # one process prepares the data cache; the others read what it wrote
            task.prepare()
        dist.barrier()
        task.prepare()
        model_args = task.check_model_args(settings.task.model)
        out = Path(out_dir)
        with fixed_threads(settings.run.threads):
            model = task.build_model(model_args).to(device)
            result = train_ddp(task, model, settings.train, log_path=out / "train.jsonl" if rank == 0 else None)
        if rank == 0:
            summary = {"steps": result.steps, "samples": result.samples, "metric": result.metric,
                       "wall_s": result.wall_s, "cpu_s": result.cpu_s, "history": result.history,
                       "stopped_early": result.stopped_early, "world_size": dist.get_world_size(),
                       "backend": backend()}
            save_checkpoint(out / "model.pt", task.name, model.cpu(), metrics=summary)
            write_atomic(out / RESULT, (json.dumps(summary, indent=2) + "\n").encode())
        dist.barrier()  # nobody exits (tearing the group down) before rank 0's files exist
        return result
    finally:
        dist.destroy_process_group()


def launch(nproc: int, argv: Sequence[str], timeout_s: float | None = None,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m autoglm.ddp argv`` as ``nproc`` local ranks through torchrun; output captured."""
    if nproc < 1:
        raise ConfigError(f"nproc={nproc} must be >= 1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "autoglm.ddp", *argv]
    run_env = {**os.environ, **(env or {})}
    run_env.setdefault("OMP_NUM_THREADS", "1")  # one core per rank; torchrun would otherwise warn and set it
    run_env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=run_env, check=False)


def main(argv: Sequence[str] | None = None) -> int:
    from autoglm.cli import add_common_args, settings_from_args

    parser = add_common_args(argparse.ArgumentParser(prog="python -m autoglm.ddp",
                                                     description=__doc__.splitlines()[0]))
    parser.add_argument("--out", required=True, help="directory for model.pt, train.jsonl and result.json")
    args = parser.parse_args(argv)
    result = run(settings_from_args(args), args.out)
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"ddp: {result.steps} steps, metric {result.metric:.4f} in {result.wall_s:.1f} s -> {args.out}")
    return 0


if __name__ == "__main__":
    from autoglm.cli import run_main

    sys.exit(run_main(main))
