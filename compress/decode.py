"""KV-cache decode graphs for GPT-style tasks: prefill and step, attention as GroupQueryAttention.

Exporting the training module would recompute the whole context for every new token. Instead the
graphs are built from the task's :class:`~autoglm.tasks.DecoderWeights`, with attention as ONNX
Runtime's ``com.microsoft.GroupQueryAttention`` (measured the fastest CPU attention for this model
size; it keeps a KV cache, handles sequences of different lengths in one batch and can update the
cache in place):

* ``prefill.onnx``: prompts (B, S), right-padded to the longest (``query_seqlens`` holds each one's
  length) -> logits at every position (B, S, V) + present K/V (B, H, S, D);
* ``step.onnx``: one token per sequence (B, 1) + past K/V (B, H, context, D), updated in place ->
  logits (B, 1, V); ``query_seqlens`` 0 leaves a row idle.

Gates: greedy tokens from the FP32 graphs must equal torch's greedy generation for the same prompts
(:func:`check_greedy_parity`); INT8 graphs (dynamic, MatMul only) and INT4 ones (MatMulNBits weights), each
also with an int8 KV cache (:mod:`compress.kv_cache`), are judged by validation loss against
``compress.max_metric_loss``, computed through the prefill graph and its cache on the task's own batches.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from autoglm._lazy import require
from autoglm.errors import AutoGLMError
from autoglm.tasks import Task
from compress.decode_graph import build_graph, write_graphs  # noqa: F401 -- build_graph re-exported
from compress.int4 import Int4Recipe

PRECISIONS = ("int8", "int4")  # quantized candidates beside FP32 (compress.generate.int8, .int4)


CHECK_TOKENS = 64
"""New tokens per prompt of the parity gate, and prompt and new tokens of the speed rounds: decoding a whole
1024-token context through torch's generate() for every prompt would take minutes for a 135M model."""


class DecodeParityError(AutoGLMError):
    """The decode graphs' greedy text differs from torch's: they are not published."""


def quantize_graphs(paths: tuple[Path, Path], out_dir: Path, precision: str = "int8",
                    int4: Int4Recipe | None = None) -> tuple[Path, Path]:
    """The graphs with quantized MatMul weights, attention and norms left in FP32: ``int8`` dynamic INT8 (weights
    per tensor, activations per batch at run time); ``int4`` weight-only INT4 blocks (``int4``'s recipe, else
    compress.int4's defaults; activations per row at run time, see :mod:`compress.int4`)."""
    out = out_dir / "prefill.onnx", out_dir / "step.onnx"
    out_dir.mkdir(parents=True, exist_ok=True)
    if precision == "int4":
        from compress.int4 import quantize_int4

        return tuple(quantize_int4(src, dst, int4) for src, dst in zip(paths, out))
    if precision != "int8":
        raise ValueError(f"decode graph precision {precision!r} is unknown: use one of {list(PRECISIONS)}")
    qz = require("onnxruntime.quantization", purpose="INT8 decode graphs")
    # dynamic INT8 rather than MatMulNBits bits=8 (onnxruntime-genai's int8): on the 135M Llama shape, int8 cache,
    # 2 cores (AVX512-VNNI, AMX), MatMulNBits-8 (symmetric or not, accuracy_level 4) stepped 32 sequences 2.1-2.5x
    # slower (68-75 vs 29-35 ms) and decoded one ~10% slower
    for src, dst in zip(paths, out):
        # DefaultTensorType: the contrib ops' outputs have no type ORT's quantizer can infer
        qz.quantize_dynamic(str(src), str(dst), op_types_to_quantize=["MatMul"], weight_type=qz.QuantType.QInt8,
                            extra_options={"DefaultTensorType": 1})
    return out


def torch_greedy(model, prompt: list[int], n_new: int) -> list[int]:
    """Torch's greedy continuation of ``prompt``: transformers' own ``generate()`` for a model wrapping a
    Hugging Face one (``model.hf``, never stopping at an end-of-sequence token), else nanoGPT's generation
    (the whole cropped context recomputed for every token)."""
    import torch

    idx = torch.tensor([prompt], dtype=torch.long)
    with torch.no_grad():
        if hasattr(model, "hf"):
            out = model.hf.generate(idx, attention_mask=torch.ones_like(idx), do_sample=False,
                                    max_new_tokens=n_new, min_new_tokens=0, eos_token_id=None)
            return out[0, len(prompt):].tolist()
        block = model.config.block_size
        for _ in range(n_new):
            logits = model(idx[:, -block:])[:, -1]
            idx = torch.cat([idx, logits.argmax(-1, keepdim=True)], dim=1)
    return idx[0, len(prompt):].tolist()


