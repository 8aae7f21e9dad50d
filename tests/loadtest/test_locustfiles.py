"""The locustfiles in a real locust process against a stub HTTP server: load shapes, phases, the SLO gate.

Locust runs as a subprocess (as in production): importing it here would patch pytest with gevent.
"""

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from loadtest.latency import Slo
from loadtest.runner import LoadSpec, run_window


class _Stub(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like Triton and the gateway
    status = 200

    def do_POST(self):  # noqa: N802 - http.server's naming
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = b'{"outputs": []}'
        self.send_response(self.server.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def stub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    server.daemon_threads = True
    server.status = 200
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def payloads(tmp_path):
    path = tmp_path / "payloads.json"
    body = {"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [0.5, 1.5]}]}
    path.write_text(json.dumps({"scenarios": {"v2": [{"path": "/v2/models/{model}/infer", "body": body}]}}))
    return path


def test_step_shape_reports_one_phase_per_step(stub, payloads, tmp_path):
    spec = LoadSpec("v2", f"http://127.0.0.1:{stub.server_port}", "m", users=4, duration_s=4, warmup_s=0,
                    shape="step", shape_steps=2, slo=Slo(1000, 0.01))
    result = run_window(spec, tmp_path / "step", payloads=payloads)
    assert result["slo"]["passed"] and result["window"]["requests"] > 0 and result["window"]["failures"] == 0
    assert [p["phase"] for p in result["phases"]] == ["users=2", "users=4"]
    stats = (tmp_path / "step" / "locust_stats.csv").read_text()
    assert "/v2/models/[model]/infer" in stats  # named by route, not by model
    assert result["energy"] == {"unavailable": "no energy source configured"}


def test_the_meter_spans_the_window_though_finding_the_serving_processes_is_slow(stub, payloads, tmp_path):
    import os
    import time

    from loadtest.energy_join import EnergySource

    class SlowSource(EnergySource):  # a busy host: the scan of its sockets takes longer than the window
        def meter(self):
            time.sleep(2.5)
            return super().meter()

    source = SlowSource(kind="estimated", pids=(os.getpid(),))  # this process serves the stub
    spec = LoadSpec("v2", f"http://127.0.0.1:{stub.server_port}", "m", users=2, duration_s=2, warmup_s=0,
                    slo=Slo(1000, 0.01))
    result = run_window(spec, tmp_path / "slow", payloads=payloads, energy=source)
    energy, seconds = result["energy"], result["window"]["seconds"]
    assert energy["joules"] > 0 and energy["seconds"] >= seconds * 0.9 and energy["pids"] == [os.getpid()]
    assert energy["j_per_request"] > 0


def test_shapes_refuse_phases_shorter_than_the_shape_tick():
    with pytest.raises(Exception, match="phases under 1 s"):
        LoadSpec("v2", "http://h:1", "m", users=4, duration_s=3, shape="spike")
    with pytest.raises(Exception, match="fewer steps"):
        LoadSpec("v2", "http://h:1", "m", users=4, duration_s=3, shape="step", shape_steps=4)


def test_failing_server_fails_the_gate_through_a_spike(stub, payloads, tmp_path):
    stub.status = 500
    spec = LoadSpec("triton", f"http://127.0.0.1:{stub.server_port}", "m", users=4, duration_s=6, warmup_s=0,
                    shape="spike", slo=Slo(1000, 0.01))
    result = run_window(spec, tmp_path / "spike", payloads=payloads)
    assert result["slo"]["locust_exit_code"] == 1 and not result["slo"]["passed"]
    assert result["window"]["error_rate"] == 1.0
    assert any(reason.startswith("error rate 100.00%") for reason in result["slo"]["breaches"])
    assert [p["phase"] for p in result["phases"]] == ["before", "spike", "after"]


def test_the_locust_side_imports_nothing_of_the_pipeline():
    import subprocess
    import sys

    code = ("import sys, loadtest.latency, loadtest.locustfiles; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'numpy', 'pydantic', 'autoglm'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


class _SseStub(BaseHTTPRequestHandler):
    """A streaming :generate: three deltas (1, 2 and 1 tokens) 20 ms apart, then the summary."""

    protocol_version = "HTTP/1.1"
    final = True  # False: the stream is cut off after its deltas (no summary, no error event)

    def setup(self):
        import socket

        super().setup()
        # as uvicorn does: without it Nagle's algorithm holds a small event up to a delayed ACK (~40 ms)
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def do_POST(self):  # noqa: N802 - http.server's naming
        import time

        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        events = [{"delta": "a", "tokens": 1}, {"delta": "bc", "tokens": 3}, {"delta": "d", "tokens": 4},
                  {"model": "m", "text": "abcd", "tokens": 4, "finish_reason": "length"}]
        for event in events if self.final else events[:-1]:
            time.sleep(0.02)
            data = b"data: " + json.dumps(event).encode() + b"\n\n"
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")

    def log_message(self, *args):
        pass


def _generate_window(tmp_path, handler, **shape):
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    payloads = tmp_path / "payloads.json"
    body = {"prompt": "ab", "max_new_tokens": 4, "stream": True}
    payloads.write_text(json.dumps({"scenarios": {"generate": [{"path": "/v1/models/{model}:generate",
                                                                "body": body}]}}))
    try:
        spec = LoadSpec("generate", f"http://127.0.0.1:{server.server_port}", "m", users=2, duration_s=3,
                        warmup_s=0, slo=Slo(1000, 0.01), **shape)
        return run_window(spec, tmp_path / "generate", payloads=payloads)
    finally:
        server.shutdown()
        server.server_close()


def test_generate_scenario_reports_time_to_first_token_and_inter_token_latency(tmp_path):
    result = _generate_window(tmp_path, _SseStub)
    window, stream = result["window"], result["stream"]
    assert result["slo"]["passed"] and window["requests"] > 0 and window["failures"] == 0
    assert window["p50_ms"] >= 75  # the whole stream (four 20 ms waits), not the time to its headers
    ttft, itl = stream["time to first token"], stream["inter-token"]
    # lower bounds are the stub's sleeps; upper bounds are relations, which a loaded host cannot break
    assert ttft["requests"] == window["requests"] and 15 <= ttft["p50_ms"] < window["p50_ms"] - 40
    assert itl["requests"] == 3 * window["requests"]  # 4 tokens: 3 gaps, the 2-token delta counts twice
    assert 5 <= itl["p50_ms"] < ttft["p50_ms"]  # 20 ms for one token, 10 ms each for two
    stats = (tmp_path / "generate" / "locust_stats.csv").read_text()
    assert "time to first token" in stats and "inter-token" in stats
    assert window["tokens"] == 4 * window["requests"]  # the final event's count, each completed stream
    assert window["tokens_per_s"] == pytest.approx(window["tokens"] / window["seconds"])


def test_a_step_ladder_reports_each_steps_stream_latencies_and_tokens(tmp_path):
    result = _generate_window(tmp_path, _SseStub, shape="step", shape_steps=2)
    steps = {p["phase"]: p for p in result["phases"]}
    assert set(steps) == {"users=1", "users=2"}
    for step in steps.values():
        assert step["requests"] > 0 and step["tokens"] == 4 * step["requests"]
        assert step["stream"]["time to first token"]["requests"] == step["requests"]
        assert step["stream"]["inter-token"]["requests"] == 3 * step["requests"]
    assert sum(s["tokens"] for s in steps.values()) == result["window"]["tokens"]


class _CutStub(_SseStub):
    final = False


def test_a_stream_cut_off_before_its_final_event_is_a_failure(tmp_path):
    result = _generate_window(tmp_path, _CutStub)
    window = result["window"]
    assert window["requests"] > 0 and window["failures"] == window["requests"] and not result["slo"]["passed"]


PHASE_CLOCK = """
import json
from loadtest.locustfiles import common

now = [100.0]
common.time.time = lambda: now[0]
window = common.Window()
common.WINDOW = window
common.set_phase("before")      # before the window opens: not counted
now[0] = 102.0; window.open()
now[0] = 111.0; window.record(5.0, False)    # a slow start: the first response comes 9 s in
now[0] = 112.0; window.record(5.0, False); common.set_phase("spike")
for t in (112.5, 115.0, 121.0):
    now[0] = t; window.record(5.0, False)
now[0] = 122.0; window.close()
now[0] = 130.0; common.set_phase("after")    # after the window closes: not counted
print(json.dumps(window.summary()))
"""


def test_a_phase_rate_divides_by_the_phase_span_not_by_its_first_to_last_response():
    done = subprocess.run([sys.executable, "-c", PHASE_CLOCK], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    phases = {p["phase"]: p for p in summary["phases"]}
    assert phases["before"]["seconds"] == pytest.approx(10.0) and phases["before"]["rps"] == pytest.approx(0.2)
    assert phases["spike"]["seconds"] == pytest.approx(10.0) and phases["spike"]["rps"] == pytest.approx(0.3)
    assert summary["window"]["seconds"] == pytest.approx(20.0) and "after" not in phases
