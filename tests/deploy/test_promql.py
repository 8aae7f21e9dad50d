"""The autoscaling PromQL against a real Prometheus scraping a real Triton, with the rendered scrape job.

Kubernetes service discovery is replaced by a static target carrying the same ``__meta_kubernetes_*``
labels a pod would have, so the rendered relabeling itself (keep annotated pods, port and path from
the annotations, ``namespace``/``pod`` labels) is what Prometheus runs. Then the prometheus-adapter
rules' series and metrics queries are asked through Prometheus's HTTP API, as the adapter does.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse

import numpy as np
import pytest
import yaml

from autoglm.local_http import DIRECT
from deploy import render_run
from deploy.scaling import SERIES
from serve.triton import TritonServer, free_port, free_ports
from tests.serve.fixtures import require_triton

pytestmark = [pytest.mark.integration,
              pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export")]
POD, NAMESPACE = "autoglm-triton-7d9f-abcde", "autoglm"


def _meta(port: int, scrape: str, pod: str) -> dict[str, str]:
    m = "__meta_kubernetes_pod_"
    return {f"{m}annotation_prometheus_io_scrape": scrape, f"{m}annotation_prometheus_io_port": str(port),
            f"{m}annotation_prometheus_io_path": "/metrics", "__meta_kubernetes_namespace": NAMESPACE,
            f"{m}name": pod, f"{m}label_app_kubernetes_io_name": "triton"}


@pytest.fixture(scope="module")
def triton(tmp_path_factory):
    torch = pytest.importorskip("torch")
    require_triton()
    from autoglm.tasks.base import IOSpec, TensorSpec
    from compress.repository import ModelConfig, write_model

    root = tmp_path_factory.mktemp("triton")
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).eval()  # (B,1,8,8) -> (B,10)
    torch.onnx.export(model, (torch.randn(2, 1, 8, 8),), str(root / "m.onnx"), input_names=["image"],
                      output_names=["logits"], dynamic_axes={"image": {0: "b"}, "logits": {0: "b"}}, dynamo=False)
    io = IOSpec(inputs=(TensorSpec("image", "float32", (1, 8, 8)),), outputs=(TensorSpec("logits", "float32", (10,)),))
    write_model(root / "repo", ModelConfig("digits-fp32", io, max_batch_size=8, parameters={"intra_op_threads": "1"}),
                root / "m.onnx")
    http, grpc, metrics = free_ports(3)
    server = TritonServer(root / "repo", workdir=root / "work", http_port=http, grpc_port=grpc, metrics_port=metrics)
    with server.start(timeout_s=90):
        yield server


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory, triton):
    """A Prometheus running the rendered scrape job (plus a decoy pod without the scrape annotation)."""
    if shutil.which("prometheus") is None:
        pytest.skip("Prometheus is not installed (Debian: apt-get install -y prometheus)")
    from tests.deploy.conftest import publish_repository

    root = tmp_path_factory.mktemp("promql")
    rundir = publish_repository(root / "runs")
    keys = root / "keys.txt"
    keys.write_text("ci:" + "cd" * 32 + "\n")
    from autoglm.config import load_settings

    render_run(load_settings(None, [f"run.root='{root / 'runs'}'", "run.name='rel'",
                                    f"deploy.api_keys_file='{keys.as_posix()}'", "deploy.kustomize=false"]))
    monitoring = rundir.stage_dir("deploy") / "out/cpu/k8s/monitoring"
    job = yaml.safe_load((monitoring / "prometheus-scrape.yaml").read_text())["scrape_configs"][0]
    adapter = yaml.safe_load((monitoring / "adapter-rules.yaml").read_text())
    metrics_port = triton.ports["metrics"]
    job.pop("kubernetes_sd_configs")
    job["scrape_interval"] = "1s"
    job["static_configs"] = [  # the address's port is wrong on purpose: the annotation must win
        {"targets": ["127.0.0.1:9"], "labels": _meta(metrics_port, "true", POD)},
        {"targets": [f"127.0.0.1:{metrics_port}"], "labels": _meta(metrics_port, "false", "decoy")}]
    config = root / "prometheus.yml"
    config.write_text(yaml.safe_dump({"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                                      "scrape_configs": [job]}))
    port = free_port()
    proc = subprocess.Popen(["prometheus", f"--config.file={config}", f"--storage.tsdb.path={root / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL,
                            stderr=open(root / "prometheus.log", "wb"))  # noqa: SIM115 - closed with the process
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if DIRECT.open(f"{url}/-/ready", timeout=1).status == 200:
                    break
            except OSError:
                time.sleep(0.2)
        else:
            pytest.fail(f"prometheus did not start: {(root / 'prometheus.log').read_text()[-2000:]}")
        yield url, adapter
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _api(url: str, path: str, **params: str):
    with DIRECT.open(f"{url}/api/v1/{path}?{urllib.parse.urlencode(params)}", timeout=10) as resp:
        body = json.loads(resp.read())
    assert body["status"] == "success", body
    data = body["data"]
    return data["result"] if isinstance(data, dict) and "result" in data else data


def _infer(triton, requests: int) -> None:
    httpclient = pytest.importorskip("tritonclient.http")
    client = httpclient.InferenceServerClient(triton.http_url.removeprefix("http://"))
    try:
        for i in range(requests):
            x = np.random.default_rng(i).standard_normal((1 + i % 4, 1, 8, 8)).astype(np.float32)
            tensor = httpclient.InferInput("image", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            client.infer("digits-fp32", [tensor])
    finally:
        client.close()  # an idle keep-alive connection would hold Triton's shutdown


def test_adapter_series_return_the_expected_values_per_pod(prometheus, triton):
    url, adapter = prometheus
    _infer(triton, 60)
    matchers = f'namespace="{NAMESPACE}",pod=~"{POD}"'
    values: dict[str, list[dict]] = {}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # rate() needs two scrapes that saw the requests
        values = {s.name: _api(url, "query", query=s.promql(matchers)) for s in SERIES}
        if all(r and float(r[0]["value"][1]) > 0 for r in values.values()):
            break
        _infer(triton, 10)
        time.sleep(1)
    for series in SERIES:
        result = values[series.name]
        assert len(result) == 1 and result[0]["metric"] == {"pod": POD}, (series.name, result)
        assert float(result[0]["value"][1]) > 0, series.name
    latency = float(values["autoglm_triton_request_latency_seconds"][0]["value"][1])
    p95 = float(values["autoglm_triton_request_p95_seconds"][0]["value"][1])
    assert 0 < latency < 1 and 0 < p95 < 1  # seconds, not microseconds
    print(f"\nper pod: {float(values['autoglm_triton_requests_per_second'][0]['value'][1]):.2f} req/s, "
          f"avg {latency * 1000:.2f} ms, p95 {p95 * 1000:.2f} ms")

    # what the adapter discovers: its seriesQuery finds the annotated pod, labelled by the rendered relabeling
    for rule in adapter["rules"]:
        found = _api(url, "series", **{"match[]": rule["seriesQuery"]})
        assert found and {s["pod"] for s in found} == {POD}, rule["seriesQuery"]
        assert all(s["namespace"] == NAMESPACE and s["component"] == "triton" for s in found)
        assert rule["metricsQuery"] == next(s.query for s in SERIES if s.name == rule["name"]["as"])
    targets = _api(url, "targets")
    assert {t["labels"].get("pod") for t in targets["activeTargets"]} == {POD}  # the decoy was dropped
