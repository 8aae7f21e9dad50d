"""The ``bench hf`` tables: decode speed, goals, the batch-1 ceiling, a step's profile, spinning, quality."""

from __future__ import annotations

import os

import numpy as np

from bench._hf_profile import last_level_cache_bytes, profile_table_rows
from bench.harness import Table, ratio


def of_ceiling(measured: float, ceiling: float) -> str:
    """``measured`` as a share of ``ceiling``; a ceiling exceeded is no ceiling: the bandwidth behind it is
    suspect, and no share above 100% is printed."""
    return f"{measured / ceiling:.0%}" if measured <= ceiling else "over it: bandwidth suspect"


def ceiling_table(ceiling_rows: list[list], bandwidths: dict[str, float]) -> Table:
    """``ceiling_rows``: model, graphs, MiB per token, GB/s read just before, ceiling, measured tokens/s @1;
    ``bandwidths``: each reader's figure at the start of the run."""
    llc = last_level_cache_bytes()
    notes = ["read bandwidth: the best of a few readers, each a lower bound (all cores, a float32 buffer of 2 GiB"
             + (f", {2**31 / llc:.1f}x the {llc / 2**20:,.0f} MiB last-level cache" if llc else "")
             + "), measured right before each row's decode (best of 3 rounds); at the run's start (best of 5): "
             + "; ".join(f"{name} {b / 1e9:.1f} GB/s" for name, b in bandwidths.items())]
    suspect = [f"{r[0]} {r[1]}" for r in ceiling_rows if r[5] > r[4]]
    if suspect:
        notes.append(f"SUSPECT: {', '.join(suspect)} decoded faster than the ceiling this bandwidth gives, so the "
                     "measured bandwidth understates what a decode step reads at (weights that fit the last-level "
                     "cache can be read from it)")
    return Table(f"The batch-1 ceiling: read bandwidth{' (suspect)' if suspect else ''} / bytes read per token",
                 ["model", "decode graphs", "MiB read per token", "read GB/s", "ceiling tokens/s",
                  "measured tokens/s @1", "of ceiling"], [[*r, of_ceiling(r[5], r[4])] for r in ceiling_rows], notes)


def engine_row(precision: str, continuous: bool = False) -> str:
    """The speed table's row of decode graphs ``precision`` run in process (a static batch, or continuous)."""
    return f"decode graphs {precision}, in process{', continuous batching' if continuous else ''} (no serving)"


