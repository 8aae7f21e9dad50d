"""KV-cache decoding with ONNX Runtime: many sequences, one batched step (numpy + onnxruntime only).

Runs the graphs :mod:`compress.decode` writes. This file is also copied next to the Triton generation
model's ``model.py``, so it imports nothing from the project.

The cache is one preallocated buffer per layer and K/V, ``(max_sequences, heads, context, head_size)``.
Live sequences occupy slots ``0..n-1``, those ready to step first (a freed slot is refilled from the
end), so a step feeds the first rows of every buffer to the step graph *in place*: GroupQueryAttention
writes each new key/value into the same memory it reads the past from (past and present share the
buffer), and no cache is ever copied between steps.

Context: a model with learned positions knows ``context`` positions only. A sequence whose cache is
full slides: it is re-encoded from its last ``context // 2`` tokens (one prefill), then steps on, so
generation never stops and pays one prefill per ``context // 2`` tokens. Prompts longer than the
context keep their last ``context`` tokens.

Two step graphs: a step with few live sequences reads every weight for few tokens (bandwidth-bound), one with
many is compute-bound, and the precision fastest at one is not always fastest at the other (INT4 weights at batch 1,
INT8 at 8, on hosts with fast int8 dot products). ``small_step_path`` is a second step graph over the same KV cache
(same cache type and scales, other weights), run while at most ``small_batch`` sequences step.

Prefills (joins and slides) can run on a thread of their own (``prefill_thread=True``; served, where the step's
pool leaves cores free: :func:`prefill_on_thread`) while the step graph runs the other sequences: with many
sequences, re-encoding is about half the work, and it would otherwise stall every sequence's next token.
Sequences being encoded keep the last slots, so a step runs only the rows that can step (no compute spent on
waiting rows); their cache rows are written by the caller's thread between steps, so the two threads never touch the same memory. A group that
joins or slides together while nothing else could step is split: its first ``prefill_chunk``
sequences are encoded at once and step while the rest are encoded in the background. Otherwise
identical requests (a benchmark's, a batch job's) would stay in lock-step -- all encoding, then all
stepping -- and the two never overlap. Without the thread, prefills run on the caller's, between steps, at
most ``prefill_chunk`` sequences per round (one step, then one chunk), so a large group joining holds up the
others' next token by one chunk's prefill at a time.
"""

from __future__ import annotations

import os
import queue
import threading
from collections import deque

import numpy as np
import onnxruntime as ort


CACHE_TYPES = {"tensor(float)": np.float32, "tensor(int8)": np.int8}
"""The graphs' KV cache element type -> the engine's buffers."""

SMALL_STEP_FILE = "step_small.onnx"
"""The small-batch step graph's file beside ``step.onnx`` in a served model's version folder."""


class PrefillError(RuntimeError):
    """A prompt's prefill failed (raised by the synchronous API); ``sequence`` is the one it was for."""

    def __init__(self, message: str, sequence: Sequence):
        super().__init__(message)
        self.sequence = sequence


class Sequence:
    """One live sequence: its slot in the cache buffers and its latest token ids (at least the last context)."""

    __slots__ = ("slot", "ids", "length", "tag", "encoding")

    def __init__(self, ids, tag=None):
        self.ids = list(ids)
        self.slot = -1
        self.length = 0  # tokens held in the cache
        self.tag = tag  # whatever the caller attaches (a request, a sampler)
        self.encoding = False  # a prefill for it is under way; it steps again once advance() returns it


SPINNING = {"off": ("0", "0"), "run": ("1", "1"), "on": ("1", "0")}
"""How the intra-op pool's idle threads wait -> (allow_spinning, force_spinning_stop): ``off`` sleeps at once,
``run`` spins within a run and stops when it returns, ``on`` also spins on after it (ONNX Runtime's default)."""


PREFILL_THREAD = ("auto", "true", "false")
"""Where prefills run (``compress.generate.prefill_thread``): ``auto`` on a thread of their own only where the
step's pool leaves a core free (:func:`prefill_on_thread`), ``true`` always, ``false`` on the decode loop."""


