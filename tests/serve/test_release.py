"""Model versions on a real Triton: a canary split of 1,000 requests matches its weight (over HTTP and over gRPC),
promote and rollback under load lose no request, a failing canary is rolled back automatically, a tampered
version is refused."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from autoglm.artifacts import RunDir, sha256_file, write_atomic
from autoglm.config import CanarySettings
from autoglm.errors import IntegrityError
from autoglm.triton_config import parse_pbtxt
from autoglm.versions import add_version, link_version, load_lineage, next_version, write_lineage
from serve.canary_watch import ROLLED_BACK, watch
from serve.gateway.canary import read_routing
from serve.release import Stack, promote, rollback, start_canary
from tests.serve.fixtures import get, on_free_ports, post, published_run, require_triton, wait_until

IMAGE = orjson.dumps({"images": [[[3.0] * 8] * 8]})
V2 = orjson.dumps({"inputs": [{"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [3.0] * 64}]})
MODEL = "digits-fp32"
FAILING_MODEL = b'''import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """Answers its warm-up, then fails every request: a broken release."""

    def initialize(self, args):
        self.calls = 0

    def execute(self, requests):
        self.calls += 1
        if self.calls == 1:
            return [pb_utils.InferenceResponse([pb_utils.Tensor("logits", np.zeros((1, 10), np.float32))])
                    for _ in requests]
        return [pb_utils.InferenceResponse(error=pb_utils.TritonError("injected failure")) for _ in requests]
'''


def publish(run: RunDir, model_py: bytes | None = None) -> int:
    """A new version made of the stable one's files (``model.py`` replaced where given), recorded in the lineage
    and the manifest as a publishing stage records it: not yet stable."""
    repo = run.stage_dir("repository")
    lineage = load_lineage(repo)
    stable, version = lineage["stable"], next_version(lineage)
    link_version(repo, stable, version)
    if model_py is not None:
        for path in repo.glob(f"*/{MODEL}/{version}/model.py"):
            path.unlink()  # a hard link: write a file of its own
            path.write_bytes(model_py)
    add_version(lineage, repo, version, {**lineage["versions"][str(stable)], "source": "test", "parent": stable})
    lineage["stable"], lineage["history"] = stable, lineage["history"][:-1]  # published, not released
    write_lineage(repo, lineage)
    manifest_path = run.manifest_path("repository")
    manifest = json.loads(manifest_path.read_text())
    manifest["outputs"]["versions.json"] = {"sha256": sha256_file(repo / "versions.json"),
                                            "size": (repo / "versions.json").stat().st_size}
    write_atomic(manifest_path, json.dumps(manifest).encode())
    return version


@pytest.fixture(scope="module")
def release_run(tmp_path_factory):
    """A copy of the published digits run (version 1) with a version 2 of the same files."""
    require_triton()
    base = published_run("digits")
    root = tmp_path_factory.mktemp("release")
    shutil.copytree(Path(base.run.root) / base.run.name, root / "release")
    settings = base.model_copy(update={"run": base.run.model_copy(update={"root": str(root), "name": "release"})})
    run = RunDir(root, "release")
    assert publish(run) == 2
    return settings, run


@pytest.fixture(scope="module")
def stack(release_run):
    """`autoglm serve --canary 2 --weight 10` on the copy."""
    from serve import start_serving

    settings, run = release_run
    canary = settings.serve.canary.model_copy(update={"version": 2, "weight": 10.0})
    settings = on_free_ports(settings, canary=canary, models=["fp32"])
    with start_serving(settings) as serving:
        yield serving, Stack.find(run), run


def version_counts(gateway: str, role: str | None = None) -> Counter:
    """Requests per (version, status) of the digits model from the gateway's metrics."""
    counts = Counter()
    for family in text_string_to_metric_families(get(f"{gateway}/metrics")[1].decode()):
        for s in family.samples:
            if s.name == "autoglm_gateway_version_requests_total" and role in (None, s.labels["role"]):
                counts[(int(s.labels["version"]), s.labels["status"])] += s.value
    return counts


def triton_counts(serving) -> Counter:
    """Successful inferences per version of the digits model, as Triton itself counts them."""
    counts = Counter()
    for family in text_string_to_metric_families(get(serving.triton_metrics_url)[1].decode()):
        for s in family.samples:
            if s.name == "nv_inference_request_success_total" and s.labels["model"] == MODEL:  # the parser's name
                counts[int(s.labels["version"])] += s.value
    return counts


def grpc_infer(client, headers: dict | None = None, version: str = "") -> None:
    import tritonclient.grpc as grpcclient

    image = grpcclient.InferInput("image", [1, 1, 8, 8], "FP32")
    image.set_data_from_numpy(np.full((1, 1, 8, 8), 3.0, np.float32))
    client.infer(MODEL, [image], model_version=version, headers=headers)


