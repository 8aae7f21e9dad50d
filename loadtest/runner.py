"""One measured window: locust headless in its own process, joined with energy and Triton's metrics.

Locust runs as a subprocess (importing it would patch this process with gevent). It marks the
moment every user is spawned and warmed up, and the moment the test starts stopping, in a window
file; this process starts the energy meter and scrapes Triton's counters at the first mark and stops
both at the second, so ramp-up, start-up and shutdown stay out of every per-request figure.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autoglm.errors import AutoGLMError
from loadtest.energy_join import EnergySource, PeakRss
from loadtest.latency import Slo
from loadtest.locustfiles import BEARER_ENV, DIRECTORY, SCENARIOS, SHAPES
from loadtest.triton_metrics import scrape, window_stats

PROJECT_ROOT = Path(__file__).resolve().parents[1]  # so the locust process can import loadtest.locustfiles


@dataclass(frozen=True)
class LoadSpec:
    """What one locust run does: scenario, target, closed-loop concurrency, shape, duration, gate."""

    scenario: str
    host: str
    model: str
    users: int
    duration_s: float
    spawn_rate: float | None = None  # None: every user within one second
    warmup_s: float = 1.0
    shape: str = "steady"
    shape_steps: int = 4
    slo: Slo = field(default_factory=lambda: Slo(math.inf, 1.0))
    api_key: str | None = field(default=None, repr=False)  # the gateway's, sent as a Bearer token

    def __post_init__(self) -> None:
        if self.scenario not in SCENARIOS:
            raise AutoGLMError(f"scenario '{self.scenario}' is unknown: use one of {sorted(SCENARIOS)}")
        if self.shape not in SHAPES:
            raise AutoGLMError(f"load shape '{self.shape}' is unknown: use one of {sorted(SHAPES)}")
        if self.users < 1 or self.duration_s <= 0:
            raise AutoGLMError(f"need users >= 1 and duration_s > 0 (got {self.users}, {self.duration_s})")
        # Locust evaluates a shape once a second: a phase shorter than that can be skipped entirely.
        shortest = {"step": self.duration_s / max(1, self.shape_steps), "spike": 0.2 * self.duration_s}
        if shortest.get(self.shape, 1.0) < 1.0:
            raise AutoGLMError(f"the {self.shape} shape over {self.duration_s:g} s has phases under 1 s, which "
                               "locust's once-a-second shape tick can miss: use a longer duration or fewer steps")

    @property
    def rate(self) -> float:
        return self.spawn_rate or float(self.users)

    @property
    def run_time_s(self) -> int:
        """Locust's --run-time: ramp, warm-up and the measured duration (whole seconds, rounded up)."""
        ramp = 0.0 if self.shape != "steady" else self.users / self.rate
        return math.ceil(ramp + self.warmup_s + self.duration_s)


def locust_command(spec: LoadSpec, payloads: Path, window_file: Path, csv_prefix: Path) -> list[str]:
    """The locust command line for ``spec`` (locustfiles by path: the scenario, then the shape if any).

    Paths are made absolute: locust runs in the point's own directory, not the caller's.
    """
    payloads, window_file, csv_prefix = payloads.resolve(), window_file.resolve(), csv_prefix.resolve()
    files = [str(DIRECTORY / SCENARIOS[spec.scenario])]
    if SHAPES[spec.shape]:
        files.append(str(DIRECTORY / SHAPES[spec.shape]))
    return [sys.executable, "-m", "locust", "-f", ",".join(files), "--headless", "--host", spec.host,
            "-u", str(spec.users), "-r", f"{spec.rate:g}", "-t", f"{spec.run_time_s}s", "--stop-timeout", "0",
            "--csv", str(csv_prefix), "--only-summary", "--loglevel", "WARNING",
            "--payloads", str(payloads), "--model", spec.model, "--window-file", str(window_file),
            "--warmup-s", f"{spec.warmup_s:g}", "--shape-steps", str(spec.shape_steps),
            "--slo-p95-ms", f"{spec.slo.p95_ms:g}", "--slo-error-rate", f"{spec.slo.error_rate:g}"]


