"""Triton python-backend generation model: KV-cache decoding with in-flight batching, streamed.

Copied into the model repository as ``<model>/1/model.py`` with ``decode_engine.py``, ``sampling.py``,
``detokenizer.py``, the token table ``detokenizer.json`` and the ``prefill.onnx``/``step.onnx`` graphs
next to it; it imports nothing from the project.

The model is *decoupled* (``model_transaction_policy { decoupled: true }``): ``execute`` only queues
requests and returns at once; one thread runs the decode loop and another, the outbox, does every
round trip to the Triton process (sending responses, asking whether a client went away, updating
metrics), so the loop only computes. Between two steps, waiting requests join (prefill into a free
cache slot) and finished or cancelled sequences leave, so every step runs all live sequences as one
batch -- in-flight batching. Prefills (joins, and slides past the context) run either on the engine's own
thread while the loop steps the other sequences, or on the loop, ``prefill_chunk`` sequences between two
steps (``prefill_thread``: ``auto``, the default, takes the thread only where the step's ``intra_op_threads``
leave a core free; a second pool on the step's cores slows both). New tokens go back as responses
(``token_ids``, ``text``, ``finish_reason``); the last one carries the final flag. ``text`` holds
complete characters only (a character whose UTF-8 bytes span tokens goes out with its last token); a
sequence ends at ``max_new_tokens`` ("length"), a stop string or an end-of-sequence token ("stop"). The first token is
sent at once (time to first token); later ones are coalesced: a sequence sends every
``stream_interval_ms`` (0: every token), and all sequences together at most ``stream_responses_per_s``
(each of n live sequences then every n / budget seconds), and only while the outbox keeps up. A
response costs Triton, its HTTP stream and the gateway ~0.3 ms of CPU, more than a batched decode step
per token of a small model, so per-token responses would cap throughput, and a fixed interval would
let their rate grow with concurrency (both measured).
Measured against Triton's sequence batcher: its implicit state is dropped by this Triton build, and a
request per token pays Triton's and the backend's per-request cost on every token.

Metrics (Triton's ``/metrics``): ``autoglm_generate_sequences{state="live"|"waiting"}`` and
``autoglm_generate_tokens_total``, updated at most every 0.1 s while busy and at once when idle.

Config parameters: ``max_sequences`` (cache slots; more
requests wait), ``max_waiting`` (beyond it requests are refused), ``max_new_tokens`` (limit per
request), ``stream_interval_ms``, ``stream_responses_per_s``, ``intra_op_threads``, ``intra_op_spinning``,
``prefill_chunk``, ``prefill_thread`` (auto/true/false), ``small_step_max_batch`` (0, or the most stepping
sequences ``step_small.onnx`` serves).
"""

import json
import os
import queue
import sys
import threading
import time
from collections import deque

import numpy as np
import triton_python_backend_utils as pb_utils

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # decode_engine.py, sampling.py, detokenizer.py
from decode_engine import SMALL_STEP_FILE, DecodeEngine, prefill_on_thread  # noqa: E402
from detokenizer import TABLE_FILE, DecodeTable  # noqa: E402
from sampling import Sampler, StopMatcher  # noqa: E402

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
METRICS_INTERVAL_S = 0.1


def _response(ids, text, reason):
    """One streamed response: new token ids, their text and the finish reason ("" until the last)."""
    return pb_utils.InferenceResponse(output_tensors=[
        pb_utils.Tensor("token_ids", np.asarray(ids, np.int64)),
        pb_utils.Tensor("text", np.asarray([text.encode()], np.object_)),
        pb_utils.Tensor("finish_reason", np.asarray([reason.encode()], np.object_))])


def _error(message, code_name="INVALID_ARG"):
    code = getattr(pb_utils.TritonError, code_name, None)
    return pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)