class Load:
    """Clients sending :predict, unversioned v2 infer and (with ``grpc``) unversioned gRPC ModelInfer requests
    until stopped; every status kept (a gRPC call's as ``grpc OK`` or its error)."""

    def __init__(self, gateway: str, clients: int = 3, grpc: str | None = None):
        self.gateway, self.statuses, self.stop = gateway, Counter(), threading.Event()
        self.threads = [threading.Thread(target=self._client, args=(i,)) for i in range(clients)]
        if grpc is not None:
            self.threads.append(threading.Thread(target=self._grpc_client, args=(grpc,)))

    def _client(self, i: int) -> None:
        path, body = ("/v1/models/digits:predict", IMAGE) if i % 2 else (f"/v2/models/{MODEL}/infer", V2)
        while not self.stop.is_set():
            self.statuses[post(self.gateway + path, body)[0]] += 1

    def _grpc_client(self, address: str) -> None:
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        with grpcclient.InferenceServerClient(address) as client:
            while not self.stop.is_set():
                try:
                    grpc_infer(client)
                    self.statuses["grpc OK"] += 1
                except InferenceServerException as exc:
                    self.statuses[f"grpc {exc.status()}: {exc.message()}"] += 1

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()


def test_a_canary_takes_its_weight_of_1000_requests_and_keeps_each_client(stack):
    serving, _, _ = stack
    gateway = serving.gateway.url
    before = version_counts(gateway)
    statuses = [post(f"{gateway}/v1/models/digits:predict", IMAGE)[0] for _ in range(1000)]  # no client key
    after = version_counts(gateway)
    canary = after[(2, "200")] - before[(2, "200")]
    stable = after[(1, "200")] - before[(1, "200")]
    assert statuses == [200] * 1000 and canary + stable == 1000
    assert abs(canary - 100) <= 4 * math.sqrt(1000 * 0.1 * 0.9), canary  # binomial(1000, 0.1), 4 sigma
    for client in ("alice", "bob", "carol"):  # a known client stays on one version
        before = version_counts(gateway)
        for _ in range(20):
            assert post(f"{gateway}/v1/models/digits:predict", IMAGE, {"x-client-id": client})[0] == 200
        delta = version_counts(gateway) - before
        assert len(delta) == 1 and sum(delta.values()) == 20, (client, delta)


def test_a_grpc_canary_takes_its_weight_keeps_each_client_and_respects_a_named_version(stack):
    import tritonclient.grpc as grpcclient

    serving, _, _ = stack
    gateway = serving.gateway.url

    def served(role: str | None = None) -> Counter:  # OK calls per version, as the gateway counted them
        return Counter({v: n for (v, status), n in version_counts(gateway, role).items() if status == "200"})

    start, start_triton = served(), triton_counts(serving)
    with grpcclient.InferenceServerClient(serving.gateway.grpc_url) as client:
        for _ in range(1000):  # tritonclient, no client key: drawn per call
            grpc_infer(client)
        drawn = served() - start
        assert sum(drawn.values()) == 1000, drawn
        assert abs(drawn[2] - 100) <= 4 * math.sqrt(1000 * 0.1 * 0.9), drawn  # binomial(1000, 0.1), 4 sigma
        for name in ("alice", "bob", "carol"):  # a known client (gRPC metadata) stays on one version
            before = served()
            for _ in range(10):
                grpc_infer(client, {"x-client-id": name})
            delta = served() - before
            assert len(delta) == 1 and sum(delta.values()) == 10, (name, delta)
        before = served("pinned")
        for _ in range(10):
            grpc_infer(client, version="2")
        assert served("pinned") - before == Counter({2: 10})  # named by the client: kept
    # Triton's own counts (published every couple of seconds) agree version by version: the versions reached it
    assert wait_until(lambda: sum((triton_counts(serving) - start_triton).values()) >= 1040, timeout=15)
    assert triton_counts(serving) - start_triton == served() - start


def test_rollback_and_promote_under_load_lose_no_request(stack):
    serving, live, run = stack
    gateway, repo = serving.gateway.url, run.stage_dir("repository")
    with Load(gateway, grpc=serving.gateway.grpc_url) as load:
        withdrawn = rollback(run, live)  # the canary goes: version 1 takes everything, 2 unloads
        assert withdrawn["withdrawn"] == [2]
        promoted = promote(run, 2, live)  # 2 loads beside 1, takes everything, 1 unloads
        assert promoted["stable"] == 2 and promoted["previous"] == 1
        assert live.triton.ready(MODEL, 2) and not live.triton.ready(MODEL, 1)
        back = rollback(run, live)  # the stable version goes back to 1
    assert back["stable"] == 1 and live.triton.ready(MODEL, 1) and not live.triton.ready(MODEL, 2)
    assert set(load.statuses) == {200, "grpc OK"} and load.statuses[200] > 50, load.statuses
    assert load.statuses["grpc OK"] > 20, load.statuses
    config = parse_pbtxt((repo / "python" / MODEL / "config.pbtxt").read_text())
    assert list(config.version_policy.specific.versions) == [1]  # a restart serves what was released
    history = [(h["version"], h["by"]) for h in load_lineage(repo)["history"]]
    assert history[-2:] == [(2, "release promote"), (1, "release rollback")]
    assert run.state("repository") == "complete"


