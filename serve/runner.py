"""Bring the serving stack up for a run: verified repository → Triton → gateway → (autoscaler).

:func:`start_serving` returns a :class:`Serving` handle (URLs, supervisor, autoscaler) and leaves
everything running under supervision until :meth:`Serving.stop`; ``python -m serve`` wraps it with
signal handling. Triton is the bundled server on 127.0.0.1 (it has no authentication of its own),
or an external one given by ``serve.triton_url``.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from autoglm.artifacts import RunDir, verify_outputs
from autoglm.autoscaling import AutoscaleRules, rules_from
from autoglm.config import Settings
from autoglm.errors import AutoGLMError, ConfigError
from autoglm.local_http import DIRECT
from serve.autoscale import Autoscaler, GatewayLatency, TritonActuator, TritonMetrics
from serve.gateway import TaskCatalog
from serve.settings import GatewaySettings
from serve.supervisor import GatewayProcess, Supervisor
from serve.triton import TritonServer, TritonTracing, free_ports

log = logging.getLogger("serve")


@dataclass
class Serving:
    """A running stack; :meth:`stop` shuts it down (gateway first, then Triton)."""

    run: RunDir
    catalog: TaskCatalog
    models: list[str]
    triton_url: str
    triton_metrics_url: str
    gateway: GatewayProcess
    supervisor: Supervisor
    triton: TritonServer | None = None
    autoscaler: Autoscaler | None = None
    control_url: str | None = None
    _control_server: object = None

    def urls(self) -> dict[str, str]:
        out = {"gateway": self.gateway.url, "docs": f"{self.gateway.url}/docs",
               "metrics": f"{self.gateway.url}/metrics", "triton": self.triton_url,
               "triton_metrics": self.triton_metrics_url}
        if self.gateway.grpc_url:
            out["gateway_grpc"] = self.gateway.grpc_url
        if self.control_url:
            out["control_metrics"] = self.control_url
        return out

    def stop(self) -> None:
        if self.autoscaler is not None:
            self.autoscaler.stop()
        if self._control_server is not None:
            self._control_server.shutdown()
            self._control_server.server_close()
        self.supervisor.stop()

    def __enter__(self) -> Serving:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def on_free_ports(settings: Settings, **serve) -> Settings:
    """A copy of ``settings`` whose gateway and Triton listen on free ports, without the control port (and
    ``serve`` overrides): for a stack beside another one (tests, benchmarks)."""
    gateway, http, grpc, metrics, gateway_grpc = free_ports(5)
    ports = {"gateway_port": gateway, "triton_http_port": http, "triton_grpc_port": grpc,
             "triton_metrics_port": metrics, "control_port": 0,
             "gateway": settings.serve.gateway.model_copy(update={"grpc_port": gateway_grpc})}
    return settings.model_copy(update={"serve": settings.serve.model_copy(update={**ports, **serve})})


def verified_repository(run: RunDir) -> Path:
    """The repository stage directory, after checking every file against its manifest."""
    manifest = run.manifest("repository")  # names `autoglm compress` when absent
    verify_outputs(run.stage_dir("repository"), manifest)  # IntegrityError naming a changed file
    return run.stage_dir("repository")


def _model_names(catalog: TaskCatalog, wanted: list[str]) -> list[str]:
    """Triton models to load: every variant by default; the task's name brings its generation model too."""
    with_generate = [catalog.generate] if catalog.generate and (not wanted or catalog.task in wanted) else []
    if not wanted:
        return sorted({*catalog.models.values(), *with_generate})
    names = list(with_generate)
    for name in wanted:
        model = catalog.resolve(name)
        if model is None:
            raise AutoGLMError(f"model {name!r} is not in this run's repository: choose from {catalog.names}")
        names.append(model)
    return sorted(set(names))


def _load_external(triton_url: str, models: list[str]) -> None:
    """Ask an external Triton (explicit model control) to load the models it does not serve yet."""
    for model in models:
        try:
            DIRECT.open(f"{triton_url}/v2/models/{model}/ready", timeout=5).close()
            continue  # already loaded (or the server loads everything itself)
        except OSError:
            pass
        request = urllib.request.Request(f"{triton_url}/v2/repository/models/{model}/load", data=b"{}", method="POST")
        try:
            DIRECT.open(request, timeout=120).close()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:200]
            raise AutoGLMError(f"the Triton at {triton_url} cannot load {model}: {detail}; give it this run's "
                               f"repository (the native/ flavour for the NGC container)") from None
        except OSError as exc:
            raise AutoGLMError(f"the Triton at {triton_url} is unreachable ({exc}): start it or fix "
                               f"serve.triton_url") from None


class _SupervisorCollector:
    """Supervisor state as metrics on the control endpoint."""

    def __init__(self, supervisor: Supervisor):
        self.supervisor = supervisor

    def collect(self):
        up = GaugeMetricFamily("autoglm_serve_up", "1 while the process runs", labels=["process"])
        restarts = CounterMetricFamily("autoglm_serve_restarts", "Restarts after a crash", labels=["process"])
        for name, status in self.supervisor.status.items():
            up.add_metric([name], 1.0 if status.state == "running" else 0.0)
            restarts.add_metric([name], status.restarts)
        yield up
        yield restarts


