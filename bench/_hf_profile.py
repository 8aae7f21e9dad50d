"""What one decode step reads and where its time goes, for ``bench hf``: the bytes of weights a step streams and
the host's read bandwidth (the batch-1 ceiling's denominator and numerator), and ONNX Runtime's per-node profile
of a batched step."""

from __future__ import annotations

import json
import os
import tempfile
import threading
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


# ---- the host's read bandwidth ----------------------------------------------------------------------------
def _torch_sum(buffer: np.ndarray, cores: int):
    import torch

    tensor = torch.from_numpy(buffer)
    return lambda: tensor.sum()  # torch's own pool of ``cores`` threads, vectorized


def _numpy_max(buffer: np.ndarray, cores: int):
    parts = np.array_split(buffer, cores)

    def read() -> None:  # numpy's float reductions are vectorized and release the GIL: one thread per core
        threads = [threading.Thread(target=np.maximum.reduce, args=(p,)) for p in parts]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return read


def _ort_gemv(buffer: np.ndarray, cores: int):
    """ONNX Runtime's MatMul of one row by the buffer as a (K, N) matrix: the kernel a batch-1 decode step runs."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    k = 1024
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "gemv",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k]),
                               helper.make_tensor_value_info("w", TensorProto.FLOAT, [k, "n"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "n"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = cores
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feed = {"x": np.ones((1, k), np.float32), "w": buffer[: buffer.size // k * k].reshape(k, -1)}  # no copy
    return lambda: session.run(None, feed)


BANDWIDTH_READERS = {"torch sum": _torch_sum, "numpy max, a thread per core": _numpy_max,
                     "ONNX Runtime MatMul (1 x K row by the buffer)": _ort_gemv}
"""Ways to stream a float32 buffer with all cores. Each gives a lower bound on the read bandwidth (a reader
slower than the memory measures its own arithmetic): the bandwidth is the best of them."""


def read_bandwidth(gib: float = 2.0, repeats: int = 5) -> dict[str, float]:
    """Bytes/s at which all cores read one float32 buffer of ``gib`` GiB, per reader of
    :data:`BANDWIDTH_READERS`: the best of ``repeats`` rounds, the readers alternating within each round (a
    shared host's load then falls on all alike). The buffer must dwarf the last-level cache, or this measures
    the cache."""
    import torch

    cores = os.cpu_count() or 1
    buffer = np.ones(int(gib * (1 << 30)) // 4, np.float32)
    threads = torch.get_num_threads()
    torch.set_num_threads(cores)
    try:
        readers = {name: make(buffer, cores) for name, make in BANDWIDTH_READERS.items()}
        best = dict.fromkeys(readers, 0.0)
        for read in readers.values():
            read()  # warm-up: pages touched, pools started
        for _ in range(repeats):
            for name, read in readers.items():
                started = time.perf_counter()
                read()
                best[name] = max(best[name], buffer.nbytes / (time.perf_counter() - started))
    finally:
        torch.set_num_threads(threads)
    return best


def last_level_cache_bytes() -> int | None:
    """The largest CPU cache's size (sysfs), or None where it is not readable."""
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = path.read_text().strip()
        sizes.append(int(text[:-1]) * {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[text[-1]] if text[-1].isalpha()
                     else int(text))
    return max(sizes, default=None)


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
