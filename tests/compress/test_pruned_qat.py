"""pruned-qat: the pruned, fine-tuned model fine-tuned fake-quantized, exported as a narrower INT8 QDQ graph."""

from __future__ import annotations

from math import prod

import onnx
from onnx import TensorProto

from compress import build_variants
from tests.compress._trained import digits

FAST = ["compress.exporter='legacy'", "compress.prune.ratio=0.5", "compress.prune.finetune_steps=40",
        "compress.qat.steps=10", "compress.quantize.calibration_batches=2", "compress.max_metric_loss=0.02",
        "train.lr=3e-3", "train.batch_size=64", "train.eval_batches=5", "measure.repeats=3", "measure.warmup=1",
        "measure.batch_sizes=[1]"]


def _weights(path, dtype: int) -> list[tuple[int, ...]]:
    """The shapes of the Conv/Gemm weights (initializers of 2 or more axes) of type ``dtype`` in ``path``."""
    graph = onnx.load(str(path)).graph
    return sorted(tuple(i.dims) for i in graph.initializer if i.data_type == dtype and len(i.dims) >= 2)


def test_pruned_qat_is_a_narrower_qdq_graph_gated_like_every_variant(settings_in, tmp_path):
    task, model = digits()

    by_name = {v.name: v for v in build_variants(task, model, dict(model.model_args), settings_in(*FAST), tmp_path,
                                                 ["pruned-qat"])}

    fp32, variant = by_name["fp32"], by_name["pruned-qat"]
    ops = {n.op_type for n in onnx.load(str(variant.path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # QDQ, run by ORT on INT8 kernels
    full, narrow = _weights(fp32.path, TensorProto.FLOAT), _weights(variant.path, TensorProto.INT8)
    assert len(full) == len(narrow) and sum(map(prod, narrow)) < sum(map(prod, full))
    assert all(n[0] <= f[0] for f, n in zip(full, narrow)) and any(n[0] < f[0] for f, n in zip(full, narrow))
    assert variant.recipe["pass"] == "prune" and variant.recipe["ratio"] == 0.5
    assert variant.recipe["then"] == {"pass": "qat", "steps": 10, "lr_frac": 0.2}
    assert variant.metric_loss is not None
    if variant.status == "rejected":  # gated like every variant: a loss past the limit is told, not served
        assert variant.metric_loss > 0.02 and "compress.max_metric_loss=0.02" in variant.reason
    else:
        assert variant.status == "ok" and variant.metric_loss <= 0.02

