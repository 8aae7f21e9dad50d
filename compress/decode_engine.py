"""KV-cache decoding with ONNX Runtime: many sequences, one batched step (numpy + onnxruntime only).

Runs the graphs :mod:`compress.decode` writes. This file is also copied next to the Triton generation
model's ``model.py``, so it imports nothing from the project.

The cache is one preallocated buffer per layer and K/V, ``(max_sequences, heads, context, head_size)``.
Live sequences occupy slots ``0..n-1`` (a finished sequence's slot is refilled by the last one), so a
step feeds the first ``n`` rows of every buffer to the step graph *in place*: GroupQueryAttention
writes each new key/value into the same memory it reads the past from (past and present share the
buffer), and no cache is ever copied between steps.

Context: a model with learned positions knows ``context`` positions only. A sequence whose cache is
full slides: it is re-encoded from its last ``context // 2`` tokens (one prefill), then steps on, so
generation never stops and pays one prefill per ``context // 2`` tokens. Prompts longer than the
context keep their last ``context`` tokens.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort


class Sequence:
    """One live sequence: its slot in the cache buffers and its latest token ids (at least the last context)."""

    __slots__ = ("slot", "ids", "length", "tag")

    def __init__(self, ids, tag=None):
        self.ids = list(ids)
        self.slot = -1
        self.length = 0  # tokens held in the cache
        self.tag = tag  # whatever the caller attaches (a request, a sampler)


def session_options(threads: int = 0):
    """ONNX Runtime options for the decode graphs.

    SkipLayerNormFusion is disabled: on these graphs (LayerNormalization without bias) it crashes the
    process in ONNX Runtime 1.32, and where it works it is ~5x slower than plain LayerNormalization.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("optimization.disable_specified_optimizers", "SkipLayerNormFusion")
    # Idle pool threads sleep instead of spinning: the host's cores are shared with Triton and the gateway.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


