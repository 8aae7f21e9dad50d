"""Keep the serving processes running: restart with backoff, expose state, stop in order.

:class:`Supervisor` watches any object with ``start(timeout_s)``, ``stop(timeout_s)`` and ``alive()``
(a :class:`~serve.triton.TritonServer`, a :class:`GatewayProcess`) from one thread. A process that
dies is stopped (which also reaps its children and shared memory) and started again after a backoff
that doubles up to ``max_backoff_s`` and resets once it has stayed up for ``stable_s``. Processes start
in the given order and stop in reverse: the gateway first, since Triton's shutdown waits for every open
client connection.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from autoglm.artifacts import write_atomic
from autoglm.errors import AutoGLMError
from autoglm.local_http import answers_ok, client_host
from serve.gateway.buckets import BUCKETS_FILE
from serve.settings import GatewaySettings
from serve.triton import ChildProcess, log_excerpt

log = logging.getLogger("serve.supervisor")
State = Literal["stopped", "starting", "running", "restarting", "failed"]


class Process(Protocol):
    def start(self, timeout_s: float = ...) -> object: ...
    def stop(self, timeout_s: float = ...) -> None: ...
    def alive(self) -> bool: ...


class GatewayProcess(ChildProcess):
    """The gateway as ``uvicorn`` worker process(es), configured through a settings JSON file.

    With several workers they share their metrics and rate-limit buckets through ``shared_dir``
    (``<workdir>/gateway-shared`` unless the settings name one), emptied at every start and removed on stop.
    """

    def __init__(self, settings: GatewaySettings, workdir: Path | str):
        self.workdir = Path(workdir)
        if settings.workers > 1 and settings.shared_dir is None:
            settings = settings.model_copy(update={"shared_dir": self.workdir / "gateway-shared"})
        self.settings = settings
        self.log_path = self.workdir / "gateway.log"
        self._proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{client_host(self.settings.host)}:{self.settings.port}"

    @property
    def grpc_url(self) -> str | None:
        """``host:port`` of KServe v2 over gRPC (the form tritonclient.grpc takes); None when it is off."""
        port = self.settings.grpc_port
        return f"{client_host(self.settings.host)}:{port}" if port else None

    def healthy(self) -> bool:
        return answers_ok(f"{self.url}/healthz")

    def command(self) -> list[str]:
        from serve.gateway.http_protocol import PROTOCOL

        s = self.settings
        # uvloop + httptools: the fastest event loop and HTTP parser uvicorn offers, with the fast routes'
        # lean request cycle (serve.gateway.http_protocol; granian, measured too, cost more CPU per request
        # than uvicorn here). Off: the access log unless serve.gateway.access_log (≈10% of a
        # small request's CPU; the gateway's metrics count requests; the app applies the setting too, see
        # serve.gateway.app.access_log) and the proxy-headers layer (no trusted proxy in front by default).
        return [sys.executable, "-m", "uvicorn", "serve.gateway.app:app_from_env", "--factory",
                "--host", s.host, "--port", str(s.port), "--workers", str(s.workers), "--loop", "uvloop",
                "--http", PROTOCOL, "--access-log" if s.access_log else "--no-access-log", "--no-proxy-headers",
                "--no-server-header", "--log-level", "warning", "--timeout-graceful-shutdown", "5"]

    def start(self, timeout_s: float = 30) -> GatewayProcess:
        """Start uvicorn and wait for ``/healthz``; AutoGLMError with the log tail otherwise."""
        from serve.gateway.app import SETTINGS_ENV

        if self.alive():
            return self
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._clear_shared()  # counts of an earlier gateway must not add to this one's
        if self.settings.shared_dir is not None:
            self.settings.shared_dir.mkdir(parents=True, exist_ok=True)
        settings_path = write_atomic(self.workdir / "gateway-settings.json",
                                     self.settings.model_dump_json(indent=2).encode())
        env = dict(os.environ, **{SETTINGS_ENV: str(settings_path.absolute())})
        log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as out:
            self._proc = subprocess.Popen(self.command(), stdout=out, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                code = self._proc.returncode
                self.stop()
                raise AutoGLMError(f"the gateway exited with code {code} while starting; {self.log_path} says:\n"
                                   f"{log_excerpt(self.log_path, log_start)}")
            if self.healthy():
                return self
            time.sleep(0.1)
        self.stop()
        raise AutoGLMError(f"the gateway did not answer /healthz within {timeout_s:g} s; see {self.log_path}")

    def stop(self, timeout_s: float = 10) -> None:
        """SIGTERM (uvicorn finishes in-flight requests), then SIGKILL to its process group."""
        self._terminate(timeout_s)  # worker processes of --workers N share the group
        self._clear_shared()

    def _clear_shared(self) -> None:
        """Remove the workers' shared files (only ours: the directory may be an operator's), then the directory
        if that leaves it empty."""
        shared = self.settings.shared_dir
        if shared is None or not shared.is_dir():
            return
        for path in [*shared.glob("*.db"), shared / BUCKETS_FILE]:
            path.unlink(missing_ok=True)
        try:
            shared.rmdir()
        except OSError:  # something else lives there
            pass


@dataclass
class ProcessStatus:
    """What the supervisor knows about one process."""

    name: str
    state: State = "stopped"
    restarts: int = 0
    started_at: float | None = None
    last_error: str | None = None
    restart_seconds: list[float] = field(default_factory=list)  # death noticed → running again


class Supervisor:
    """Start processes in order, restart any that dies, stop them in reverse order."""

    def __init__(self, processes: dict[str, Process], *, interval_s: float = 0.2, backoff_s: float = 0.5,
                 max_backoff_s: float = 30.0, stable_s: float = 60.0, start_timeout_s: float = 90.0):
        self.processes = dict(processes)
        self.interval_s, self.backoff_s, self.max_backoff_s = interval_s, backoff_s, max_backoff_s
        self.stable_s, self.start_timeout_s = stable_s, start_timeout_s
        self.status = {name: ProcessStatus(name) for name in self.processes}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Supervisor:
        """Start every process (in order), then watch them; a failed start stops those already started."""
        try:
            for name, proc in self.processes.items():
                self.status[name].state = "starting"
                proc.start(timeout_s=self.start_timeout_s)
                self.status[name].state, self.status[name].started_at = "running", time.monotonic()
        except BaseException:
            self.stop()
            raise
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, name="serve-supervisor", daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        delays = {name: self.backoff_s for name in self.processes}
        while not self._stop.wait(self.interval_s):
            for name, proc in self.processes.items():
                status = self.status[name]
                if proc.alive():
                    if status.started_at and time.monotonic() - status.started_at > self.stable_s:
                        delays[name] = self.backoff_s  # stayed up long enough: the next crash restarts fast
                    continue
                noticed = time.monotonic()
                status.state = "restarting"
                log.warning("%s died; restarting in %.1f s", name, delays[name])
                while not self._stop.is_set():
                    proc.stop()  # reap its children and shared memory before starting again
                    if self._stop.wait(delays[name]):
                        return
                    try:
                        proc.start(timeout_s=self.start_timeout_s)
                    except Exception as exc:  # noqa: BLE001 -- any failure (OSError from Popen too): retry later,
                        status.last_error = str(exc)  # never let the watcher thread die
                        delays[name] = min(self.max_backoff_s, delays[name] * 2)
                        log.error("restarting %s failed (next try in %.1f s): %s", name, delays[name], exc)
                        continue
                    status.state, status.started_at = "running", time.monotonic()
                    status.restarts += 1
                    status.restart_seconds.append(time.monotonic() - noticed)
                    delays[name] = min(self.max_backoff_s, delays[name] * 2)
                    log.warning("%s restarted in %.2f s", name, status.restart_seconds[-1])
                    break

    def stop(self, timeout_s: float = 15) -> None:
        """Stop watching, then stop every process in reverse order."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=timeout_s + self.max_backoff_s)
        for name, proc in reversed(self.processes.items()):
            proc.stop(timeout_s=timeout_s)
            self.status[name].state = "stopped"

    def states(self) -> dict[str, State]:
        return {name: status.state for name, status in self.status.items()}

    def __enter__(self) -> Supervisor:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
