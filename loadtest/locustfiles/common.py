"""What every locustfile shares: options, payloads, the measured window and the SLO gate.

Imported by the locustfiles only, inside the locust process (importing locust patches a process with
gevent, so the pipeline never imports this module). The protocol with ``loadtest/runner.py``:

* ``--payloads FILE``: request bodies precomputed from the task's validation data (so locust never
  imports torch or the task code); ``--model NAME``: the Triton model the paths name.
* ``--window-file FILE``: JSON lines. ``{"event": "open"}`` once every user is spawned and
  ``--warmup-s`` has passed (the runner starts its energy meter and Triton scrape then),
  ``{"event": "close"}`` when the test starts stopping, finally ``{"event": "summary", ...}`` with the
  window's latency histogram summary, per-phase summaries (step/spike shapes) and the SLO verdict.
* ``--slo-p95-ms`` / ``--slo-error-rate``: the gate; a breach makes the process exit with code 1.
"""

from __future__ import annotations

import json
import math
import os
import random
import time

import gevent
from locust import FastHttpUser, events, task

from loadtest.latency import LatencyHistogram, Slo
from loadtest.locustfiles import BEARER_ENV

# Accept-Encoding identity: FastHttpUser asks for gzip by default, and Triton then compresses every
# reply, which costs server CPU that no client of ours asked for.
HEADERS = {"Content-Type": "application/json", "Accept-Encoding": "identity"}
if os.environ.get(BEARER_ENV):  # loadtest.api_key, for a gateway with keys
    HEADERS["Authorization"] = f"Bearer {os.environ[BEARER_ENV]}"
REQUESTS: dict[str, list[tuple[str, str, bytes]]] = {}  # scenario -> [(path, stats name, body)]


class Window:
    """The measured window: opens after spawning + warm-up, closes when the test starts stopping."""

    def __init__(self) -> None:
        self.opened: float | None = None
        self.closed: float | None = None
        self.total = LatencyHistogram()
        self.phases: dict[str, LatencyHistogram] = {}
        self.phase = "steady"
        # seconds each phase was current while the window was open: a phase's rate divides by its own span,
        # not by its first-to-last response (which a slow start or a stall would shrink)
        self.phase_seconds: dict[str, float] = {}
        self._phase_since: float | None = None
        self.warmup_s = 0.0
        self.out = None

    def mark(self, event: str, **data) -> None:
        if self.out is not None:
            self.out.write(json.dumps({"event": event, "t": time.time(), **data}) + "\n")
            self.out.flush()  # the runner polls this file to time its meters

    def open(self) -> None:
        if self.opened is None and self.closed is None:
            self.opened = self._phase_since = time.time()
            self.mark("open")

    def close(self) -> None:
        if self.closed is None:
            self.closed = time.time()
            self._count_phase(self.closed)
            self._phase_since = None
            self.mark("close", opened=self.opened is not None)

    def switch(self, label: str) -> None:
        """Requests from now on count under ``label`` as well as the window."""
        if label != self.phase:
            self._count_phase(time.time())
            self.phase = label

    def _count_phase(self, now: float) -> None:
        """Credit the current phase with the open window's time since it became current (or the window opened)."""
        if self._phase_since is not None:
            self.phase_seconds[self.phase] = self.phase_seconds.get(self.phase, 0.0) + max(0.0, now - self._phase_since)
            self._phase_since = now

    def record(self, ms: float, failed: bool) -> None:
        if self.opened is None or self.closed is not None:
            return
        self.total.record(ms, failed)
        self.phases.setdefault(self.phase, LatencyHistogram()).record(ms, failed)

    def summary(self) -> dict:
        seconds = (self.closed or time.time()) - self.opened if self.opened else 0.0
        spans = dict(self.phase_seconds)
        if self.closed is None and self._phase_since is not None:  # the current phase, still running
            spans[self.phase] = spans.get(self.phase, 0.0) + time.time() - self._phase_since
        phases = [{"phase": label, **hist.summary(span := max(spans.get(label, 0.0), 1e-9)),
                   **STREAM.phase_summary(label, span)} for label, hist in self.phases.items()]
        return {"window": {**self.total.summary(seconds), **STREAM.tokens_summary(None, seconds)}, "phases": phases,
                "stream": STREAM.summary(seconds)}


WINDOW = Window()


