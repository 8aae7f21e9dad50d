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
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from bench import _hf_models as hf_models
from bench._hf_profile import (bytes_read_per_token, last_level_cache_bytes, profile_table_rows, read_bandwidth,
                               step_profile)
from bench.harness import Table, ratio

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: busy-waiting OpenMP is 2-10x slower here
PROMPT_TOKENS, NEW_TOKENS = 64, 128
CONCURRENCY = (1, 8, 32)
ROOT = Path(__file__).resolve().parents[1]


# ---- peers, each in its own process: `python -m bench.hf peer SPEC.json` --------------------------------------
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

    generate(1, 4)  # warm-up
    ttft = [generate(1, 1) * 1e3 for _ in range(spec["repeats"])]
    rates = {str(b): max(b * spec["new_tokens"] / generate(b, spec["new_tokens"]) for _ in range(spec["repeats"]))
             for b in spec["batches"]}
    return {"tokens_per_s": rates, "ttft_ms": ttft}


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

    generate(1, 4)
    ttft = [generate(1, 1) * 1e3 for _ in range(spec["repeats"])]
    rates = {str(b): max(b * spec["new_tokens"] / generate(b, spec["new_tokens"]) for _ in range(spec["repeats"]))
             for b in spec["batches"]}
    return {"tokens_per_s": rates, "ttft_ms": ttft}


def _engine_peer(spec: dict) -> dict:
    """The served decode graphs in ONNX Runtime, no serving: batch b = b sequences stepped together."""
    from compress.decode import decode_speeds
    from compress.decode_engine import DecodeEngine

    engine = DecodeEngine(spec["prefill"], spec["step"], max(spec["batches"]), threads=spec["threads"])
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
    from compress.decode import decode_speeds
    from compress.decode_engine import SPINNING, DecodeEngine

    engines = {mode: DecodeEngine(spec["prefill"], spec["step"], max(spec["batches"]), threads=spec["threads"],
                                  spinning=mode) for mode in SPINNING}
    speeds = decode_speeds(engines, spec["prompts"][0], spec["new_tokens"], batches=tuple(spec["batches"]),
                           rounds=spec["repeats"])
    return {mode: {str(b): v for b, v in by.items()} for mode, by in speeds.items()}


PEERS = {"transformers": _transformers_peer, "genai": _genai_peer, "engine": _engine_peer,
         "spinning": _spinning_peer}


def run_peer(kind: str, workdir: Path, **spec) -> dict:
    """A peer's figures from its own process, with that process's peak RSS (MiB)."""
    path = workdir / f"peer-{kind}.json"
    path.write_text(json.dumps({"kind": kind, **spec}))
    out = subprocess.run([sys.executable, "-m", "bench.hf", "peer", str(path)], capture_output=True, text=True,
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
              lr: float = 5e-5):
    from autoglm.config import load_settings
    from autoglm.train import train_run
    from compress.stage import compress_run

    settings = load_settings(ROOT / "configs" / "hf-causal-lm.toml", [
        f"run.root='{workdir}'", f"run.cache_dir='{workdir / 'cache'}'", f"run.name='{name}'",
        f"task.model_id='{model_dir}'", f"task.data='{text_file}'", f"train.max_steps={steps}",
        "train.eval_every=100000", f"train.eval_batches={eval_batches}", "train.batch_size=8",
        f"train.lr={lr}", "task.model.block_size=64", "compress.variants=['fp32']",
        "compress.exporter='legacy'", "measure.repeats=3", "measure.batch_sizes=[1]",
        "compress.generate.max_sequences=32", "compress.generate.intra_op_threads=0"])
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


def _served(settings, prompt_texts: list[str], workdir: Path, duration: float) -> dict:
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
        results = {c: _load(url, bodies, c, duration, pids, workdir, new_tokens=NEW_TOKENS, exact=False)
                   for c in CONCURRENCY}
        sampler.done.set()
    return {"tokens_per_s": {str(c): r["tokens_per_s"] for c, r in results.items()},
            "ttft_p50": results[1]["ttft_p50"], "ttft_p95": results[1]["ttft_p95"],
            "ttft_p95_32": results[32]["ttft_p95"], "errors": sum(r["errors"] for r in results.values()),
            "cpu_ms_per_token_1": results[1]["cpu_ms_per_token"],
            "peak_rss_mb": sampler.peak_mb}