def tables(shapes: dict, quality: list[list], bandwidths: dict[str, float]) -> list[Table]:
    speed_rows, goal_rows, ceiling_rows, profile_rows, spinning_rows, round_rows = [], [], [], [], [], []
    n_rounds = max((len(r) for shape in shapes.values() for r in shape["rounds"].values()), default=0)
    errors, loads = [], []
    for label, shape in shapes.items():
        rows = shape["rows"]
        for name, r in rows.items():
            if "profile" in r:
                profile_rows += profile_table_rows(label, name[:-len(", in process (no serving)")], r["profile"])
        for name, r in rows.items():
            t = r["tokens_per_s"]
            ttft = r.get("ttft_ms")
            p50 = r.get("ttft_p50", float(np.median(ttft)) if ttft else None)
            p95 = r.get("ttft_p95", float(np.percentile(ttft, 95)) if ttft else None)
            speed_rows.append([label, name, t.get("1"), t.get("8"), t.get("32"), p50, p95, r.get("peak_rss_mb")])
        torch_row = next(r for n, r in rows.items() if n.startswith("transformers"))["tokens_per_s"]
        served = next(r for n, r in rows.items() if n.startswith("served"))
        st = served["tokens_per_s"]
        goal_rows += [[label, "served / transformers, tokens/s @1", ratio(st["1"], torch_row["1"]), "≥ 2×"],
                      [label, "served / transformers, aggregate tokens/s @32", ratio(st["32"], torch_row["32"]),
                       "≥ 4×"]]
        for name, r in rows.items():
            if name.startswith("onnxruntime-genai"):
                g = r["tokens_per_s"]
                goal_rows += [[label, f"served / {name}, @1", ratio(st["1"], g["1"]), "≥ 1× (match)"],
                              [label, f"served / {name}, aggregate @32", ratio(st["32"], g["32"]), "≥ 2×"]]
        alone = rows[engine_row(shape["served_precision"])]["tokens_per_s"]
        continuous = rows[engine_row(shape["served_precision"], continuous=True)]
        goal_rows += [[label, "served @1 / the same graphs in process @1 (what serving costs per token)",
                       ratio(st["1"], alone["1"]), "—"],
                      [label, "served @32 / the same graphs in process, continuous batching @32 (what serving "
                       "costs at 32)", ratio(st["32"], continuous["tokens_per_s"]["32"]), "—"],
                      [label, "in process @32: continuous batching / a static batch (what joining at any time "
                       "costs)", ratio(continuous["tokens_per_s"]["32"], alone["32"]), "—"],
                      [label, "served @1: CPU of Triton and the gateway per token, ms (the decode step's included)",
                       f"{served.get('cpu_ms_per_token_1', float('nan')):.2f}", "—"]]
        at_1 = shape.get("batch1_precision", shape["served_precision"])  # the graphs that step one sequence
        served_ceiling = next(c for c in shape["ceilings"] if c[1] == at_1)[4]
        goal_rows.append([label, f"served @1 / its ceiling ({at_1})",
                          of_ceiling(st["1"], served_ceiling), "≥ 50%"])
        ceiling_rows += shape["ceilings"]
        spinning_rows += shape["spinning"]
        for c, rounds in shape["rounds"].items():
            round_rows += [[label, name, c, *(r[name] for r in rounds), *[None] * (n_rounds - len(rounds)),
                            rows[name]["tokens_per_s"][str(c)]] for name in rounds[0]]
        errors.append(f"{label}: {served.get('errors', 0)}")
        loads.append(f"{label}: {shape['load'][0]:.1f} / {shape['load'][1]:.1f}")
    notes = ["64-token prompts, 128 new tokens, greedy; every path uses all of the host's cores; the served path's "
             "load generator shares them", "decode graphs NAME-kv8: NAME weights with an int8 KV cache "
             "(compress.kv_cache); without the suffix the cache is fp32",
             "TTFT: at batch 1 (the served path: p50/p95 at the client of c = 1)",
             "peak RSS: the peer's own process; served: Triton with its python-backend stubs plus the gateway",
             "@1 and @32: the median of alternating rounds (next table) where a path has them; the ceiling table's "
             "@1 is a figure of its own, measured right after its bandwidth; served requests that failed: "
             + ", ".join(errors),
             f"the host's 1-min load average ({os.cpu_count()} cores) at the start / end of each model's figures: "
             + "; ".join(loads) + " (other work on the cores falls unevenly on the paths: compare in quiet runs)"]
    return [Table("Decode speed at real sizes (random weights): tokens/s", [
                "model", "path", "@1", "@8 (aggregate)", "@32 (aggregate)", "TTFT p50 ms", "TTFT p95 ms",
                "peak RSS MiB"], speed_rows, notes),
            Table("Goals", ["model", "comparison", "value", "goal"], goal_rows),
            Table("Tokens/s at 1 and 32 concurrent requests, in alternating rounds",
                  ["model", "path", "concurrent requests", *(f"round {i + 1}" for i in range(n_rounds)), "median"],
                  round_rows,
                  ["each round runs every path once at 1 (or at 32), one after another (the served stack idles while "
                   "the others run): a shared host's load falls on all alike", "static batch: 32 copies of a prompt "
                   "joined at once, ending together (as the peers batch); continuous batching: each sequence "
                   "replaced by the next prompt as it ends, encoded where the served model encodes it "
                   "(compress.generate.prefill_thread: with the step on every core, between two steps)"]),
            ceiling_table(ceiling_rows, bandwidths),
            Table("Where a batched decode step's time goes (the served graphs, and their weights with an fp32 KV "
                  "cache, in process)",
                  ["model", "decode graphs", "part", "ms per step", "share"], profile_rows,
                  ["ONNX Runtime's per-node profile of 16 steps of the step graph, 32 sequences live, ending at "
                   "the middle of their generation (64-token prompts + 64 of 128 new tokens), all cores; "
                   "profiling adds to 'between kernels'",
                   "a step reads its weights once for the whole batch, but each live sequence's keys and "
                   "values (every layer, every cached position) for itself"]),
            Table("The decode loop's ONNX Runtime pool: how idle threads wait (compress.generate.intra_op_spinning), "
                  "in process, tokens/s", ["model", "decode graphs", "spinning", "@1", "@8 (aggregate)",
                                           "@32 (aggregate)"], spinning_rows,
                  ["off: sleep at once; run: spin within a step, sleep when it returns (the served default, as the "
                   "other in-process rows); on: spin on after it too (ONNX Runtime's own default, and "
                   "onnxruntime-genai's)", "the served graphs, all "
                   "cores, the modes in alternating rounds (a shared host's load falls on all alike)"]),
            Table("Quality: a tiny Llama-family model fine-tuned on Shakespeare, compress's loss gate",
                  ["weights", "KV cache", "validation loss", "vs fp32", "gate", "served"], quality,
                  ["the gate passes a precision whose validation loss is within compress.max_metric_loss of fp32",
                   "validation loss read through the decode graphs 8 tokens at a time, each chunk attending to the "
                   "cache the earlier ones wrote (int8: per-channel scales calibrated on training batches)"])]
