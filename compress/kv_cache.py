"""An INT8 KV cache for the decode graphs: keys and values stored as int8 with static per-channel scales.

At 32 live sequences a decode step reads every sequence's cached keys and values (each layer, each cached
position) besides the weights, which it reads once for the whole batch: with FP32 caches and INT8 weights
the cache is most of the bytes a step moves, and attention over it most of the step's time. ONNX Runtime's
CPU ``GroupQueryAttention`` keeps its cache in int8 when given ``k_scale``/``v_scale`` (``PER_CHANNEL``:
one scale per key/value head and channel) and reads it with FP32 queries: a quarter of FP32's bytes.

The scales are static, so they are calibrated here: the FP32 prefill graph encodes the task's own text
and each channel's scale is its largest magnitude / 127 (a value beyond it saturates). Keys of a rotary
model are cached after rotation, which mixes channel ``i`` with ``i + R/2`` (``R`` the rotated channels of
a head: all ``D`` of them, or the first ones with a partial rotary) by an angle that depends on the
position; the pair's 2-norm does not, so both channels of a pair take the largest 2-norm seen, a bound
that holds at every position, including those longer than the calibration text. Weights are untouched: the
transform applies to FP32, INT8 or INT4 graphs alike. Quality is judged like any variant, by validation
loss read through the cache (:func:`compress.decode.graph_val_loss` scores in chunks, so most of attention
reads cached, quantized positions).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from autoglm._lazy import require
from autoglm.artifacts import atomic_output

KV_CACHES = ("fp32", "int8")
"""The decode graphs' cache types: fp32 (the FP32 graphs always; the reference), int8 (per-channel scales)."""

SCALE_INPUTS = 12, 13  # GroupQueryAttention's k_scale and v_scale inputs


def calibrate(prefill_path: Path, batches: Iterable[np.ndarray], rotary_dims: int | Sequence[int]) -> np.ndarray:
    """Per-channel scales ``(n_layer, 2, kv_heads, head_size)`` (keys, values) from the FP32 prefill graph at
    ``prefill_path`` encoding each batch of token ids ``(B, T)``; ``rotary_dims``: the first channels of each
    key head that are rotated (rotate-half layout; 0: none), one for all layers or one per layer, so each of
    their pairs shares the largest 2-norm seen (see the module's docstring)."""
    ort = require("onnxruntime", purpose="calibrating an INT8 KV cache")
    from compress.decode_engine import session_options

    session = ort.InferenceSession(str(prefill_path), session_options(), providers=["CPUExecutionProvider"])
    past = [i for i in session.get_inputs() if i.name.startswith("past_key_")]
    n_layer, heads, size = len(past), past[0].shape[1], past[0].shape[3]
    names = [f"present_{kind}_{i}" for i in range(n_layer) for kind in ("key", "value")]
    peak = np.zeros((n_layer, 2, heads, size), np.float32)
    turned = [rotary_dims] * n_layer if isinstance(rotary_dims, int) else list(rotary_dims)
    for ids in batches:
        b, t = ids.shape
        feed = {"input_ids": ids.astype(np.int64), "position_ids": np.tile(np.arange(t, dtype=np.int64), (b, 1)),
                "seqlens_k": np.full(b, t - 1, np.int32), "total_sequence_length": np.asarray(t, np.int32),
                "query_seqlens": np.full(b, t, np.int32), "last_only": np.asarray(True)}
        empty = np.zeros((b, heads, t, size), np.float32)
        feed |= {f"past_{kind}_{i}": empty for i in range(n_layer) for kind in ("key", "value")}
        for j, kv in enumerate(session.run(names, feed)):  # (B, heads, T, D)
            kv = kv[:, :, :t]
            r = turned[j // 2]
            if r and j % 2 == 0:
                norm = np.sqrt(kv[..., :r // 2] ** 2 + kv[..., r // 2:r] ** 2)
                kv = np.concatenate([norm, norm, kv[..., r:]], axis=-1)
            np.maximum(peak[j // 2, j % 2], np.abs(kv).max(axis=(0, 2)), out=peak[j // 2, j % 2])
    # a channel never seen non-zero gets the smallest positive scale rather than 0 (a division by zero)
    return np.maximum(peak / 127.0, np.finfo(np.float32).tiny)


def with_int8_cache(model: Any, scales: np.ndarray) -> Any:
    """``model`` (an ``onnx.ModelProto`` of a decode graph, changed in place and returned) with int8
    ``past``/``present`` keys and values: every GroupQueryAttention, in layer order, gets its layer's scales."""
    onnx = require("onnx", purpose="INT8 KV cache graphs")
    helper, numpy_helper = onnx.helper, onnx.numpy_helper
    attentions = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    if len(attentions) != len(scales):
        raise ValueError(f"{len(scales)} layers of KV scales for a graph of {len(attentions)} attention layers")
    for i, (node, layer) in enumerate(zip(attentions, scales)):
        inputs = list(node.input) + [""] * max(0, SCALE_INPUTS[1] + 1 - len(node.input))
        for kind, index, value in (("k", SCALE_INPUTS[0], layer[0]), ("v", SCALE_INPUTS[1], layer[1])):
            name = f"kv.{kind}_scale_{i}"
            model.graph.initializer.append(numpy_helper.from_array(value[None, :, None, :].astype(np.float32), name))
            inputs[index] = name
        del node.input[:]
        node.input.extend(inputs)
        node.attribute.extend([helper.make_attribute("k_quant_type", "PER_CHANNEL"),
                               helper.make_attribute("v_quant_type", "PER_CHANNEL"),
                               helper.make_attribute("kv_cache_bit_width", 8)])
    for value in (*model.graph.input, *model.graph.output):
        if value.name.startswith(("past_key_", "past_value_", "present_key_", "present_value_")):
            value.type.tensor_type.elem_type = onnx.TensorProto.INT8
    model.metadata_props.add(key="kv_cache", value="int8")
    return model


def write_int8_cache_graphs(paths: tuple[Path, Path], out_dir: Path, scales: np.ndarray) -> tuple[Path, Path]:
    """The decode graphs at ``paths`` (prefill, step) with an int8 cache, written atomically to ``out_dir``."""
    onnx = require("onnx", purpose="INT8 KV cache graphs")
    out = out_dir / "prefill.onnx", out_dir / "step.onnx"
    for src, dst in zip(paths, out):
        model = with_int8_cache(onnx.load(str(src)), scales)
        with atomic_output(dst) as tmp:
            onnx.save(model, str(tmp))
    return out