# ---- one shape ----------------------------------------------------------------------------------------------
def _shape(label: str, family: str, config: dict, text: str, workdir: Path, quick: bool) -> dict:
    from autoglm.artifacts import RunDir

    threads = os.cpu_count() or 1
    model_dir = hf_models.save_checkpoint(workdir / family, family, config, text)
    text_file = workdir / "corpus.txt"
    text_file.write_text(text[: 200_000], encoding="utf-8")
    ids = hf_models.prompts(model_dir, text, 32, PROMPT_TOKENS)
    repeats = 1 if quick else 3
    common = {"prompts": ids, "new_tokens": NEW_TOKENS, "threads": threads, "repeats": repeats,
              "batches": list(CONCURRENCY)}
    rows = {"transformers generate() (torch eager, KV cache, padded batch)":
            run_peer("transformers", workdir, model_dir=str(model_dir), **common)}
    for precision in ("int4", "int8"):
        built = build_genai(model_dir, workdir / f"genai-{family}-{precision}", precision, threads)
        if built is not None:
            rows[f"onnxruntime-genai {precision} (model builder + generator, static batch)"] = run_peer(
                "genai", workdir, model_dir=str(built), **common)
    settings = _pipeline(model_dir, text_file, workdir, f"bench-{family}", steps=1, eval_batches=1)
    decode_dir = RunDir(settings.run.root, settings.run.name).stage_dir("compress") / "decode"
    report = json.loads((decode_dir / "decode.json").read_text())
    ceilings = []
    chosen = next(c for c in report["candidates"] if c["precision"] == report["precision"])
    # the served weights with an FP32 cache beside the served int8 cache, at 32 and profiled: what the cache gives
    sibling = chosen.get("weights") if chosen.get("kv_cache") == "int8" else None
    for cand in report["candidates"]:
        p = cand["precision"]
        if cand.get("status") != "ok" or ("tokens_per_s" not in cand and p != sibling):
            continue  # rejected, or stood in for by the same weights with an int8 cache
        graphs = decode_dir / p / "prefill.onnx", decode_dir / p / "step.onnx"
        served = p == report["precision"]  # its aggregate at 32 in process too, and where a step's time goes
        at32 = served or p == sibling
        bandwidth = max(read_bandwidth(repeats=3).values())  # right before its decode: the load moves both alike
        engine = run_peer("engine", workdir, prefill=str(graphs[0]), step=str(graphs[1]),
                          **{**common, "batches": [1, 8, 32] if at32 else [1, 8] if cand.get("kv_cache") == "int8"
                             else [1], "profile": at32})  # the other int8-cache weights at 8: where they cross
        per_token = bytes_read_per_token(graphs[1])
        ceiling = bandwidth / per_token
        ceilings.append([label, p, per_token / 2**20, bandwidth / 1e9, ceiling, engine["tokens_per_s"]["1"]])
        rows[f"decode graphs {p}, in process (no serving)"] = engine | {"_served": served}
        if served:
            spinning = run_peer("spinning", workdir, prefill=str(graphs[0]), step=str(graphs[1]), **common)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = [tokenizer.decode(p, skip_special_tokens=True) for p in ids]
    rows[f"served :generate through the gateway ({report['precision']})"] = _served(
        settings, texts, workdir, 10.0 if quick else 30.0)
    return {"rows": rows, "ceilings": ceilings, "served_precision": report["precision"],
            "spinning": [[label, report["precision"], mode, t.get("1"), t.get("8"), t.get("32")]
                         for mode, t in spinning.items() if mode != "peak_rss_mb"]}


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


def run(quick: bool) -> list[Table]:
    text = hf_models.corpus_text()
    bandwidths = read_bandwidth()
    shapes, quality = {}, []
    with tempfile.TemporaryDirectory(prefix="autoglm-bench-hf-") as tmp:
        workdir = Path(tmp)
        quality = _quality(text, workdir, quick)
        for label, (family, config) in hf_models.SHAPES.items():
            shapes[label] = _shape(label, family, config, text, workdir, quick)
    return _tables(shapes, quality, bandwidths)


