"""hf-causal-lm: fine-tune a pretrained Hugging Face causal LM, scored by validation loss (nats per token).

``task.model_id`` names the model (a local ``save_pretrained`` directory or a hub id; see
:mod:`autoglm.tasks.hf_source`), ``task.data`` the text: a UTF-8 text file, or a JSONL file of
``{"text": ...}`` documents (joined with the tokenizer's EOS between them). The text is tokenized once with
the model's own tokenizer into ``<cache_dir>/hf-causal-lm/<sha256 of data and tokenizer>/`` (train.bin,
val.bin: the last 10% of the tokens; meta.json last) and read back through np.memmap, like charlm's.
Batches are windows of ``block_size`` tokens, capped at the model's context.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from autoglm.artifacts import atomic_output, write_atomic
from autoglm.errors import DataError
from autoglm.tasks import corpus
from autoglm.tasks.base import IOSpec, Knob, TensorSpec
from autoglm.tasks.decoder import DecoderWeights
from autoglm.tasks.hf_decoder import MAX_CONTEXT as SERVED_CONTEXT  # the decode graphs' default KV cache length
from autoglm.tasks.hf_source import (LORA_SPACE, HFTask, content_digest, decoder_family, jsonl_records,
                                     max_positions, tokenizer_identity)
from autoglm.tasks.next_token import NextTokenScoring

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)
CACHE_FORMAT = 1  # bump when tokenization changes, so caches are rebuilt
DOC_CHARS = 100_000  # a text file is tokenized in pieces of about this size, cut at line ends


def read_documents(path: Path) -> list[str]:
    """A text file as one document, or a JSONL file's ``text`` fields; DataError names a bad line."""
    text = corpus.read_text_file(path)
    if path.suffix.lower() != ".jsonl":
        return [text]
    docs = []
    for number, record in jsonl_records(path, text, '{"text": ...}'):
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise DataError(f"{path}:{number} has no string \"text\" field: write one {{\"text\": ...}} per line")
        docs.append(record["text"])
    return docs


def _pieces(text: str) -> list[str]:
    """``text`` cut at line ends into pieces of about DOC_CHARS (tokenizing megabytes at once is slow)."""
    pieces, start = [], 0
    while start < len(text):
        end = text.find("\n", start + DOC_CHARS)
        end = len(text) if end < 0 else end + 1
        pieces.append(text[start:end])
        start = end
    return pieces


