"""GPU proof, in one run on a CUDA host: charlm trained on CUDA, CUDA-EP parity, FP32/INT8/TensorRT timings at batch
1 and 32, a KIND_GPU python-backend model in the bundled Triton serving 1,000 requests through the gateway, and NVML
energy per inference.

``python -m bench.gpu_check [--quick] [--out DIR]`` (``make bench ARGS=gpu`` runs it too) writes one results file,
``<out>/<date>-gpu.md``, rewritten after every step so a run cut short keeps what it measured. A step that fails
is written up with its error and the steps that do not depend on it still run. On a host where torch sees no CUDA
device, or whose onnxruntime lacks the CUDA provider, it refuses at once with the reason (exit status 2).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.harness import RESULTS_DIR, Outcome, Table, render

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
REQUESTS = 1000
CONCURRENCY = 16
DEVICE = "cuda:0"
TIMED = ("fp32", "int8-dynamic", "int8-static", "trt-fp16", "trt-int8")  # beside torch on CUDA


class Refused(Exception):
    """This host cannot run the proof; the message says why and what would fix it."""


def preflight() -> dict[str, Any]:
    """What the host has; Refused where torch sees no CUDA device. Without ONNX Runtime's CUDA provider the steps
    that need it say so and the others (CUDA training, torch and TensorRT timings, NVML) still run."""
    try:
        import torch
    except ImportError as exc:
        raise Refused(f"torch is not importable ({exc}): install the project's environment (make venv "
                      "EXTRAS=all,gpu,dev)") from exc
    if not torch.cuda.is_available():
        build = torch.version.cuda
        raise Refused(f"torch {torch.__version__} ({'CUDA ' + build if build else 'a CPU-only build'}) sees no CUDA "
                      "device: run this on a GPU host with a CUDA build of torch")
    import onnxruntime as ort

    from autoglm.device import CUDA_EP, PROVIDER_PACKAGES
    from compress.tensorrt import tensorrt_status

    no_cuda_ep = None if CUDA_EP in ort.get_available_providers() else (
        f"onnxruntime {ort.__version__} has no {CUDA_EP} (it has {', '.join(ort.get_available_providers())}): "
        f"install {PROVIDER_PACKAGES[CUDA_EP]}")
    trt, trt_reason = tensorrt_status()
    return {"GPU": torch.cuda.get_device_name(0), "torch": f"{torch.__version__} (CUDA {torch.version.cuda})",
            "onnxruntime": f"{ort.__version__}: {', '.join(ort.get_available_providers())}",
            "tensorrt": "importable" if trt else trt_reason, "nvml": _nvml_status(), "no CUDA EP": no_cuda_ep}


def _nvml_status() -> str:
    from autoglm.energy import MeterUnavailable, NvmlMeter

    try:
        meter = NvmlMeter(device=DEVICE)
    except MeterUnavailable as exc:
        return f"unavailable: {exc}"
    return f"measured ({meter.method})"


def _settings(workdir: Path, quick: bool):
    from autoglm.config import load_settings

    return load_settings(CONFIGS / "charlm.toml", [
        f"run.root='{workdir}'", f"run.cache_dir='{workdir / 'cache'}'", "run.name=gpu", f"run.device='{DEVICE}'",
        f"serve.device='{DEVICE}'", f"train.max_steps={150 if quick else 600}", "train.eval_every=150",
        "compress.variants=['fp32']", "compress.exporter='legacy'", "compress.generate.enabled=false",
        "compress.providers=['cuda','cpu']", "measure.batch_sizes=[1, 32]", f"measure.repeats={10 if quick else 30}",
        "measure.energy='auto'", "compress.max_metric_loss=1.0"])


class Proof:
    """The steps' tables, written to one results file after each step."""

    def __init__(self, out_dir: Path, quick: bool, facts: dict[str, Any]):
        self.path = Path(out_dir) / f"{dt.date.today().isoformat()}-gpu.md"
        self.quick, self.started = quick, time.perf_counter()
        self.no_cuda_ep = facts.pop("no CUDA EP", None)  # why ONNX Runtime cannot run on the GPU here, if it cannot
        self.tables = [Table("Host", ["what", "value"], [[k, v] for k, v in facts.items()])]
        self.failed: list[str] = []
        self.state: dict[str, Any] = {}

    def step(self, name: str, fn: Callable[[], list[Table]], needs: tuple[str, ...] = (),
             cuda_ep: bool = False) -> None:
        missing = [n for n in needs if n in self.failed]
        if missing or (cuda_ep and self.no_cuda_ep):
            why = f"{', '.join(missing)} failed" if missing else self.no_cuda_ep
            self.tables.append(Table(name, ["result"], [[f"not run: {why}"]]))
            self.failed.append(name)
        else:
            try:
                self.tables += fn()
            except Exception as exc:  # one failed step is reported, and the independent ones still run
                self.failed.append(name)
                last = traceback.format_exception_only(exc)[-1].strip()
                self.tables.append(Table(name, ["result"], [[f"FAILED: {last}"]]))
                traceback.print_exc()
        self.write()

    def write(self) -> None:
        outcome = Outcome("gpu", __doc__.splitlines()[0], time.perf_counter() - self.started, self.tables)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(render([outcome], "gpu", self.quick))