def of_ceiling(measured: float, ceiling: float) -> str:
    """``measured`` as a share of ``ceiling``; a ceiling exceeded is no ceiling: the bandwidth behind it is
    suspect, and no share above 100% is printed."""
    return f"{measured / ceiling:.0%}" if measured <= ceiling else "over it: bandwidth suspect"


def _ceiling_table(ceiling_rows: list[list], bandwidths: dict[str, float]) -> Table:
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


def _tables(shapes: dict, quality: list[list], bandwidths: dict[str, float]) -> list[Table]:
    speed_rows, goal_rows, ceiling_rows, profile_rows, spinning_rows = [], [], [], [], []
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
        alone = rows[f"decode graphs {shape['served_precision']}, in process (no serving)"]["tokens_per_s"]["1"]
        goal_rows += [[label, "served @1 / the same graphs in process @1 (what serving costs per token)",
                       ratio(st["1"], alone), "—"],
                      [label, "served @1: CPU of Triton and the gateway per token, ms (the decode step's included)",
                       f"{served.get('cpu_ms_per_token_1', float('nan')):.2f}", "—"]]
        served_ceiling = next(c for c in shape["ceilings"] if c[1] == shape["served_precision"])[4]
        goal_rows.append([label, f"served @1 / its ceiling ({shape['served_precision']})",
                          of_ceiling(st["1"], served_ceiling), "≥ 50%"])
        ceiling_rows += shape["ceilings"]
        spinning_rows += shape["spinning"]
    notes = ["64-token prompts, 128 new tokens, greedy; every path uses all of the host's cores; the served path's "
             "load generator shares them", "decode graphs NAME-kv8: NAME weights with an int8 KV cache "
             "(compress.kv_cache); without the suffix the cache is fp32", "TTFT: at batch 1 (the served path: p50/p95 at the client of c = 1)",
             "peak RSS: the peer's own process; served: Triton with its python-backend stubs plus the gateway"]
    return [Table("Decode speed at real sizes (random weights): tokens/s", [
                "model", "path", "@1", "@8 (aggregate)", "@32 (aggregate)", "TTFT p50 ms", "TTFT p95 ms",
                "peak RSS MiB"], speed_rows, notes),
            Table("Goals", ["model", "comparison", "value", "goal"], goal_rows),
            _ceiling_table(ceiling_rows, bandwidths),
            Table("Where a batched decode step's time goes (the served graphs, and their weights with an fp32 KV cache, "
                  "in process)",
                  ["model", "decode graphs", "part", "ms per step", "share"], profile_rows,
                  ["ONNX Runtime's per-node profile of 16 steps of the step graph, 32 sequences live, ending at "
                   "the middle of their generation (64-token prompts + 64 of 128 new tokens), all cores; "
                   "profiling adds to 'between kernels'", "a step reads its weights once for the whole batch, but each live sequence's keys and "
                   "values (every layer, every cached position) for itself"]),
            Table("The decode loop's ONNX Runtime pool: how idle threads wait (compress.generate.intra_op_spinning), "
                  "in process, tokens/s", ["model", "decode graphs", "spinning", "@1", "@8 (aggregate)",
                                           "@32 (aggregate)"], spinning_rows,
                  ["off: sleep at once (the default); run: spin within a step, sleep when it returns; on: spin on "
                   "after it too (ONNX Runtime's own default, and onnxruntime-genai's)", "the served graphs, all "
                   "cores, the modes in alternating rounds (a shared host's load falls on all alike)"]),
            Table("Quality: a tiny Llama-family model fine-tuned on Shakespeare, compress's loss gate",
                  ["weights", "KV cache", "validation loss", "vs fp32", "gate", "served"], quality,
                  ["the gate passes a precision whose validation loss is within compress.max_metric_loss of fp32",
                   "validation loss read through the decode graphs 8 tokens at a time, each chunk attending to the "
                   "cache the earlier ones wrote (int8: per-channel scales calibrated on training batches)"])]


def _cli(argv: list[str]) -> int:
    if argv[:1] == ["peer"]:
        return _peer_main(argv[1])
    print("usage: python -m bench.hf peer SPEC.json  (or: python -m bench hf)")
    return 2


if __name__ == "__main__":
    sys.exit(_cli(sys.argv[1:]))
