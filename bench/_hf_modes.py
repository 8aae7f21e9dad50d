"""``bench hf --spinning`` / ``--prefill-thread``: served ``:generate`` under each value of one parameter of the
generation model, applied live.

``--spinning``: ``compress.generate.intra_op_spinning`` decides whether the step's idle threads sleep (``off``),
spin within a step (``run``, the default) or after it too (``on``). A decode step runs a few kernels per layer,
each split across the pool's threads, so a pool that sleeps is woken hundreds of times per token, and its cost
grows with depth; a spinning pool keeps its cores from Triton, the gateway and the clients, which share them.
``--prefill-thread``: ``compress.generate.prefill_thread`` encodes joining prompts on a thread of their own
beside the steps (``true``) or on the decode loop between two steps (``false``): a second pool on the step's cores
against every sequence waiting for the prefill. The default, ``auto``, decides by the step's thread count, so the
served rounds (the step on every core) are followed by the same graphs in process with the step on one thread and
on every core.

Which wins depends on the model and the host, so this measures it served: each shape goes through the real
pipeline once, then in every round each value is applied to the live generation model through Triton's model
control (a parameter change reloads it, as ``loadtest --tune`` does) and loaded at 1 and 32 concurrent
streams, values in alternating rounds. The development shapes come first; the goal shapes of ``bench hf``
(``--shapes all``) are reported beside them, never used to pick the default.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from bench import _hf_models as hf_models
from bench.harness import Table

# each measured parameter: its values, the first one the reference ("on" also spins between steps, where the
# loop's Python and the outbox need the cores)
PARAMETERS = {"spinning": ("intra_op_spinning", ("off", "run")),
              "prefill_thread": ("prefill_thread", ("true", "false"))}
CONCURRENCY = (1, 32)


def _modes_served(settings, texts: list[str], workdir: Path, duration: float, rounds: int, parameter: str,
                  modes: tuple[str, ...]) -> tuple[dict, dict]:
    """{mode: {c: [tokens/s per round]}} and the same of TTFT p50 (ms) from one serving start, ``parameter`` set
    to each mode live in every round."""
    from autoglm.artifacts import RunDir
    from bench.generate import _load
    from bench.hf import NEW_TOKENS
    from loadtest.control import LiveModels, ModelControl, ServingConfig
    from serve import GatewaySettings, on_free_ports, start_serving

    settings = on_free_ports(settings)
    task_info = RunDir(settings.run.root, settings.run.name).stage_dir("repository") / "task.json"
    model = json.loads(task_info.read_text())["generate"]  # the generation model compress wrote
    bodies = [{"prompt": p, "max_new_tokens": NEW_TOKENS, "temperature": 0, "stream": True} for p in texts]
    found: dict = {mode: {c: [] for c in CONCURRENCY} for mode in modes}
    ttft: dict = {mode: {c: [] for c in CONCURRENCY} for mode in modes}
    with start_serving(settings, GatewaySettings(port=settings.serve.gateway_port, max_in_flight=256,
                                                 request_timeout_s=600)) as serving:
        live = LiveModels(ModelControl(serving.triton.http_url))
        url = f"{serving.gateway.url}/v1/models/{settings.task.name}:generate"
        pids = [serving.triton.pid, serving.gateway.pid]
        try:
            for _ in range(rounds):
                for mode in modes:
                    live.apply(ServingConfig(model, parameters={parameter: mode}))
                    for c in CONCURRENCY:
                        got = _load(url, bodies, c, duration, pids, workdir, new_tokens=NEW_TOKENS, exact=False)
                        found[mode][c].append(got["tokens_per_s"])
                        ttft[mode][c].append(got["ttft_p50"])
        finally:
            live.restore()
    return found, ttft


def _prefills_in_process(settings, ids: list[list[int]], workdir: Path, seconds: float, rounds: int) -> dict:
    """{(step threads, prefills on a thread): [tokens/s per round]} of the served graphs in process (no serving):
    32 sequences in a closed loop, the step on one thread or on every core, prefills on a thread of their own or on
    the loop; the four in alternating rounds, each in a fresh process (``bench._hf_peers``' batching peer)."""
    from autoglm.artifacts import RunDir
    from bench._hf_peers import run_peer
    from bench.hf import NEW_TOKENS, served_engine_spec

    generate = settings.compress.generate
    decode_dir = RunDir(settings.run.root, settings.run.name).stage_dir("compress") / "decode"
    report = json.loads((decode_dir / "decode.json").read_text())
    spec = {**served_engine_spec(decode_dir, report, generate.intra_op_spinning),
            "prefill_chunk": generate.prefill_chunk, "prompts": ids, "new_tokens": NEW_TOKENS, "clients": max(CONCURRENCY), "seconds": seconds}
    found: dict = {(threads, thread): [] for threads in (1, os.cpu_count() or 1) for thread in (True, False)}
    for _ in range(rounds):
        for (threads, thread), got in found.items():
            got.append(run_peer("batching", workdir, **spec, threads=threads, prefill_thread=thread)["continuous"])
    return found


def in_process_rows(label: str, found: dict) -> list[list]:
    """Rows of :func:`_prefills_in_process`' figures: per step thread count, the thread (the reference) and the
    loop, with what ``auto`` picks there."""
    from compress.decode_engine import prefill_on_thread

    rows = []
    for threads in dict.fromkeys(t for t, _ in found):
        picks = "thread" if prefill_on_thread("auto", threads) else "loop"
        for thread in (True, False):
            got, base = found[threads, thread], found[threads, True]
            rows.append([label, threads, "thread" if thread else "loop", *got, *versus(got, base, thread), picks])
    return rows


def _shape(label: str, family: str, config: dict, text: str, workdir: Path, quick: bool,
           measured: str) -> tuple[list[list], list[list]]:
    from bench.hf import _pipeline, checkpoint, prompt_texts

    model_dir, text_file, ids = checkpoint(family, config, text, workdir)
    settings = _pipeline(model_dir, text_file, workdir, f"modes-{family}", steps=1, eval_batches=1)
    seconds, rounds = (8.0, 3) if quick else (15.0, 5)
    found, ttft = _modes_served(settings, prompt_texts(model_dir, ids), workdir, seconds, rounds,
                                *PARAMETERS[measured])
    local = _prefills_in_process(settings, ids, workdir, seconds, rounds) if measured == "prefill_thread" else {}
    return rows_of(label, found, ttft), in_process_rows(label, local) if local else []


def rows_of(label: str, found: dict, ttft: dict) -> list[list]:
    """Table rows from ``{mode: {c: [tokens/s per round]}}`` (the first mode the reference): every round, the
    median, the ratio of medians to the reference's, in how many rounds the mode beat the reference's figure of
    the same round, and the median of ``ttft``'s rounds (same layout)."""
    rows, reference = [], next(iter(found))
    for c in CONCURRENCY:
        for mode, by in found.items():
            rows.append([label, c, mode, *by[c], *versus(by[c], found[reference][c], mode == reference),
                         float(np.median(ttft[mode][c]))])
    return rows


def versus(got: list[float], base: list[float], reference: bool) -> list:
    """[median of ``got``, its ratio to ``base``'s median, in how many paired rounds it beat ``base`` ("—" for
    the reference itself)]."""
    wins = sum(g > b for g, b in zip(got, base))
    return [float(np.median(got)), f"{np.median(got) / np.median(base):.2f}×",
            "—" if reference else f"{wins}/{len(got)}"]


NOTES = {"spinning": "off: the step's idle threads sleep at once; run (the default): they spin within a step and "
                     "sleep when it returns; prefills (their own thread, beside the steps) always sleep",
         "prefill_thread": "true: joining prompts are encoded on a thread of their own while the others step; "
                           "false: on the decode loop, prefill_chunk of them between two steps; the default (auto) "
                           "is false here, where the step's threads take every core, true where they leave one free"}


def run(quick: bool, args: list[str]) -> list[Table]:
    """One table: each shape's served tokens/s per value of the measured parameter at 1 and 32, every round,
    medians and wins over the first value."""
    parser = argparse.ArgumentParser(prog="python -m bench hf")
    measured = parser.add_mutually_exclusive_group(required=True)
    measured.add_argument("--spinning", action="store_true", help="compress.generate.intra_op_spinning: off, run")
    measured.add_argument("--prefill-thread", action="store_true",
                          help="compress.generate.prefill_thread: true, false")
    parser.add_argument("--shapes", choices=("dev", "all"), default="dev",
                        help="dev: the development shapes only; all: the goal shapes of `bench hf` too")
    opts = parser.parse_args(args)
    key = "spinning" if opts.spinning else "prefill_thread"
    parameter, modes = PARAMETERS[key]
    shapes = dict(hf_models.DEV_SHAPES)
    if opts.shapes == "all":
        shapes |= {f"{label} (goal)": spec for label, spec in hf_models.SHAPES.items()}
    text, rows, local = hf_models.corpus_text(), [], []
    with tempfile.TemporaryDirectory(prefix="autoglm-bench-hf-modes-") as tmp:
        for i, (label, (family, config)) in enumerate(shapes.items()):
            served, in_process = _shape(label, family, config, text, Path(tmp) / str(i), quick, key)
            rows, local = rows + served, local + in_process
    n = 3 if quick else 5
    tables = [Table(f"Served :generate with each value of compress.generate.{parameter}, tokens/s",
                  ["model", "concurrent requests", parameter, *(f"round {k + 1}" for k in range(n)), "median",
                   f"vs {modes[0]}", f"rounds above {modes[0]}", "TTFT p50 ms (median)"], rows,
                  ["the served graphs (compress's choice), one serving start per shape; in each round every value is "
                   "applied live through Triton's model control (the model reloads) and loaded at 1, then 32 "
                   "streams: values in alternating rounds, so a shared host's load falls on all", NOTES[key],
                   "64-token prompts, 128 new tokens, greedy, all cores; the load generator shares them"])]
    if local:
        tables.append(Table(
            "In process: where prefills run, by the step's threads, 32 sequences in a closed loop, tokens/s",
            ["model", "step threads", "prefills", *(f"round {k + 1}" for k in range(n)), "median", "vs thread",
             "rounds above thread", "auto picks"], local,
            ["the served graphs without Triton, the gateway or clients: each sequence replaced by the next prompt as "
             "soon as it has its 128 tokens; the four ways in alternating rounds, each a fresh process",
             "thread: prefills on a thread of their own beside the steps; loop: prefill_chunk of them between two "
             "steps; auto (the default) takes the thread only where the step's threads leave a core free"]))
    return tables