def test_a_failing_canary_is_rolled_back_automatically(stack):
    serving, live, run = stack
    gateway = serving.gateway.url
    failing = publish(run, FAILING_MODEL)
    start_canary(run, live, failing, 50.0)
    rules = CanarySettings(min_requests=10, window_s=5.0, check_every_s=0.2)
    with Load(gateway, clients=2, grpc=serving.gateway.grpc_url) as load:
        code = watch(run, live, rules, duration_s=30)
    assert code == ROLLED_BACK
    grpc_failed = {k for k in load.statuses if isinstance(k, str) and k != "grpc OK"}
    assert all("injected failure" in k for k in grpc_failed), grpc_failed  # gRPC calls reached the canary too
    assert load.statuses[200] > 0 and set(load.statuses) - grpc_failed <= {200, 500, 502, "grpc OK"}
    state = read_routing(live.routing)
    assert state["models"][MODEL] == {"stable": 1, "canary": None} and "5xx" in state["auto_rollbacks"][-1]["reason"]
    metrics = get(f"{gateway}/metrics")[1].decode()
    assert "autoglm_release_auto_rollbacks_total 1.0" in metrics
    assert version_counts(gateway, "canary")[(failing, "500")] > 0  # v2 relays Triton's own 500
    assert post(f"{gateway}/v1/models/digits:predict", IMAGE)[0] == 200


def test_a_canary_is_served_again_after_triton_restarts(stack):
    serving, live, run = stack
    gateway = serving.gateway.url
    start_canary(run, live, 2, 50.0)
    os.kill(serving.triton.pid, signal.SIGKILL)
    assert wait_until(lambda: serving.supervisor.status["triton"].restarts == 1, timeout=60)
    before = version_counts(gateway, "canary")
    statuses = [post(f"{gateway}/v1/models/digits:predict", IMAGE, {"x-client-id": f"c{i}"})[0] for i in range(40)]
    assert statuses == [200] * 40 and (version_counts(gateway, "canary") - before)[(2, "200")] > 0
    rollback(run, live)


def test_a_tampered_version_is_refused(release_run, tmp_path):
    settings, run = release_run
    repo = run.stage_dir("repository")
    version = publish(run)
    target = repo / "python" / MODEL / str(version) / "model.onnx"
    target.unlink()  # a hard link: replace it
    target.write_bytes(b"not the model that was published")
    with pytest.raises(IntegrityError, match=f"version {version} cannot be served: .*model.onnx was modified.*"
                                             "autoglm compress --force"):
        promote(run, version)
    assert load_lineage(repo)["stable"] == 1  # nothing moved


def test_generation_during_a_canary_reaches_the_picked_version(tmp_path):
    """:generate (whole and streamed) and /v1/completions on a charlm run whose version 2 is a canary at 50%:
    each client's requests reach, in Triton, the version the split picks for it."""
    from serve import start_serving
    from serve.gateway.canary import Split

    require_triton()
    base = published_run("charlm")
    shutil.copytree(Path(base.run.root) / base.run.name, tmp_path / "gen")
    settings = base.model_copy(update={"run": base.run.model_copy(update={"root": str(tmp_path), "name": "gen"})})
    run = RunDir(tmp_path, "gen")
    assert publish(run) == 2
    canary = settings.serve.canary.model_copy(update={"version": 2, "weight": 50.0})

    def generated(serving) -> Counter:
        counts = Counter()
        for family in text_string_to_metric_families(get(serving.triton_metrics_url)[1].decode()):
            for s in family.samples:
                if s.name == "nv_inference_request_success_total" and s.labels["model"] == "charlm-generate":
                    counts[int(s.labels["version"])] += s.value
        return counts

    with start_serving(on_free_ports(settings, canary=canary)) as serving:
        gateway, want = serving.gateway.url, Counter()
        for client in ("alice", "bob", "carol", "dave"):
            version = Split(1, 2).pick(50.0, client.encode())[0]
            for path, body in (("/v1/models/charlm:generate", {"prompt": "ab", "max_new_tokens": 4}),
                               ("/v1/models/charlm:generate", {"prompt": "ab", "max_new_tokens": 4, "stream": True}),
                               ("/v1/completions", {"model": "charlm", "prompt": "ab", "max_tokens": 4})):
                status, reply = post(gateway + path, orjson.dumps(body), {"x-client-id": client})
                assert status == 200 and b"error" not in reply, reply
                want[version] += 1
        assert set(want) == {1, 2}  # both versions serve some of these clients
        assert wait_until(lambda: sum(generated(serving).values()) >= 12, timeout=15)
        assert generated(serving) == want
