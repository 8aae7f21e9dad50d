"""The ``bench hf`` peers, each in a process of its own (so its peak RSS is its own), all with the same thread count:
transformers' ``model.generate()``, onnxruntime-genai's generator, and the served decode graphs in ONNX Runtime
without serving. ``run_peer`` starts one: ``python -m bench._hf_peers SPEC.json`` prints its figures as JSON.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench._hf_profile import step_profile

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: busy-waiting OpenMP is 2-10x slower here
ROOT = Path(__file__).resolve().parents[1]


def _timed(generate, spec: dict) -> dict:
    """A generator's figures: ``generate(batch, new)`` -> seconds, after a warm-up; tokens/s at each batch of
    ``spec["batches"]`` (the best of ``repeats``) and, where batch 1 is measured, its time to a first token."""
    generate(1, 4)  # warm-up
    ttft = [generate(1, 1) * 1e3 for _ in range(spec["repeats"] if 1 in spec["batches"] else 0)]
    rates = {str(b): max(b * spec["new_tokens"] / generate(b, spec["new_tokens"]) for _ in range(spec["repeats"]))
             for b in spec["batches"]}
    return {"tokens_per_s": rates, "ttft_ms": ttft}


def _transformers_peer(spec: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(spec["threads"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32).eval()
    prompts = torch.tensor(spec["prompts"], dtype=torch.long)

    def generate(batch: int, new: int) -> float:
        ids = prompts[:batch]
        started = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                                 do_sample=False, use_cache=True, pad_token_id=0)
        assert out.shape[1] == ids.shape[1] + new
        return time.perf_counter() - started

    return _timed(generate, spec)


def _genai_peer(spec: dict) -> dict:
    import onnxruntime_genai as og

    model = og.Model(spec["model_dir"])
    prompts = np.asarray(spec["prompts"], np.int32)

    def generate(batch: int, new: int) -> float:
        params = og.GeneratorParams(model)
        total = prompts.shape[1] + new
        params.set_search_options(max_length=total, min_length=total, do_sample=False, batch_size=batch)
        started = time.perf_counter()
        generator = og.Generator(model, params)
        generator.append_tokens(prompts[:batch])
        while not generator.is_done():
            generator.generate_next_token()
        return time.perf_counter() - started

    return _timed(generate, spec)


def _small_step(spec: dict) -> dict:
    """The served small-batch step graph of ``spec``, if it has one (compress.decode_speed)."""
    return {"small_step_path": spec.get("small_step"), "small_batch": spec.get("small_batch", 0)}


def _engine_peer(spec: dict) -> dict:
    """The served decode graphs in ONNX Runtime, no serving: batch b = b sequences stepped together, the pool
    waiting as the served one does (``spinning``)."""
    from compress.decode_speed import decode_speeds
    from compress.decode_engine import DecodeEngine

    engine = DecodeEngine(spec["prefill"], spec["step"], max(spec["batches"]), threads=spec["threads"],
                          spinning=spec["spinning"], **_small_step(spec))
    prompt = spec["prompts"][0]
    ttft = []
    for _ in range(spec["repeats"]):
        started = time.perf_counter()
        seq = engine.start_many([prompt])[0][0]
        ttft.append((time.perf_counter() - started) * 1e3)
        engine.release(seq)
    speeds = decode_speeds({"e": engine}, prompt, spec["new_tokens"], batches=tuple(spec["batches"]),
                           rounds=spec["repeats"])["e"]
    out = {"tokens_per_s": {str(b): v for b, v in speeds.items()}, "ttft_ms": ttft}
    if spec.get("profile"):
        out["profile"] = step_profile(spec["prefill"], spec["step"], spec["prompts"], spec["threads"],
                                      spec["new_tokens"])
    return out


def _spinning_peer(spec: dict) -> dict:
    """The served decode graphs with each way the intra-op pool waits (compress.generate.intra_op_spinning),
    in alternating rounds; no serving (the served path is measured with the default)."""
    from compress.decode_speed import decode_speeds
    from compress.decode_engine import SPINNING, DecodeEngine

    engines = {mode: DecodeEngine(spec["prefill"], spec["step"], max(spec["batches"]), threads=spec["threads"],
                                  spinning=mode) for mode in SPINNING}
    speeds = decode_speeds(engines, spec["prompts"][0], spec["new_tokens"], batches=tuple(spec["batches"]),
                           rounds=spec["repeats"])
    return {mode: {str(b): v for b, v in by.items()} for mode, by in speeds.items()}


def _batching_peer(spec: dict) -> dict:
    """The served decode graphs at ``clients`` sequences, no serving, batched two ways: a static batch (every
    sequence joins at once and all end together, as the peers' batches do) and continuous batching (each sequence
    replaced by the next prompt as soon as it ends, encoded as the served model encodes it -- on the prefill thread
    while the others step, or between two steps (``prefill_thread``) -- without Triton, the gateway or the
    clients)."""
    from bench.generate import closed_loop_rate
    from compress.decode_speed import decode_speeds
    from compress.decode_engine import DecodeEngine

    n = spec["clients"]
    engine = DecodeEngine(spec["prefill"], spec["step"], n, threads=spec["threads"],
                          prefill_thread=spec["prefill_thread"], prefill_chunk=spec["prefill_chunk"],
                          spinning=spec["spinning"], **_small_step(spec))
    try:
        static = decode_speeds({"e": engine}, spec["prompts"][0], spec["new_tokens"], batches=(n,), rounds=1)["e"][n]
        closed_loop_rate(engine, spec["prompts"], spec["new_tokens"], n, 1.0)  # warm-up: the joins' shapes
        continuous = closed_loop_rate(engine, spec["prompts"], spec["new_tokens"], n, spec["seconds"])
    finally:
        engine.close()  # a prefill still running when the process exits would abort it
    return {"static": static, "continuous": continuous}


PEERS = {"transformers": _transformers_peer, "genai": _genai_peer, "engine": _engine_peer,
         "spinning": _spinning_peer, "batching": _batching_peer}


def run_peer(kind: str, workdir: Path, **spec) -> dict:
    """A peer's figures from its own process, with that process's peak RSS (MiB)."""
    path = workdir / f"peer-{kind}.json"
    path.write_text(json.dumps({"kind": kind, **spec}))
    out = subprocess.run([sys.executable, "-m", "bench._hf_peers", str(path)], capture_output=True, text=True,
                         timeout=3600, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if out.returncode:
        raise RuntimeError(f"peer {kind} failed: {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def peak_rss_mb() -> float:
    """This process's peak RSS since it exec'd (VmHWM; ru_maxrss would carry the parent's high-water mark
    across fork and exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _peer_main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    result = PEERS[spec["kind"]](spec)
    result["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_peer_main(sys.argv[1]) if len(sys.argv) == 2 else 2)
