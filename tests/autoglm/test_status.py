"""`autoglm status`: serving has no manifest, so its state comes from the URLs it recorded and a live probe."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from autoglm.artifacts import RunDir
from autoglm.status import main, serve_state


class Healthz(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        self.send_response(200 if self.path == "/healthz" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def gateway():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Healthz)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def record(run: RunDir, text: str) -> None:
    run.stage_dir("serve").mkdir(parents=True, exist_ok=True)
    (run.stage_dir("serve") / "serving.json").write_text(text)


def test_serve_is_running_while_its_gateway_answers_and_stopped_after(tmp_path, gateway, capsys):
    run = RunDir(tmp_path, "r")
    assert serve_state(run) == "missing"
    record(run, json.dumps({"urls": {"gateway": gateway}, "models": ["m"]}))
    assert serve_state(run) == "running"
    assert main(["r", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "running" in out and gateway in out

    record(run, json.dumps({"urls": {"gateway": "http://127.0.0.1:9"}, "models": ["m"]}))  # nothing listens
    assert serve_state(run) == "stopped"


@pytest.mark.parametrize("text", ['{"urls": {"gate', '{"urls": {}}', '[1, 2]', '{"urls": {"gateway": "not a url"}}'])
def test_a_damaged_serving_record_reads_incomplete_not_a_crash(tmp_path, text):
    run = RunDir(tmp_path, "r")
    record(run, text)
    assert serve_state(run) == "incomplete"
