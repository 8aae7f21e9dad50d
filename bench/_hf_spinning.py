"""``bench hf --spinning``: served ``:generate`` with each way the decode step's ONNX Runtime pool waits.

``compress.generate.intra_op_spinning`` decides whether the step's idle threads sleep (``off``), spin within a
step (``run``, the default) or after it too (``on``). A decode step runs a few kernels per layer, each split
across the pool's threads, so a pool that sleeps is woken hundreds of times per token, and its cost grows with
depth; a spinning pool keeps its cores from Triton, the gateway and the clients, which share them. Which
wins depends on the model and the host, so this measures it served: each shape goes through the real
pipeline once, then in every round each mode is applied to the live generation model through Triton's model
control (a parameter change reloads it, as ``loadtest --tune`` does) and loaded at 1 and 32 concurrent
streams, modes in alternating rounds. The development shapes come first; the goal shapes of ``bench hf``
(``--shapes all``) are reported beside them, never used to pick the default.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from bench import _hf_models as hf_models
from bench.harness import Table

MODES = ("off", "run")  # "on" also spins between steps, where the loop's Python and the outbox need the cores
CONCURRENCY = (1, 32)


def _modes_served(settings, texts: list[str], workdir: Path, duration: float, rounds: int) -> dict:
    """{mode: {c: [tokens/s per round]}} from one serving start, each mode applied live in every round."""
    from autoglm.artifacts import RunDir
    from bench.generate import _load
    from bench.hf import NEW_TOKENS
    from loadtest.control import LiveModels, ModelControl, ServingConfig
    from serve import GatewaySettings, on_free_ports, start_serving

    settings = on_free_ports(settings)
    task_info = RunDir(settings.run.root, settings.run.name).stage_dir("repository") / "task.json"
    model = json.loads(task_info.read_text())["generate"]  # the generation model compress wrote
    bodies = [{"prompt": p, "max_new_tokens": NEW_TOKENS, "temperature": 0, "stream": True} for p in texts]
    found: dict = {mode: {c: [] for c in CONCURRENCY} for mode in MODES}
    with start_serving(settings, GatewaySettings(port=settings.serve.gateway_port, max_in_flight=256,
                                                 request_timeout_s=600)) as serving:
        live = LiveModels(ModelControl(serving.triton.http_url))
        url = f"{serving.gateway.url}/v1/models/{settings.task.name}:generate"
        pids = [serving.triton.pid, serving.gateway.pid]
        try:
            for _ in range(rounds):
                for mode in MODES:
                    live.apply(ServingConfig(model, parameters={"intra_op_spinning": mode}))
                    for c in CONCURRENCY:
                        found[mode][c].append(_load(url, bodies, c, duration, pids, workdir, new_tokens=NEW_TOKENS,
                                                    exact=False)["tokens_per_s"])
        finally:
            live.restore()
    return found


def _shape(label: str, family: str, config: dict, text: str, workdir: Path, quick: bool) -> list[list]:
    from bench.hf import _pipeline, checkpoint, prompt_texts

    model_dir, text_file, ids = checkpoint(family, config, text, workdir)
    settings = _pipeline(model_dir, text_file, workdir, f"spin-{family}", steps=1, eval_batches=1)
    found = _modes_served(settings, prompt_texts(model_dir, ids), workdir, 8.0 if quick else 15.0, 3 if quick else 5)
    return rows_of(label, found)


def rows_of(label: str, found: dict) -> list[list]:
    """Table rows from ``{mode: {c: [tokens/s per round]}}``: every round, the median, the ratio of medians to
    off's, and in how many rounds the mode beat off's figure of the same round."""
    rows = []
    for c in CONCURRENCY:
        off = found["off"][c]
        for mode in MODES:
            got = found[mode][c]
            wins = sum(g > o for g, o in zip(got, off))
            rows.append([label, c, mode, *got, float(np.median(got)),
                         f"{np.median(got) / np.median(off):.2f}×", "—" if mode == "off" else f"{wins}/{len(got)}"])
    return rows


def run(quick: bool, args: list[str]) -> list[Table]:
    """One table: each shape's served tokens/s per mode at 1 and 32, every round, medians and wins over off."""
    parser = argparse.ArgumentParser(prog="python -m bench hf --spinning")
    parser.add_argument("--spinning", action="store_true", required=True)
    parser.add_argument("--shapes", choices=("dev", "all"), default="dev",
                        help="dev: the development shapes only; all: the goal shapes of `bench hf` too")
    opts = parser.parse_args(args)
    shapes = dict(hf_models.DEV_SHAPES)
    if opts.shapes == "all":
        shapes |= {f"{label} (goal)": spec for label, spec in hf_models.SHAPES.items()}
    text, rows = hf_models.corpus_text(), []
    with tempfile.TemporaryDirectory(prefix="autoglm-bench-hf-spin-") as tmp:
        for i, (label, (family, config)) in enumerate(shapes.items()):
            rows += _shape(label, family, config, text, Path(tmp) / str(i), quick)
    n = 3 if quick else 5
    return [Table("Served :generate with each way the decode step's pool waits (compress.generate.intra_op_spinning),"
                  " tokens/s", ["model", "concurrent requests", "spinning", *(f"round {k + 1}" for k in range(n)),
                                "median", "vs off", "rounds above off"], rows,
                  ["the served graphs (compress's choice), one serving start per shape; in each round every mode is "
                   "applied live through Triton's model control (the model reloads) and loaded at 1, then 32 "
                   "streams: modes in alternating rounds, so a shared host's load falls on both",
                   "off: the step's idle threads sleep at once; run (the default): they spin within a step and "
                   "sleep when it returns; prefills (their own thread, beside the steps) always sleep",
                   "64-token prompts, 128 new tokens, greedy, all cores; the load generator shares them"])]