class HFCausalLMTask(NextTokenScoring, HFTask):
    """Next-token prediction with a pretrained model's own tokenizer; ``test`` is the val split."""

    name = "hf-causal-lm"
    metric = "val_loss"
    direction = "minimize"
    token_input = "input_ids"
    other_metrics = {"perplexity": "minimize"}
    model_space = {
        # tokens per training window; capped at the model's context (n_positions / max_position_embeddings)
        "block_size": Knob("categorical", 128, choices=(64, 128, 256, 512)),
        # tokens of prompt + generation served (the KV cache length), capped at the model's context; one
        # value searched: it is a deployment choice, and the cache's memory grows with it
        "context": Knob("categorical", SERVED_CONTEXT, choices=(SERVED_CONTEXT,)),
        **LORA_SPACE,
    }
    data_help = "a UTF-8 text file or a JSONL file of {\"text\": ...} lines"

    def __init__(self, data: str | None = None, cache_dir: Path | str = ".cache/autoglm", seed: int = 1337,
                 model_id: str | None = None):
        super().__init__(data=data, cache_dir=cache_dir, seed=seed, model_id=model_id)
        self._data_dir: Path | None = None
        self._splits: dict[str, np.ndarray] = {}
        self._unsupported_logged = False

    # ---- data ------------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Tokenize task.data unless its cache directory is complete (meta.json written last)."""
        if self._data_dir is not None:
            return
        path = Path(self.data_source).expanduser()
        if not path.is_file():
            raise DataError(f"task.data={self.data_source} does not exist: give {self.data_help}")
        identity = tokenizer_identity(self.tokenizer)
        out = self.cache_dir / self.name / content_digest(f"format={CACHE_FORMAT}", path.read_bytes(), identity)
        if not (out / "meta.json").is_file():
            self._write_tokens(read_documents(path), out, str(path))
        self._data_dir = out

    def _write_tokens(self, docs: list[str], out: Path, source: str) -> None:
        tok = self.tokenizer
        eos = tok.eos_token_id
        ids: list[int] = []
        for doc in docs:
            for encoding in tok.backend_tokenizer.encode_batch(_pieces(doc), add_special_tokens=False):
                ids.extend(encoding.ids)
            if eos is not None and len(docs) > 1:
                ids.append(eos)  # documents end where the model learned to stop
        if not ids:
            raise DataError(f"task.data={source} holds no text (0 tokens): give {self.data_help}")
        dtype = np.uint16 if len(tok) <= np.iinfo(np.uint16).max + 1 else np.uint32
        tokens = np.asarray(ids, dtype=dtype)
        n_val = int(len(tokens) * corpus.VAL_FRACTION)
        for name, part in (("train.bin", tokens[: len(tokens) - n_val]), ("val.bin", tokens[len(tokens) - n_val:])):
            with atomic_output(out / name) as tmp:
                part.tofile(tmp)
        meta = {"source": source, "model_id": self.model_id, "dtype": np.dtype(dtype).name, "documents": len(docs),
                "train_tokens": len(tokens) - n_val, "val_tokens": n_val}
        write_atomic(out / "meta.json", (json.dumps(meta) + "\n").encode())

    def _split(self, split: str) -> np.ndarray:
        name = "train" if split == "train" else "val"
        if name not in self._splits:
            self.prepare()
            meta = json.loads((self._data_dir / "meta.json").read_text(encoding="utf-8"))
            self._splits[name] = np.memmap(self._data_dir / f"{name}.bin", dtype=meta["dtype"], mode="r")
        return self._splits[name]

    def block_size(self, model_args: Mapping[str, Any] | None) -> int:
        """Tokens per window: the knob, at most the model's context."""
        block = int((model_args or {}).get("block_size", self.model_space["block_size"].default))
        context = max_positions(self.hf_config)
        return min(block, context) if context else block

    def io_spec(self, model_args: Mapping[str, Any]) -> IOSpec:
        vocab = int(self.hf_config.get_text_config().vocab_size)
        return IOSpec(inputs=(TensorSpec("input_ids", "int64", (-1,)),),
                      outputs=(TensorSpec("logits", "float32", (-1, vocab)),))

    def batches(self, split: Literal["train", "val", "test"], batch_size: int, n_batches: int,
                seed: int = 0, model_args: Mapping[str, Any] | None = None,
                ) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
        """Windows of block_size tokens, targets shifted by one (train: random; val/test: fixed, spread)."""
        data = self._split(split)
        block = self.block_size(model_args)
        if len(data) <= block + 1:  # never an empty or short window
            raise DataError(f"the {split} split of task.data has {len(data)} tokens, too few for block_size={block}: "
                            f"use a longer text (its last 10% validates) or a smaller task.model.block_size")
        offsets = np.arange(block + 1)

        def window_batch(starts: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
            windows = np.asarray(data[starts[:, None] + offsets], dtype=np.int64)  # (B, T+1)
            return {"input_ids": windows[:, :-1]}, windows[:, 1:]

        if split == "train":
            rng = np.random.default_rng(seed)
            for _ in range(n_batches):
                yield window_batch(rng.integers(0, len(data) - block, size=batch_size))
            return
        every = np.arange(0, len(data) - block, block)
        if len(every) > batch_size * n_batches:
            every = every[np.linspace(0, len(every) - 1, batch_size * n_batches).round().astype(np.int64)]
        for i in range(0, len(every), batch_size):
            yield window_batch(every[i:i + batch_size])

    # ---- model -----------------------------------------------------------------------------------
    def build_model(self, model_args: Mapping[str, Any]) -> torch.nn.Module:
        return self._build(model_args, "AutoModelForCausalLM")

    def context(self, model_args: Mapping[str, Any] | None = None) -> int:
        """Tokens of prompt plus generation the served model takes: ``task.model.context``, at most the model's
        own; the decode graphs' KV cache and the gateway's limit (serving metadata ``block_size``) both read it."""
        cap = int((model_args or {}).get("context", SERVED_CONTEXT))
        return min(cap, max_positions(self.hf_config) or cap)

    def serving_metadata(self, model_args: Mapping[str, Any]) -> dict[str, Any]:
        """The tokenizer (tokenizer.json as a dict), context, EOS ids and chat template for the gateway."""
        eos = self.hf_config.eos_token_id
        eos_ids = sorted({int(i) for i in (eos if isinstance(eos, list) else [eos]) if i is not None}
                         | ({int(self.tokenizer.eos_token_id)} if self.tokenizer.eos_token_id is not None else set()))
        return {"tokenizer": json.loads(tokenizer_identity(self.tokenizer)), "block_size": self.context(model_args),
                "eos_token_ids": eos_ids, "chat_template": getattr(self.tokenizer, "chat_template", None),
                "model_type": self.hf_config.model_type, "family": decoder_family(self.hf_config.model_type)}

    def prunable_layers(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        """The MLP's inner width only (residual width and heads are tied across layers); [] if not found."""
        from autoglm.tasks.hf_model import mlp_inner_layers

        return mlp_inner_layers(model)

    def decoder_weights(self, model: torch.nn.Module) -> DecoderWeights | None:
        """The model's arrays for KV-cache decode graphs (``hf_decoder``); None, logged once, for other families."""
        try:
            from autoglm.tasks import hf_decoder
        except ImportError:
            return None
        weights = hf_decoder.decoder_weights(model.hf, context=self.context(getattr(model, "model_args", None)))
        if weights is None and not self._unsupported_logged:
            self._unsupported_logged = True
            log.warning(hf_decoder.unsupported_message(self.hf_config.model_type))
        return weights
