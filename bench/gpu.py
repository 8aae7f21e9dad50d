"""GPU proof on a CUDA host: CUDA training, CUDA-EP parity, FP32/INT8/TensorRT timings, KIND_GPU Triton, NVML energy.

The work is :mod:`bench.gpu_check` (also ``python -m bench.gpu_check``). On a host without CUDA the report says why
the proof did not run, so ``make bench`` over every benchmark still completes there.
"""

from __future__ import annotations

from bench.gpu_check import Refused, run_proof
from bench.harness import Table


def run(quick: bool) -> list[Table]:
    try:
        return run_proof(quick).tables
    except Refused as exc:
        return [Table("GPU proof", ["result"], [[f"not run: {exc}"]])]