def _train(proof: Proof) -> list[Table]:
    from autoglm.train import train_run

    manifest = train_run(proof.state["settings"], progress=False)
    m, energy = manifest.metrics, manifest.energy["training"]
    return [Table("Training charlm on CUDA", ["device", "steps", "val loss", "wall s", "energy J", "energy method"],
                  [[m["device"], m["steps"], m["val_loss"], m["wall_s"], energy["joules"], energy["method"]]])]


def _model(proof: Proof):
    from autoglm.artifacts import RunDir
    from autoglm.tasks import get_task
    from autoglm.tasks.checkpoint import load_checkpoint

    settings = proof.state["settings"]
    task = get_task(settings)
    task.prepare()
    checkpoint = load_checkpoint(RunDir(settings.run.root, settings.run.name).stage_dir("train") / "model.pt")
    return task, checkpoint.build_model(task).to(settings.run.device), checkpoint.model_args


def _parity(proof: Proof) -> list[Table]:
    """The FP32 export on ONNX Runtime's CUDA provider against torch on CUDA, on validation batches."""
    from autoglm.device import settings_providers
    from autoglm.tasks.predict import onnx_predictor, torch_predictor
    from compress.export import export_onnx

    settings = proof.state["settings"]
    task, model, args = _model(proof)
    path = proof.state["workdir"] / "parity" / "fp32.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    export_onnx(model, task, args, path, exporter="legacy")  # from the model on CUDA: export follows run.device
    choice = settings_providers(settings)
    want, got = torch_predictor(model), onnx_predictor(path, providers=choice)
    worst, passed = 0.0, True
    atol, rtol = settings.compress.parity_atol, settings.compress.parity_rtol
    for batch in (1, 7):
        for inputs, _ in task.batches("val", batch, 2, seed=0, model_args=args):
            a, b = want(inputs), got(inputs)
            diff = np.abs(b.astype(np.float64) - a)
            worst, passed = max(worst, float(diff.max())), passed and bool(np.all(diff <= atol + rtol * np.abs(a)))
    return [Table("CUDA-EP parity with torch (FP32 export, validation batches of 1 and 7)",
                  ["providers", "max |onnx - torch|", f"within atol {atol:g} + rtol {rtol:g}"],
                  [[", ".join(choice.providers), worst, passed]])]


def _timings(proof: Proof) -> list[Table]:
    """torch on CUDA, then each variant on CUDA (ONNX Runtime's CUDA provider, or a TensorRT engine), batch 1/32."""
    from autoglm.tasks.predict import torch_predictor
    from compress.variants import Variant, VariantBuilder

    settings = proof.state["settings"]
    task, model, args = _model(proof)
    builder = VariantBuilder(task, model, args, settings, proof.state["workdir"] / "variants")
    reference = builder.measure(Variant("torch", None, {"pass": "none"}, status="reference"),
                                torch_predictor(model), None)
    baseline = reference.metrics[task.metric]
    rows = [_row(reference)]
    for name in TIMED:
        if proof.no_cuda_ep and not name.startswith("trt-"):
            rows.append([name, f"not run: {proof.no_cuda_ep}", *[None] * 8])
            continue
        try:
            variant = builder.build(name)
            if variant.status != "skipped":
                builder.measure(variant, builder.predictor(variant), baseline)
            rows.append(_row(variant))
        except Exception as exc:  # an engine TensorRT cannot build is a row, not the end of the table
            rows.append([name, f"failed: {type(exc).__name__}: {str(exc)[:200]}", *[None] * 8])
    return [Table("FP32 vs INT8 vs TensorRT on CUDA (charlm, p50 ms per batch; energy per item)",
                  ["variant", "status", "device", "val loss", "b1 p50 ms", "b32 p50 ms", "b1 mJ/item", "b32 mJ/item",
                   "energy method", "providers"], rows,
                  ["ONNX variants run on ONNX Runtime's CUDA provider (compress.providers=['cuda','cpu']); trt-* "
                   "are TensorRT engines built by compress.tensorrt",
                   "energy: over each timed window, by the method shown"])]


def _row(v) -> list[Any]:
    p1, p32 = v.profile.get(1, {}), v.profile.get(32, {})
    mj = [p.get("j_per_item") * 1e3 if p.get("j_per_item") is not None else None for p in (p1, p32)]
    status = f"{v.status}: {v.reason[:120]}" if v.reason else v.status
    return [v.name, status, p32.get("device") or p1.get("device"),
            v.metrics.get("val_loss"), p1.get("p50_ms"), p32.get("p50_ms"), *mj, p32.get("energy_method"),
            ", ".join(p32.get("providers") or [])]