def _check_ports_free(serve, gateway: GatewaySettings | None) -> None:
    """Refuse ports something already holds (an earlier stack still running, Prometheus on 9090) before
    anything starts: a new Triton would fail to bind while the old one answers its health checks."""
    import socket

    wanted = {"serve.gateway_port": (gateway.port, gateway.host) if gateway else (serve.gateway_port, serve.host),
              "serve.gateway.grpc_port": (gateway.grpc_port, gateway.host) if gateway
              else (serve.gateway.grpc_port, serve.host),
              "serve.control_port": (serve.control_port, "127.0.0.1")}
    if not serve.triton_url:
        wanted |= {f"serve.triton_{k}_port": (getattr(serve, f"triton_{k}_port"), "127.0.0.1")
                   for k in ("http", "grpc", "metrics")}
    for key, (port, host) in wanted.items():
        if not port:
            continue
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do: TIME_WAIT is free
            try:
                probe.bind((host, port))
            except OSError as exc:
                raise ConfigError(f"{key}={port} is in use on {host} ({exc.strerror}): stop what holds it (an "
                                  f"earlier `autoglm serve`?) or choose another port with --set {key}=...") from None


def _initial_routing(run: RunDir, repository: Path, models: list[str], canary: int | None) -> Path | None:
    """A fresh routing file naming each served model's stable version (None for a repository without
    versions); a canary's files are checked here, before anything starts."""
    from autoglm.versions import check_version, load_lineage
    from serve.gateway.canary import ROUTING_FILE, Split, write_routing

    lineage = load_lineage(repository)
    if lineage["stable"] is None:
        if canary is not None:
            raise ConfigError("this repository has no numbered versions to canary: re-run `autoglm compress --force`")
        return None
    if canary is not None:
        check_version(repository, lineage, canary)  # IntegrityError naming the changed file
    path = run.stage_dir("serve") / ROUTING_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)  # an earlier stack's canary is not this one's
    write_routing(path, {m: Split(lineage["stable"]) for m in models}, 0.0)
    return path


def start_serving(settings: Settings, gateway: GatewaySettings | None = None,
                  rules: AutoscaleRules | None = None) -> Serving:
    """Verify the run's repository, start Triton (or use serve.triton_url) and the gateway, supervised; with
    ``serve.autoscale`` (or ``rules``) the autoscaler too, by ``rules`` or else ``serve.autoscale_rules``."""
    serve = settings.serve
    if serve.autoscale and rules is None:
        rules = rules_from(serve.autoscale_rules)  # a bad rule is refused before anything starts
    _check_ports_free(serve, gateway)
    tracing = gateway.tracing if gateway else serve.gateway.tracing
    if tracing:
        from serve.gateway.tracing import check_installed

        check_installed()  # before anything starts: MissingExtraError naming the otel extra
    run = RunDir(settings.run.root, settings.run.name)
    repository = verified_repository(run)
    catalog = TaskCatalog.load(repository)
    models = _model_names(catalog, serve.models)
    workdir = run.stage_dir("serve")
    processes: dict = {}
    triton = None
    if serve.triton_url:
        triton_url = serve.triton_url.rstrip("/")
        host = triton_url.removeprefix("http://").rsplit(":", 1)[0]
        metrics_url = f"http://{host}:{serve.triton_metrics_port}/metrics"
        triton_grpc_url = f"{host}:{serve.triton_grpc_port}"
        _load_external(triton_url, models)
        if tracing and serve.triton_tracing:
            log.warning("tracing: the external Triton at %s joins the gateway's traces only when started with %s",
                        triton_url, " ".join(TritonTracing.from_environment().flags()))
    else:
        flavour_dir = repository / serve.flavour
        triton = TritonServer(flavour_dir, workdir=workdir / "triton", host="127.0.0.1",
                              http_port=serve.triton_http_port, grpc_port=serve.triton_grpc_port,
                              metrics_port=serve.triton_metrics_port, load_models=tuple(models),
                              tracing=TritonTracing.from_environment() if tracing and serve.triton_tracing else None)
        processes["triton"] = triton
        triton_url, metrics_url, triton_grpc_url = triton.http_url, triton.metrics_url, triton.grpc_url
    routing = _initial_routing(run, repository, models, serve.canary.version)
    if triton is not None and routing is not None:  # a restarted Triton serves the disk's stable versions only
        from serve.release import TritonControl, restore_canary

        triton.on_ready = lambda: restore_canary(TritonControl(triton.http_url), routing)
    base = (gateway or GatewaySettings.from_settings(settings)).model_dump()
    gateway_settings = GatewaySettings(**{**base, "triton_url": triton_url, "triton_grpc_url": triton_grpc_url,
                                          "repository": repository, "routing_file": routing,
                                          "client_header": serve.canary.client_header})
    gateway_process = GatewayProcess(gateway_settings, workdir)
    processes["gateway"] = gateway_process
    supervisor = Supervisor(processes, start_timeout_s=serve.start_timeout_s).start()
    serving = Serving(run, catalog, models, triton_url, metrics_url, gateway_process, supervisor, triton)
    try:
        registry = CollectorRegistry()
        registry.register(_SupervisorCollector(supervisor))
        if rules is not None:
            serving.autoscaler = Autoscaler(rules, catalog.recommended, TritonMetrics(metrics_url, catalog.recommended),
                                            TritonActuator(triton_url), registry=registry,
                                            gateway=GatewayLatency(f"{gateway_process.url}/metrics")).start()
        if serve.control_port:
            server, _ = start_http_server(serve.control_port, addr="127.0.0.1", registry=registry)
            serving._control_server = server
            serving.control_url = f"http://127.0.0.1:{serve.control_port}/metrics"
        record = {"urls": serving.urls(), "models": models, **({"routing": str(routing)} if routing else {})}
        (workdir / "serving.json").write_text(json.dumps(record, indent=2))
        if serve.canary.version is not None:
            from serve.release import Stack, TritonControl, start_canary

            stack = Stack(TritonControl(triton_url), routing, models, f"{gateway_process.url}/metrics")
            start_canary(run, stack, serve.canary.version, serve.canary.weight)
    except BaseException:
        serving.stop()
        raise
    return serving