def prefill_on_thread(setting: str, threads: int, cores: int | None = None) -> bool:
    """Whether prefills get a thread of their own (``DecodeEngine(prefill_thread=...)``) for ``setting``
    (:data:`PREFILL_THREAD`) and a step pool of ``threads`` (0: all cores) on ``cores`` cores (default: those
    this process may run on).

    ``auto``: a prefill beside the steps pays only where it has cores to itself. Where the step's pool takes every
    core, a second pool on the same cores slows both (each kernel's threads wait for the one the other pool
    preempted), and encoding between steps is faster; where the step runs on fewer threads than cores, the
    prefill thread uses the rest.
    """
    if setting not in PREFILL_THREAD:
        raise ValueError(f"prefill_thread={setting!r} must be one of {', '.join(PREFILL_THREAD)}")
    if setting != "auto":
        return setting == "true"
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return 0 < threads < cores


def session_options(threads: int = 0, spinning: str = "off"):
    """ONNX Runtime options for the decode graphs.

    SkipLayerNormFusion is disabled: on these graphs (LayerNormalization without bias) it crashes the
    process in ONNX Runtime 1.32, and where it works it is ~5x slower than plain LayerNormalization.
    ``spinning`` (:data:`SPINNING`): a decode step runs a few kernels per layer, each split across the pool, so
    a pool that sleeps is woken hundreds of times per token; one that spins keeps its cores from other work on
    the host. The served default (``compress.generate.intra_op_spinning``) was picked served, on development
    shapes (``bench hf --spinning``); this function's ``off`` is for callers that share the cores.
    """
    if spinning not in SPINNING:
        raise ValueError(f"spinning {spinning!r} is unknown: use one of {list(SPINNING)}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("optimization.disable_specified_optimizers", "SkipLayerNormFusion")
    allow, stop = SPINNING[spinning]
    options.add_session_config_entry("session.intra_op.allow_spinning", allow)
    options.add_session_config_entry("session.force_spinning_stop", stop)
    return options


def _cache_inputs(session) -> list[tuple]:
    """A step session's KV cache inputs: (name, element type, shape past the batch axis) each."""
    return [(i.name, i.type, i.shape[1:]) for i in session.get_inputs() if i.name.startswith("past_")]


class DecodeEngine:
    """Prefill and batched step over a fixed pool of ``max_sequences`` cache slots.

    Two ways to drive it: :meth:`submit` and :meth:`advance` (prefills may run in the background), or
    the synchronous :meth:`start_many` / :meth:`step` / :meth:`generate`, which wait for every prefill.
    ``spinning`` (:data:`SPINNING`) sets how the step session's idle threads wait; the prefill session's
    always sleep. ``small_step_path``: a step graph run instead of ``step_path`` while at most ``small_batch``
    sequences step (its cache inputs must match: same type, same scales).
    """

    def __init__(self, prefill_path: str, step_path: str, max_sequences: int = 32, threads: int = 0,
                 prefill_thread: bool = False, prefill_chunk: int = 8, spinning: str = "off",
                 small_step_path: str | None = None, small_batch: int = 0):
        # the CPU on every host: the KV caches live in numpy between steps, and a GPU provider would copy every
        # layer's cache in and out on each step
        providers = ["CPUExecutionProvider"]
        # ``spinning`` is the step's alone: prefills may run beside the steps (``prefill_thread``), and a second
        # spinning pool on the same cores takes the cores the step's pool spins for (measured: bench/results)
        self.prefill = ort.InferenceSession(prefill_path, session_options(threads, "off"), providers=providers)
        self.step_session = ort.InferenceSession(step_path, session_options(threads, spinning), providers=providers)
        meta = self.prefill.get_modelmeta().custom_metadata_map
        self.context = int(meta["context"])
        self.vocab_size = int(meta["vocab_size"])
        past = [i for i in self.step_session.get_inputs() if i.name.startswith("past_key_")]
        self.n_layer = len(past)
        _, self.n_head, _, self.head_size = past[0].shape
        self.cache_dtype = CACHE_TYPES[past[0].type]  # float32, or int8 (compress.kv_cache's scaled cache)
        self.small_session, self.small_batch = None, 0
        if small_step_path and small_batch > 0:
            self.small_session = ort.InferenceSession(small_step_path, session_options(threads, spinning),
                                                      providers=providers)
            if _cache_inputs(self.small_session) != _cache_inputs(self.step_session):
                raise ValueError(f"{small_step_path} and {step_path} take different KV caches: a small-batch step "
                                 "graph must share the step graph's cache (type, layers, heads)")
            self.small_batch = small_batch
        self.max_sequences = max_sequences
        shape = (max_sequences, self.n_head, self.context, self.head_size)
        self.keys = [np.zeros(shape, self.cache_dtype) for _ in range(self.n_layer)]
        self.values = [np.zeros(shape, self.cache_dtype) for _ in range(self.n_layer)]
        self.live: list[Sequence] = []  # slot order: the ``ready`` ones that can step, then those being encoded
        self.ready = 0
        self.prefill_chunk = max(1, prefill_chunk)
        self.keep = max(1, self.context // 2)
        self._bindings: dict[tuple, tuple] = {}  # (n, session)
        self._encoded: deque = deque()  # (sequence, length, K/V rows, logits, error) from finished prefills
        self._backlog: list = []  # without a prefill thread: (sequence, ids) to encode, a chunk per round
        self.failures: list[tuple[Sequence, BaseException]] = []  # failed prefills (released); the caller drains
        self._done = threading.Condition()
        self._encodes: queue.SimpleQueue | None = None
        self._worker: threading.Thread | None = None
        if prefill_thread:
            self._encodes = queue.SimpleQueue()
            self._worker = threading.Thread(target=self._prefill_worker, name="prefill", daemon=True)
            self._worker.start()

    @property
    def free_slots(self) -> int:
        return self.max_sequences - len(self.live)

    # ---- sequences join and leave --------------------------------------------------------------
    def submit(self, prompts, tags=None) -> list[Sequence]:
        """Reserve free slots for prompts (any lengths) and encode them; :meth:`advance` returns their logits."""
        if len(prompts) > self.free_slots:
            raise RuntimeError(f"{len(prompts)} new sequences but {self.free_slots} of {self.max_sequences} "
                               f"slots are free")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("a prompt is empty")
        seqs = []
        for prompt, tag in zip(prompts, tags or [None] * len(prompts)):
            seq = Sequence(prompt, tag)
            seq.slot = len(self.live)
            self.live.append(seq)
            seqs.append(seq)
        self._encode([(s, s.ids[-self.context:]) for s in seqs], overlap=self.ready > 0)
        return seqs

    def release(self, seq: Sequence) -> None:
        """Free the sequence's slot; slots stay compact (ready ones first). A prefill still under way for it
        is discarded when it finishes."""
        if seq.slot < 0:
            return
        if seq.slot < self.ready:  # the last ready sequence takes its slot (one cache row copied)
            self.ready -= 1
            self._swap(self.live[self.ready], seq)
        self._swap(self.live[-1], seq, copy=False)  # the last one (being encoded: its cache holds nothing yet)
        self.live.pop()
        seq.slot = -1

    def _swap(self, keep: Sequence, other: Sequence, copy: bool = True) -> None:
        """Exchange two sequences' slots, moving only ``keep``'s cache rows (``other``'s are about to be
        replaced)."""
        if keep is other:
            return
        a, b = keep.slot, other.slot
        if copy:
            for buf in (*self.keys, *self.values):
                buf[b] = buf[a]
        keep.slot, other.slot = b, a
        self.live[a], self.live[b] = other, keep

    def close(self) -> None:
        """Stop the prefill thread (if any), after the prefill under way."""
        if self._worker is not None:
            self._encodes.put(None)
            self._worker.join(timeout=10)

    # ---- one round: prefills finished, one batched step --------------------------------------------
    def advance(self, fed, wait: bool = False) -> list[tuple[Sequence, np.ndarray]]:
        """Append each ``(sequence, token)`` of ``fed`` and run one round; ``(sequence, next-token logits)``
        of every sequence that has logits now.

        Fed sequences with a full cache slide (re-encoded from their last tokens, perhaps in the
        background); the others run as one batch through the step graph, their caches updated in place.
        Finished prefills (joins and slides) are stored into their slots and returned too. Blocks for a
        prefill only when nothing else could be returned, or for all of them with ``wait=True``. A sequence
        whose prefill failed is released and listed in :attr:`failures` with its error, for the caller to
        drain; the other sequences go on.
        """
        if any(seq.encoding or seq.slot < 0 for seq, _ in fed) or len({id(seq) for seq, _ in fed}) < len(fed):
            raise ValueError("each sequence is fed once per round, after advance() returned its logits and "
                             "before release()")
        stepping, sliding = [], []
        for seq, token in fed:
            seq.ids.append(int(token))
            if len(seq.ids) > 2 * self.context:  # only the last context tokens can ever be re-encoded
                del seq.ids[:-self.context]
            (sliding if seq.length >= self.context else stepping).append(seq)
        if sliding:
            self._encode([(s, s.ids[-self.keep:]) for s in sliding], overlap=bool(stepping))
        results = self._step(stepping) if stepping else []
        if self._backlog:  # no prefill thread: one chunk after each step
            self._prefill_backlog()
        results += self._store_encoded()  # after the step: what they store steps next round, with the rest
        while self.ready < len(self.live) and (wait or not results):
            if self._backlog:
                self._prefill_backlog()
            else:
                with self._done:
                    self._done.wait_for(lambda: self._encoded)
            results += self._store_encoded()
        return results

    def _step(self, stepping: list[Sequence]) -> list[tuple[Sequence, np.ndarray]]:
        """One token for each of ``stepping`` through the step graph; every other live sequence takes part as
        an idle row (query_seqlens 0; its seqlens_k must leave room for one more token). Sequences being
        encoded hold the slots past ``ready`` and are not part of the batch."""
        n = self.ready
        live = self.live[:n]
        session = self.small_session if n <= self.small_batch else self.step_session
        binding, feed, out = self._binding(n, session)
        lengths = np.fromiter((s.length for s in live), np.int64, n)
        if len(stepping) == n:  # all of them (the usual case): whole rows, in slot order
            stepping = live
            feed["input_ids"][:, 0] = [s.ids[-1] for s in live]
            feed["position_ids"][:, 0] = lengths
            feed["seqlens_k"][:] = lengths
            feed["query_seqlens"][:] = 1
        else:
            rows = np.fromiter((s.slot for s in stepping), np.int64, len(stepping))
            for name in ("input_ids", "position_ids", "query_seqlens"):
                feed[name][:] = 0
            feed["input_ids"][rows, 0] = [s.ids[-1] for s in stepping]
            feed["position_ids"][rows, 0] = lengths[rows]
            # a full idle cache is never stepped again (its next token slides it), so it may claim to hold one
            feed["seqlens_k"][:] = np.where(lengths < self.context, np.maximum(lengths - 1, 0), 0)
            feed["seqlens_k"][rows] = lengths[rows]
            feed["query_seqlens"][rows] = 1
        session.run_with_iobinding(binding)
        logits = out[:, 0].copy()  # the bound buffer is overwritten by the next step
        for seq in stepping:
            seq.length += 1
        return [(seq, logits[seq.slot]) for seq in stepping]

    def _binding(self, n: int, session):
        """``session``'s I/O binding for ``n`` live sequences, made once: inputs are preallocated arrays
        filled in place, and past/present K/V are the first ``n`` rows of the cache buffers (contiguous)."""
        key = n, id(session)
        if key in self._bindings:
            return self._bindings[key]
        ort_value = ort.OrtValue.ortvalue_from_numpy
        feed = {"input_ids": np.zeros((n, 1), np.int64), "position_ids": np.zeros((n, 1), np.int64),
                "seqlens_k": np.zeros(n, np.int32), "total_sequence_length": np.asarray(self.context, np.int32),
                "query_seqlens": np.zeros(n, np.int32)}
        binding = session.io_binding()
        for name, value in feed.items():
            binding.bind_ortvalue_input(name, ort_value(value))  # shares the array's memory
        shape = [n, self.n_head, self.context, self.head_size]
        for i in range(self.n_layer):
            for kind, bufs in (("key", self.keys), ("value", self.values)):
                ptr = bufs[i].ctypes.data
                binding.bind_input(f"past_{kind}_{i}", "cpu", 0, self.cache_dtype, shape, ptr)
                binding.bind_output(f"present_{kind}_{i}", "cpu", 0, self.cache_dtype, shape, ptr)
        out = np.empty((n, 1, self.vocab_size), np.float32)
        binding.bind_output("logits", "cpu", 0, np.float32, list(out.shape), out.ctypes.data)
        self._bindings[key] = binding, feed, out
        return self._bindings[key]

    # ---- prefills: on the prefill thread, or at once on the caller's --------------------------------
    def _encode(self, pending: list[tuple[Sequence, list]], overlap: bool) -> None:
        """Encode on the prefill thread when other sequences could step meanwhile (``overlap``), else at once:
        a hand-over between threads only costs latency when there is nothing to overlap. With a prefill
        thread, a large group that nothing could overlap is split: the first chunk is encoded at once and
        steps while the rest is encoded in the background."""
        for seq, _ in pending:
            if seq.slot < self.ready:  # it was ready (a slide): the last ready sequence takes its slot
                self.ready -= 1
                self._swap(self.live[self.ready], seq)
            seq.encoding = True
            seq.length = 0  # what its cache held is about to be replaced
        if self._encodes is None:  # on the caller's thread: a chunk now if nothing else could step, else after it
            self._backlog += pending
            if not overlap:
                self._prefill_backlog()
            return
        if not overlap:
            self._run_prefill(pending[:self.prefill_chunk])
            pending = pending[self.prefill_chunk:]
        if pending:
            self._encodes.put(pending)

    def _prefill_backlog(self) -> None:
        """Encode the backlog's next ``prefill_chunk`` sequences still holding their slots, on this thread."""
        self._backlog = [(seq, ids) for seq, ids in self._backlog if seq.slot >= 0]  # released ones dropped
        chunk, self._backlog = self._backlog[:self.prefill_chunk], self._backlog[self.prefill_chunk:]
        if chunk:
            self._run_prefill(chunk)

    def _prefill_worker(self) -> None:
        """Encode what is queued, at most ``prefill_chunk`` sequences at a time: a prefill costs the same per
        position from a few rows up, and smaller batches hand sequences back to the steps sooner."""
        backlog: list = []
        while True:
            while not backlog or not self._encodes.empty():  # take all queued; wait only when there is nothing
                more = self._encodes.get()
                if more is None:
                    return
                backlog += more
            chunk, backlog = backlog[:self.prefill_chunk], backlog[self.prefill_chunk:]
            self._run_prefill(chunk)

    def _run_prefill(self, pending: list[tuple[Sequence, list]]) -> None:
        """Encode the rows at positions 0.. as one right-padded batch; queue each sequence's K/V and last logits
        (or the error) for the caller's thread to store."""
        rows = [row for _, row in pending]
        b, lengths = len(rows), np.fromiter(map(len, rows), np.int64, len(rows))
        try:
            n = int(lengths.max())
            ids = np.zeros((b, n), np.int64)
            for j, row in enumerate(rows):
                ids[j, :len(row)] = row
            # past buffers hold nothing (every row starts at position 0) but give room for the padded chunk
            empty = np.zeros((b, self.n_head, n, self.head_size), self.cache_dtype)
            feed = {"input_ids": ids, "position_ids": np.tile(np.arange(n, dtype=np.int64), (b, 1)),
                    "seqlens_k": (lengths - 1).astype(np.int32), "total_sequence_length": np.asarray(n, np.int32),
                    "query_seqlens": lengths.astype(np.int32)}
            for i in range(self.n_layer):
                feed[f"past_key_{i}"] = feed[f"past_value_{i}"] = empty
            feed["last_only"] = np.asarray(True)  # logits (B, 1, V): each row's last position only
            out = self.prefill.run(None, feed)
            done = [(seq, length, [kv[j] for kv in out[1:]], out[0][j, 0], None)
                    for j, ((seq, _), length) in enumerate(zip(pending, lengths.tolist()))]
        except Exception as exc:  # noqa: BLE001 -- handed to the caller, raised from advance()
            done = [(seq, 0, None, None, exc) for seq, _ in pending]
        with self._done:
            self._encoded.extend(done)
            self._done.notify()

    def _store_encoded(self) -> list[tuple[Sequence, np.ndarray]]:
        """Copy finished prefills into their sequences' (current) slots; (sequence, logits) for each."""
        results = []
        while self._encoded:
            seq, length, kv, logits, error = self._encoded.popleft()
            if seq.slot < 0:  # released while it was being encoded
                continue
            if error is not None:  # no logits will ever come: free its slot, and tell the caller
                self.release(seq)
                self.failures.append((seq, error))
                continue
            seq.encoding = False
            self._swap(seq, self.live[self.ready], copy=False)  # to the first slot past the ready ones
            self.ready += 1
            if length < self.context:  # a full cache is not kept: the sequence's next token slides it
                for i in range(self.n_layer):
                    self.keys[i][seq.slot, :, :length] = kv[2 * i][:, :length]
                    self.values[i][seq.slot, :, :length] = kv[2 * i + 1][:, :length]
            seq.length = length
            results.append((seq, logits))
        return results

    # ---- synchronous use: every prefill waited for ------------------------------------------------
    def start(self, prompt_ids, tag=None) -> tuple[Sequence, np.ndarray]:
        """Encode a prompt into a free slot; the sequence and its next-token logits (V,)."""
        (seq, logits), = self.start_many([prompt_ids], [tag])
        return seq, logits

    def start_many(self, prompts, tags=None) -> list[tuple[Sequence, np.ndarray]]:
        """Encode several prompts (any lengths) into free slots; (sequence, logits) each, in order."""
        seqs = self.submit(prompts, tags)
        logits = dict(self.advance([], wait=True))
        failed = [(seq, error) for seq, error in self.failures if seq in seqs]
        if failed:
            self.failures = [f for f in self.failures if f not in failed]
            for seq in seqs:  # the prompts are refused together: leave no slot taken
                self.release(seq)
            raise PrefillError(f"prefill failed: {failed[0][1]}", failed[0][0]) from failed[0][1]
        return [(seq, logits[seq]) for seq in seqs]

    def step(self, tokens) -> np.ndarray:
        """Append ``tokens[i]`` to live sequence ``i`` (slot order) and wait for every next-token logits (n, V),
        row ``i`` for that same sequence. A slide may reorder the slots: read :attr:`live` again before the next
        call."""
        live = list(self.live)
        tokens = np.asarray(tokens, np.int64).reshape(len(live)).tolist()
        logits = dict(self.advance(list(zip(live, tokens)), wait=True))
        return np.stack([logits[seq] for seq in live]) if live else np.empty((0, self.vocab_size), np.float32)

    def generate(self, prompt_ids, max_new_tokens: int) -> list[int]:
        """One sequence's greedy continuation, start to end (tests, parity gate, benchmarks)."""
        if self.live:
            raise RuntimeError("generate() runs one sequence alone; use start/step/release for several")
        seq, logits = self.start(prompt_ids)
        out = []
        try:
            for k in range(max_new_tokens):
                out.append(int(logits.argmax()))
                if k + 1 < max_new_tokens:
                    logits = self.step([out[-1]])[0]
        finally:
            self.release(seq)
        return out