class StreamMetrics:
    """Streaming generation's own latencies (time to first token, inter-token) and the tokens of the completed
    streams, in the measured window and per phase of a load shape (a step ladder judges each step on them).

    Also fired as locust request events of type ``SSE`` (so locust's stats and UI show them); the
    window's request histogram and SLO gate count whole requests only."""

    request_type = "SSE"

    def __init__(self) -> None:
        self.histograms: dict[str, LatencyHistogram] = {}
        self.phases: dict[str, dict[str, LatencyHistogram]] = {}
        self.tokens: dict[str | None, int] = {}  # None: the whole window

    def record(self, environment, name: str, values_ms: list[float]) -> None:
        opened = WINDOW.opened is not None and WINDOW.closed is None
        for ms in values_ms:
            environment.events.request.fire(request_type=self.request_type, name=name, response_time=ms,
                                            response_length=0, exception=None, context={})
            if opened:
                self.histograms.setdefault(name, LatencyHistogram()).record(ms)
                self.phases.setdefault(WINDOW.phase, {}).setdefault(name, LatencyHistogram()).record(ms)

    def completed(self, tokens: int) -> None:
        """A stream that finished inside the measured window brought ``tokens`` tokens."""
        if WINDOW.opened is not None and WINDOW.closed is None:
            for key in (None, WINDOW.phase):
                self.tokens[key] = self.tokens.get(key, 0) + tokens

    def tokens_summary(self, phase: str | None, seconds: float) -> dict:
        """Tokens and tokens/s of ``phase`` (None: the window); nothing when no stream was measured."""
        if not self.tokens:
            return {}
        tokens = self.tokens.get(phase, 0)
        return {"tokens": tokens, "tokens_per_s": tokens / seconds if seconds > 0 else 0.0}

    def phase_summary(self, phase: str, seconds: float) -> dict:
        if not self.tokens and not self.phases:
            return {}
        return {**self.tokens_summary(phase, seconds),
                "stream": {name: hist.summary(seconds) for name, hist in self.phases.get(phase, {}).items()}}

    def summary(self, seconds: float) -> dict:
        return {name: hist.summary(seconds) for name, hist in self.histograms.items()}


STREAM = StreamMetrics()


def set_phase(label: str) -> None:
    """Called by load shapes: requests from now on are also counted under ``label``."""
    WINDOW.switch(label)


@events.init_command_line_parser.add_listener
def _options(parser) -> None:
    group = parser.add_argument_group("autoglm loadtest")
    group.add_argument("--payloads", required=True, help="JSON request bodies written by the runner")
    group.add_argument("--model", required=True, help="Triton model name used in the request paths")
    group.add_argument("--window-file", default="", help="where window marks and the summary go")
    group.add_argument("--warmup-s", type=float, default=0.0, help="seconds after spawning before measuring")
    group.add_argument("--slo-p95-ms", type=float, default=math.inf)
    group.add_argument("--slo-error-rate", type=float, default=1.0)
    group.add_argument("--shape-steps", type=int, default=4, help="steps of the step shape")


@events.init.add_listener
def _load(environment, **_kwargs) -> None:
    opts = environment.parsed_options
    with open(opts.payloads) as fh:
        payloads = json.load(fh)
    for scenario, requests in payloads["scenarios"].items():
        REQUESTS[scenario] = [(r["path"].format(model=opts.model), r["path"].format(model="[model]"),
                               json.dumps(r["body"], separators=(",", ":")).encode()) for r in requests]
    WINDOW.warmup_s = opts.warmup_s
    if opts.window_file:
        WINDOW.out = open(opts.window_file, "a")  # noqa: SIM115 - open for the life of the process


@events.spawning_complete.add_listener
def _spawned(user_count, **_kwargs) -> None:
    # The first time only: with a load shape, each stage completes a spawn of its own.
    if WINDOW.opened is None:
        if WINDOW.warmup_s > 0:
            gevent.spawn_later(WINDOW.warmup_s, WINDOW.open)
        else:
            WINDOW.open()


@events.request.add_listener
def _request(request_type, response_time, exception, **_kwargs) -> None:
    if request_type != StreamMetrics.request_type:  # stream metrics have histograms of their own
        WINDOW.record(response_time, exception is not None)


@events.test_stopping.add_listener
def _stopping(**_kwargs) -> None:
    WINDOW.close()


@events.quitting.add_listener
def _gate(environment, **_kwargs) -> None:
    """The SLO gate: exit code 1 when the measured window misses it (or user code raised)."""
    WINDOW.close()
    opts = environment.parsed_options
    summary = WINDOW.summary()
    breaches = Slo(opts.slo_p95_ms, opts.slo_error_rate).breaches(summary["window"])
    runner = environment.runner
    if runner is not None and runner.exceptions:
        breaches.append(f"{len(runner.exceptions)} exception(s) in the locustfile: see its log")
    saturated = bool(runner is not None and runner.cpu_warning_emitted)
    WINDOW.mark("summary", **summary, breaches=breaches, generator_saturated=saturated)
    environment.process_exit_code = 1 if breaches else 0


class PayloadUser(FastHttpUser):
    """A closed-loop client: sends the next request as soon as the last one is answered (no think time),
    so the number of users is the client concurrency. Bodies are drawn at random from ``scenario``'s list."""

    abstract = True
    scenario = ""
    network_timeout = 30.0
    connection_timeout = 10.0

    def on_start(self) -> None:
        if not REQUESTS.get(self.scenario):
            raise RuntimeError(f"the payload file has no '{self.scenario}' requests: regenerate it with the runner")
        self.requests = REQUESTS[self.scenario]
        self.rng = random.Random()

    @task
    def send(self) -> None:
        self.request(*self.rng.choice(self.requests))

    def request(self, path: str, name: str, body: bytes) -> None:
        """One request; scenarios that read replies differently override this (not ``send``: locust would
        run both tasks)."""
        self.client.post(path, data=body, headers=HEADERS, name=name)
