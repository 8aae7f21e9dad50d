"""``python -m serve`` end to end: clean start and stop on a signal, a tampered repository refused,
Triton killed in the middle of traffic (503 at once, restarted, traffic recovers)."""

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import orjson
import pytest

from autoglm.errors import ConfigError, IntegrityError
from serve import GatewaySettings, start_serving
from serve.__main__ import main
from tests.serve.fixtures import get, on_free_ports, post, published_run, require_triton, wait_until

pytestmark = pytest.mark.integration
IMAGE = orjson.dumps({"images": [[[3.0] * 8] * 8]})


@pytest.fixture(scope="module")
def digits():
    require_triton()
    return published_run("digits")


def _leftovers(marker: str) -> list[str]:
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            found.append(cmdline[:120])
    return found


def test_cli_serves_until_sigterm_then_leaves_nothing_behind(digits, tmp_path):
    settings = on_free_ports(digits)
    s = settings.serve
    args = [sys.executable, "-m", "serve", "--set", f"run.root='{settings.run.root}'", "--run", settings.run.name,
            "--set", f"serve.gateway_port={s.gateway_port}", "--set", f"serve.triton_http_port={s.triton_http_port}",
            "--set", f"serve.triton_grpc_port={s.triton_grpc_port}",
            "--set", f"serve.triton_metrics_port={s.triton_metrics_port}",
            "--set", f"serve.gateway.grpc_port={s.gateway.grpc_port}", "--control-port", "0"]
    started = time.monotonic()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "SIGTERM stops" in line or proc.poll() is not None:
            break
    startup = time.monotonic() - started
    gateway = f"http://127.0.0.1:{s.gateway_port}"
    try:
        assert any(gateway in line for line in lines), "".join(lines)
        assert any(f"127.0.0.1:{s.gateway.grpc_port}" in line for line in lines), "".join(lines)
        assert _port_open(s.gateway.grpc_port)  # KServe v2 over gRPC, with the gateway
        assert get(f"{gateway}/readyz")[0] == 200
        assert post(f"{gateway}/v1/models/digits:predict", IMAGE)[0] == 200
        shm = list(Path("/dev/shm").glob(f"autoglm_{proc.pid}_*"))  # the python backend's regions
    finally:
        proc.send_signal(signal.SIGTERM)
        stopping = time.monotonic()
        rest = proc.communicate(timeout=60)[0]
    print(f"\npython -m serve: ready after {startup:.1f} s, stopped in {time.monotonic() - stopping:.1f} s")
    assert proc.returncode == 0, rest
    assert not _leftovers(f"--http-port={s.triton_http_port}") and not _leftovers(f"--port {s.gateway_port}")
    assert shm and not [p for p in shm if p.exists()]
    assert not _port_open(s.gateway_port) and not _port_open(s.gateway.grpc_port)


def _port_open(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_a_tampered_repository_is_refused_naming_the_file(digits, tmp_path):
    root = tmp_path / "runs"
    shutil.copytree(Path(digits.run.root) / digits.run.name, root / "copy")
    config = root / "copy" / "repository" / "python" / "digits-fp32" / "config.pbtxt"
    config.write_text(config.read_text().replace("max_batch_size: 64", "max_batch_size: 65"))
    settings = digits.model_copy(update={"run": digits.run.model_copy(update={"root": root, "name": "copy"})})
    with pytest.raises(IntegrityError, match=r"digits-fp32/config.pbtxt was modified"):
        start_serving(settings)


def test_the_autoscaler_runs_by_the_configured_rules_and_a_bad_rule_starts_nothing(digits):
    def autoscaling(rules):
        serve = digits.serve.model_copy(update={"autoscale": True, "autoscale_rules": rules})
        return on_free_ports(digits.model_copy(update={"serve": serve}))

    with pytest.raises(ConfigError, match=r"serve\.autoscale_rules: max_instances: .*greater than or equal to 1"):
        start_serving(autoscaling({"max_instances": 0}))
    with start_serving(autoscaling({"max_instances": 2, "interval_s": 60})) as serving:
        assert (serving.autoscaler.rules.max_instances, serving.autoscaler.rules.interval_s) == (2, 60)


def test_a_port_already_in_use_is_refused_before_anything_starts(digits):
    import socket

    settings = on_free_ports(digits)
    with socket.socket() as holder:  # say, Prometheus on the control port
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        serve = settings.serve.model_copy(update={"control_port": port})
        with pytest.raises(ConfigError, match=rf"serve.control_port={port} is in use"):
            start_serving(settings.model_copy(update={"serve": serve}))


def test_beyond_loopback_without_keys_refuses_to_start(digits, capsys):
    from autoglm.cli import run_main

    code = run_main(main, ["--set", f"run.root='{digits.run.root}'", "--run", digits.run.name,
                           "--set", "serve.host=0.0.0.0"])
    assert code == 2 and "API keys are required" in capsys.readouterr().err


def test_triton_killed_mid_traffic_is_503_then_restarted_and_traffic_recovers(digits):
    settings = on_free_ports(digits)
    serving = start_serving(settings, GatewaySettings(port=settings.serve.gateway_port))
    results: list[tuple[float, int]] = []
    stop = threading.Event()

    def traffic():
        while not stop.is_set():
            results.append((time.monotonic(), post(f"{serving.gateway.url}/v1/models/digits:predict", IMAGE)[0]))

    worker = threading.Thread(target=traffic)
    try:
        worker.start()
        assert wait_until(lambda: len(results) > 20)
        killed_at = time.monotonic()
        os.kill(serving.triton.pid, signal.SIGKILL)
        assert wait_until(lambda: serving.supervisor.status["triton"].restarts == 1, timeout=60)
        assert wait_until(lambda: results[-1][1] == 200, timeout=30)
        time.sleep(0.3)
    finally:
        stop.set()
        worker.join()
        serving.stop()
    after = [(t - killed_at, status) for t, status in results if t >= killed_at]
    failures = [(t, s) for t, s in after if s != 200]
    restart_s = serving.supervisor.status["triton"].restart_seconds[0]
    print(f"\ntriton restart: {restart_s:.2f} s after its death was noticed; {len(failures)} requests refused, "
          f"first refusal {failures[0][0] * 1000 if failures else float('nan'):.0f} ms after the kill")
    assert {s for _, s in failures} <= {503}  # never a hang, a 500 or a 502
    assert failures and failures[0][0] < 2.0  # refused at once, not after a timeout
    assert after[-1][1] == 200
