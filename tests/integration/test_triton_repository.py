"""A real Triton serves a generated python-flavour repository: same answers as ONNX Runtime, batched,
bad requests refused without hanging, clean shutdown."""

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from autoglm.tasks.base import IOSpec, TensorSpec
from compress.repository import DynamicBatching, ModelConfig, write_model
from serve.triton import TritonServer, free_ports
from tests.serve.fixtures import require_triton

pytestmark = [pytest.mark.integration,
              pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export")]
torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
httpclient = pytest.importorskip("tritonclient.http")

IO = IOSpec(inputs=(TensorSpec("image", "float32", (1, 8, 8)),), outputs=(TensorSpec("logits", "float32", (10,)),))


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    require_triton()
    root = tmp_path_factory.mktemp("triton")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).eval()  # (B,1,8,8) -> (B,10)
    onnx_file = root / "digits.onnx"
    torch.onnx.export(model, (torch.randn(2, 1, 8, 8),), str(onnx_file), input_names=["image"],
                      output_names=["logits"], dynamo=False,
                      dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
    # A short queue delay lets concurrent requests meet in one execute().
    cfg = ModelConfig("digits", IO, max_batch_size=16, dynamic_batching=DynamicBatching(max_queue_delay_us=2000),
                      parameters={"intra_op_threads": "1"}, warmup_batch_sizes=(1, 16))
    write_model(root / "repo", cfg, onnx_file)
    return root, onnx_file


def _server(root: Path, name: str) -> TritonServer:
    http, grpc, metrics = free_ports(3)
    return TritonServer(root / "repo", workdir=root / name, http_port=http, grpc_port=grpc, metrics_port=metrics)


@pytest.fixture(scope="module")
def server(repository):
    root, _ = repository
    triton = _server(root, "shared")
    started = time.monotonic()
    with triton.start(timeout_s=60):
        print(f"\ntriton start-to-ready: {time.monotonic() - started:.2f} s")
        yield triton


@pytest.fixture
def client(server):
    client = httpclient.InferenceServerClient(server.http_url.removeprefix("http://"), network_timeout=20,
                                              connection_timeout=20)
    yield client
    client.close()  # an open keep-alive connection would make Triton wait out its exit timeout on stop


def _infer(client, x):
    tensor = httpclient.InferInput("image", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return client.infer("digits", [tensor]).as_numpy("logits")


def _reference(onnx_file, x):
    return ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]


def test_batch_and_single_match_onnxruntime(repository, client):
    _, onnx_file = repository
    rng = np.random.default_rng(0)
    for batch in (3, 1):
        x = rng.standard_normal((batch, 1, 8, 8)).astype(np.float32)
        np.testing.assert_allclose(_infer(client, x), _reference(onnx_file, x), atol=1e-5)


def test_concurrent_requests_all_answered_in_order(repository, server):
    _, onnx_file = repository
    rng = np.random.default_rng(1)
    inputs = [rng.standard_normal((n, 1, 8, 8)).astype(np.float32) for n in (1, 2, 3, 1, 4, 2, 1, 3) * 3]

    def one(x):  # one client per thread: the HTTP client is not thread-safe
        client = httpclient.InferenceServerClient(server.http_url.removeprefix("http://"), network_timeout=20)
        try:
            return _infer(client, x)
        finally:
            client.close()

    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(one, inputs))
    for x, answer in zip(inputs, answers):
        np.testing.assert_allclose(answer, _reference(onnx_file, x), atol=1e-5)
    stats_client = httpclient.InferenceServerClient(server.http_url.removeprefix("http://"))
    stats = stats_client.get_inference_statistics("digits")["model_stats"][0]
    stats_client.close()
    # Counts include warmup and earlier tests; fewer executions than requests means batches formed.
    print(f"\n{stats['inference_count']} rows in {stats['execution_count']} executions")


@pytest.mark.parametrize(("shape", "dtype", "triton_type"), [
    ((2, 1, 8, 9), np.float32, "FP32"),
    ((2, 64), np.float32, "FP32"),
    ((2, 1, 8, 8), np.float64, "FP64"),
])
def test_bad_request_is_an_error_not_a_hang(client, shape, dtype, triton_type):
    tensor = httpclient.InferInput("image", list(shape), triton_type)
    tensor.set_data_from_numpy(np.zeros(shape, dtype))
    started = time.monotonic()
    with pytest.raises(Exception, match="image") as info:
        client.infer("digits", [tensor])
    assert type(info.value).__name__ == "InferenceServerException"
    assert time.monotonic() - started < 5
    assert _infer(client, np.zeros((1, 1, 8, 8), np.float32)).shape == (1, 10)  # the server still serves


def test_stop_leaves_no_process_and_no_shared_memory(repository):
    root, _ = repository
    triton = _server(root, "own").start(timeout_s=60)
    client = httpclient.InferenceServerClient(triton.http_url.removeprefix("http://"))
    _infer(client, np.ones((2, 1, 8, 8), np.float32))
    client.close()
    pid, prefix = triton.pid, triton.shm_prefix
    assert triton.alive() and list(Path("/dev/shm").glob(f"{prefix}*"))  # the python backend uses shm
    started = time.monotonic()
    triton.stop(timeout_s=15)
    print(f"\ntriton stop: {time.monotonic() - started:.2f} s")
    assert not triton.alive() and triton.pid is None
    assert not Path(f"/proc/{pid}").exists()
    assert not list(Path("/dev/shm").glob(f"{prefix}*"))
    stubs = [p for p in Path("/proc").glob("[0-9]*") if _cmdline_has(p, prefix)]
    assert not stubs, "python-backend stubs outlived the server"


def _cmdline_has(proc_dir: Path, text: str) -> bool:
    try:
        return text.encode() in (proc_dir / "cmdline").read_bytes()
    except OSError:
        return False