def _serve(proof: Proof) -> list[Table]:
    """compress writes the KIND_GPU repository; the bundled Triton serves it and the gateway takes the requests."""
    from autoglm.artifacts import RunDir
    from autoglm.energy import energy_meter
    from autoglm.tasks.predict import torch_predictor
    from compress.stage import compress_run
    from autoglm.triton_config import parse_pbtxt
    from serve.settings import GatewaySettings
    from serve.supervisor import GatewayProcess
    from serve.triton import TritonServer, free_ports

    settings, workdir = proof.state["settings"], proof.state["workdir"]
    compress_run(settings, progress=False)
    repo = RunDir(settings.run.root, settings.run.name).stage_dir("repository")
    model = json.loads((repo / "task.json").read_text())["models"]["fp32"]
    group = parse_pbtxt((repo / "python" / model / "config.pbtxt").read_text()).instance_group[0]
    kind = type(group).Kind.Name(group.kind)
    task, torch_model, args = _model(proof)
    inputs = task.example_inputs(1, model_args=args)
    body = json.dumps({"inputs": [{"name": k, "shape": list(v.shape), "datatype": "INT64", "data": v.ravel().tolist()}
                                  for k, v in inputs.items()]}).encode()
    http, grpc, metrics, gateway_port = free_ports(4)
    triton = TritonServer(repo / "python", workdir=workdir / "triton", http_port=http, grpc_port=grpc,
                          metrics_port=metrics)
    t0 = time.monotonic()
    triton.start(timeout_s=180)
    ready_s = time.monotonic() - t0
    gateway = GatewayProcess(GatewaySettings(port=gateway_port, triton_url=triton.http_url, grpc_port=0,
                                             repository=repo), workdir / "gateway")
    try:
        gateway.start(timeout_s=60)
        url = f"{gateway.url}/v2/models/{model}/infer"
        meter = energy_meter("auto", device=settings.serve.device)
        with meter:
            result = asyncio.run(_requests(url, body, REQUESTS, CONCURRENCY))
        reading = meter.reading
    finally:
        gateway.stop()
        triton.stop()
    want = torch_predictor(torch_model)(inputs)
    close = bool(np.allclose(np.asarray(result["first"], np.float32).reshape(want.shape), want, atol=1e-3, rtol=1e-3))
    served = REQUESTS - result["errors"]
    return [Table(f"{REQUESTS:,} requests through the gateway to a {kind} python-backend model (concurrency "
                  f"{CONCURRENCY})", ["instance group", "GPU ids", "errors", "req/s", "p50 ms", "p95 ms",
                                      "matches torch", "mJ/request", "energy method", "Triton ready s"],
                  [[kind, list(group.gpus), result["errors"], result["rps"], result["p50"], result["p95"], close,
                    reading.joules / max(served, 1) * 1e3, reading.method, ready_s]],
                  ["energy over the whole window: NVML on the serving GPU where it works (board energy, idle share "
                   "included), else the method column says what"])]


async def _requests(url: str, body: bytes, n: int, concurrency: int) -> dict[str, Any]:
    import aiohttp

    latencies, errors, first, left = [], 0, None, iter(range(n))
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(skip_auto_headers=["Accept-Encoding"]) as session:
        async def client() -> None:
            nonlocal errors, first
            for _ in left:
                t0 = time.perf_counter()
                async with session.post(url, data=body, headers=headers) as reply:
                    payload = await reply.read()
                latencies.append(time.perf_counter() - t0)
                if reply.status != 200:
                    errors += 1
                elif first is None:
                    first = json.loads(payload)["outputs"][0]["data"]

        started = time.perf_counter()
        await asyncio.gather(*[client() for _ in range(concurrency)])
        elapsed = time.perf_counter() - started
    ms = np.array(latencies) * 1e3
    return {"rps": n / elapsed, "p50": float(np.percentile(ms, 50)), "p95": float(np.percentile(ms, 95)),
            "errors": errors, "first": first}


def run_proof(quick: bool, out_dir: Path = RESULTS_DIR) -> Proof:
    """Every step, in order; Refused before anything runs on a host that cannot do it."""
    proof = Proof(out_dir, quick, preflight())
    with tempfile.TemporaryDirectory(prefix="autoglm-gpu-check-") as tmp:
        proof.state |= {"workdir": Path(tmp), "settings": _settings(Path(tmp), quick)}
        proof.step("train", lambda: _train(proof))
        proof.step("parity", lambda: _parity(proof), needs=("train",), cuda_ep=True)
        proof.step("timings", lambda: _timings(proof), needs=("train",))
        proof.step("serve", lambda: _serve(proof), needs=("train",), cuda_ep=True)
    return proof


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer training steps and timed repeats")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder of the results file")
    args = parser.parse_args(argv)
    try:
        proof = run_proof(args.quick, args.out)
    except Refused as exc:
        print(f"gpu_check: refused: {exc}", file=sys.stderr)
        return 2
    print(f"gpu_check: wrote {proof.path}" + (f"; failed steps: {', '.join(proof.failed)}" if proof.failed else ""))
    return 1 if proof.failed else 0


if __name__ == "__main__":
    sys.exit(main())
