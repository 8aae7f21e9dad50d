"""Soak: the gateway and Triton held at 80% of measured capacity for 10 minutes (30 s with --quick).

Capacity is measured first (closed loop, concurrency 32, through the gateway); the soak then paces
requests open-loop at 80% of it, so queues stay short and any growth is a leak, not overload. Reported
per window: throughput, p95, errors; and the resident memory of the gateway and of Triton's process tree
(its python-backend stubs included) at the start and the end. Goals: zero errors, RSS growth < 10%.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.harness import Table
from bench.serve import _bodies, _load, _prepare

LOAD = 0.8
CLIENTS = 32


def _rss_mib(pid: int) -> float:
    import psutil

    process = psutil.Process(pid)
    total = 0
    for proc in (process, *process.children(recursive=True)):
        try:
            total += proc.memory_info().rss
        except psutil.Error:  # a stub that just ended
            pass
    return total / 2**20


async def _paced(url: str, body: bytes, headers: dict, rate: float, seconds: float, window_s: float) -> list[dict]:
    """Open loop at ``rate`` req/s from CLIENTS clients; one summary per window.

    Latency counts from when a request was *due*, not from when it went out: a client held up by a slow reply
    sends its next request late, and timing from the send would hide exactly the queueing a stall causes
    (coordinated omission). ``service_p95`` is the send-to-reply time, for comparison."""
    import aiohttp

    interval = CLIENTS / rate  # each client's period
    samples: list[tuple[float, float, float, bool]] = []  # (finish time, latency from due, from sent, ok)
    connector = aiohttp.TCPConnector(limit=CLIENTS)
    async with aiohttp.ClientSession(connector=connector, skip_auto_headers=["Accept-Encoding"]) as session:
        start = time.perf_counter()

        async def client(offset: float) -> None:
            due = start + offset
            while due < start + seconds:
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
                sent = time.perf_counter()
                try:
                    async with session.post(url, data=body, headers=headers) as reply:
                        await reply.read()
                        ok = reply.status == 200
                except aiohttp.ClientError:
                    ok = False
                done = time.perf_counter()
                samples.append((done - start, done - due, done - sent, ok))
                due += interval

        await asyncio.gather(*[client(i * interval / CLIENTS) for i in range(CLIENTS)])
    windows = []
    for w in range(int(np.ceil(seconds / window_s))):
        part = [(lat, service, ok) for t, lat, service, ok in samples if w * window_s <= t < (w + 1) * window_s]
        if part:
            ms = np.array([(lat, service) for lat, service, _ in part]) * 1000
            windows.append({"window": w, "rps": len(part) / window_s, "p95": float(np.percentile(ms[:, 0], 95)),
                            "service_p95": float(np.percentile(ms[:, 1], 95)),
                            "errors": sum(not ok for _, _, ok in part), "requests": len(part)})
    return windows


def run(quick: bool) -> list[Table]:
    from serve.settings import GatewaySettings
    from serve.supervisor import GatewayProcess
    from serve.triton import TritonServer, free_ports

    seconds, window_s = (30.0, 10.0) if quick else (600.0, 60.0)
    with tempfile.TemporaryDirectory(prefix="autoglm-bench-soak-") as tmp:
        workdir = Path(tmp)
        run_dir, repo = _prepare(workdir, quick)
        body, headers = _bodies(workdir)["predict"]
        http, grpc, metrics, gateway_port = free_ports(4)
        triton = TritonServer(repo, workdir=workdir / "triton", http_port=http, grpc_port=grpc, metrics_port=metrics)
        triton.start(timeout_s=120)
        gateway = GatewayProcess(GatewaySettings(port=gateway_port, triton_url=triton.http_url,
                                                 repository=run_dir.stage_dir("repository")), workdir / "gateway")
        try:
            gateway.start(timeout_s=60)
            url = f"{gateway.url}/v1/models/digits:predict"
            capacity = _load(url, body, headers, CLIENTS, 5.0, {})["rps"]
            rss_before = {"gateway": _rss_mib(gateway.pid), "triton": _rss_mib(triton.pid)}
            windows = asyncio.run(_paced(url, body.read_bytes(), headers, LOAD * capacity, seconds, window_s))
            rss_after = {"gateway": _rss_mib(gateway.pid), "triton": _rss_mib(triton.pid)}
        finally:
            gateway.stop()
            triton.stop()
    rows = [[w["window"], f"{w['rps']:.0f}", f"{w['p95']:.2f}", f"{w['service_p95']:.2f}", w["errors"], w["requests"]]
            for w in windows]
    errors = sum(w["errors"] for w in windows)
    growth = {k: rss_after[k] / rss_before[k] - 1 for k in rss_before}
    notes = [f"capacity through the gateway (closed loop, {CLIENTS} clients): {capacity:.0f} req/s; soak paced at "
             f"{LOAD:.0%} = {LOAD * capacity:.0f} req/s for {seconds:.0f} s",
             "p95 from due: latency counted from when the open-loop schedule said to send (a late send's wait "
             "counts, no coordinated omission); from sent: the reply time alone",
             "RSS " + ", ".join(f"{k} {rss_before[k]:.0f} → {rss_after[k]:.0f} MiB ({growth[k]:+.1%})"
                                for k in growth),
             f"goal: zero errors ({'met' if errors == 0 else f'NOT met: {errors}'}), RSS growth < 10% "
             f"({'met' if max(growth.values()) < 0.10 else 'NOT met'})"]
    return [Table(f"Soak at {LOAD:.0%} of capacity, digits :predict through the gateway",
                  [f"window ({window_s:.0f} s)", "req/s", "p95 ms (from due)", "p95 ms (from sent)", "errors",
                   "requests"], rows, notes)]