class Job:
    """One request's generation: its sender, sampler, stop matcher and progress."""

    def __init__(self, sender, ids, max_new, sampler, stops, text):
        self.sender, self.ids, self.max_new = sender, ids, max_new
        self.sampler, self.stop, self.text = sampler, StopMatcher(stops), text
        self.produced = 0
        self.next_token = None
        self.cancelled = False
        self.unsent_ids, self.unsent_text, self.sent_at = [], "", None


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.model_name = config.get("name", "generate")
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        self.max_new_tokens = int(params.get("max_new_tokens") or 256)
        self.max_waiting = int(params.get("max_waiting") or 256)
        self.interval_s = float(params.get("stream_interval_ms") or 0) / 1000
        self.responses_per_s = float(params.get("stream_responses_per_s") or 0)  # 0: no budget
        version_dir = os.path.join(args["model_repository"], str(args["model_version"]))
        threads = int(params.get("intra_op_threads") or 0)
        try:
            on_thread = prefill_on_thread(params.get("prefill_thread") or "auto", threads)
        except ValueError as exc:
            raise ValueError(f"{self.model_name}: parameter {exc}") from None
        self.engine = DecodeEngine(os.path.join(version_dir, "prefill.onnx"), os.path.join(version_dir, "step.onnx"),
                                   max_sequences=int(params.get("max_sequences") or 32),
                                   threads=threads, prefill_thread=on_thread,
                                   prefill_chunk=int(params.get("prefill_chunk") or 8),
                                   spinning=params.get("intra_op_spinning") or "off",
                                   small_step_path=os.path.join(version_dir, SMALL_STEP_FILE),
                                   small_batch=int(params.get("small_step_max_batch") or 0))
        with open(os.path.join(version_dir, TABLE_FILE)) as f:
            table = DecodeTable.from_json(f.read())
        try:  # token id -> bytes, for every logit the graphs give (ids past the tokenizer's add no text)
            self.table = table.padded(self.engine.vocab_size)
        except ValueError as exc:
            raise ValueError(f"the graphs have {self.engine.vocab_size} tokens but the tokenizer has {len(table)} "
                             f"({exc}): regenerate the repository with `autoglm compress --force`") from None
        self.eos_ids = table.eos_ids
        # The families must outlive their metrics (the backend refuses updates otherwise): keep them.
        self.families = (
            pb_utils.MetricFamily(name="autoglm_generate_sequences", kind=pb_utils.MetricFamily.GAUGE,
                                  description="sequences being generated (live) or waiting for a slot"),
            pb_utils.MetricFamily(name="autoglm_generate_tokens_total", description="tokens generated",
                                  kind=pb_utils.MetricFamily.COUNTER))
        self.live_gauge = self.families[0].Metric(labels={"model": self.model_name, "state": "live"})
        self.waiting_gauge = self.families[0].Metric(labels={"model": self.model_name, "state": "waiting"})
        self.tokens_counter = self.families[1].Metric(labels={"model": self.model_name})
        self.reported, self.metrics_at, self.unreported_tokens = (0, 0), 0.0, 0
        self.waiting = deque()
        self.wake = threading.Condition()
        self.stopping = False
        self.outbox = queue.SimpleQueue()  # (job, response or None, flags) for the outbox thread
        self.threads = [threading.Thread(target=self._loop, name="decode-loop", daemon=True),
                        threading.Thread(target=self._deliver, name="outbox", daemon=True)]
        for thread in self.threads:
            thread.start()

    # ---- requests in ------------------------------------------------------------------------------
    def _scalar(self, request, name, dtype, default):
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        if tensor is None:
            return default
        array = tensor.as_numpy().reshape(-1)
        if array.size != 1:
            raise ValueError(f"'{name}' must be one value, got {array.size}")
        return dtype(array[0])

    def _job(self, request):
        tensor = pb_utils.get_input_tensor_by_name(request, "input_ids")
        if tensor is None:
            raise ValueError("input 'input_ids' is missing")
        ids = tensor.as_numpy().reshape(-1).astype(np.int64)
        if ids.size == 0:
            raise ValueError("'input_ids' is empty: give at least one prompt token")
        if ids.min() < 0 or ids.max() >= len(self.table):
            raise ValueError(f"token ids must be within 0..{len(self.table) - 1}")
        max_new = self._scalar(request, "max_new_tokens", int, 64)
        if not 1 <= max_new <= self.max_new_tokens:
            raise ValueError(f"max_new_tokens={max_new} must be within 1..{self.max_new_tokens}")
        top_k = self._scalar(request, "top_k", int, 0)
        top_p = self._scalar(request, "top_p", float, 1.0)
        seed = self._scalar(request, "seed", int, -1)
        sampler = Sampler(self._scalar(request, "temperature", float, 1.0), top_k or None,
                          top_p if top_p < 1 else None, seed if seed >= 0 else None)
        stop = pb_utils.get_input_tensor_by_name(request, "stop")
        stops = [] if stop is None else [s.decode() if isinstance(s, bytes) else str(s)
                                         for s in stop.as_numpy().reshape(-1)]
        ids = ids.tolist()
        return Job(request.get_response_sender(), ids, max_new, sampler, stops, self.table.stream(ids))

    def execute(self, requests):
        """Queue every request for the decode loop; answers go through each request's sender."""
        for request in requests:
            try:
                job = self._job(request)
            except ValueError as exc:
                request.get_response_sender().send(
                    pb_utils.InferenceResponse(output_tensors=[], error=_error(f"{self.model_name}: {exc}")),
                    flags=FINAL)
                continue
            with self.wake:
                if len(self.waiting) >= self.max_waiting:
                    job.sender.send(pb_utils.InferenceResponse(output_tensors=[], error=_error(
                        f"{self.model_name}: {self.max_waiting} requests are already waiting; retry later",
                        "UNAVAILABLE")), flags=FINAL)
                    continue
                self.waiting.append(job)
                self.wake.notify()
        return None

    # ---- the decode loop --------------------------------------------------------------------------
    def _loop(self):
        engine = self.engine
        while True:
            with self.wake:
                while not self.waiting and not engine.live and not self.stopping:
                    self.wake.wait()
                if self.stopping:
                    break
                joining = [self.waiting.popleft() for _ in range(min(engine.free_slots, len(self.waiting)))]
            try:
                if joining:  # join between steps: their prompts are encoded on the engine's prefill thread
                    engine.submit([j.ids for j in joining], joining)
                for seq in [s for s in engine.live if s.tag.cancelled]:
                    self._finish(seq, None)  # the client went away (seen by the outbox): free its slot
                fed = [(s, s.tag.next_token) for s in engine.live if s.tag.next_token is not None]
                for seq, _ in fed:
                    seq.tag.next_token = None
                # one batched step for the fed sequences; joins and slides come back when their prefill is done
                ready = engine.advance(fed)
                while engine.failures:  # a prefill that failed fails its own request only (already released)
                    seq, error = engine.failures.pop()
                    self.outbox.put((seq.tag, pb_utils.InferenceResponse(output_tensors=[], error=_error(
                        f"{self.model_name}: generation failed: {error}", "INTERNAL")), FINAL))
                if ready:
                    self._emit_all(ready)
            except Exception as exc:  # never leave a client waiting: fail every live sequence
                for seq in list(engine.live):
                    self.outbox.put((seq.tag, pb_utils.InferenceResponse(output_tensors=[], error=_error(
                        f"{self.model_name}: generation failed: {exc}", "INTERNAL")), FINAL))
                    engine.release(seq)
            finally:
                self._update_metrics(len(engine.live), len(self.waiting))

    def _deliver(self):
        """The outbox thread: every send, cancellation check and metric update (round trips to the Triton
        process, ~0.1-0.4 ms each) happens here, so the decode loop never waits on them. One thread keeps each
        request's order."""
        while (item := self.outbox.get()) is not None:
            job, response, flags = item
            if job is None:  # metrics: (live, waiting, new tokens)
                self._report(*response)
                continue
            try:
                if response is None:
                    job.sender.send(flags=flags)
                else:  # tokens (built into a response here, off the loop) or an error response
                    job.sender.send(_response(*response) if isinstance(response, tuple) else response, flags=flags)
                if not flags and job.sender.is_cancelled():
                    job.cancelled = True  # the decode loop frees the slot at its next step
            except Exception:  # the request is gone (e.g. its client closed the connection)
                job.cancelled = True

    def _update_metrics(self, live, waiting):
        """Queue the gauges and the token count for the outbox (each update is a round trip to the Triton
        process), at most every METRICS_INTERVAL_S while busy, at once when the model goes idle."""
        now = time.monotonic()
        if (live and now - self.metrics_at < METRICS_INTERVAL_S) or \
                ((live, waiting) == self.reported and not self.unreported_tokens):
            return
        self.metrics_at, self.reported = now, (live, waiting)
        self.outbox.put((None, (live, waiting, self.unreported_tokens), 0))
        self.unreported_tokens = 0

    def _report(self, live, waiting, tokens):
        self.live_gauge.set(live)
        self.waiting_gauge.set(waiting)
        if tokens:
            self.tokens_counter.increment(tokens)

    def _emit_all(self, ready):
        """Each ``(sequence, logits row)``'s next token, then :meth:`_emit`. Rows are argmaxed where they lie:
        stacking them first would copy every row (32 x 50k floats at batch 32) for nothing."""
        now = time.monotonic()
        interval = self.interval_s
        if self.responses_per_s:
            interval = max(interval, len(self.engine.live) / self.responses_per_s)
        # sends are due only while the outbox keeps up (else the tokens wait and go out together later)
        may_send = self.outbox.qsize() < len(self.engine.live)
        for seq, row in ready:
            sampler = seq.tag.sampler
            self._emit(seq, int(row.argmax()) if sampler.temperature == 0 else sampler(row), now, interval, may_send)

    def _emit(self, seq, token, now, interval, may_send):
        """Record the sequence's new token; queue what is unsent when due; finish the sequence when done."""
        job = seq.tag
        job.produced += 1
        self.unreported_tokens += 1
        eos = token in self.eos_ids
        done = eos or job.produced >= job.max_new
        # complete characters only; at the end, an unfinished one becomes U+FFFD
        text, stopped = job.stop.push(job.text.push(token) + (job.text.flush() if done else ""))
        reason = "stop" if stopped or eos else "length" if done else ""
        if reason and not stopped:
            text += job.stop.flush()
        job.unsent_ids.append(token)
        job.unsent_text += text
        if reason:
            self._finish(seq, self._unsent(job, reason))
            return
        job.next_token = token
        if job.sent_at is None or (may_send and now - job.sent_at >= interval):
            self.outbox.put((job, self._unsent(job, ""), 0))
            job.sent_at = now

    def _finish(self, seq, response):
        self.outbox.put((seq.tag, response, FINAL))
        self.engine.release(seq)

    @staticmethod
    def _unsent(job, reason):
        """(token ids not sent yet, their text -- stop-string prefixes held back --, the finish reason)."""
        ids, text = job.unsent_ids, job.unsent_text
        job.unsent_ids, job.unsent_text = [], ""
        return ids, text, reason

    def finalize(self):
        with self.wake:
            self.stopping = True
            self.wake.notify()
        self.threads[0].join(timeout=10)
        self.outbox.put(None)  # after the loop's last responses
        self.threads[1].join(timeout=10)
        self.engine.close()
