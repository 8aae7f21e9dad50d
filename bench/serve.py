"""Serving: Triton direct vs the AutoGLM gateway, dynamic batching on vs off, and a naive FastAPI + torch server.

One digits model (trained briefly, exported to ONNX FP32) is served by the bundled Triton twice: with
dynamic batching (delay 0) and without. Each target is loaded by an aiohttp closed-loop generator
in its own process at concurrency 1, 8 and 32, the targets of one concurrency one after another:
Triton direct (v2 binary tensors), the gateway's v2 passthrough (same bytes) and its ``:predict``
(JSON images), the same ``ModelInfer`` bytes over gRPC to Triton and through the gateway's gRPC relay
(grpc.aio, :mod:`bench.grpc_load`), Triton without batching, and what a user would write alone: one
FastAPI process running the torch model per request. Energy is the estimate (server CPU-seconds × 10 W per core).

Canary: a fourth gateway whose routing file sends 10% of the requests to version 2 of the same model (stable 1,
both loaded), sticky per client where one is known, random here: its v2, ``:predict`` and gRPC rows beside the
plain gateway's show what a 90/10 split costs per request (on gRPC the relay writes the version into each
message and keeps the flow-control books; without a routing file frames pass byte for byte).

Tracing: the same v2 and gRPC requests through three gateways side by side, in alternating rounds: the
code of the git ref ``$BENCH_SERVE_BASELINE`` (default ``HEAD``: the last commit against the working tree),
this code with tracing off, and this code with tracing on, exporting to a collector in this process: three
gateway processes started together, so none has served more than the others before the rounds. All three
have a routing file naming the stable version (no canary), as ``autoglm serve`` runs them. Triton's
own tracing stays off: the bundled 2.51 crashes when many concurrent requests are traced (see
``serve.triton.TritonTracing``), and what is measured here is the gateway's cost.
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
from pydantic import BaseModel

from bench import grpc_load
from bench._otlp import OtlpCollector
from bench.harness import Table, cpu_seconds, ratio

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: busy-waiting OpenMP is 2-10x slower here
CONCURRENCY = (1, 8, 32)
DIRECT, V2, PREDICT = "Triton direct (v2)", "gateway v2 passthrough", "gateway :predict (JSON)"
NO_BATCHING, NAIVE = "Triton direct, no batching", "naive FastAPI + torch"
GRPC_DIRECT, GRPC = "Triton direct (gRPC)", "gateway gRPC relay"
V2_BEFORE, V2_OFF, V2_TRACED = "gateway v2, baseline code", "gateway v2, tracing off", "gateway v2, tracing on"
GRPC_BEFORE, GRPC_OFF, GRPC_TRACED = ("gateway gRPC, baseline code", "gateway gRPC, tracing off",
                                      "gateway gRPC, tracing on")
CANARY_V2, CANARY_PREDICT = "gateway v2, canary 90/10", "gateway :predict, canary 90/10"
CANARY_GRPC = "gateway gRPC, canary 90/10"
BASELINE_ENV = "BENCH_SERVE_BASELINE"  # the git ref whose gateway is the "before" of the tracing rows
WATTS_PER_CORE = 10.0


# ---- load generator (runs in its own process: `python -m bench.serve load <spec.json>`) --------------
async def _closed_loop(spec: dict) -> dict:
    import aiohttp

    if spec.get("protocol") == "grpc":
        async with grpc_load.infer_call(spec) as call:
            return await _drive(call, spec)
    body = Path(spec["body"]).read_bytes()
    connector = aiohttp.TCPConnector(limit=spec["concurrency"])
    # No Accept-Encoding: Triton would gzip every reply for a client that asked.
    async with aiohttp.ClientSession(connector=connector, skip_auto_headers=["Accept-Encoding"]) as session:
        async def call() -> bool:
            async with session.post(spec["url"], data=body, headers=spec["headers"]) as reply:
                await reply.read()
                return reply.status == 200

        return await _drive(call, spec)


async def _drive(call, spec: dict) -> dict:
    """``concurrency`` clients calling ``call`` back to back: a warm-up, then the measured window."""
    latencies: list[float] = []
    errors = warm_requests = 0

    async def client(until: float, record: bool):
        nonlocal errors, warm_requests
        while time.perf_counter() < until:
            started = time.perf_counter()
            ok = await call()
            if record:
                latencies.append(time.perf_counter() - started)
                errors += not ok
            else:
                warm_requests += 1

    warm = time.perf_counter() + spec["warmup_s"]
    await asyncio.gather(*[client(warm, False) for _ in range(spec["concurrency"])])
    started = time.perf_counter()
    await asyncio.gather(*[client(started + spec["duration_s"], True) for _ in range(spec["concurrency"])])
    return _summary(latencies, time.perf_counter() - started, errors, warm_requests)


def _summary(latencies: list[float], elapsed: float, errors: int, warm_requests: int) -> dict:
    ms = np.array(latencies) * 1000
    return {"rps": len(ms) / elapsed, "p50": float(np.percentile(ms, 50)), "p95": float(np.percentile(ms, 95)),
            "p99": float(np.percentile(ms, 99)), "errors": errors, "requests": len(ms), "warm_requests": warm_requests}


def _load(url: str, body: Path, headers: dict, concurrency: int, duration_s: float, servers: dict[str, int]) -> dict:
    """Run the generator in its own process; add each server's CPU per request (its process tree)."""
    import psutil

    grpc_target = url.removeprefix("grpc://")  # a gRPC target: host:port, the request's bytes in ``body``
    spec = {"url": url, "target": grpc_target, "protocol": "grpc" if grpc_target != url else "http",
            "body": str(body), "headers": headers, "concurrency": concurrency,
            "duration_s": duration_s, "warmup_s": min(1.0, duration_s / 3)}
    spec_file = body.with_suffix(".spec.json")
    spec_file.write_text(json.dumps(spec))
    trees = {name: [p := psutil.Process(pid), *p.children(recursive=True)] for name, pid in servers.items()}
    before = {name: sum(map(cpu_seconds, procs)) for name, procs in trees.items()}
    out = subprocess.run([sys.executable, "-m", "bench.serve", "load", str(spec_file)], capture_output=True, text=True,
                         timeout=duration_s * 4 + 60, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    served = max(1, result["requests"] + result["warm_requests"])
    result["cpu_us"] = {name: (sum(map(cpu_seconds, procs)) - before[name]) / served * 1e6
                        for name, procs in trees.items()}
    return result


# ---- the naive server (`python -m bench.serve naive <checkpoint> <port>`) -------------------------------
class NaiveImages(BaseModel):
    images: list[list[list[float]]]


def _naive_server(checkpoint: str, port: int) -> None:
    """What one would write alone: FastAPI, pydantic request model, torch eager per request."""
    import torch
    import uvicorn
    from fastapi import FastAPI

    from autoglm.tasks.checkpoint import load_checkpoint
    from autoglm.tasks.digits import DigitsTask

    model = load_checkpoint(checkpoint).build_model(DigitsTask())
    app = FastAPI()

    @app.post("/v1/models/digits:predict")
    def predict(request: NaiveImages) -> dict:
        x = torch.tensor(request.images, dtype=torch.float32).unsqueeze(1) / 16
        with torch.no_grad():
            probs = torch.softmax(model(x), dim=1)
        return {"predictions": [{"class": str(int(p.argmax())), "probabilities": p.tolist()} for p in probs]}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


# ---- the benchmark --------------------------------------------------------------------------------------
def _prepare(workdir: Path, quick: bool):
    """Train and export digits; a repository with the model twice: batching on (versions 1 and 2, both served,
    for the canary rows) and off."""
    from autoglm.artifacts import RunDir
    from autoglm.config import load_settings
    from autoglm.tasks import get_task
    from autoglm.train import train_run
    from compress.repository import DynamicBatching, ModelConfig, write_model
    from compress.stage import compress_run

    settings = load_settings(Path(__file__).resolve().parents[1] / "configs" / "digits.toml", [
        f"run.root='{workdir}'", f"run.cache_dir='{workdir / 'cache'}'", "run.name=bench",
        f"train.max_steps={150 if quick else 600}", "compress.variants=['fp32']", "compress.exporter='legacy'",
        "measure.repeats=5", "measure.batch_sizes=[1]"])
    train_run(settings, progress=False)
    compress_run(settings, progress=False)
    run = RunDir(settings.run.root, settings.run.name)
    io = get_task(settings).io_spec({})
    repo = workdir / "bench-repository"
    for name, batching, versions in (("digits-fp32", DynamicBatching(), (1, 2)), ("digits-fp32-nobatch", None, (1,))):
        for version in versions:
            write_model(repo, ModelConfig(name, io, max_batch_size=64, dynamic_batching=batching,
                                          parameters={"intra_op_threads": "1"}, versions=versions),
                        run.stage_dir("compress") / "fp32.onnx", version)
    return run, repo


def _bodies(workdir: Path) -> dict[str, tuple[Path, dict]]:
    import orjson
    from sklearn.datasets import load_digits

    image = load_digits().images[0].astype(np.float32)  # (8, 8), pixels 0..16
    head = orjson.dumps({"inputs": [{"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32",
                                     "parameters": {"binary_data_size": 256}}],
                         "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]})
    (workdir / "v2.bin").write_bytes(head + (image / 16).tobytes())
    (workdir / "predict.json").write_bytes(orjson.dumps({"images": [image.tolist()]}))
    (workdir / "grpc.bin").write_bytes(grpc_load.infer_request("digits-fp32", image / 16))
    return {"grpc": (workdir / "grpc.bin", {}),
            "v2": (workdir / "v2.bin", {"Content-Type": "application/octet-stream",
                                        "Inference-Header-Content-Length": str(len(head))}),
            "predict": (workdir / "predict.json", {"Content-Type": "application/json"})}


def _mean_batch(metrics_url: str, model: str) -> tuple[float, float]:
    import urllib.request

    text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    values = {}
    for line in text.splitlines():
        for key in ("nv_inference_count", "nv_inference_exec_count"):
            if line.startswith(key + "{") and f'model="{model}"' in line:
                values[key] = float(line.rsplit(" ", 1)[1])
    return values.get("nv_inference_count", 0.0), values.get("nv_inference_exec_count", 0.0)


def run(quick: bool) -> list[Table]:
    from serve.gateway.canary import Split, write_routing
    from serve.settings import GatewaySettings
    from serve.supervisor import GatewayProcess
    from serve.triton import TritonServer, free_ports

    duration = 3.0 if quick else 10.0
    with tempfile.TemporaryDirectory(prefix="autoglm-bench-serve-") as tmp, OtlpCollector(keep=False) as collector:
        workdir = Path(tmp)
        run_dir, repo = _prepare(workdir, quick)
        bodies = _bodies(workdir)
        endpoint = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = collector.endpoint  # the traced gateway's exporter reads it
        http, grpc, metrics, naive_port = free_ports(4)
        triton = TritonServer(repo, workdir=workdir / "triton", http_port=http, grpc_port=grpc, metrics_port=metrics)
        started = time.monotonic()
        triton.start(timeout_s=120)
        triton_start = time.monotonic() - started

        def gateway_settings(**values) -> GatewaySettings:
            port, grpc_port = free_ports(2)
            return GatewaySettings(port=port, triton_url=triton.http_url, grpc_port=grpc_port,
                                   triton_grpc_url=triton.grpc_url, repository=run_dir.stage_dir("repository"),
                                   **values)

        gateway = GatewayProcess(gateway_settings(), workdir / "gateway")
        routing = workdir / "routing.json"  # stable 1, canary 2 for 10% of requests
        write_routing(routing, {"digits-fp32": Split(1, 2)}, 10.0)
        canary = GatewayProcess(gateway_settings(routing_file=routing), workdir / "gateway-canary")
        # the tracing rows' gateways run as `autoglm serve` runs them: a routing file naming the stable version
        stable = workdir / "routing-stable.json"
        write_routing(stable, {"digits-fp32": Split(1), "digits-fp32-nobatch": Split(1)}, 0.0)
        untraced = GatewayProcess(gateway_settings(routing_file=stable), workdir / "gateway-untraced")  # "off"
        traced = GatewayProcess(gateway_settings(tracing=True, routing_file=stable), workdir / "gateway-traced")
        source = _baseline_source(workdir)
        baseline = _BaselineGateway(source[0], gateway_settings(routing_file=stable), workdir / "gateway-baseline") \
            if isinstance(source, tuple) else None
        naive = subprocess.Popen([sys.executable, "-m", "bench.serve", "naive",
                                  str(run_dir.stage_dir("train") / "model.pt"), str(naive_port)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            gateway.start(timeout_s=60)
            canary.start(timeout_s=60)
            untraced.start(timeout_s=60)
            traced.start(timeout_s=60)
            if baseline is not None:
                try:
                    baseline.start()
                except RuntimeError as exc:  # that commit's gateway cannot run here: reported, not fatal
                    baseline.stop()
                    baseline, source = None, f"no baseline rows: the gateway of {source[1]} did not start ({exc})"
            _wait_http(f"http://127.0.0.1:{naive_port}/docs")
            triton_only, both = {"triton": triton.pid}, {"triton": triton.pid, "gateway": gateway.pid}
            targets = {  # name -> (url, body, servers whose CPU it costs, Triton model for batch stats)
                DIRECT: (f"{triton.http_url}/v2/models/digits-fp32/infer", "v2", triton_only, "digits-fp32"),
                V2: (f"{gateway.url}/v2/models/digits-fp32/infer", "v2", both, "digits-fp32"),
                PREDICT: (f"{gateway.url}/v1/models/digits:predict", "predict", both, "digits-fp32"),
                GRPC_DIRECT: (f"grpc://{triton.grpc_url}", "grpc", triton_only, "digits-fp32"),
                GRPC: (f"grpc://{gateway.grpc_url}", "grpc", both, "digits-fp32"),
                NO_BATCHING: (f"{triton.http_url}/v2/models/digits-fp32-nobatch/infer", "v2", triton_only,
                              "digits-fp32-nobatch"),
                NAIVE: (f"http://127.0.0.1:{naive_port}/v1/models/digits:predict", "predict", {"naive": naive.pid},
                        None),
                CANARY_V2: (f"{canary.url}/v2/models/digits-fp32/infer", "v2",
                            {"triton": triton.pid, "gateway": canary.pid}, "digits-fp32"),
                CANARY_PREDICT: (f"{canary.url}/v1/models/digits:predict", "predict",
                                 {"triton": triton.pid, "gateway": canary.pid}, "digits-fp32"),
                CANARY_GRPC: (f"grpc://{canary.grpc_url}", "grpc", {"triton": triton.pid, "gateway": canary.pid},
                              "digits-fp32"),
            }
            main_targets = list(targets)
            for v2, grpc, proc in ((V2_BEFORE, GRPC_BEFORE, baseline), (V2_OFF, GRPC_OFF, untraced),
                                   (V2_TRACED, GRPC_TRACED, traced)):  # the tracing rows' gateways
                if proc is not None:
                    servers = {"triton": triton.pid, "gateway": proc.pid}
                    targets[v2] = (f"{proc.url}/v2/models/digits-fp32/infer", "v2", servers, "digits-fp32")
                    targets[grpc] = (f"grpc://{proc.grpc_url}", "grpc", servers, "digits-fp32")

            def measure(name: str, concurrency: int, seconds: float) -> dict:
                url, kind, servers, model = targets[name]
                before = _mean_batch(triton.metrics_url, model) if model else None
                result = _load(url, *bodies[kind], concurrency, seconds, servers)
                if model:
                    after = _mean_batch(triton.metrics_url, model)
                    result["batch"] = (after[0] - before[0]) / max(1.0, after[1] - before[1])
                return result

            results = {(name, c): measure(name, c, duration) for c in CONCURRENCY for name in main_targets}
            # The goals' ratios again, alternating direct and gateway in short rounds: on a shared machine
            # the median of adjacent pairs is steadier than one pair.
            rounds = [{(name, c): measure(name, c, duration * 2 / 3) for c in (1, 32)
                       for name in (DIRECT, V2, PREDICT, GRPC_DIRECT, GRPC, CANARY_V2, CANARY_PREDICT, CANARY_GRPC)}
                      for _ in range(3 if quick else 5)]
            split = _canary_share(canary.url)
            tracing_rounds = [{k: v for group in ((V2_BEFORE, V2_OFF, V2_TRACED), (GRPC_BEFORE, GRPC_OFF, GRPC_TRACED))
                               for k, v in _tracing_round(measure, [n for n in group if n in targets], i,
                                                          duration * 2 / 3).items()} for i in range(5)]
        finally:
            naive.terminate()
            naive.wait(timeout=30)
            for process in (gateway, canary, untraced, traced, baseline):
                if process is not None:
                    process.stop()
            triton.stop()
            if endpoint is None:
                os.environ.pop("OTEL_EXPORTER_OTLP_ENDPOINT")
            else:
                os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = endpoint
        exported = dict(collector.batches)
    return [*_tables(results, rounds, duration, triton_start, split),
            _tracing_table(tracing_rounds, source, exported, duration * 2 / 3)]


def _tracing_round(measure, names: list[str], i: int, seconds: float) -> dict:
    """One round of ``names`` at concurrency 1 then 32, starting at a different one each round."""
    order = names[i % len(names):] + names[:i % len(names)]
    return {(name, c): measure(name, c, seconds) for c in (1, 32) for name in order}


def _baseline_source(workdir: Path) -> tuple[Path, str] | str:
    """(a directory holding the ``autoglm`` and ``serve`` packages of ``$BENCH_SERVE_BASELINE``, "ref (commit)"),
    or why there is none (no git, an unknown ref)."""
    import io
    import tarfile

    ref, root = os.environ.get(BASELINE_ENV) or "HEAD", Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "--verify", f"{ref}^{{commit}}"], cwd=root, capture_output=True,
                                text=True, check=True).stdout.strip()
        archive = subprocess.run(["git", "archive", "--format=tar", commit, "autoglm", "serve"], cwd=root,
                                 capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        return f"no baseline rows: git cannot export {ref!r} here ({exc})"
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(workdir / "baseline", filter="data")
    return workdir / "baseline", f"{ref} ({commit[:10]})"


class _BaselineGateway:
    """The baseline commit's gateway: that commit's own uvicorn command run in its source tree, given
    only the settings both know (the rest at that code's defaults)."""

    def __init__(self, source: Path, settings, workdir: Path):
        from serve.supervisor import GatewayProcess

        self.source, self.workdir = source, workdir
        self.process = GatewayProcess(settings, workdir)  # for its addresses
        self.url, self.grpc_url = self.process.url, self.process.grpc_url
        self.settings_json = settings.model_dump_json(exclude_defaults=True)
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def start(self) -> None:
        from serve.gateway.app import SETTINGS_ENV

        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "settings.json").write_text(self.settings_json)
        env = dict(os.environ, PYTHONPATH=str(self.source), **{SETTINGS_ENV: str(self.workdir / "settings.json")})
        with open(self.workdir / "gateway.log", "ab") as log:
            self.proc = subprocess.Popen(self._command(env), cwd=self.source, env=env, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        _wait_http(f"{self.url}/healthz", 60)

    def _command(self, env: dict) -> list[str]:
        """The baseline code's own command line (its uvicorn flags are part of what is compared)."""
        ask = ("import json, sys; from serve.settings import GatewaySettings; from serve.supervisor import "
               "GatewayProcess; print(json.dumps(GatewayProcess(GatewaySettings.model_validate_json(sys.argv[1]), "
               "sys.argv[2]).command()))")
        try:
            out = subprocess.run([sys.executable, "-c", ask, self.settings_json, str(self.workdir)], cwd=self.source,
                                 env=env, capture_output=True, text=True, check=True, timeout=60).stdout
        except subprocess.CalledProcessError as exc:
            raise RuntimeError(f"its command line: {exc.stderr.strip()[-300:]}") from None
        return json.loads(out.strip().splitlines()[-1])

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


def _wait_http(url: str, timeout_s: float = 90) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout_s:g} s")


def _canary_share(gateway_url: str) -> str:
    """The canary gateway's requests per version (its per-version metrics): the split it made."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    counts: dict[str, float] = {}
    text = urllib.request.urlopen(f"{gateway_url}/metrics", timeout=5).read().decode()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "autoglm_gateway_version_requests_total":
                counts[s.labels["role"]] = counts.get(s.labels["role"], 0.0) + s.value
    total = sum(counts.values()) or 1.0
    return ", ".join(f"{role} {n:.0f} ({n / total:.1%})" for role, n in sorted(counts.items()))


def _tables(results: dict, rounds: list[dict], duration: float, triton_start: float, split: str) -> list[Table]:
    rows = []
    for (name, c), r in results.items():
        cpu = r["cpu_us"]
        total = sum(cpu.values())
        rows.append([name, c, r["rps"], r["p50"], r["p95"], r["p99"], r["errors"], r.get("batch"),
                     cpu.get("triton"), cpu.get("gateway"), cpu.get("naive"),
                     f"{total * 1e-6 * WATTS_PER_CORE * 1e3:.2f}"])
    main = Table("Serving one digits image per request: throughput and latency",
                 ["target", "concurrency", "req/s", "p50 ms", "p95 ms", "p99 ms", "errors", "mean batch",
                  "Triton CPU µs/req", "gateway CPU µs/req", "naive CPU µs/req", "est. mJ/req (cpu×10W)"], rows,
                 [f"{duration:g} s per cell after a warm-up; the targets of one concurrency run back to back",
                  "CPU per request of each server's process tree (Triton includes its python-backend stubs); the "
                  "load generator runs on the same 2 cores",
                  "p99 of the batching model includes Triton 2.51's dynamic-batcher stalls: now and then a request "
                  "waits ≈500 ms (the scheduler's idle re-check period); seen here only with dynamic batching on",
                  f"Triton start to ready: {triton_start:.1f} s"])

    def med(values):
        return float(np.median(values))

    def spread(values, fmt):
        return f"{fmt(med(values))} (range {fmt(min(values))}–{fmt(max(values))}, {len(values)} rounds)"

    def x(v):
        return f"{v:.2f}×"

    def ms(v):
        return f"{v:+.2f} ms"

    def r(name, c, key="rps"):
        return results[(name, c)][key]

    baseline = {V2: DIRECT, PREDICT: DIRECT, GRPC: GRPC_DIRECT}  # each gateway route against Triton's same protocol
    throughput = {t: [rd[(t, 32)]["rps"] / rd[(d, 32)]["rps"] for rd in rounds] for t, d in baseline.items()}
    added = {t: [rd[(t, 1)]["p50"] - rd[(d, 1)]["p50"] for rd in rounds] for t, d in baseline.items()}
    ratios = [
        ["gateway v2 / Triton direct, throughput @32", spread(throughput[V2], x), "≥ 0.6×"],
        ["gateway :predict / Triton direct, throughput @32", spread(throughput[PREDICT], x), ""],
        ["gateway v2 added p50 @1", spread(added[V2], ms), "≤ 1.5 ms"],
        ["gateway :predict added p50 @1", spread(added[PREDICT], ms), ""],
        ["gateway gRPC / Triton gRPC direct, throughput @32", spread(throughput[GRPC], x), "≥ 0.6×"],
        ["gateway gRPC added p50 @1", spread(added[GRPC], ms), "≤ +0.5 ms"],
        ["gateway's own CPU per gRPC request @32", f"{med([rd[(GRPC, 32)]['cpu_us']['gateway'] for rd in rounds]):.0f} µs",
         "≤ 150 µs"],
        ["gateway's own CPU per request @32 (v2 / :predict)",
         f"{med([rd[(V2, 32)]['cpu_us']['gateway'] for rd in rounds]):.0f} / "
         f"{med([rd[(PREDICT, 32)]['cpu_us']['gateway'] for rd in rounds]):.0f} µs", ""],
        *[[f"canary 90/10 {route}: gateway CPU per request @32, and p50 @1 against the plain gateway",
           f"{med([rd[(t, 32)]['cpu_us']['gateway'] for rd in rounds]):.0f} µs vs "
           f"{med([rd[(b, 32)]['cpu_us']['gateway'] for rd in rounds]):.0f} µs; "
           f"{spread([rd[(t, 1)]['p50'] - rd[(b, 1)]['p50'] for rd in rounds], ms)}", "reported"]
          for route, t, b in (("v2", CANARY_V2, V2), (":predict", CANARY_PREDICT, PREDICT),
                              ("gRPC", CANARY_GRPC, GRPC))],
        ["dynamic batching on / off, throughput @32", ratio(r(DIRECT, 32), r(NO_BATCHING, 32)), ""],
        *[[f"AutoGLM :predict / naive FastAPI + torch, throughput @{c}", ratio(r(PREDICT, c), r(NAIVE, c)), ""]
          for c in CONCURRENCY],
        ["naive / AutoGLM :predict, p95 @32", ratio(r(NAIVE, 32, "p95"), r(PREDICT, 32, "p95")),
         ">1: AutoGLM's p95 is lower"],
    ]
    return [main, Table("Ratios", ["comparison", "value", "goal"], ratios,
                        ["throughput and p50 goals: medians of alternating short rounds (direct, gateway v2, "
                         ":predict, gRPC direct, gateway gRPC, and the canary gateway's v2, :predict and gRPC); the "
                         "other ratios come from adjacent cells of the table above",
                         f"the canary gateway's split over the whole run (random: no client key): {split}"])]


def _tracing_table(rounds: list[dict], source: tuple[Path, str] | str, exported: dict[str, int],
                   seconds: float) -> Table:
    """The gateway's own CPU and p50 with tracing off against the baseline code (must not move) and on."""
    def med(values) -> float:
        return float(np.median(values))

    def spread(values, fmt) -> str:
        return f"{fmt(med(values))} ({fmt(min(values))} to {fmt(max(values))})"

    def cell(name, c, key):
        return [rd[(name, c)]["cpu_us"]["gateway"] if key == "cpu" else rd[(name, c)][key] for rd in rounds]

    names = [n for n in (V2_BEFORE, V2_OFF, V2_TRACED, GRPC_BEFORE, GRPC_OFF, GRPC_TRACED) if (n, 1) in rounds[0]]
    rows = [[name, spread(cell(name, 1, "p50"), lambda v: f"{v:.2f}"), f"{med(cell(name, 1, 'cpu')):.0f}",
             spread(cell(name, 32, "cpu"), lambda v: f"{v:.0f}"), f"{med(cell(name, 32, 'rps')):.0f}",
             sum(r["errors"] for rd in rounds for k, r in rd.items() if k[0] == name)] for name in names]
    for against, label, goal in (((V2_BEFORE, GRPC_BEFORE), "tracing off / baseline", "1.00×: must not move"),
                                 ((V2_TRACED, GRPC_TRACED), "tracing on / off", "reported")):
        for base, other in zip((V2_OFF, GRPC_OFF), against, strict=True):
            if (other, 1) not in rounds[0]:
                continue
            first, second = (other, base) if label.startswith("tracing on") else (base, other)
            cpu = [rd[(first, 32)]["cpu_us"]["gateway"] / rd[(second, 32)]["cpu_us"]["gateway"] for rd in rounds]
            p50 = [rd[(first, 1)]["p50"] - rd[(second, 1)]["p50"] for rd in rounds]
            rows.append([f"{base.split(',')[0]}: {label}", f"{spread(p50, lambda v: f'{v:+.2f}')} ms",
                         "", f"{spread(cpu, lambda v: f'{v:.2f}×')}", "", goal])
    baseline = source[1] if isinstance(source, tuple) else source
    return Table("Tracing: the gateway's own cost, baseline code vs tracing off vs tracing on",
                 ["target / comparison", "p50 ms @1", "gateway CPU µs/req @1", "gateway CPU µs/req @32", "req/s @32",
                  "errors / goal"], rows,
                 [f"medians (and ranges) of {len(rounds)} alternating rounds of {seconds:g} s per cell, the three "
                  "gateways' order rotating per round; comparisons are medians of each round's ratio or difference",
                  f"baseline code: {baseline} (${BASELINE_ENV} picks another git ref), run with its own uvicorn "
                  "command line",
                  "all three gateways have a routing file naming the stable version, no canary (as `autoglm serve` "
                  "runs them): versions resting, the gRPC relay passes frames as they came",
                  "tracing on: every request sampled, a server and a client span each, the traceparent sent to "
                  "Triton; spans batched over OTLP/HTTP to a collector in the benchmark's own process (its CPU "
                  "counted nowhere). Triton's own tracing is off here: Triton 2.51 crashes (SIGSEGV) within seconds "
                  "when 32 concurrent requests are all traced (its issue #7795)",
                  "export batches received: " + (", ".join(f"{k} {v}" for k, v in sorted(exported.items())) or "none")])


def _cli(argv: list[str]) -> int:
    if argv[:1] == ["load"]:
        print(json.dumps(asyncio.run(_closed_loop(json.loads(Path(argv[1]).read_text())))))
        return 0
    if argv[:1] == ["naive"]:
        _naive_server(argv[1], int(argv[2]))
        return 0
    print("usage: python -m bench.serve load SPEC.json | naive CHECKPOINT PORT  (or: python -m bench serve)")
    return 2


if __name__ == "__main__":
    sys.exit(_cli(sys.argv[1:]))
