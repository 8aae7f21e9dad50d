"""``bench hf --int4-blocks``: the INT4 decode graphs' block size (``compress.int4.block_size``), speed and loss.

A coarser block means fewer scales per weight (block 128: 0.54 bytes per weight, 32: 0.64) and fewer per-block
steps in ``MatMulNBits``' kernel, and a coarser grid. Speed does not depend on the weights, so it is measured on
random-initialized checkpoints: each shape's INT4 step graphs with an int8 KV cache (as served) at each block,
decoded at 1, 2, 4 and 8 sequences in compress's own alternating rounds (:mod:`compress.decode_speed`), with all
cores and the served spinning. Loss does depend on the weights: a tiny Llama-family model is trained on each
development corpus of the tuning pool (:mod:`bench.pool`) and compressed at each block; its validation loss
through the int8-cache INT4 graphs is read against FP32's (compress's gate allows ``compress.max_metric_loss``).
The development shapes and corpora pick the default; ``--shapes all`` reports the goal shapes beside them.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from bench import _hf_models as hf_models
from bench.harness import Table

BLOCKS = (32, 64, 128)
QUALITY_MODEL = {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
                 "intermediate_size": 704, "max_position_embeddings": 256, "tie_word_embeddings": True}


def _speeds(family: str, config: dict, workdir: Path, rounds: int) -> dict[int, dict[int, list[float]]]:
    """{block: {batch: [tokens/s per round]}} of the shape's INT4 int8-cache graphs, blocks in alternating rounds."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from autoglm.config import GenerateSettings
    from autoglm.tasks.hf_decoder import decoder_weights
    from compress.decode import quantize_graphs
    from compress.decode_engine import DecodeEngine
    from compress.decode_graph import write_graphs
    from compress.decode_speed import SPEED_BATCHES, decode_rounds
    from compress.int4 import Int4Recipe
    from compress.kv_cache import calibrate, write_int8_cache_graphs

    torch.manual_seed(0)
    model = (GPT2LMHeadModel(GPT2Config(**config)) if family == "gpt2" else LlamaForCausalLM(LlamaConfig(**config)))
    weights = decoder_weights(model.eval(), context=256)
    fp32 = write_graphs(weights, workdir / "fp32")
    vocab = weights.token_embedding.shape[0]
    rng = np.random.default_rng(0)
    scales = calibrate(fp32[0], [rng.integers(0, vocab, (4, 64)) for _ in range(2)], weights.rotary_dims)
    spinning = GenerateSettings().intra_op_spinning
    engines = {}
    for block in BLOCKS:
        pair = quantize_graphs(fp32, workdir / f"int4-{block}", "int4", Int4Recipe(block))
        pair = write_int8_cache_graphs(pair, workdir / f"int4-{block}-kv8", scales)
        engines[block] = DecodeEngine(str(pair[0]), str(pair[1]), max(SPEED_BATCHES), threads=0, spinning=spinning)
    prompt = [5 + i % (vocab - 5) for i in range(64)]
    return decode_rounds(engines, prompt, 64, SPEED_BATCHES, rounds=rounds)


def _losses(corpus: str, text: str, workdir: Path, steps: int) -> dict[int, float]:
    """{block: relative loss of the int8-cache INT4 graphs vs FP32} of a tiny model trained on ``text`` (the gate
    opened wide, so no block falls back)."""
    from autoglm.artifacts import RunDir
    from bench.hf import _pipeline

    model_dir = hf_models.save_checkpoint(workdir / f"model-{corpus}", "llama", QUALITY_MODEL, text, vocab_size=1024)
    text_file = workdir / f"{corpus}.txt"
    text_file.write_text(text[:400_000], encoding="utf-8")
    found = {}
    for block in BLOCKS:  # one training run: each block compresses the same checkpoint
        settings = _pipeline(model_dir, text_file, workdir, corpus, steps, eval_batches=8, lr=2e-3, extra=(
            "compress.generate.int8=false", "compress.max_metric_loss=1.0", f"compress.int4.block_size={block}"))
        report = RunDir(settings.run.root, settings.run.name).stage_dir("compress") / "decode" / "decode.json"
        row = next(c for c in json.loads(report.read_text())["candidates"] if c["precision"] == "int4-kv8")
        found[block] = row["metric_loss"]
    return found


def speed_rows(label: str, found: dict[int, dict[int, list[float]]]) -> list[list]:
    """Per batch: each block's median tokens/s, its ratio to block 32's, and the rounds it beat block 32 in."""
    from bench._hf_modes import versus

    return [[label, batch, block, *versus(found[block][batch], found[BLOCKS[0]][batch], block == BLOCKS[0])]
            for batch in found[BLOCKS[0]] for block in BLOCKS]


def run(quick: bool, args: list[str]) -> list[Table]:
    """Two tables: decode speed per block on each shape, and loss per block on each development corpus."""
    from bench.pool import corpora as pool_corpora
    from bench.pool import dev_tasks

    parser = argparse.ArgumentParser(prog="python -m bench hf --int4-blocks")
    parser.add_argument("--int4-blocks", action="store_true", required=True)
    parser.add_argument("--shapes", choices=("dev", "all"), default="dev",
                        help="dev: the development shapes only; all: the goal shapes of `bench hf` too")
    opts = parser.parse_args(args)
    shapes = dict(hf_models.DEV_SHAPES)
    if opts.shapes == "all":
        shapes |= {f"{label} (goal)": spec for label, spec in hf_models.SHAPES.items()}
    corpora = {t.name: hf_models.corpus_text() if t.corpus is None else getattr(pool_corpora, t.corpus)()
               for t in dev_tasks() if t.task == "charlm"}  # the pool's development text corpora
    speed, quality = [], []
    with tempfile.TemporaryDirectory(prefix="autoglm-bench-int4-") as tmp:
        for i, (label, (family, config)) in enumerate(shapes.items()):
            speed += speed_rows(label, _speeds(family, config, Path(tmp) / f"shape{i}", 3 if quick else 5))
        for name, text in corpora.items():
            losses = _losses(name, text, Path(tmp) / name, 200 if quick else 600)
            quality += [[f"{name} (dev)", block, f"{loss:+.3%}"] for block, loss in losses.items()]
    return [Table("INT4 decode graphs (int8 KV cache) by block size: tokens/s", [
        "model", "sequences", "block", "median tokens/s", "vs block 32", "rounds above block 32"], speed, [
        "random weights; compress's speed rounds (alternating, all cores, the served spinning), 64-token prompt, "
        "64 new tokens", "development shapes pick compress.int4.block_size; goal shapes (--shapes all) are "
        "reported only"]),
        Table("INT4 decode graphs (int8 KV cache) by block size: validation loss vs FP32", [
            "corpus", "block", "loss vs fp32"], quality, [
            "a tiny Llama-family model (4 layers x 256) trained from random weights on each development corpus of "
            "the tuning pool; compress's loss gate reads the loss through the graphs' KV cache (the gate allows "
            "compress.max_metric_loss, 1% by default)"])]
