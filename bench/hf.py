"""Pretrained transformers at real sizes: served `:generate` vs transformers, onnxruntime-genai, the bandwidth ceiling.

Speed does not depend on the weights, so the speed rows use random-initialized models at real sizes, saved in
the Hugging Face layout with a tokenizer trained here: the GPT-2 small shape (124M parameters) and a
Llama-family shape of about 135M (hidden 576, 30 layers, 9 heads, 3 key/value heads, MLP 1536, vocabulary
49,152; SmolLM-135M's). Each goes through the real pipeline (`hf-causal-lm` task, one training step, compress
with its decode graphs, serve) and is loaded through the gateway's streaming ``:generate`` with 64-token
prompts and 128 new tokens at 1, 8 and 32 concurrent requests. Peers, each in a process of its own (so its
peak RSS is its own), with the same thread count: transformers' ``model.generate()`` (torch eager, KV cache,
concurrent requests batched with padding) and, where it installs, onnxruntime-genai's model builder and
generator on the same checkpoint. The quality rows fine-tune a tiny Llama-family model here and read what
compress's loss gate measured for each precision of its decode graphs.

The ceiling at batch 1: decoding reads every weight once per token, so tokens/s <= read bandwidth / bytes
read per token (the step graph's weights, less tables only gathered from); the bandwidth is measured in the
same run, right before each variant's decode, all cores streaming through a buffer far larger than the
last-level cache. A variant that decodes faster than its ceiling makes the figure suspect, and the table says so.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bench import _hf_models as hf_models
from bench._hf_peers import run_peer
from bench._hf_profile import bytes_read_per_token, read_bandwidth
from bench._hf_tables import engine_row, tables
from bench.harness import Table

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: busy-waiting OpenMP is 2-10x slower here
PROMPT_TOKENS, NEW_TOKENS = 64, 128
CONCURRENCY = (1, 8, 32)
# quick, full: alternating rounds behind each path's figure at 1 and its aggregate at 32 (a 128-token generation at
# batch 1 takes about a second, and one such figure on a shared host can be off by half)
ROUNDS = {True: {1: 3, 32: 2}, False: {1: 5, 32: 3}}
TRANSFORMERS = "transformers generate() (torch eager, KV cache, padded batch)"
ROOT = Path(__file__).resolve().parents[1]


def build_genai(model_dir: Path, out: Path, precision: str, threads: int) -> Path | None:
    """onnxruntime-genai's model builder on the checkpoint (None where genai or the architecture is missing)."""
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        return None
    done = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(model_dir), "-o",
                           str(out), "-p", precision, "-e", "cpu", "-c", str(out.parent / "genai-cache")],
                          capture_output=True, text=True, timeout=3600)
    if done.returncode:
        return None  # e.g. GPT-2: the builder supports no GPT2LMHeadModel
    config_path = out / "genai_config.json"
    config = json.loads(config_path.read_text())
    config["model"]["decoder"]["session_options"]["intra_op_num_threads"] = threads
    config_path.write_text(json.dumps(config, indent=2))
    return out


# ---- the served path: the real pipeline, then closed-loop clients through the gateway -------------------------
def _pipeline(model_dir: Path, text_file: Path, workdir: Path, name: str, steps: int, eval_batches: int,
              lr: float = 5e-5, extra: tuple[str, ...] = ()):
    """Train (once: a trained run is up to date) and compress ``model_dir`` on ``text_file``; ``extra``: more
    overrides. The run's settings."""
    from autoglm.config import load_settings
    from autoglm.train import train_run
    from compress.stage import compress_run

    settings = load_settings(ROOT / "configs" / "hf-causal-lm.toml", [
        f"run.root='{workdir}'", f"run.cache_dir='{workdir / 'cache'}'", f"run.name='{name}'",
        f"task.model_id='{model_dir}'", f"task.data='{text_file}'", f"train.max_steps={steps}",
        "train.eval_every=100000", f"train.eval_batches={eval_batches}", "train.batch_size=8",
        f"train.lr={lr}", "task.model.block_size=64", "compress.variants=['fp32']",
        "compress.exporter='legacy'", "measure.repeats=3", "measure.batch_sizes=[1]",
        "compress.generate.max_sequences=32", "compress.generate.intra_op_threads=0", *extra])
    train_run(settings, progress=False)
    compress_run(settings, progress=False)
    return settings