def _token_input(task: Task, model_args: dict) -> str:
    """The name of the task's token-id input (charlm's ``idx``, a causal LM's ``input_ids``)."""
    return task.io_spec(model_args).inputs[0].name


def prompts(task: Task, model_args: dict, n: int, length: int) -> list[list[int]]:
    """``n`` validation prompts of ``length`` tokens (the task's own fixed batches)."""
    inputs, _ = next(task.batches("val", n, 1, seed=0, model_args=model_args))
    return [row[:length].tolist() for row in inputs[_token_input(task, model_args)]]


def check_greedy_parity(model, engine, task: Task, model_args: dict, n_prompts: int = 3,
                        max_new_tokens: int | None = None) -> dict[str, Any]:
    """Greedy continuations from the graphs vs torch, within the context (where both are exact): prompts of a
    quarter of the context, continued to its end (or by ``max_new_tokens``)."""
    context = engine.context
    length = max(1, context // 4)
    n_new = context - length if max_new_tokens is None else min(context - length, max_new_tokens)
    rows = []
    for prompt in prompts(task, model_args, n_prompts, length):
        want, got = torch_greedy(model, prompt, n_new), engine.generate(prompt, n_new)
        first = next((k for k, (a, b) in enumerate(zip(want, got)) if a != b), None)
        rows.append({"prompt_tokens": len(prompt), "new_tokens": n_new, "equal": want == got,
                     "first_difference": first})
    return {"passed": all(r["equal"] for r in rows), "prompts": rows}


SCORE_CHUNK = 8
"""Tokens per call when the validation loss is read through the decode graphs: each chunk attends to the
cache the earlier ones wrote, as decoding does, so an INT8 cache's rounding is part of the score."""


def graph_val_loss(prefill_path: Path, task: Task, model_args: dict, n_batches: int, batch_size: int = 16,
                   chunk: int = SCORE_CHUNK, alternate: Path | None = None) -> float:
    """The task's validation loss, predicted by the prefill graph on the task's fixed batches, ``chunk`` tokens
    of each row at a time over the graph's own KV cache (FP32 or int8). With ``alternate`` (a prefill graph of
    other weights over the same cache), every other chunk runs through it, reading what the first one cached and
    the reverse: how a sequence fares when its tokens come from both (a small-batch step graph)."""
    ort = require("onnxruntime", purpose="scoring decode graphs")
    from compress.decode_engine import CACHE_TYPES, session_options

    sessions = [ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])
                for path in (prefill_path, alternate) if path is not None]
    session = sessions[0]
    past = [i for i in session.get_inputs() if i.name.startswith("past_key_")]
    n_layer, heads, size, dtype = len(past), past[0].shape[1], past[0].shape[3], CACHE_TYPES[past[0].type]
    names = ["logits"] + [f"present_{k}_{i}" for i in range(n_layer) for k in ("key", "value")]

    token_input = _token_input(task, model_args)

    def predict(inputs: dict) -> np.ndarray:
        ids = inputs[token_input].astype(np.int64)
        b, t = ids.shape
        cache = [np.zeros((b, heads, t, size), dtype) for _ in range(2 * n_layer)]
        logits = []
        for start in range(0, t, chunk):
            n = min(chunk, t - start)
            feed = {"input_ids": ids[:, start:start + n],
                    "position_ids": np.tile(np.arange(start, start + n, dtype=np.int64), (b, 1)),
                    "seqlens_k": np.full(b, start + n - 1, np.int32), "total_sequence_length": np.asarray(t, np.int32),
                    "query_seqlens": np.full(b, n, np.int32), "last_only": np.asarray(False)}
            feed |= {f"past_{k}_{i}": cache[2 * i + j] for i in range(n_layer) for j, k in enumerate(("key", "value"))}
            out = sessions[start // chunk % len(sessions)].run(names, feed)
            logits.append(out[0][:, :n])
            cache = out[1:]
        return np.concatenate(logits, axis=1)

    metrics = task.evaluate(predict, "val", n_batches=n_batches, batch_size=batch_size, model_args=model_args)
    return float(metrics[task.metric])


@dataclass
class DecodeGraphs:
    """What :func:`build_decode_graphs` made: the served pair, every candidate and the gate results."""

    prefill: Path
    step: Path
    precision: str
    parity: dict[str, Any]
    candidates: list[dict[str, Any]] = field(default_factory=list)
    # the step graph served while at most max_batch sequences step (compress.decode_speed): precision, max_batch,
    # the mixed loss gate's row ("mixed") and, when it passed, "step" (its path); None when no candidate beat
    # the served one at batch 1
    small_step: dict[str, Any] | None = None

    @property
    def small_step_path(self) -> Path | None:
        """The small-batch step graph to serve, if one was chosen and passed the mixed gate."""
        return (self.small_step or {}).get("step")

    def describe(self) -> str:
        """The served graphs in a few words: ``int8-kv8 decode graphs``, or ``int8-kv8 decode graphs, an int4-kv8
        step for up to 1 sequence``."""
        if self.small_step_path is None:
            return f"{self.precision} decode graphs"
        k = self.small_step["max_batch"]
        return (f"{self.precision} decode graphs, an {self.small_step['precision']} step for up to {k} "
                f"sequence{'s' * (k > 1)}")

    def to_dict(self, root: Path) -> dict[str, Any]:
        small = None if self.small_step is None else {
            k: str(v.relative_to(root)) if isinstance(v, Path) else v for k, v in self.small_step.items()}
        return {"prefill": str(self.prefill.relative_to(root)), "step": str(self.step.relative_to(root)),
                "precision": self.precision, "parity": self.parity, "candidates": self.candidates,
                "small_step": small}


def build_decode_graphs(task: Task, model, model_args: dict, out_dir: Path, max_metric_loss: float = 0.01,
                        eval_batches: int = 8, int8: bool = True, precisions: Sequence[str] = PRECISIONS,
                        int4: Int4Recipe | None = None, kv_cache: str = "int8", threads: int = 1,
                        spinning: str = "off", small_step: bool = True) -> DecodeGraphs | None:
    """Write FP32 decode graphs, and each of ``precisions`` (:func:`quantize_graphs`; ``int8=False`` drops int8),
    under ``out_dir``; None when the task has no decoder.

    The FP32 pair must pass greedy parity (else :class:`DecodeParityError`, with ``decode.json``
    written and nothing else kept). With ``kv_cache="int8"`` each quantized pair is also written with an int8
    KV cache (``<precision>-kv8``, :mod:`compress.kv_cache`, scales calibrated on training batches); it stands
    in for its FP32-cache pair when it too keeps the loss within the gate: it moves a quarter of the cache's
    bytes, which at many live sequences are most of a step's, and holds four times the sequences per GB.
    INT4 starts at ``int4``'s block and halves it (:meth:`Int4Recipe.finer`) while the gate rejects the pair
    with the configured cache; its rows list the coarser blocks rejected (``rejected_blocks``). A quantized pair
    is served when it keeps the validation loss within ``max_metric_loss`` (relative) and decodes fastest
    (:func:`compress.decode_speed.served_choice`, rounds measured alternating), FP32 when none is faster;
    ``decode.json`` records every candidate. FP32 graphs keep an FP32 cache: they are the reference that
    matches torch token for token. Speeds are measured with the decode loop's ``threads`` and
    ``spinning``, as served. With ``small_step``, another candidate over the same cache that decodes the smallest
    batches faster is served beside it for those (:mod:`compress.decode_speed`) when the two mixed in one sequence
    keep the loss within the gate too.
    """
    from compress.decode_engine import DecodeEngine
    from compress.int4 import weight_bytes
    from compress.kv_cache import KV_CACHES, calibrate, write_int8_cache_graphs
    from compress.decode_speed import SPEED_BATCHES, decode_rounds, medians, served_choice, small_batch_choice

    if kv_cache not in KV_CACHES:
        raise ValueError(f"KV cache {kv_cache!r} is unknown: use one of {list(KV_CACHES)}")
    weights = task.decoder_weights(model)
    if weights is None:
        return None
    model.eval()
    fp32 = write_graphs(weights, out_dir / "fp32")
    engines = {"fp32": DecodeEngine(str(fp32[0]), str(fp32[1]), max(SPEED_BATCHES), threads, spinning=spinning)}
    parity = check_greedy_parity(model, engines["fp32"], task, model_args, max_new_tokens=CHECK_TOKENS)
    if not parity["passed"]:
        _write_report(out_dir, {"parity": parity, "published": False})
        raise DecodeParityError(f"decode graphs' greedy tokens differ from torch ({parity['prompts']}); "
                                f"see {out_dir / 'decode.json'}")
    prompt = prompts(task, model_args, 1, max(1, min(weights.context // 2, CHECK_TOKENS)))[0]
    base_loss = graph_val_loss(fp32[0], task, model_args, eval_batches)
    candidates = [{"precision": "fp32", "kv_cache": "fp32", "val_metric": base_loss, "status": "ok",
                   "weight_bytes": weight_bytes(fp32[1])}]
    graphs = {"fp32": fp32}

    def gate(loss: float) -> dict[str, Any]:
        worse = (loss - base_loss if task.direction == "minimize" else base_loss - loss) / max(abs(base_loss), 1e-12)
        return {"val_metric": loss, "metric_loss": worse, "status": "ok" if worse <= max_metric_loss else "rejected"}

    def judge(name: str, pair: tuple[Path, Path], precision: str, cache: str, recipe: Int4Recipe) -> dict[str, Any]:
        row = {"precision": name, "weights": precision, "kv_cache": cache,
               **gate(graph_val_loss(pair[0], task, model_args, eval_batches)), "weight_bytes": weight_bytes(pair[1])}
        return row | ({"recipe": recipe.to_dict()} if precision == "int4" else {})

    scales = None
    for precision in dict.fromkeys(p for p in precisions if int8 or p != "int8"):
        recipe, coarser = int4 or Int4Recipe(), []
        while True:  # int4: from the recipe's block, each finer one while the gate rejects the configured cache
            q = quantize_graphs(fp32, out_dir / precision, precision, recipe)
            rows = {precision: judge(precision, q, precision, "fp32", recipe)}
            if kv_cache == "int8":
                if scales is None:
                    scales = calibrate(fp32[0], _calibration_batches(task, model_args), weights.rotary_dims)
                kv8 = write_int8_cache_graphs(q, out_dir / f"{precision}-kv8", scales)
                rows[f"{precision}-kv8"] = judge(f"{precision}-kv8", kv8, precision, "int8", recipe)
                graphs[f"{precision}-kv8"] = kv8
            finer = recipe.finer() if precision == "int4" else None
            if finer is None or list(rows.values())[-1]["status"] == "ok":
                break
            coarser += [{"block_size": recipe.block_size, **{n: r["metric_loss"] for n, r in rows.items()}}]
            recipe = finer
        graphs[precision] = q
        candidates.extend(r | ({"rejected_blocks": coarser} if coarser else {}) for r in rows.values())
        ok = [name for name, r in rows.items() if r["status"] == "ok"]
        if ok:  # the int8 cache where it keeps the loss within the gate
            pair = graphs[ok[-1]]
            engines[ok[-1]] = DecodeEngine(str(pair[0]), str(pair[1]), max(SPEED_BATCHES), threads, spinning=spinning)
    rounds = decode_rounds(engines, prompt, min(weights.context, CHECK_TOKENS), SPEED_BATCHES)
    speeds = medians(rounds)
    for row in candidates:
        if row["precision"] in speeds:
            row["tokens_per_s"] = {f"batch {b}": v for b, v in speeds[row["precision"]].items()}
    chosen = served_choice(speeds, small_step)
    served = DecodeGraphs(graphs[chosen][0], graphs[chosen][1], chosen, parity, candidates)
    small = small_batch_choice(rounds, chosen, candidates) if small_step else None
    if small is not None:
        name, max_batch = small
        mix = gate(graph_val_loss(graphs[chosen][0], task, model_args, eval_batches, alternate=graphs[name][0]))
        served.small_step = {"precision": name, "max_batch": max_batch, "mixed": mix}
        if mix["status"] == "ok":
            served.small_step["step"] = graphs[name][1]
    _write_report(out_dir, served.to_dict(out_dir) | {"published": True, "metric": task.metric,
                                                      "context": weights.context})
    return served


def _calibration_batches(task: Task, model_args: dict, batch_size: int = 8, n_batches: int = 4) -> list[np.ndarray]:
    """Token ids ``(B, T)`` of the task's training batches: what the int8 cache's scales are calibrated on (the
    validation batches judge them)."""
    name = _token_input(task, model_args)
    return [inputs[name] for inputs, _ in task.batches("train", batch_size, n_batches, seed=0, model_args=model_args)]


def _write_report(out_dir: Path, report: dict[str, Any]) -> None:
    from autoglm.artifacts import write_atomic

    write_atomic(out_dir / "decode.json", (json.dumps(report, indent=2) + "\n").encode())

