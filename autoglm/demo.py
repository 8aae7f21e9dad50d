"""``autoglm demo`` (``make demo``): the whole release on one config, end to end.

tune → compress → serve (in the background) → one sample request through the gateway → a short load
test → deploy manifests → serve stopped → the release page's path. Each stage runs as its own
``python -m <stage>`` process, exactly as a user would run it, so the core never imports stage code.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence

from autoglm.artifacts import RunDir
from autoglm.cli import add_common_args, settings_from_args
from autoglm.errors import AutoGLMError


def _stage(name: str, flags: list[str], *extra: str) -> None:
    print(f"\n== autoglm {name} {' '.join(extra)}", flush=True)
    done = subprocess.run([sys.executable, "-m", name, *flags, *extra])
    if done.returncode != 0:
        raise AutoGLMError(f"`autoglm {name}` failed (exit {done.returncode}); see its output above")


def _wait_ready(url: str, server: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AutoGLMError(f"`autoglm serve` exited with {server.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2) as reply:
                if reply.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise AutoGLMError(f"the gateway at {url} was not ready within {timeout_s:.0f} s")


def sample_request(settings, run: RunDir, url: str) -> dict:
    """One friendly request for the task the run serves (an image for digits, a prompt for charlm)."""
    info = json.loads((run.stage_dir("repository") / "task.json").read_text())
    model = info["recommended"]
    if info["task"] == "digits":
        from autoglm.tasks import get_task

        image = get_task(settings).example_inputs(1)["image"][0, 0] * info["metadata"]["pixel_max"]
        path, body = f"/v1/models/{model}:predict", {"images": [image.round().tolist()]}
    elif info["task"] == "charlm":
        path, body = f"/v1/models/{model}:generate", {"prompt": "ROMEO:\n", "max_new_tokens": 64, "seed": 0}
    else:
        return {"skipped": f"no sample request for task '{info['task']}'"}
    request = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as reply:
        return {"request": path, "response": json.loads(reply.read())}


def main(argv: Sequence[str] | None = None) -> int:
    parser = add_common_args(argparse.ArgumentParser(prog="autoglm demo", description=__doc__.splitlines()[0]))
    parser.add_argument("--loadtest-seconds", type=float, default=10.0)
    args = parser.parse_args(argv)
    settings = settings_from_args(args)
    flags = [*(["--config", args.config] if args.config else []), "--run", settings.run.name,
             *[f"--set={o}" for o in args.overrides]]
    run = RunDir(settings.run.root, settings.run.name)
    _stage("tune", flags)
    _stage("compress", flags)
    url = f"http://{settings.serve.host}:{settings.serve.gateway_port}"
    print(f"\n== autoglm serve (background) -> {url}", flush=True)
    server = subprocess.Popen([sys.executable, "-m", "serve", *flags])
    try:
        _wait_ready(url, server)
        print(json.dumps(sample_request(settings, run, url), indent=2)[:2000])
        _stage("loadtest", flags, "--duration", str(args.loadtest_seconds))
        _stage("deploy", flags)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
    page = run.path / "report.html"
    print(f"\nrelease report: {page if page.is_file() else run.stage_dir('tune') / 'report.html'}")
    return 0
