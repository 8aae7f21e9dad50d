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
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

from autoglm.artifacts import write_atomic
from autoglm.errors import ConfigError
from autoglm.tasks.base import EvalCallback, Task, TrainResult
from autoglm.tasks.training import OneProcess, fit

if TYPE_CHECKING:
    import torch

    from autoglm.config import Settings, TrainSettings

RESULT = "result.json"


def backend(device: str = "auto") -> str:
    """NCCL when the ranks train on CUDA (``run.device``; auto: where torch sees it), gloo on the CPU."""
    from autoglm.device import resolve_device

    return "nccl" if resolve_device(device).is_cuda else "gloo"


def rank_device(device: str, local_rank: int):
    """This rank's torch device: one GPU per local rank on CUDA (``cuda:N`` offsets the ranks' GPUs by N, so
    two jobs can share a host), the CPU otherwise; ConfigError when the host has too few GPUs."""
    import torch

    from autoglm.device import resolve_device

    choice = resolve_device(device)
    if not choice.is_cuda:
        return torch.device("cpu")
    first = choice.index if device.startswith("cuda:") else 0
    index = first + local_rank
    if index >= torch.cuda.device_count():
        raise ConfigError(f"rank {local_rank} needs GPU {index} but torch sees {torch.cuda.device_count()}: start "
                          f"at most {torch.cuda.device_count() - first} ranks per host (tune.ddp_procs)")
    return torch.device("cuda", index)


def per_rank_batch(settings: TrainSettings, world: int) -> int:
    """The batch each rank draws; ConfigError unless the global batch splits evenly."""
    if settings.batch_size % world:
        raise ConfigError(f"train.batch_size={settings.batch_size} does not split over {world} processes: use a "
                          f"multiple of {world} (the batch size is global under DDP)")
    return settings.batch_size // world


class ProcessGroup(OneProcess):
    """:func:`fit`'s hooks for one rank of an initialized process group (see the module docstring)."""

    def __init__(self, device):
        import torch.distributed as dist

        self.rank, self.world, self.device = dist.get_rank(), dist.get_world_size(), device
        self.log_fields = {"world_size": self.world}

    def seed(self, task: Task) -> int:
        return task.seed + self.rank  # dropout masks and data differ per rank

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def batch_size(self, settings: TrainSettings) -> int:
        return per_rank_batch(settings, self.world)

    def micro_batch(self, module, last: bool):
        # gradients are averaged across ranks once per optimizer step, on the last micro-batch
        return nullcontext() if last else module.no_sync()

    def agree(self, values: list[float]) -> list[float]:
        import torch
        import torch.distributed as dist

        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.broadcast(tensor, 0)
        return tensor.tolist()

    def step_loss(self, loss: float) -> float:
        import torch
        import torch.distributed as dist

        mean = torch.tensor([loss / self.world], dtype=torch.float64, device=self.device)
        dist.all_reduce(mean)  # the global batch's loss, as a single process would log it
        return mean.item()


def train_ddp(task: Task, model: torch.nn.Module, settings: TrainSettings, on_eval: EvalCallback | None = None,
              log_path: Path | str | None = None) -> TrainResult:
    """:func:`autoglm.tasks.training.fit` for an initialized process group; every rank calls it.

    ``model`` is the plain module on this rank's device (identical on every rank: DDP also broadcasts
    rank 0's weights). ``samples`` counts the global batch. ``on_eval`` runs on rank 0 only.
    """
    replicas = ProcessGroup(next(model.parameters()).device)
    with task.training(model):  # as Task.train: LoRA adapters on every rank alike, merged back after
        return fit(task, model, settings, on_eval=on_eval, log_path=log_path if replicas.rank == 0 else None,
                   replicas=replicas)


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
    group_backend = backend(settings.run.device)
    device = rank_device(settings.run.device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(group_backend)
    try:
        rank = dist.get_rank()
        task = get_task(settings).scored_by(settings.tune.metric)  # a tune trial's: evaluated on its metric
        if rank == 0:  # one process prepares the data cache; the others read what it wrote
            task.prepare()
        dist.barrier()
        task.prepare()
        model_args = task.check_model_args(settings.task.model)
        out = Path(out_dir)
        with fixed_threads(settings.run.threads):
            model = task.build_model(model_args).to(device)
            result = train_ddp(task, model, settings.train, log_path=out / "train.jsonl" if rank == 0 else None)
        # every rank's whole process so far, imports included: what the ranks cost the machine together
        spent = torch.tensor([time.process_time()], dtype=torch.float64, device=device)
        dist.all_reduce(spent)
        if rank == 0:
            summary = {"steps": result.steps, "samples": result.samples, "metric": result.metric,
                       "wall_s": result.wall_s, "cpu_s": result.cpu_s, "ranks_cpu_s": float(spent.item()),
                       "history": result.history,
                       "stopped_early": result.stopped_early, "world_size": dist.get_world_size(),
                       "backend": group_backend, "device": str(device)}
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
    import logging

    from autoglm.cli import run_main

    code = run_main(main)
    # Every file is written and the group torn down by now. Leave without the interpreter's teardown: torch's
    # exit-time destructors abort a rank now and then ("terminate called without an active exception", SIGABRT,
    # about 1 exit in 20 on a loaded 2-core host), which torchrun reports as the trial failing after it trained.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