class RssSampler(threading.Thread):
    """Peak summed RSS (MiB) of some processes and their children, sampled every 0.2 s while it runs."""

    def __init__(self, pids: list[int]):
        super().__init__(daemon=True)
        self.pids, self.peak_mb, self.done = pids, 0.0, threading.Event()

    def run(self) -> None:
        import psutil

        while not self.done.wait(0.2):
            total = 0
            for pid in self.pids:
                try:
                    root = psutil.Process(pid)
                    total += sum(p.memory_info().rss for p in (root, *root.children(recursive=True)))
                except psutil.Error:
                    pass
            self.peak_mb = max(self.peak_mb, total / 2**20)


def _served(settings, prompt_texts: list[str], workdir: Path, duration: float, name: str,
            others_at: Callable[[int], dict[str, float]], rounds: dict[int, int]) -> tuple[dict, dict]:
    """The served path at 8 concurrent requests, then alternating rounds at 1 and 32 (``rounds``: how many at
    each): a round at c runs every other path at c (``others_at(c)``, while the served stack idles), then the
    served one as ``name``. A shared host's load moves during a run; alternating lets it fall on every path's
    figure alike. Returns the served row (its figures at 1 and 32 the medians of its rounds) and each
    concurrency's rounds."""
    from bench.generate import _load
    from serve import GatewaySettings, on_free_ports, start_serving

    settings = on_free_ports(settings)
    bodies = [{"prompt": p, "max_new_tokens": NEW_TOKENS, "temperature": 0, "stream": True} for p in prompt_texts]
    serving = start_serving(settings, GatewaySettings(port=settings.serve.gateway_port, max_in_flight=256,
                                                      request_timeout_s=600))
    with serving:
        pids = [serving.triton.pid, serving.gateway.pid]
        sampler = RssSampler(pids)
        sampler.start()
        url = f"{serving.gateway.url}/v1/models/{settings.task.name}:generate"

        def load(concurrency: int) -> dict:
            return _load(url, bodies, concurrency, duration, pids, workdir, new_tokens=NEW_TOKENS, exact=False)

        results = {c: [load(c)] for c in CONCURRENCY if c not in rounds}
        results |= {c: [] for c in rounds}
        by_round: dict[int, list[dict[str, float]]] = {c: [] for c in rounds}
        for k in range(max(rounds.values())):
            for c in (c for c in rounds if k < rounds[c]):
                others = others_at(c)
                results[c].append(load(c))
                by_round[c].append(others | {name: results[c][-1]["tokens_per_s"]})
        sampler.done.set()

    def median(c: int, key: str) -> float:
        return float(np.median([r[key] for r in results[c]]))

    return {"tokens_per_s": {str(c): median(c, "tokens_per_s") for c in results},
            "ttft_p50": median(1, "ttft_p50"), "ttft_p95": median(1, "ttft_p95"),
            "errors": sum(r["errors"] for rs in results.values() for r in rs),
            "cpu_ms_per_token_1": median(1, "cpu_ms_per_token"),
            "peak_rss_mb": sampler.peak_mb}, by_round


def checkpoint(family: str, config: dict, text: str, workdir: Path) -> tuple[Path, Path, list[list[int]]]:
    """A shape's random-initialized checkpoint, the corpus file its pipeline fine-tunes on, and 32 prompts."""
    model_dir = hf_models.save_checkpoint(workdir / family, family, config, text)
    text_file = workdir / "corpus.txt"
    text_file.write_text(text[: 200_000], encoding="utf-8")
    return model_dir, text_file, hf_models.prompts(model_dir, text, 32, PROMPT_TOKENS)


