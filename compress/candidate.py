"""What a tuning trial asks of compress: one variant built and timed, or built, scored and timed, where the
timings of an identical graph stand for its own instead of being measured twice.

A graph's speed depends on its ops and its tensors' shapes, not on its weights: two graphs with equal
:func:`graph_signature` run the same kernels on the same shapes, so a trial may time its untrained model's graph
while it trains and keep those figures for the trained one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autoglm.config import Settings
from autoglm.tasks import Task
from compress.variants import Variant, VariantBuilder


@dataclass(frozen=True)
class Timing:
    """One compressed graph's timings (batch -> latency and energy) and what it was (:func:`graph_signature`)."""

    profile: dict[int, dict[str, Any]]
    graph: tuple


def graph_signature(path: Path | None) -> tuple:
    """What a graph's speed depends on: its nodes' op types in order and its initializers' shapes and types
    (not their values). Two graphs with equal signatures run the same kernels on the same shapes."""
    if path is None or path.suffix != ".onnx":
        return ()  # not an ONNX graph (a TensorRT plan): never taken for another one
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return (tuple(f"{n.domain}:{n.op_type}" for n in graph.node),
            tuple(sorted((i.name, tuple(i.dims), i.data_type) for i in graph.initializer)))


def time_variant(task: Task, model, model_args: dict[str, Any], settings: Settings, out_dir: Path, name: str, *,
                 batch_sizes: Sequence[int], repeats: int, threads: int) -> Timing:
    """Variant ``name`` of ``model`` built under ``out_dir`` and timed (not scored) with ``threads`` threads."""
    builder = VariantBuilder(task, model, model_args, settings, out_dir)
    variant = builder.build(name)
    builder.time(variant, builder.predictor(variant, threads), batch_sizes, repeats)
    return Timing(variant.profile, graph_signature(variant.path))


def evaluate_variant(task: Task, model, model_args: dict[str, Any], settings: Settings, out_dir: Path, name: str, *,
                     batch_sizes: Sequence[int], repeats: int, threads: int,
                     timing: Timing | None = None) -> tuple[Variant, bool]:
    """Variant ``name`` of ``model`` built under ``out_dir``, scored on validation data and timed, and whether its
    timings are ``timing``'s: those of a graph with the same signature, taken instead of timing it again."""
    builder = VariantBuilder(task, model, model_args, settings, out_dir)
    variant = builder.build(name)
    builder.score(variant, builder.predictor(variant), baseline=None)
    if timing is not None and timing.graph and timing.graph == graph_signature(variant.path):
        variant.profile = timing.profile
        return variant, True
    builder.time(variant, builder.predictor(variant, threads), batch_sizes, repeats)
    return variant, False
