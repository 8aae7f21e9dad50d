"""The tritonserver launcher: install discovery, command line and environment, and failures that
surface as AutoGLMError with Triton's own log text, within the timeout."""

import importlib.util
import socket
import sys
import sysconfig
import time
import types
from pathlib import Path

import pytest

from autoglm.errors import AutoGLMError, ConfigError, MissingExtraError
from serve.triton import TritonServer, find_tritonserver, free_ports, log_excerpt
from tests.serve.fixtures import require_triton


@pytest.fixture(scope="module")
def install():
    return require_triton()


def _server(tmp_path, repository, **kwargs):
    http, grpc, metrics = free_ports(3)
    return TritonServer(repository, workdir=tmp_path / "work", http_port=http, grpc_port=grpc, metrics_port=metrics,
                        **kwargs)


def test_find_tritonserver_locates_binary_libs_and_this_pythons_stub(install):
    assert install.binary.is_file() and install.libs_dir.is_dir()
    assert install.backend_lib.name == "libtriton_python.so" and install.backend_lib.is_file()
    assert install.backend_utils.name == "triton_python_backend_utils.py"
    assert install.stub.parent.name == f"{sys.version_info.major}.{sys.version_info.minor}"


def test_free_ports_are_distinct_and_bindable():
    """Ports picked together never repeat (one at a time, the kernel may hand the same one out twice)."""
    ports = free_ports(16)
    assert len(set(ports)) == 16
    for port in ports:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_missing_install_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MissingExtraError, match=r"pip install 'autoglm\[triton\]'"):
        find_tritonserver()


def test_missing_stub_for_this_python_is_explained(install, monkeypatch):
    monkeypatch.setattr(sys, "version_info", types.SimpleNamespace(major=3, minor=99))
    with pytest.raises(MissingExtraError, match=r"no python-backend stub for Python 3\.99 \(it has .*3\.11"):
        find_tritonserver()


def test_bad_arguments_are_refused():
    with pytest.raises(ConfigError, match="model_control"):
        TritonServer("repo", workdir="w", model_control="auto")
    with pytest.raises(ConfigError, match="ports must differ"):
        TritonServer("repo", workdir="w", http_port=9000, grpc_port=9000)


def test_command_and_environment(install, tmp_path):
    server = TritonServer(tmp_path / "repo", workdir=tmp_path / "work", host="0.0.0.0", http_port=9100,
                          grpc_port=9101, metrics_port=9102, load_models=("a", "b"))
    cmd = server.command(install)
    assert f"--backend-config=python,shm-region-prefix-name={server.shm_prefix}" in cmd
    assert {"--http-address=0.0.0.0", "--grpc-port=9101", "--metrics-port=9102", "--allow-gpu-metrics=false",
            "--model-control-mode=explicit", "--load-model=a", "--load-model=b"} <= set(cmd)
    assert sorted(p.name for p in (tmp_path / "work" / "backends" / "python").iterdir()) == sorted(
        [install.backend_lib.name, install.backend_utils.name, install.stub.name])
    env = server.environment(install)
    libs = env["LD_LIBRARY_PATH"].split(":")
    assert libs[:2] == [sysconfig.get_config_var("LIBDIR"), str(install.libs_dir)]  # own libpython first
    assert env["PATH"].split(":")[0] == str(Path(sys.prefix) / "bin")
    assert (server.http_url, server.grpc_url) == ("http://127.0.0.1:9100", "127.0.0.1:9101")
    assert server.metrics_url == "http://127.0.0.1:9102/metrics"
    assert server.pid is None and not server.alive()
    assert TritonServer("r", workdir="w").shm_prefix != server.shm_prefix


def test_log_excerpt_puts_the_cause_before_the_tail(tmp_path):
    log = tmp_path / "triton.log"
    lines = ["I0101 00:00:00.1 1 x] start", 'E0101 00:00:00.2 1 y] "CudaDriverHelper has not been initialized."',
             'E0101 00:00:00.3 1 z] "failed to load \'m\': bad model"'] + [f"| table row {i} |" for i in range(30)] + [
        "error: creating server: Internal - failed to load all models"]
    log.write_text("\n".join(lines))
    text = log_excerpt(log, tail=5)
    assert text.splitlines()[0].endswith("bad model\"") and "Cuda" not in text and "table row" not in text
    assert text.splitlines()[-1] == "error: creating server: Internal - failed to load all models"
    assert log_excerpt(tmp_path / "absent.log") == "(no log)"


@pytest.mark.integration
def test_missing_repository_fails_fast_with_log_text(install, tmp_path):
    server = _server(tmp_path, tmp_path / "no-such-repo")
    started = time.monotonic()
    with pytest.raises(AutoGLMError, match="exited with code") as info:
        server.start(timeout_s=30)
    assert time.monotonic() - started < 30
    assert "no-such-repo" in str(info.value) and "log" in str(info.value)
    assert not server.alive()


@pytest.mark.integration
def test_broken_model_fails_with_the_models_error(install, tmp_path):
    from autoglm.tasks.base import IOSpec, TensorSpec
    from compress.repository import ModelConfig, write_model

    garbage = tmp_path / "broken.onnx"
    garbage.write_bytes(b"this is not an onnx graph")
    io = IOSpec((TensorSpec("x", "float32", (4,)),), (TensorSpec("y", "float32", (2,)),))
    write_model(tmp_path / "repo", ModelConfig("broken", io), garbage)
    server = _server(tmp_path, tmp_path / "repo")
    started = time.monotonic()
    with pytest.raises(AutoGLMError) as info:
        server.start(timeout_s=45)
    assert time.monotonic() - started < 45
    message = str(info.value)
    assert "failed to load 'broken'" in message and "Protobuf parsing failed" in message
    assert not server.alive() and not list(Path("/dev/shm").glob(f"{server.shm_prefix}*"))


@pytest.mark.integration
def test_not_ready_within_timeout_is_stopped_and_reported(install, tmp_path):
    from autoglm.tasks.base import IOSpec, TensorSpec
    from compress.repository import ModelConfig, write_model

    model = tmp_path / "m.onnx"
    model.write_bytes(b"never read: the timeout comes first")
    io = IOSpec((TensorSpec("x", "float32", (4,)),), (TensorSpec("y", "float32", (2,)),))
    write_model(tmp_path / "repo", ModelConfig("slow", io), model)
    server = _server(tmp_path, tmp_path / "repo")
    with pytest.raises(AutoGLMError, match=r"not ready after 0\.3 s"):
        server.start(timeout_s=0.3)
    assert not server.alive() and server.pid is None