def prompt_texts(model_dir: Path, ids: list[list[int]]) -> list[str]:
    """The prompts as text, for the gateway's ``:generate``."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return [tokenizer.decode(p, skip_special_tokens=True) for p in ids]


def served_small_step(report: dict) -> dict:
    """The small-batch step of compress's ``decode.json`` report that is served beside the step graph (chosen, and
    through the mixed gate), or {}."""
    small = report.get("small_step") or {}
    return small if small.get("step") else {}


def served_engine_spec(decode_dir: Path, report: dict, spinning: str) -> dict:
    """The served decode graphs of ``decode_dir`` as the engine peers take them (``bench._hf_peers``)."""
    served, small = decode_dir / report["precision"], served_small_step(report)
    return {"prefill": str(served / "prefill.onnx"), "step": str(served / "step.onnx"), "spinning": spinning,
            "small_step": str(decode_dir / small["step"]) if small else None, "small_batch": small.get("max_batch", 0)}


# ---- one shape ----------------------------------------------------------------------------------------------
def _shape(label: str, family: str, config: dict, text: str, workdir: Path, quick: bool) -> dict:
    from autoglm.artifacts import RunDir
    from compress.decode_engine import prefill_on_thread

    threads, load_at_start = os.cpu_count() or 1, os.getloadavg()[0]
    model_dir, text_file, ids = checkpoint(family, config, text, workdir)
    repeats = 1 if quick else 3
    common = {"prompts": ids, "new_tokens": NEW_TOKENS, "threads": threads, "repeats": repeats,
              "batches": [c for c in CONCURRENCY if c != 32]}  # 32: in alternating rounds (_served)
    rows = {TRANSFORMERS: run_peer("transformers", workdir, model_dir=str(model_dir), **common)}
    genai = {}
    for precision in ("int4", "int8"):
        built = build_genai(model_dir, workdir / f"genai-{family}-{precision}", precision, threads)
        if built is not None:
            name = f"onnxruntime-genai {precision} (model builder + generator, static batch)"
            genai[name], rows[name] = built, run_peer("genai", workdir, model_dir=str(built), **common)
    settings = _pipeline(model_dir, text_file, workdir, f"bench-{family}", steps=1, eval_batches=1)
    decode_dir = RunDir(settings.run.root, settings.run.name).stage_dir("compress") / "decode"
    report = json.loads((decode_dir / "decode.json").read_text())
    generate = settings.compress.generate
    spinning = generate.intra_op_spinning  # the in-process rows wait as the served model does
    ceilings = []
    chosen = next(c for c in report["candidates"] if c["precision"] == report["precision"])
    # the served weights with an FP32 cache beside the served int8 cache, at 32 and profiled: what the cache gives
    sibling = chosen.get("weights") if chosen.get("kv_cache") == "int8" else None
    for cand in report["candidates"]:
        p = cand["precision"]
        if cand.get("status") != "ok" or ("tokens_per_s" not in cand and p != sibling):
            continue  # rejected, or stood in for by the same weights with an int8 cache
        graphs = decode_dir / p / "prefill.onnx", decode_dir / p / "step.onnx"
        served = p == report["precision"]  # its aggregate at 32 in the rounds, and where a step's time goes
        bandwidth = max(read_bandwidth(repeats=3).values())  # right before its decode: the load moves both alike
        engine = run_peer("engine", workdir, prefill=str(graphs[0]), step=str(graphs[1]), spinning=spinning,
                          **{**common, "batches": [1, 8, 32] if p == sibling else [1, 8] if served or
                             cand.get("kv_cache") == "int8" else [1], "profile": served or p == sibling})
        # (the other int8-cache weights at 8: where they cross)
        per_token = bytes_read_per_token(graphs[1])
        ceiling = bandwidth / per_token
        ceilings.append([label, p, per_token / 2**20, bandwidth / 1e9, ceiling, engine["tokens_per_s"]["1"]])
        rows[engine_row(p)] = engine | {"_served": served}
        if served:
            modes = run_peer("spinning", workdir, prefill=str(graphs[0]), step=str(graphs[1]),
                             **{**common, "batches": list(CONCURRENCY)})

    duration = 10.0 if quick else 30.0
    small = served_small_step(report)
    served_label = report["precision"] + (f" + {small['precision']} at ≤ {small['max_batch']}" if small else "")
    static, continuous = engine_row(served_label), engine_row(served_label, continuous=True)
    rows.setdefault(static, {"tokens_per_s": {}})
    rows[continuous] = {"tokens_per_s": {}}
    once = {**common, "repeats": 1}

    def others_at(c: int) -> dict[str, float]:
        """Every path but the served one at ``c`` (1 or 32), once."""
        out = {TRANSFORMERS: run_peer("transformers", workdir, model_dir=str(model_dir), **once | {"batches": [c]})}
        for name, built in genai.items():
            out[name] = run_peer("genai", workdir, model_dir=str(built), **once | {"batches": [c]})
        out = {name: r["tokens_per_s"][str(c)] for name, r in out.items()}
        graphs = served_engine_spec(decode_dir, report, spinning)
        if c == 1:
            return out | {static: run_peer("engine", workdir, **graphs, **once | {"batches": [1]})["tokens_per_s"]["1"]}
        batched = run_peer("batching", workdir, **graphs, prompts=ids, new_tokens=NEW_TOKENS, threads=threads,
                           clients=c, seconds=duration, prefill_chunk=generate.prefill_chunk,
                           prefill_thread=prefill_on_thread(generate.prefill_thread, generate.intra_op_threads))
        return out | {static: batched["static"], continuous: batched["continuous"]}

    texts = prompt_texts(model_dir, ids)
    served_name = f"served :generate through the gateway ({served_label})"
    rows[served_name], rounds = _served(settings, texts, workdir, duration, served_name, others_at, ROUNDS[quick])
    for c, by_round in rounds.items():  # each path's figure at 1 and at 32: the median of its rounds
        for name in by_round[0]:
            rows[name]["tokens_per_s"][str(c)] = float(np.median([r[name] for r in by_round]))
    return {"rows": rows, "ceilings": ceilings, "served_precision": served_label, "rounds": rounds,
            "batch1_precision": small.get("precision", report["precision"]),
            "load": (load_at_start, os.getloadavg()[0]),
            "spinning": [[label, report["precision"], mode, t.get("1"), t.get("8"), t.get("32")]
                         for mode, t in modes.items() if mode != "peak_rss_mb"]}


def _quality(text: str, workdir: Path, quick: bool) -> list[list]:
    """A tiny Llama-family model fine-tuned here; compress's gate figures for each decode-graph precision."""
    from autoglm.artifacts import RunDir

    model_dir = hf_models.save_checkpoint(workdir / "tiny-llama", "llama", hf_models.TINY_LLAMA, text,
                                          vocab_size=512)
    text_file = workdir / "quality.txt"
    text_file.write_text(text[: 400_000], encoding="utf-8")
    settings = _pipeline(model_dir, text_file, workdir, "bench-quality", steps=150 if quick else 600,
                         eval_batches=4, lr=2e-3)  # from random weights: a from-scratch learning rate
    decode_dir = RunDir(settings.run.root, settings.run.name).stage_dir("compress") / "decode"
    report = json.loads((decode_dir / "decode.json").read_text())
    base = report["candidates"][0]["val_metric"]
    return [[c.get("weights", c["precision"]), c.get("kv_cache", "fp32"), c["val_metric"],
             f"{(c['val_metric'] - base) / base:+.2%}", c["status"], c["precision"] == report["precision"]]
            for c in report["candidates"]]


def run(quick: bool, args: list[str] | None = None) -> list[Table]:
    """The speed, ceiling and quality tables; ``--spinning`` / ``--prefill-thread [--shapes all]``: a generation
    model parameter's values served (:mod:`bench._hf_modes`); ``--int4-blocks [--shapes all]``: INT4 block sizes
    (:mod:`bench._hf_int4_blocks`)."""
    if args and "--int4-blocks" in args:
        from bench._hf_int4_blocks import run as int4_blocks

        return int4_blocks(quick, args)
    if args:
        from bench._hf_modes import run as modes

        return modes(quick, args)
    text = hf_models.corpus_text()
    bandwidths = read_bandwidth()
    shapes, quality = {}, []
    with tempfile.TemporaryDirectory(prefix="autoglm-bench-hf-") as tmp:
        workdir = Path(tmp)
        quality = _quality(text, workdir, quick)
        for label, (family, config) in hf_models.SHAPES.items():
            shapes[label] = _shape(label, family, config, text, workdir, quick)
    return tables(shapes, quality, bandwidths)