def _environment(api_key: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    if api_key:  # through the environment, not argv: a command line is visible to every user of the host
        env[BEARER_ENV] = api_key
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


def _events(path: Path, offset: int) -> tuple[list[dict], int]:
    """Complete JSON lines of ``path`` from byte ``offset`` on, and the offset after them."""
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n") + 1  # a line still being written waits for the next poll
    return [json.loads(line) for line in data[:end].splitlines() if line.strip()], offset + end


def run_window(spec: LoadSpec, out_dir: Path, *, payloads: Path, metrics_url: str | None = None,
               triton_model: str | None = None, energy: EnergySource | None = None) -> dict[str, Any]:
    """Run locust for ``spec`` and join its measured window with energy and Triton's counters.

    Writes locust's CSVs and log into ``out_dir``. Returns the window summary (requests, rps,
    p50/p95/p99, error rate), ``energy`` (joules, method, J/request), ``triton`` (mean batch, queue
    time), ``memory`` (peak RSS of Triton's processes) and ``slo`` (breaches; ``passed``). Raises
    AutoGLMError when locust itself fails.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    window_file, log_path = out_dir / "window.jsonl", out_dir / "locust.log"
    window_file.unlink(missing_ok=True)
    cmd = locust_command(spec, payloads, window_file, out_dir / "locust")
    marks: dict[str, dict] = {}
    # Serving pids are looked up now, not at the window's open: the lookup scans every socket of the host
    # (tenths of a second, seconds on a busy one), and a meter started that late could miss a short window.
    meter = energy.meter() if energy else None
    sampler = energy.peak_rss() if energy else "no energy source configured"
    before = memory = None
    joined: dict[str, Any] = {"energy": None, "triton": None, "memory": None}
    offset = 0
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=_environment(spec.api_key), cwd=out_dir)
        deadline = time.monotonic() + spec.run_time_s + 60  # start-up and shutdown take seconds, not minutes
        try:
            while True:
                done = proc.poll() is not None
                events, offset = _events(window_file, offset)
                for event in events:
                    marks[event["event"]] = event
                    if event["event"] == "open":
                        if meter is not None:  # first: the scrape below can take seconds
                            meter.start()
                        before = _scrape(metrics_url, triton_model, joined)
                        memory = sampler
                    elif event["event"] == "close" and "open" in marks:
                        joined["energy"] = _energy(meter, energy)
                        joined["memory"] = _memory(memory)
                        memory = None
                        after = _scrape(metrics_url, triton_model, joined)
                        if before is not None and after is not None:
                            joined["triton"] = window_stats(before, after)
                if isinstance(memory, PeakRss):
                    memory.sample()
                if done:
                    break
                if time.monotonic() > deadline:
                    proc.kill()
                    raise AutoGLMError(f"locust did not finish within {spec.run_time_s + 60} s; see {log_path}")
                time.sleep(0.02)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    summary = marks.get("summary")
    if summary is None or proc.returncode not in (0, 1):
        tail = log_path.read_text(errors="replace")[-2000:]
        raise AutoGLMError(f"locust exited with code {proc.returncode} without a summary (command: "
                           f"{' '.join(cmd[2:6])} ...); its log {log_path} ends with:\n{tail}")
    return _joined(spec, summary, joined, proc.returncode)


def _scrape(metrics_url: str | None, model: str | None, joined: dict[str, Any]):
    if not metrics_url or not model:
        return None
    try:
        return scrape(metrics_url, model)
    except AutoGLMError as exc:
        joined["triton_unavailable"] = str(exc)
        return None


def _energy(meter, source: EnergySource | None) -> dict[str, Any] | None:
    if meter is None:
        return {"unavailable": source.unavailable if source else "no energy source configured"}
    reading = meter.stop()
    lost = getattr(meter, "lost_pids", [])
    return {**reading.to_dict(), "lost_pids": lost, "pids": list(getattr(meter, "pids", None) or [])}


def _memory(memory: PeakRss | str | None) -> dict[str, Any]:
    if isinstance(memory, PeakRss):
        memory.sample(math.inf)  # the window's last moment counts too
        return memory.result()
    return {"unavailable": memory or "the measured window never opened"}


def _joined(spec: LoadSpec, summary: dict, joined: dict[str, Any], exit_code: int) -> dict[str, Any]:
    window = summary["window"]
    energy = joined["energy"] or {"unavailable": "the measured window never opened"}
    span, seconds = energy.get("seconds"), window.get("seconds") or 0.0
    if "joules" in energy and span is not None and span < seconds / 2:  # marks read late: not this window's
        energy = {"unavailable": f"the meter ran {span:.2f} s of the {seconds:.2f} s window: this process read "
                                 "locust's open and close marks late (an overloaded host); measure again"}
    if "joules" in energy and window["requests"]:
        # the meter's span is not exactly the window's: charge it the requests of its own span
        rate, span = window.get("rps") or 0.0, energy.get("seconds") or 0.0
        served = rate * span if rate > 0 and span > 0 else window["requests"]
        energy["j_per_request"] = energy["joules"] / served
    return {
        "scenario": spec.scenario, "host": spec.host, "model": spec.model, "users": spec.users,
        "shape": spec.shape, "duration_s": spec.duration_s, "window": window, "phases": summary["phases"],
        "energy": energy, "triton": joined["triton"], "triton_unavailable": joined.get("triton_unavailable"),
        "memory": joined.get("memory") or {"unavailable": "the measured window never opened"},
        "generator_saturated": summary.get("generator_saturated", False), "stream": summary.get("stream") or {},
        "slo": {"p95_ms": spec.slo.p95_ms, "error_rate": spec.slo.error_rate, "breaches": summary["breaches"],
                "passed": not summary["breaches"], "locust_exit_code": exit_code},
    }
