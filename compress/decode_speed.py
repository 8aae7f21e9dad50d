"""How fast decode graphs decode, measured in alternating rounds; and the second step graph for few live
sequences chosen from those rounds.

A decode step with one or two live sequences reads every weight for a token or two: it is bound by memory
bandwidth, so the fewest bytes of weights win (INT4). With many sequences the same weights serve every row and the
step is bound by compute, where dynamic INT8's GEMM wins on hosts with fast int8 dot products. One precision's step
graph serves the load (:func:`served_choice`: the fastest at the largest batch measured, or on average over the
smallest and the largest without a second step graph); where another precision that passed the loss gate over the
same KV cache beats it at the smallest batches, its step graph is served beside it for those
(:class:`compress.decode_engine.DecodeEngine`'s ``small_step_path``).

The choice is measured, on the host and with the threads the model is served with: a candidate must be faster by
its median *and* in most of the paired rounds at every batch from 1 up to the one it serves, so a noisy tie engages
nothing. Both precisions then share each sequence: their mix is judged by the loss gate too
(:func:`compress.decode.graph_val_loss` with ``alternate``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import numpy as np

__all__ = ["SPEED_BATCHES", "beats", "decode_rounds", "decode_speeds", "medians", "served_choice",
           "small_batch_choice"]

SPEED_BATCHES = (1, 2, 4, 8)
"""Batch sizes of compress's speed rounds: the served choice reads 8 (and 1), the small-batch step all of them."""


def _decode_rate(engine, prompt: list[int], n_new: int, batch: int) -> float:
    """Tokens/s of ``batch`` copies of ``prompt`` decoded together for ``n_new`` steps (one round)."""
    start = time.perf_counter()
    seqs = [seq for seq, _ in engine.start_many([prompt] * batch)]
    for _ in range(n_new - 1):
        engine.step([1] * len(engine.live))
    for seq in seqs:
        engine.release(seq)
    return batch * n_new / (time.perf_counter() - start)


def decode_rounds(engines: dict[str, Any], prompt: list[int], n_new: int, batches=(1, 8),
                  rounds: int = 5) -> dict[str, dict[int, list[float]]]:
    """Tokens/s of each engine at each batch size in each round, the engines measured in alternating rounds (a
    shared host's load then falls on all of them alike): round ``r`` of every engine ran side by side."""
    rates: dict[str, dict[int, list[float]]] = {name: {b: [] for b in batches} for name in engines}
    for name, engine in engines.items():
        _decode_rate(engine, prompt, 4, 1)  # warm-up
    for _ in range(rounds):
        for b in batches:
            for name, engine in engines.items():
                rates[name][b].append(_decode_rate(engine, prompt, n_new, b))
    return rates


def decode_speeds(engines: dict[str, Any], prompt: list[int], n_new: int, batches=(1, 8),
                  rounds: int = 5) -> dict[str, dict[int, float]]:
    """Median tokens/s of each engine at each batch size over :func:`decode_rounds`."""
    return medians(decode_rounds(engines, prompt, n_new, batches, rounds))


def medians(rounds: dict[str, dict[int, list[float]]]) -> dict[str, dict[int, float]]:
    """Each engine's median tokens/s at each batch size of :func:`decode_rounds`."""
    return {name: {b: float(np.median(v)) for b, v in by.items()} for name, by in rounds.items()}


def beats(mine: list[float], theirs: list[float]) -> bool:
    """Faster by the median and in most paired rounds (a tie is not a win)."""
    wins = sum(m > t for m, t in zip(mine, theirs))
    return bool(np.median(mine) > np.median(theirs)) and 2 * wins > len(mine)


def served_choice(speeds: dict[str, dict[int, float]], small_step: bool) -> str:
    """The precision whose step graph serves the load, from median tokens/s per candidate and batch (``fp32``
    among them): with ``small_step`` (another step graph may serve the smallest batches, :func:`small_batch_choice`)
    the fastest at the largest batch measured, else the fastest on average over batch 1 and the largest (speed-ups
    over FP32); FP32 on a tie."""
    top = max(speeds["fp32"])
    read = (top,) if small_step else (1, top)
    gains = {p: float(np.mean([by[b] / speeds["fp32"][b] for b in read])) for p, by in speeds.items()}
    return max(gains, key=lambda p: (gains[p], p == "fp32"))


def small_batch_choice(rounds: dict[str, dict[int, list[float]]], chosen: str,
                       rows: Iterable[dict[str, Any]]) -> tuple[str, int] | None:
    """(candidate, largest batch it serves) of the step graph to run beside ``chosen``'s at small batches, or None.

    ``rounds``: tokens/s per candidate, batch and round (:func:`decode_rounds`); ``rows``: the
    candidates' records (``precision``, ``kv_cache``, ``status``). Eligible: passed the gate, measured, and caching
    as ``chosen`` does (the same cache type; an int8 cache's scales are calibrated once for every precision). A
    candidate serves batches 1..k where it :func:`beats` ``chosen`` at every measured batch up to k; the widest k
    wins, then the faster at batch 1."""
    rows = list(rows)
    cache = next(r["kv_cache"] for r in rows if r["precision"] == chosen)
    best: tuple[int, float, str] | None = None
    for row in rows:
        name = row["precision"]
        if name == chosen or row["status"] != "ok" or row["kv_cache"] != cache or name not in rounds:
            continue
        served = 0
        for batch in sorted(rounds[chosen]):
            if not beats(rounds[name][batch], rounds[chosen][batch]):
                break
            served = batch
        key = (served, float(np.median(rounds[name][min(rounds[name])])), name)
        if served and (best is None or key > best):
            best = key
    return None if best is None else (best[2], best[0])
