"""The prefill and step ONNX graphs of a :class:`~autoglm.tasks.DecoderWeights`, KV cache in GroupQueryAttention.

Both graphs take the same inputs (``input_ids``, ``position_ids``, ``seqlens_k``,
``total_sequence_length``, ``query_seqlens`` and ``past_{key,value}_{i}`` (B, kv_heads, cache, D)) and
return ``logits`` plus ``present_{key,value}_{i}``; the prefill also takes ``last_only`` (false: logits at
every position; true: at each row's last). :mod:`compress.decode_engine` drives them. Two
families of decoder:

* GPT-style: learned positions (gathered by ``position_ids``), LayerNorm, GELU (exact, or GPT-2's
  tanh approximation), biases;
* Llama-style: rotary positions applied by GroupQueryAttention itself (``do_rotary``, cos/sin tables
  from the model's ``inv_freq``, rotate-half layout as in transformers), RMSNorm (each residual add and
  the norm after it one ``SkipSimplifiedLayerNormalization``), SwiGLU MLP, grouped-query heads, and where
  the model has them (Qwen3) an RMSNorm of each query and key head before the rotation; a layer without
  positions (SmolLM3's NoPE layers) attends unrotated; Gemma's GeGLU, norms of each block's output before
  the residual, sliding-window layers with their own rotary tables, and softcapped scores and logits.
  GroupQueryAttention places each query row at ``P + s`` (``P`` the tokens already cached:
  ``seqlens_k + 1 - query_seqlens``), which is the same position the engine feeds the learned family,
  so ``position_ids`` is an input of every graph but only the GPT family reads it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from autoglm._lazy import require
from autoglm.tasks import DecoderWeights
from autoglm.tasks.decoder import GATED

OPSET = 17  # LayerNormalization
OPSET_RMS = 23  # RMSNormalization


def rotary_tables(inv_freq: np.ndarray, scale: float, context: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin (context, R/2) of every position, in float32 as transformers computes them."""
    positions = np.arange(context, dtype=np.float32)[:, None]
    angles = positions * inv_freq.astype(np.float32)[None, :]  # (context, R/2)
    return np.cos(angles) * np.float32(scale), np.sin(angles) * np.float32(scale)


def last_positions(x: str, inputs: list, inits: list, nodes: list) -> str:
    """``x`` (B, S, C), or with the prefill's ``last_only`` input true each row's last prompt position only
    (B, 1, C): a prompt's next token needs one row of logits, and the head (the widest MatMul) and the logits
    of every other position would be a third of a prefill's work; the loss gate (false) scores them all.
    ONNX Runtime runs every node of a graph whatever outputs are asked for, so the choice is an ``If``
    rather than a second output."""
    onnx = require("onnx", purpose="building decode graphs")
    helper = onnx.helper
    inputs.append(helper.make_tensor_value_info("last_only", onnx.TensorProto.BOOL, []))
    inits.append(onnx.numpy_helper.from_array(np.array([-1, 1, 1], np.int64), "last.shape"))
    f32 = onnx.TensorProto.FLOAT
    # row b's last prompt position is query_seqlens[b] - 1 (prompts are right-padded)
    last = helper.make_graph([
        helper.make_node("Cast", ["query_seqlens"], ["last.len"], to=onnx.TensorProto.INT64),
        helper.make_node("Sub", ["last.len", "last.one"], ["last.pos"]),
        helper.make_node("Reshape", ["last.pos", "last.shape"], ["last.index"]),  # (B, 1, 1)
        helper.make_node("GatherND", [x, "last.index"], ["last.x"], batch_dims=1)],  # (B, 1, C)
        "last_position", [], [helper.make_tensor_value_info("last.x", f32, None)])
    inits.append(onnx.numpy_helper.from_array(np.array(1, np.int64), "last.one"))
    every = helper.make_graph([helper.make_node("Identity", [x], ["every.x"])], "every_position", [],
                              [helper.make_tensor_value_info("every.x", f32, None)])
    nodes.append(helper.make_node("If", ["last_only"], ["x.logit_rows"], then_branch=last, else_branch=every))
    return "x.logit_rows"


