"""What one decode step reads and where its time goes: the bytes of weights a step streams (the batch-1
bandwidth ceiling's denominator) and ONNX Runtime's per-node profile of a batched step, for ``bench hf``."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np


def bytes_read_per_token(onnx_path: Path) -> int:
    """Bytes of the graph's weights that one decode step reads: every initializer but those only gathered
    from (the token and position tables: a step reads one row of each)."""
    import onnx

    model = onnx.load(str(onnx_path))
    users: dict[str, set[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            users.setdefault(name, set()).add(node.op_type)
    total = 0
    for init in model.graph.initializer:
        if users.get(init.name, set()) <= {"Gather"} and init.name in users:
            continue
        total += onnx.numpy_helper.to_array(init).nbytes
    return total


PROFILE_GROUPS = {"GroupQueryAttention": "attention over the KV cache (GroupQueryAttention)",
                  "MatMulNBits": "weight GEMMs", "DynamicQuantizeMatMul": "weight GEMMs",
                  "MatMulIntegerToFloat": "weight GEMMs", "MatMulInteger": "weight GEMMs", "MatMul": "weight GEMMs",
                  "FusedMatMul": "weight GEMMs", "Gemm": "weight GEMMs",
                  "DynamicQuantizeLinear": "activation quantization (DynamicQuantizeLinear)"}


def step_profile(prefill: str, step: str, prompts: list[list[int]], threads: int, new_tokens: int) -> dict:
    """Where one batched decode step's time goes, ``len(prompts)`` sequences live at the middle of their
    generation: ONNX Runtime's own per-node profile of the step graph grouped by kind (ms per step), and the
    engine's step outside the graph (Python, feeds, the logits copy) as the rest of the wall time."""
    import onnxruntime as ort

    from compress.decode_engine import DecodeEngine, session_options

    options = session_options(threads)
    options.enable_profiling = True
    with tempfile.TemporaryDirectory(prefix="autoglm-profile-") as tmp:
        options.profile_file_prefix = str(Path(tmp) / "step")
        engine = DecodeEngine(prefill, step, len(prompts), threads=threads)
        engine.step_session = ort.InferenceSession(step, options, providers=["CPUExecutionProvider"])
        engine.start_many(prompts)
        walls, n = [], 16
        for _ in range(max(0, new_tokens // 2 - n)):  # the profiled steps end at the generation's middle
            engine.step([1] * len(prompts))
        for _ in range(n):
            started = time.perf_counter()
            engine.step([1] * len(prompts))
            walls.append(time.perf_counter() - started)
        events = json.loads(Path(engine.step_session.end_profiling()).read_text())
    runs = [e["dur"] for e in events if e.get("cat") == "Session" and e["name"] == "model_run"][-n:]
    kernels: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            group = PROFILE_GROUPS.get(e["args"]["op_name"], "norms, activations, adds, embeddings (the rest)")
            kernels[group] = kernels.get(group, 0.0) + e["dur"]
    steps = sum(1 for e in events if e.get("cat") == "Session" and e["name"] == "model_run")
    ms = {group: us / steps / 1e3 for group, us in kernels.items()}
    graph_ms, wall_ms = float(np.mean(runs)) / 1e3, float(np.mean(walls)) * 1e3
    ms["ONNX Runtime between kernels (thread pool, allocations)"] = max(0.0, graph_ms - sum(ms.values()))
    ms["outside the graph (Python, feeds, logits copy)"] = max(0.0, wall_ms - graph_ms)
    live = np.mean([seq.length for seq in engine.live])  # keys and values attention reads per step, all layers
    kv_bytes = (len(prompts) * live * engine.n_layer * 2 * engine.n_head * engine.head_size
                * np.dtype(engine.cache_dtype).itemsize)
    return {"batch": len(prompts), "step_ms": wall_ms, "ms": ms, "kv_mib": kv_bytes / 2**20,
            "weights_mib": bytes_read_per_token(Path(step)) / 2**20}


def profile_table_rows(label: str, graphs: str, prof: dict) -> list[list]:
    """Rows of the bench's profile table for one :func:`step_profile`: its parts, largest first, then the step."""
    rows = [[label, f"{graphs}, step of {prof['batch']}", part, ms, f"{ms / prof['step_ms']:.0%}"]
            for part, ms in sorted(prof["ms"].items(), key=lambda kv: -kv[1])]
    rows.append([label, f"reads {prof['kv_mib']:,.0f} MiB of keys and values, {prof['weights_mib']:,.0f} MiB of "
                        "weights", "the whole step (wall)", prof["step_ms"], "100%"])
    return rows
