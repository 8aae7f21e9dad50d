"""Start and stop a local Triton server: the ``tritonserver`` binary bundled in ``nvidia-pytriton``.

PyPI's ``nvidia-pytriton`` wheel carries a real Triton (2.51) with its python backend, which is what a
pip-only host can serve with. Running it outside pytriton needs three things this module does:
a backend directory holding the python backend's library, utils and the stub built for *this*
Python; ``LD_LIBRARY_PATH`` with this interpreter's libpython first (else the stub loads the system's
libpython against this stdlib) and the wheel's ``nvidia_pytriton.libs`` next (else the server never
becomes ready); and this environment's ``bin`` first on ``PATH`` so the stub finds numpy/onnxruntime.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from autoglm._lazy import extra_for
from autoglm.errors import AutoGLMError, ConfigError, MissingExtraError
from autoglm.local_http import answers_ok, client_host

INSTALL_HINT = f"pip install 'autoglm[{extra_for('pytriton')}]'"  # nvidia-pytriton, which bundles Triton
_ERROR_LINE = re.compile(r"E\d{4} ")
_RUNNING: weakref.WeakSet[TritonServer] = weakref.WeakSet()


@dataclass(frozen=True)
class TritonInstall:
    """Where the bundled server and its python backend live."""

    binary: Path
    libs_dir: Path  # nvidia_pytriton.libs: the server's shared libraries
    backend_lib: Path  # libtriton_python.so
    backend_utils: Path  # triton_python_backend_utils.py
    stub: Path  # triton_python_backend_stub built for this Python's major.minor


def find_tritonserver() -> TritonInstall:
    """Locate the tritonserver bundled in nvidia-pytriton; MissingExtraError naming the install otherwise."""
    spec = importlib.util.find_spec("pytriton")  # locate without importing pytriton itself
    if spec is None or not spec.submodule_search_locations:
        raise MissingExtraError(f"Triton is not installed: {INSTALL_HINT}")
    root = Path(list(spec.submodule_search_locations)[0])
    server = root / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    install = TritonInstall(
        binary=server / "bin" / "tritonserver",
        libs_dir=root.parent / "nvidia_pytriton.libs",
        backend_lib=server / "backends" / "python" / "libtriton_python.so",
        backend_utils=server / "backends" / "python" / "triton_python_backend_utils.py",
        stub=server / "python_backend_stubs" / version / "triton_python_backend_stub",
    )
    if not install.stub.is_file():
        have = sorted(p.name for p in (server / "python_backend_stubs").glob("*")) or ["none"]
        raise MissingExtraError(f"the bundled Triton has no python-backend stub for Python {version} "
                                f"(it has {', '.join(have)}): use one of those Pythons, or reinstall with "
                                f"{INSTALL_HINT}")
    for path in (install.binary, install.libs_dir, install.backend_lib, install.backend_utils):
        if not path.exists():
            raise MissingExtraError(f"{path} is missing from the nvidia-pytriton install: {INSTALL_HINT}")
    return install


def traces_endpoint(environ: Mapping[str, str] = os.environ) -> str:
    """Where OTLP/HTTP traces go, as OpenTelemetry's exporters read it: ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``
    as is, else ``OTEL_EXPORTER_OTLP_ENDPOINT`` + ``/v1/traces``, else the OTLP default on localhost."""
    if endpoint := environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        return endpoint
    base = environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or "http://localhost:4318"
    return f"{base.removesuffix('/')}/v1/traces"


@dataclass(frozen=True)
class TritonTracing:
    """Triton's own OpenTelemetry traces (``--trace-config mode=opentelemetry``), exported to ``url`` (an
    OTLP/HTTP traces endpoint: Triton exports over HTTP only).

    ``rate=0`` samples nothing by itself: Triton then traces exactly the requests that carry a W3C trace
    context (Triton does so for every one of them, since 24.01; this is 2.51 = 24.10), that is the gateway's
    sampled requests, each as a request span with model and compute spans beneath, in the gateway's trace.
    2.51 crashes (SIGSEGV) under many concurrent traced requests (triton-inference-server/server#7795, a
    mutex freed under its own lock, fixed in later releases; here within seconds at 32 concurrent requests all
    traced, not in 25 s with 5% of them traced or one at a time): sample under load, see ``serve.triton_tracing``.
    """

    url: str
    service_name: str = "triton-inference-server"  # named here: an inherited OTEL_SERVICE_NAME is the gateway's

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> TritonTracing:
        """To the collector the gateway exports to (the standard ``OTEL_EXPORTER_OTLP_*`` variables)."""
        return cls(traces_endpoint(environ))

    def flags(self) -> list[str]:
        return ["--trace-config=mode=opentelemetry", f"--trace-config=opentelemetry,url={self.url}",
                f"--trace-config=opentelemetry,resource=service.name={self.service_name}",
                "--trace-config=rate=0", "--trace-config=count=-1", "--trace-config=level=TIMESTAMPS"]


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct TCP ports free right now (another process may still take one before use; fine for
    tests). All are held open until every one is chosen: ports picked one at a time may repeat."""
    with contextlib.ExitStack() as held:
        socks = [held.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in socks]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free right now; use :func:`free_ports` for several that must differ."""
    return free_ports(1, host)[0]


def _noise(line: str) -> bool:
    """Tables ("|...|", "+---+") repeat our own flags; CUDA lines are harmless on a CPU host; "...] " heads a table."""
    return not line.strip() or line.startswith(("|", "+")) or "cuda" in line.lower() or line.rstrip().endswith("]")


def log_excerpt(path: Path, start: int = 0, errors: int = 8, tail: int = 12, width: int = 400) -> str:
    """Triton's error lines, then its last meaningful lines, from byte ``start`` on (this run only)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(start)
            lines = fh.read().decode(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    lines = [ln for ln in lines if not _noise(ln)]
    found = [ln for ln in lines if _ERROR_LINE.match(ln)][-errors:]  # "E1128 01:35:55.389 ..."
    picked = found + (["..."] if found else []) + [ln for ln in lines[-tail:] if ln not in found]
    return "\n".join(ln if len(ln) <= width else ln[:width] + " …" for ln in picked) or "(empty log)"


class ChildProcess:
    """A server process this one started (``_proc``, set by ``start``): its pid and whether it runs."""

    _proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        """The process id while started, else None."""
        return self._proc.pid if self._proc else None

    def alive(self) -> bool:
        """True while the process runs (it may still be starting up)."""
        return self._proc is not None and self._proc.poll() is None

    def _terminate(self, timeout_s: float) -> None:
        """SIGTERM, up to ``timeout_s`` to exit, then SIGKILL to the process group (its worker processes and
        stubs share it, and outlive a killed parent otherwise). Forgets the process."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()


class TritonServer(ChildProcess):
    """One ``tritonserver`` process serving ``repository``; use as a context manager.

    ``model_control="explicit"`` loads ``load_models`` at start ("*" = all) and allows runtime
    load/unload through the repository API; "none" loads everything, "poll" watches the repository.
    ``tracing`` turns on Triton's OpenTelemetry traces (:class:`TritonTracing`).
    On SIGTERM Triton waits up to ``exit_timeout_s`` for in-flight work *and open client connections*
    (an idle keep-alive connection counts), so close clients before :meth:`stop`, whose own timeout
    should exceed ``exit_timeout_s``.
    """

    def __init__(self, repository: Path | str, *, workdir: Path | str, host: str = "127.0.0.1",
                 http_port: int = 8000, grpc_port: int = 8001, metrics_port: int = 8002,
                 log_path: Path | str | None = None, model_control: str = "explicit",
                 load_models: tuple[str, ...] = ("*",), exit_timeout_s: int = 10,
                 tracing: TritonTracing | None = None):
        if model_control not in ("explicit", "none", "poll"):
            raise ConfigError(f"model_control={model_control!r} is unknown: use 'explicit', 'none' or 'poll'")
        if not isinstance(exit_timeout_s, int) or exit_timeout_s < 0:
            raise ConfigError(f"exit_timeout_s={exit_timeout_s!r} must be a non-negative integer (seconds)")
        if len({http_port, grpc_port, metrics_port}) != 3:
            raise ConfigError(f"ports must differ: http={http_port} grpc={grpc_port} metrics={metrics_port}")
        self.repository = Path(repository)
        self.workdir = Path(workdir)
        self.host = host
        self.ports = {"http": http_port, "grpc": grpc_port, "metrics": metrics_port}
        self.log_path = Path(log_path) if log_path else self.workdir / "tritonserver.log"
        self.model_control, self.load_models, self.exit_timeout_s = model_control, tuple(load_models), exit_timeout_s
        self.tracing = tracing
        self.on_ready: Callable[[], None] | None = None  # called whenever a start (a restart too) is ready
        # Unique per server: the python backend names its /dev/shm regions with it, so stop() can remove
        # exactly this server's leftovers and two servers on one host never collide.
        self.shm_prefix = f"autoglm_{os.getpid()}_{secrets.token_hex(4)}_"
        self._proc: subprocess.Popen | None = None

    # ---- addresses --------------------------------------------------------------------------------
    @property
    def _client_host(self) -> str:
        return client_host(self.host)

    @property
    def http_url(self) -> str:
        """``http://host:port`` of the KServe v2 HTTP endpoint."""
        return f"http://{self._client_host}:{self.ports['http']}"

    @property
    def grpc_url(self) -> str:
        """``host:port``, the form tritonclient.grpc expects."""
        return f"{self._client_host}:{self.ports['grpc']}"

    @property
    def metrics_url(self) -> str:
        """The Prometheus endpoint."""
        return f"http://{self._client_host}:{self.ports['metrics']}/metrics"

    def ready(self) -> bool:
        """True when ``/v2/health/ready`` answers 200 (all models loaded)."""
        return answers_ok(f"{self.http_url}/v2/health/ready")

    # ---- lifecycle --------------------------------------------------------------------------------
    def _backend_dir(self, install: TritonInstall) -> Path:
        backends = self.workdir / "backends"
        target = backends / "python"
        target.mkdir(parents=True, exist_ok=True)
        for src in (install.backend_lib, install.backend_utils, install.stub):
            dst = target / src.name
            same = dst.exists() and (dst.stat().st_size, dst.stat().st_mtime_ns) == (
                src.stat().st_size, src.stat().st_mtime_ns)
            if not same:
                shutil.copy2(src, dst)  # ≈3 MB; a copy stays intact if the package is upgraded meanwhile
        return backends.absolute()

    def environment(self, install: TritonInstall) -> dict[str, str]:
        """The server's environment: this interpreter's libpython first, this environment's bin first."""
        env = dict(os.environ)
        libs = [sysconfig.get_config_var("LIBDIR") or "", str(install.libs_dir), env.get("LD_LIBRARY_PATH", "")]
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in libs if p)
        env["PATH"] = os.pathsep.join(p for p in (str(Path(sys.prefix) / "bin"), env.get("PATH", "")) if p)
        return env

    def command(self, install: TritonInstall) -> list[str]:
        """The tritonserver command line."""
        cmd = [str(install.binary), f"--model-repository={self.repository.absolute()}",
               f"--backend-directory={self._backend_dir(install)}",
               f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
               f"--http-address={self.host}", f"--http-port={self.ports['http']}",
               f"--grpc-address={self.host}", f"--grpc-port={self.ports['grpc']}",
               f"--metrics-address={self.host}", f"--metrics-port={self.ports['metrics']}",
               "--allow-gpu-metrics=false", "--allow-cpu-metrics=true", "--metrics-config=summary_latencies=true",
               f"--exit-timeout-secs={self.exit_timeout_s}", f"--model-control-mode={self.model_control}"]
        if self.model_control == "explicit":
            cmd += [f"--load-model={name}" for name in self.load_models]
        if self.tracing is not None:
            cmd += self.tracing.flags()
        return cmd

    def start(self, timeout_s: float = 60) -> TritonServer:
        """Start the server and wait until it is ready; AutoGLMError with its log tail otherwise."""
        if self.alive():
            return self
        install = find_tritonserver()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd, env = self.command(install), self.environment(install)
        log_start = self.log_path.stat().st_size if self.log_path.exists() else 0  # the log is appended to
        with open(self.log_path, "ab") as log:
            # Own session: stop() can signal the server and its python-backend stubs as one group.
            self._proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          env=env, start_new_session=True)
        _RUNNING.add(self)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self.stop()
                raise AutoGLMError(f"tritonserver exited with code {code} before becoming ready "
                                   f"(repository {self.repository}); its log {self.log_path} says:\n"
                                   f"{log_excerpt(self.log_path, log_start)}")
            if self.ready():
                if self.on_ready is not None:
                    self.on_ready()
                return self
            time.sleep(0.1)
        self.stop()
        raise AutoGLMError(f"tritonserver was not ready after {timeout_s:g} s (repository {self.repository}); "
                           f"raise the timeout or fix the models; its log {self.log_path} says:\n"
                           f"{log_excerpt(self.log_path, log_start)}")

    def stop(self, timeout_s: float = 15) -> None:
        """SIGTERM (Triton drains and unloads), SIGKILL to the group after ``timeout_s``; clean /dev/shm."""
        _RUNNING.discard(self)
        self._terminate(timeout_s)
        for region in Path("/dev/shm").glob(f"{self.shm_prefix}*"):
            region.unlink(missing_ok=True)

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@atexit.register
def _stop_all() -> None:
    """Never leave a server running after the process that started it exits."""
    for server in list(_RUNNING):
        server.stop(timeout_s=5)