def build_graph(w: DecoderWeights, step: bool) -> Any:
    """The prefill (``step=False``) or step graph of ``w`` as an ``onnx.ModelProto``."""
    onnx = require("onnx", purpose="building decode graphs")
    helper, numpy_helper = onnx.helper, onnx.numpy_helper
    nodes, inits = [], []
    rotary = w.rotary_inv_freq is not None

    def const(name: str, value: np.ndarray | None) -> str:
        if value is None:
            return ""
        inits.append(numpy_helper.from_array(np.ascontiguousarray(value, np.float32), name))
        return name

    def const_i64(name: str, value: list[int]) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value, np.int64), name))
        return name

    def node(op: str, ins: list[str], out: str, **attrs) -> str:
        nodes.append(helper.make_node(op, ins, [out], **attrs))
        return out

    def linear(x: str, wb: tuple, name: str) -> str:
        y = node("MatMul", [x, const(f"{name}.w", wb[0])], f"{name}.mm")
        return y if wb[1] is None else node("Add", [y, const(f"{name}.b", wb[1])], f"{name}.out")

    def norm(x: str, wb: tuple, name: str) -> str:
        if w.norm == "rms":  # x / sqrt(mean(x^2) + eps) * weight (no mean subtracted, no bias)
            return node("RMSNormalization", [x, const(f"{name}.w", wb[0])], f"{name}.out", axis=-1,
                        epsilon=w.layer_norm_eps)
        return node("LayerNormalization", [x, const(f"{name}.w", wb[0]), const(f"{name}.b", wb[1])],
                    f"{name}.out", axis=-1, epsilon=w.layer_norm_eps)

    def add_norm(x: str, y: str, wb: tuple, name: str, keep_sum: bool = True) -> tuple[str, str]:
        """(norm(x + y), x + y): the residual add and the next norm. RMSNorm's pair is one node,
        SkipSimplifiedLayerNormalization (as onnxruntime-genai's Llama graphs): two nodes fewer per layer, and
        the sum is not written and read back between them. LayerNorm's pair stays an Add and a
        LayerNormalization (SkipLayerNormalization measured ~5x slower here, see decode_engine)."""
        if w.norm != "rms":
            total = node("Add", [x, y], f"{name}.sum")
            return norm(total, wb, name), total
        outs = [f"{name}.out", "", "", f"{name}.sum" if keep_sum else ""]  # output, mean, inv_std_var, x + y
        nodes.append(helper.make_node("SkipSimplifiedLayerNormalization", [x, y, const(f"{name}.w", wb[0])], outs,
                                      domain="com.microsoft", epsilon=w.layer_norm_eps))
        return outs[0], outs[3]

    def mlp(x: str, layer, p: str) -> str:
        if w.activation in GATED:  # down(act(gate(x)) * up(x))
            # gate and up as one MatMul (C, 2F), split after: one weight read, and INT8 quantizes x once
            width = layer.fc[0].shape[1]
            biases = [np.zeros(width, np.float32) if b is None else b for b in (layer.gate[1], layer.fc[1])]
            no_bias = layer.gate[1] is None and layer.fc[1] is None
            fused = (np.concatenate([layer.gate[0], layer.fc[0]], axis=1), None if no_bias else np.concatenate(biases))
            gate_up = linear(x, fused, f"{p}.mlp.gate_up")
            g, up = f"{p}.mlp.gate", f"{p}.mlp.up"
            nodes.append(helper.make_node("Split", [gate_up, const_i64(f"{p}.mlp.split", [width, width])],
                                          [g, up], axis=-1))
            if w.activation == "swiglu":  # silu(g) = g * sigmoid(g)
                act = node("Mul", [g, node("Sigmoid", [g], f"{p}.mlp.sig")], f"{p}.mlp.silu")
            else:  # Gemma's gelu_pytorch_tanh
                act = node("FastGelu", [g], f"{p}.mlp.gelu", domain="com.microsoft")
            hidden = node("Mul", [act, up], f"{p}.mlp.act")
        elif w.activation == "gelu_tanh":  # GPT-2's gelu_new: 0.5x(1 + tanh(sqrt(2/pi)(x + 0.044715x^3)))
            hidden = node("FastGelu", [linear(x, layer.fc, f"{p}.mlp.fc")], f"{p}.mlp.act", domain="com.microsoft")
        else:
            hidden = node("Gelu", [linear(x, layer.fc, f"{p}.mlp.fc")], f"{p}.mlp.act", domain="com.microsoft")
        return linear(hidden, layer.fc_out, f"{p}.mlp.out")

    def head_norms(qkv: str, layer, p: str) -> list[str]:
        """Queries, keys and values apart, each query and key head RMS-normalized (GroupQueryAttention's own
        q/k norm inputs are not honoured by its CPU kernel)."""
        names = [f"{p}.attn.{part}" for part in ("q", "k", "v")]
        sizes = const_i64(f"{p}.attn.split", [heads * size, kv_heads * size, kv_heads * size])
        nodes.append(helper.make_node("Split", [qkv, sizes], names, axis=-1))
        for j, (n, weight) in enumerate(((heads, layer.q_norm), (kv_heads, layer.k_norm))):
            part = names[j]
            per_head = node("Reshape", [part, const_i64(f"{part}.heads", [0, 0, n, size])], f"{part}.per_head")
            normed = node("RMSNormalization", [per_head, const(f"{part}.norm.w", weight)], f"{part}.normed",
                          axis=-1, epsilon=w.layer_norm_eps)
            names[j] = node("Reshape", [normed, const_i64(f"{part}.flat", [0, 0, n * size])], f"{part}.norm")
        return names

    n_layer, heads, kv_heads, size = len(w.layers), w.n_head, w.kv_heads, w.head_size
    vocab, width = w.token_embedding.shape
    seq = 1 if step else "sequence"
    cache = "context" if step else "past"
    f32, i64, i32 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64, onnx.TensorProto.INT32
    inputs = [helper.make_tensor_value_info("input_ids", i64, ["batch", seq]),
              helper.make_tensor_value_info("position_ids", i64, ["batch", seq]),
              helper.make_tensor_value_info("seqlens_k", i32, ["batch"]),
              helper.make_tensor_value_info("total_sequence_length", i32, []),
              helper.make_tensor_value_info("query_seqlens", i32, ["batch"])]
    # the prefill's logits: every position, or each row's last one (``last_only``)
    outputs = [helper.make_tensor_value_info("logits", f32, ["batch", 1 if step else "logit_positions", vocab])]

    x = node("Gather", [const("wte", w.token_embedding), "input_ids"], "tok")
    if not rotary:
        x = node("Add", [x, node("Gather", [const("wpe", w.position_embedding), "position_ids"], "pos")], "x0")
    tables: dict[tuple, list[str]] = {}  # one cos/sin pair per distinct rotary of the layers

    def rope(layer) -> tuple[list[str], dict]:
        """The layer's GroupQueryAttention cos/sin inputs and attributes: its own rotary, the model's, or none."""
        if not rotary or not layer.rotary:  # learned positions, or a NoPE layer (SmolLM3's)
            return ["", ""], {}
        own = layer.rotary_inv_freq is not None
        angles, scale = (layer.rotary_inv_freq, layer.rotary_scale) if own else (w.rotary_inv_freq, w.rotary_scale)
        key = (angles.tobytes(), scale or 1.0)
        if key not in tables:
            cos, sin = rotary_tables(angles, scale or 1.0, w.context)
            suffix = f".{len(tables)}" if tables else ""
            tables[key] = [const(f"cos_cache{suffix}", cos), const(f"sin_cache{suffix}", sin)]
        return tables[key], {"do_rotary": 1, "rotary_interleaved": 0}

    scoring = {"scale": w.attn_scale} if w.attn_scale else {}
    if w.attn_softcap:
        scoring["softcap"] = w.attn_softcap
    h = norm(x, w.layers[0].ln1, "h0.ln_1")  # later layers' first norm comes with the residual add before it
    for i, layer in enumerate(w.layers):
        p = f"h{i}"
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_{kind}_{i}", f32, ["batch", kv_heads, cache, size]))
            outputs.append(helper.make_tensor_value_info(f"present_{kind}_{i}", f32,
                                                         ["batch", kv_heads, "present", size]))
        qkv = linear(h, layer.qkv, f"{p}.attn.qkv")  # (B, S, (H + 2 KV) D)
        qkv_in = [qkv, "", ""] if layer.q_norm is None else head_norms(qkv, layer, p)
        cos_sin, attrs = rope(layer)
        if layer.window:  # transformers' sliding_window is GroupQueryAttention's local_window_size (both tested)
            attrs = {**attrs, "local_window_size": layer.window}
        gqa_in = [*qkv_in, f"past_key_{i}", f"past_value_{i}", "seqlens_k", "total_sequence_length", *cos_sin]
        gqa_in += [""] * 7 + ["query_seqlens"]  # position_ids .. k_norm_weight unused: positions from seqlens
        nodes.append(helper.make_node("GroupQueryAttention", gqa_in,
                                      [f"{p}.attn.y", f"present_key_{i}", f"present_value_{i}"],
                                      domain="com.microsoft", num_heads=heads, kv_num_heads=kv_heads,
                                      **attrs, **scoring))
        attn = linear(f"{p}.attn.y", layer.proj, f"{p}.attn.proj")
        if layer.post_attn_norm is not None:  # Gemma's: the block's output is normalized before the residual
            attn = norm(attn, (layer.post_attn_norm, None), f"{p}.attn.post_norm")
        h, x1 = add_norm(x, attn, layer.ln2, f"{p}.ln_2")
        out = mlp(h, layer, p)
        if layer.post_mlp_norm is not None:
            out = norm(out, (layer.post_mlp_norm, None), f"{p}.mlp.post_norm")
        last = i + 1 == n_layer
        h, x = add_norm(x1, out, w.ln_f if last else w.layers[i + 1].ln1,
                        "ln_f" if last else f"h{i + 1}.ln_1", keep_sum=not last)
    if not step:  # the final norm is per position: normalizing every row, then keeping the last, is the same
        h = last_positions(h, inputs, inits, nodes)
    head = linear(h, w.head, "lm_head")
    if w.logit_softcap:  # cap * tanh(logits / cap)
        cap = const("logit_softcap", np.float32(w.logit_softcap))
        head = node("Mul", [node("Tanh", [node("Div", [head, cap], "logits.div")], "logits.tanh"), cap], "logits.cap")
    node("Identity", [head], "logits")
    graph = helper.make_graph(nodes, "step" if step else "prefill", inputs, outputs, inits)
    opset = OPSET_RMS if w.norm == "rms" else OPSET
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                    helper.make_opsetid("com.microsoft", 1)],
                              producer_name="autoglm")
    model.ir_version = 8 if opset <= 17 else 11
    for key, value in {"context": w.context, "vocab_size": vocab, "n_layer": n_layer, "n_head": heads,
                       "n_kv_head": kv_heads, "n_embd": width}.items():
        model.metadata_props.add(key=key, value=str(value))
    onnx.checker.check_model(model)
    return model


def write_graphs(w: DecoderWeights, out_dir: Path) -> tuple[Path, Path]:
    """``prefill.onnx`` and ``step.onnx`` (FP32) in ``out_dir``."""
    onnx = require("onnx", purpose="building decode graphs")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = out_dir / "prefill.onnx", out_dir / "step.onnx"
    for path, step in zip(paths, (False, True)):
        onnx.save(build_graph(w, step), str(path))
    return paths