class DecodeEngine:
    """Prefill and batched step over a fixed pool of ``max_sequences`` cache slots."""

    def __init__(self, prefill_path: str, step_path: str, max_sequences: int = 32, threads: int = 0):
        options = session_options(threads)
        providers = ["CPUExecutionProvider"]
        self.prefill = ort.InferenceSession(prefill_path, options, providers=providers)
        self.step_session = ort.InferenceSession(step_path, options, providers=providers)
        meta = self.prefill.get_modelmeta().custom_metadata_map
        self.context = int(meta["context"])
        self.vocab_size = int(meta["vocab_size"])
        past = [i for i in self.step_session.get_inputs() if i.name.startswith("past_key_")]
        self.n_layer = len(past)
        _, self.n_head, _, self.head_size = past[0].shape
        self.max_sequences = max_sequences
        shape = (max_sequences, self.n_head, self.context, self.head_size)
        self.keys = [np.zeros(shape, np.float32) for _ in range(self.n_layer)]
        self.values = [np.zeros(shape, np.float32) for _ in range(self.n_layer)]
        self.live: list[Sequence] = []  # slot order
        self.keep = max(1, self.context // 2)
        self._bindings: dict[int, tuple] = {}

    @property
    def free_slots(self) -> int:
        return self.max_sequences - len(self.live)

    # ---- sequences join and leave --------------------------------------------------------------
    def start(self, prompt_ids, tag=None) -> tuple[Sequence, np.ndarray]:
        """Encode a prompt into a free slot; the sequence and its next-token logits (V,)."""
        (seq, logits), = self.start_many([prompt_ids], [tag])
        return seq, logits

    def start_many(self, prompts, tags=None) -> list[tuple[Sequence, np.ndarray]]:
        """Encode several prompts (any lengths) into free slots with one prefill; (sequence, logits) each."""
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
        logits = self._encode_many(seqs, [s.ids[-self.context:] for s in seqs])
        return list(zip(seqs, logits))

    def release(self, seq: Sequence) -> None:
        """Free the sequence's slot; the last live sequence moves into it (the cache stays compact)."""
        if seq.slot < 0:
            return
        last = self.live.pop()
        if last is not seq:
            for buf in (*self.keys, *self.values):
                buf[seq.slot] = buf[last.slot]
            last.slot = seq.slot
            self.live[seq.slot] = last
        seq.slot = -1

    def _encode_many(self, seqs: list[Sequence], rows: list) -> np.ndarray:
        """Prefill ``rows`` (token lists) into the sequences' slots, positions 0.., as one right-padded
        batch; each row's last logits (len(rows), V)."""
        b, lengths = len(rows), np.fromiter(map(len, rows), np.int64, len(rows))
        n = int(lengths.max())
        ids = np.zeros((b, n), np.int64)
        for j, row in enumerate(rows):
            ids[j, :len(row)] = row
        # past buffers hold nothing (every row starts at position 0) but give room for the padded chunk
        empty = np.zeros((b, self.n_head, n, self.head_size), np.float32)
        feed = {"input_ids": ids, "position_ids": np.tile(np.arange(n, dtype=np.int64), (b, 1)),
                "seqlens_k": (lengths - 1).astype(np.int32), "total_sequence_length": np.asarray(n, np.int32),
                "query_seqlens": lengths.astype(np.int32)}
        for i in range(self.n_layer):
            feed[f"past_key_{i}"] = feed[f"past_value_{i}"] = empty
        out = self.prefill.run(None, feed)
        for j, (seq, length) in enumerate(zip(seqs, lengths.tolist())):
            for i in range(self.n_layer):
                self.keys[i][seq.slot, :, :length] = out[1 + 2 * i][j, :, :length]
                self.values[i][seq.slot, :, :length] = out[2 + 2 * i][j, :, :length]
            seq.length = length
        return out[0][np.arange(b), lengths - 1]

    # ---- one token for every live sequence -----------------------------------------------------
    def step(self, tokens) -> np.ndarray:
        """Append ``tokens[i]`` to live sequence ``i`` (slot order); next-token logits (n, V).

        Sequences with a full cache slide (re-encoded from their last tokens); all others run as one
        batch through the step graph, their caches updated in place.
        """
        n = len(self.live)
        tokens = np.asarray(tokens, np.int64).reshape(n)
        logits = np.empty((n, self.vocab_size), np.float32)
        lengths = np.fromiter((s.length for s in self.live), np.int64, n)
        sliding = lengths >= self.context
        for seq, token in zip(self.live, tokens.tolist()):
            seq.ids.append(token)
            if len(seq.ids) > 2 * self.context:  # only the last context tokens can ever be re-encoded
                del seq.ids[:-self.context]
        if sliding.any():  # every sliding sequence re-encodes `keep` tokens: one batch
            rows = np.flatnonzero(sliding)
            slid = [self.live[i] for i in rows]
            logits[rows] = self._encode_many(slid, [s.ids[-self.keep:] for s in slid])
        if sliding.all():
            return logits
        stepping = ~sliding
        # Idle rows (the ones that just slid) take part with query_seqlens 0: their cache is left alone and
        # their seqlens_k is what they hold now (length - 1); stepping rows append at position `length`.
        lengths = np.fromiter((s.length for s in self.live), np.int64, n)
        binding, feed, out = self._binding(n)
        feed["input_ids"][:, 0] = tokens
        feed["position_ids"][:, 0] = np.where(stepping, lengths, 0)
        feed["seqlens_k"][:] = np.where(stepping, lengths, lengths - 1)
        feed["query_seqlens"][:] = stepping
        self.step_session.run_with_iobinding(binding)
        logits[stepping] = out[stepping, 0]
        for i in np.flatnonzero(stepping):
            self.live[i].length += 1
        return logits

    def _binding(self, n: int):
        """The step's I/O binding for ``n`` live sequences, made once: inputs are preallocated arrays
        filled in place, and past/present K/V are the first ``n`` rows of the cache buffers (contiguous)."""
        if n in self._bindings:
            return self._bindings[n]
        ort_value = ort.OrtValue.ortvalue_from_numpy
        feed = {"input_ids": np.zeros((n, 1), np.int64), "position_ids": np.zeros((n, 1), np.int64),
                "seqlens_k": np.zeros(n, np.int32), "total_sequence_length": np.asarray(self.context, np.int32),
                "query_seqlens": np.zeros(n, np.int32)}
        binding = self.step_session.io_binding()
        for name, value in feed.items():
            binding.bind_ortvalue_input(name, ort_value(value))  # shares the array's memory
        shape = [n, self.n_head, self.context, self.head_size]
        for i in range(self.n_layer):
            for kind, bufs in (("key", self.keys), ("value", self.values)):
                ptr = bufs[i].ctypes.data
                binding.bind_input(f"past_{kind}_{i}", "cpu", 0, np.float32, shape, ptr)
                binding.bind_output(f"present_{kind}_{i}", "cpu", 0, np.float32, shape, ptr)
        out = np.empty((n, 1, self.vocab_size), np.float32)
        binding.bind_output("logits", "cpu", 0, np.float32, list(out.shape), out.ctypes.data)
        self._bindings[n] = binding, feed, out
        return self._bindings[n]

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
