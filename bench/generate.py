"""Generation: KV-cache decoding in Triton vs full-context recomputation, through the gateway, c = 1, 8, 32.

One charlm model (nanoGPT's CPU shakespeare_char architecture, 4L/4H/128d, context 64, trained briefly:
speed does not depend on the weights) is compressed with its decode graphs and served by the bundled
Triton behind the gateway. Every request streams (``stream: true``) a greedy continuation of a 64-char
validation prompt, 64 new characters (the workload of NOTES' reference measurement): recomputation
runs the model over the last 64 characters for every token; the KV-cache paths slide their full
cache (re-encoding the last 32 characters) every 32 tokens. Two served paths, each loaded by a
closed-loop aiohttp generator in its own process:

* **KV cache**: ``/v1/models/charlm:generate`` -> the ``charlm-generate`` model (prefill once, then
  one step per token; the steps of all live sequences run as one batch);
* **recomputation**: ``/v1/models/fp32:generate`` -> one Triton request per token over the whole
  context (Triton's dynamic batcher batches concurrent requests).

The KV-cache path is also measured at c = 1 and 32 on generations that fit the context (16-char prompt,
48 new: no slides), which isolates what batching the steps gives. And the OpenAI layer's cost:
``/v1/chat/completions`` streaming vs ``:generate`` streaming of the very same generation (the chat
template's prompt and turn-end stop sent to ``:generate``), alternating rounds at c = 1 and 32.

In-process batch-1 references in the same run: torch recomputing the context (nanoGPT's ``generate``),
torch with a KV cache, and the decode graphs in ONNX Runtime without any serving. Time to first
token (TTFT) and inter-token gaps are measured at the client; energy per token is the estimate
(CPU-seconds of Triton and the gateway × 10 W per core).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.harness import Table, cpu_seconds, ratio

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: busy-waiting OpenMP is 2-10x slower here
CONCURRENCY = (1, 8, 32)
ROUNDS = 5  # alternating rounds behind each goal's median: single cells move by ±20% on a shared host
PROMPT_CHARS, NEW_TOKENS = 64, 64
# the same served path on generations that fit the context (no slides): what step batching alone gives
WITHIN_PROMPT, WITHIN_NEW = 16, 48
KV, RECOMPUTE = "KV cache (charlm-generate)", "recompute (token per request, the KV cache's precision)"
WITHIN = f"KV cache, within the context ({WITHIN_PROMPT}-char prompt, {WITHIN_NEW} new)"
CHAT, GENERATE = "/v1/chat/completions (OpenAI chunks)", ":generate (same prompt and stop)"
WATTS_PER_CORE = 10.0


# ---- load generator (its own process: `python -m bench.generate load <spec.json>`) ------------------
async def _closed_loop(spec: dict) -> dict:
    import aiohttp

    ttft, gaps, tokens, requests, errors, warm_tokens = [], [], 0, 0, 0, 0
    bodies = [json.dumps(b).encode() for b in spec["bodies"]]
    connector = aiohttp.TCPConnector(limit=spec["concurrency"])
    async with aiohttp.ClientSession(connector=connector, skip_auto_headers=["Accept-Encoding"]) as session:
        async def client(k: int, until: float, record: bool):
            nonlocal tokens, requests, errors, warm_tokens
            n = k
            while time.perf_counter() < until:
                body, n = bodies[n % len(bodies)], n + 1
                started = last = time.perf_counter()
                first, got, ok = None, 0, False
                async with session.post(spec["url"], data=body, headers={"Content-Type": "application/json"}) as r:
                    async for line in r.content:
                        if not line.startswith(b"data: {"):  # data: [DONE] ends an OpenAI stream
                            continue
                        event = _progress(json.loads(line[6:]), got)
                        now = time.perf_counter()
                        if "delta" in event:  # one or more new tokens
                            new, got = event["tokens"] - got, event["tokens"]
                            if first is None:
                                first = now - started
                            elif record and new > 0:  # per token: an event may carry several
                                gaps.extend([(now - last) / new] * new)
                            last = now
                        elif "finish_reason" in event:
                            got = max(got, event["tokens"])  # tokens that added no text come with no delta
                            ok = r.status == 200 and (event["tokens"] == spec["new_tokens"] or not spec["exact"])
                if not record:
                    warm_tokens += got
                    continue
                requests += 1
                errors += not ok
                tokens += got
                if first is not None:
                    ttft.append(first)

        warm = time.perf_counter() + spec["warmup_s"]
        await asyncio.gather(*[client(k, warm, False) for k in range(spec["concurrency"])])
        started = time.perf_counter()
        await asyncio.gather(*[client(k, started + spec["duration_s"], True) for k in range(spec["concurrency"])])
        elapsed = time.perf_counter() - started
    ms = np.array(ttft or [np.nan]) * 1000
    gap_ms = np.array(gaps or [np.nan]) * 1000
    return {"tokens_per_s": tokens / elapsed, "ttft_p50": float(np.percentile(ms, 50)),
            "ttft_p95": float(np.percentile(ms, 95)), "itl_p50": float(np.percentile(gap_ms, 50)),
            "itl_p95": float(np.percentile(gap_ms, 95)), "requests": requests, "errors": errors, "tokens": tokens,
            "all_tokens": tokens + warm_tokens}


def _progress(event: dict, got: int) -> dict:
    """An event of either API as ``:generate``'s: ``{"delta", "tokens"}`` or ``{"finish_reason", "tokens"}``.
    OpenAI's chunks carry text only: charlm's tokens are characters; the usage chunk gives the total."""
    if "choices" not in event:
        return event
    if event.get("usage"):
        return {"finish_reason": "", "tokens": event["usage"]["completion_tokens"]}
    text = event["choices"][0].get("delta", {}).get("content") if event["choices"] else None
    return {"delta": text, "tokens": got + len(text)} if text else {}


def _load(url: str, bodies: list[dict], concurrency: int, duration_s: float, pids: list[int], workdir: Path,
          new_tokens: int = NEW_TOKENS, exact: bool = True) -> dict:
    """Run the generator in its own process; add the servers' CPU per generated token. ``exact``: a
    generation counts as an error unless it has ``new_tokens`` tokens (false where a stop may end it)."""
    import psutil

    spec = {"url": url, "bodies": bodies, "concurrency": concurrency, "duration_s": duration_s,
            "warmup_s": min(1.0, duration_s / 3), "new_tokens": new_tokens, "exact": exact}
    spec_file = workdir / "generate.spec.json"
    spec_file.write_text(json.dumps(spec))
    roots = [psutil.Process(pid) for pid in pids]
    procs = [q for root in roots for q in (root, *root.children(recursive=True))]
    before = sum(map(cpu_seconds, procs))
    out = subprocess.run([sys.executable, "-m", "bench.generate", "load", str(spec_file)], capture_output=True,
                         text=True, timeout=duration_s * 6 + 120, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    # the servers' CPU spans the warm-up too: charge it to every token generated, the warm-up's included
    result["cpu_ms_per_token"] = (sum(map(cpu_seconds, procs)) - before) / max(1, result["all_tokens"]) * 1e3
    return result


# ---- in-process batch-1 references ------------------------------------------------------------------
def torch_kv_generate(model, prompt: list[int], n_new: int) -> list[int]:
    """Greedy decoding with a torch KV cache (keys/values concatenated per step); a full cache slides as the
    decode engine's does (re-encode the last context // 2 tokens)."""
    import torch
    from torch.nn import functional as F

    t, c, block = model.transformer, model.config.n_embd, model.config.block_size
    caches: list = [None] * len(t.h)

    def forward(idx, start: int):
        n = idx.size(1)
        x = t.wte(idx) + t.wpe(torch.arange(start, start + n))
        for i, block in enumerate(t.h):
            q, k, v = block.attn.c_attn(block.ln_1(x)).split(c, dim=2)
            q, k, v = (z.view(1, n, block.attn.n_head, -1).transpose(1, 2) for z in (q, k, v))
            if caches[i] is not None:
                k, v = torch.cat([caches[i][0], k], 2), torch.cat([caches[i][1], v], 2)
            caches[i] = (k, v)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=n > 1)
            x = x + block.attn.c_proj(y.transpose(1, 2).reshape(1, n, c))
            x = x + block.mlp(block.ln_2(x))
        return model.lm_head(t.ln_f(x[:, -1]))

    ids = list(prompt[-block:])
    with torch.no_grad():
        logits, length = forward(torch.tensor([ids]), 0), len(ids)
        for k in range(n_new):
            ids.append(int(logits.argmax()))
            if k + 1 == n_new:
                break
            if length >= block:  # slide: a fresh cache from the last block // 2 tokens
                caches[:] = [None] * len(t.h)
                keep = ids[-(block // 2):]
                logits, length = forward(torch.tensor([keep]), 0), len(keep)
            else:
                logits, length = forward(torch.tensor([[ids[-1]]]), length), length + 1
    return ids[-n_new:]


def closed_loop_rate(engine, prompts: list[list[int]], n_new: int, clients: int, seconds: float) -> float:
    """Greedy tokens/s of ``clients`` sequences decoded through submit/advance, each replaced by the next prompt
    as soon as it has its ``n_new`` tokens (what the served model does, without serving)."""
    fed, produced, k, tokens = [], {}, 0, 0
    started = time.perf_counter()
    while (now := time.perf_counter()) < started + seconds:
        new = [prompts[(k + j) % len(prompts)] for j in range(clients - len(engine.live))]
        k += len(new)
        produced.update(dict.fromkeys(engine.submit(new) if new else [], 0))
        ready, fed = engine.advance(fed), []
        for seq, logits in ready:
            produced[seq] += 1
            if produced[seq] == n_new:
                engine.release(seq)
                del produced[seq]
            else:
                fed.append((seq, int(logits.argmax())))
        tokens += len(ready)
    for seq in list(engine.live):  # leave the engine empty (a prefill still under way is dropped)
        engine.release(seq)
    return tokens / (now - started)


def _tokens_per_s(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return NEW_TOKENS / best


def _in_process(run, task, prompts: list[list[int]], repeats: int) -> dict[str, float]:
    import torch

    from autoglm.tasks.checkpoint import load_checkpoint
    from compress.decode import torch_greedy
    from compress.decode_engine import DecodeEngine, prefill_on_thread
    from compress.decode_speed import decode_speeds

    torch.set_num_threads(1)  # as the served model: one intra-op thread
    model = load_checkpoint(run.stage_dir("train") / "model.pt").build_model(task).eval()
    decode_dir = run.stage_dir("compress") / "decode"
    chosen = json.loads((decode_dir / "decode.json").read_text())
    graphs = str(decode_dir / chosen["prefill"]), str(decode_dir / chosen["step"])
    engine = DecodeEngine(*graphs, 32, threads=1)
    served_engine = DecodeEngine(*graphs, 32, threads=1, prefill_thread=prefill_on_thread("auto", 1))  # as served
    try:
        closed_loop_rate(served_engine, prompts, NEW_TOKENS, 32, 1.0)  # warm-up
        closed_loop = closed_loop_rate(served_engine, prompts, NEW_TOKENS, 32, 0.5 * repeats)
    finally:
        served_engine.close()
    p = prompts[0]
    short = p[:16]  # within the context, where all decoders must agree
    same = torch_kv_generate(model, short, 48) == torch_greedy(model, short, 48)
    return {"torch, recompute (nanoGPT generate)": _tokens_per_s(lambda: torch_greedy(model, p, NEW_TOKENS), repeats),
            "torch, KV cache": _tokens_per_s(lambda: torch_kv_generate(model, p, NEW_TOKENS), repeats),
            f"ONNX Runtime decode graphs ({chosen['precision']}), no serving":
                _tokens_per_s(lambda: engine.generate(p, NEW_TOKENS), repeats),
            "the same, 32 sequences decoded as one batch (tokens/s of all)":
                decode_speeds({"e": engine}, p, NEW_TOKENS, batches=(32,), rounds=repeats)["e"][32],
            "the served engine (prefill thread), 32 clients in a closed loop (tokens/s of all)":
                closed_loop,
            "_torch_kv_equals_recompute": same, "_precision": chosen["precision"]}


# ---- the benchmark ------------------------------------------------------------------------------------
def _prepare(workdir: Path, quick: bool):
    from autoglm.config import load_settings
    from autoglm.train import train_run
    from compress.stage import compress_run

    settings = load_settings(Path(__file__).resolve().parents[1] / "configs" / "charlm.toml", [
        f"run.root='{workdir}'", f"run.cache_dir='{workdir / 'cache'}'", "run.name=bench",
        f"train.max_steps={150 if quick else 600}", "train.eval_every=1000", "train.eval_batches=4",
        "compress.variants=['fp32', 'int8']", "compress.exporter='legacy'", "measure.repeats=5",
        "measure.batch_sizes=[1]",
        "compress.generate.max_sequences=32"])
    train_run(settings, progress=False)
    compress_run(settings, progress=False)
    return settings


def run(quick: bool) -> list[Table]:
    from autoglm.artifacts import RunDir
    from autoglm.tasks import get_task
    from compress.decode import prompts as val_prompts
    from serve import GatewaySettings, on_free_ports, start_serving

    duration = 4.0 if quick else 12.0
    with tempfile.TemporaryDirectory(prefix="autoglm-bench-generate-") as tmp:
        workdir = Path(tmp)
        settings = on_free_ports(_prepare(workdir, quick))
        run_dir = RunDir(settings.run.root, settings.run.name)
        task = get_task(settings)
        task.prepare()
        task_info = json.loads((run_dir.stage_dir("repository") / "task.json").read_text())
        model_args = task_info["model_args"]
        prompts = val_prompts(task, model_args, 32, PROMPT_CHARS)
        itos = task.vocab
        bodies = [{"prompt": "".join(itos[i] for i in p), "max_new_tokens": NEW_TOKENS, "temperature": 0,
                   "stream": True} for p in prompts]
        within = [{**b, "prompt": b["prompt"][-WITHIN_PROMPT:], "max_new_tokens": WITHIN_NEW} for b in bodies]
        local = _in_process(run_dir, task, prompts, 3 if quick else 10)
        # recomputation at the KV cache's precision, so the ratio is the cache's alone (not INT8's too)
        int8 = local["_precision"] == "int8" and "int8" in task_info["models"]
        recompute_variant = "int8" if int8 else "fp32"
        serving = start_serving(settings, GatewaySettings(port=settings.serve.gateway_port, max_in_flight=256,
                                                          request_timeout_s=120))
        with serving:
            pids = [serving.triton.pid, serving.gateway.pid]
            targets = {KV: f"{serving.gateway.url}/v1/models/charlm:generate",
                       RECOMPUTE: f"{serving.gateway.url}/v1/models/{recompute_variant}:generate"}
            results = {(name, c): _load(url, bodies, c, duration, pids, workdir)
                       for c in CONCURRENCY for name, url in targets.items()}
            results.update({(WITHIN, c): _load(targets[KV], within, c, duration, pids, workdir, WITHIN_NEW)
                            for c in (1, 32)})
            # the batch-1 goal again, alternating the two paths in short rounds (steadier on a shared host)
            rounds = [{name: _load(url, bodies, 1, duration / 2, pids, workdir)["tokens_per_s"]
                       for name, url in targets.items()} for _ in range(3 if quick else ROUNDS)]
            # and the concurrency goal: c = 1 and c = 32 of the KV-cache path, alternating (both workloads)
            for rd in rounds:
                for path, load, new in ((KV, bodies, NEW_TOKENS), (WITHIN, within, WITHIN_NEW)):
                    rd.update({(path, c): _load(targets[KV], load, c, duration / 2, pids, workdir, new)["tokens_per_s"]
                               for c in (1, 32)})
            # the OpenAI layer: the same chat generation through both APIs, alternating in each round
            for rd in rounds:
                for c in (1, 32):
                    rd.update({(path, c): _load(url, load, c, duration / 2, pids, workdir, exact=False)["tokens_per_s"]
                               for path, url, load in _openai_pair(serving.gateway.url, bodies)})
    local["_recompute"] = f"{recompute_variant} ({task_info['models'][recompute_variant]})"
    return _tables(results, rounds, local, duration)


def _openai_pair(gateway: str, bodies: list[dict]) -> list[tuple[str, str, list[dict]]]:
    """(path, url, bodies) of one chat generation per prompt through each API: the chat request, and the
    ``:generate`` request of its plain-template prompt and turn-end stop."""
    from serve.gateway.openai_api import TURN_END, plain_chat_prompt
    from serve.gateway.openai_schema import ChatMessage

    chats = [{"model": "charlm", "messages": [{"role": "user", "content": b["prompt"]}], "max_tokens": NEW_TOKENS,
              "temperature": 0, "stream": True, "stream_options": {"include_usage": True}} for b in bodies]
    generates = [{"prompt": plain_chat_prompt([ChatMessage(role="user", content=b["prompt"])]),
                  "max_new_tokens": NEW_TOKENS, "temperature": 0, "stop": [TURN_END], "stream": True} for b in bodies]
    return [(GENERATE, f"{gateway}/v1/models/charlm:generate", generates),
            (CHAT, f"{gateway}/v1/chat/completions", chats)]


def _tables(results: dict, rounds: list[dict], local: dict, duration: float) -> list[Table]:
    rows = [[name, c, r["tokens_per_s"], r["ttft_p50"], r["ttft_p95"], r["itl_p50"], r["itl_p95"], r["requests"],
             r["errors"], r["cpu_ms_per_token"] * WATTS_PER_CORE] for (name, c), r in results.items()]
    served = Table(f"Streaming generation through the gateway ({PROMPT_CHARS}-char prompt, {NEW_TOKENS} new characters "
                   f"per request unless the path says otherwise, greedy)",
                   ["path", "concurrency", "tokens/s (all clients)", "TTFT p50 ms", "TTFT p95 ms",
                    "inter-token p50 ms", "inter-token p95 ms", "requests", "errors", "est. mJ/token (cpu×10W)"],
                   rows, [f"{duration:g} s per cell after a warm-up; closed loop, each client streams one request "
                          f"at a time; the load generator shares the host's 2 cores",
                          "inter-token: the gap between two events divided by the tokens the later one carries (the KV "
                          "model coalesces tokens into events, recomputation sends one per token)",
                          "energy: CPU-seconds of Triton (with its python-backend stubs) and the gateway per "
                          "token × 10 W (an estimate: no RAPL or NVML here)"])
    names = [k for k in local if not k.startswith("_")]
    baseline = local[names[0]]
    reference = Table("In-process batch-1 references (one thread, no serving)", ["decoder", "tokens/s", "vs recompute"],
                      [[n, local[n], ratio(local[n], baseline)] for n in names],
                      [f"within the context (16-char prompt, 48 new), torch with KV cache generates the same greedy "
                       f"tokens as recomputation: {local['_torch_kv_equals_recompute']}",
                       f"served decode graphs: {local['_precision']}; served recomputation: {local['_recompute']}"])

    def r(name, c):
        return results[(name, c)]["tokens_per_s"]

    def median_of(per_round: list[float]) -> str:
        return f"{np.median(per_round):.2f}× (rounds {', '.join(f'{v:.2f}' for v in per_round)})"

    def batching(path: str) -> str:
        return median_of([rd[(path, 32)] / rd[(path, 1)] for rd in rounds])

    ratios = Table("Goals", ["comparison", "value", "goal"], [
        ["served KV cache / served recomputation, tokens/s @1", median_of([rd[KV] / rd[RECOMPUTE] for rd in rounds]),
         "≥ 5×"],
        ["served KV cache @1 / torch recompute in-process", ratio(r(KV, 1), baseline), ""],
        ["served KV cache: aggregate tokens/s @32 / @1", batching(KV), "≥ 3×"],
        ["served KV cache: aggregate tokens/s @8 / @1", ratio(r(KV, 8), r(KV, 1)), ""],
        ["the same within the context (no slides): aggregate tokens/s @32 / @1", batching(WITHIN), "≥ 3×"],
        ["in-process: 32 sequences in one batch / one sequence", ratio(local[names[3]], local[names[2]]),
         "no serving, one thread"],
        ["in-process ceiling: the served engine, 32 clients / one sequence", ratio(local[names[4]], local[names[2]]),
         "no serving, prefill thread"],
        ["served recomputation: aggregate tokens/s @32 / @1", ratio(r(RECOMPUTE, 32), r(RECOMPUTE, 1)), ""],
        *[[f"OpenAI layer: /v1/chat/completions / :generate streaming, tokens/s @{c}",
           median_of([rd[(CHAT, c)] / rd[(GENERATE, c)] for rd in rounds]), "≥ 0.95×"] for c in (1, 32)],
        ["TTFT p95 @32, KV cache / recomputation", ratio(results[(KV, 32)]["ttft_p95"],
                                                         results[(RECOMPUTE, 32)]["ttft_p95"]), "reported"],
    ], ["the goals: medians of alternating short rounds (the two paths at c = 1; c = 1 and c = 32 of the KV "
        "cache path, on each workload; the two APIs at c = 1 and 32), steadier on a shared host than the table's "
        "cells measured minutes apart",
        "the OpenAI layer: the same greedy chat reply (plain template, ends at its turn's end or 64 characters) "
        "streamed through /v1/chat/completions and through :generate"])
    return [served, reference, ratios]


def _cli(argv: list[str]) -> int:
    if argv[:1] == ["load"]:
        print(json.dumps(asyncio.run(_closed_loop(json.loads(Path(argv[1]).read_text())))))
        return 0
    print("usage: python -m bench.generate load SPEC.json  (or: python -m bench generate)")
    return 2


if __name__ == "__main__":
    sys.exit(_cli(sys.argv[1:]))
