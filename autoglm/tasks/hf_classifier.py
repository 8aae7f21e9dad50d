"""hf-sequence-classification: fine-tune a pretrained Hugging Face encoder to label texts, scored by accuracy.

``task.data`` is a CSV (header with ``text`` and ``label`` columns) or JSONL file of ``{"text", "label"}``,
split 90/10 with a seeded per-label shuffle, or a directory holding ``train.csv``/``train.jsonl`` and a
``val.*`` or ``validation.*`` file of its own. Labels are strings; class ids follow the model config's
``id2label`` when it names exactly these labels, else sorted order (the classification head is then new).
Tokenized, padded ids are cached per (data, tokenizer, max_length) under ``<cache_dir>/hf-sequence-classification/``.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from autoglm.artifacts import atomic_output
from autoglm.errors import DataError
from autoglm.tasks import corpus
from autoglm.tasks.base import IOSpec, Knob, TensorSpec
from autoglm.tasks.hf_source import (LORA_SPACE, HFTask, content_digest, jsonl_records, max_positions,
                                     tokenizer_identity)

if TYPE_CHECKING:
    import torch

CACHE_FORMAT = 1
SUFFIXES = (".csv", ".jsonl")
Rows = list[tuple[str, str]]


def read_rows(path: Path) -> Rows:
    """(text, label) rows of a CSV with a text,label header or a JSONL file; DataError names the bad spot."""
    if path.suffix.lower() not in SUFFIXES:
        raise DataError(f"task.data file {path} is neither .csv nor .jsonl: give text and label columns in one")
    content = corpus.read_text_file(path)
    rows: Rows = []
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(content))
        if not reader.fieldnames or not {"text", "label"} <= set(reader.fieldnames):
            raise DataError(f"{path} needs a header row with 'text' and 'label' columns, found {reader.fieldnames}")
        for number, row in enumerate(reader, 2):
            if row["text"] is None or row["label"] in (None, ""):
                raise DataError(f"{path}:{number} lacks a text or a label")
            rows.append((row["text"], row["label"].strip()))
        return rows
    for number, record in jsonl_records(path, content, '{"text", "label"}'):
        if not (isinstance(record, dict) and isinstance(record.get("text"), str)
                and isinstance(record.get("label"), str | int) and not isinstance(record.get("label"), bool)):
            raise DataError(f"{path}:{number} needs a string \"text\" and a string (or integer) \"label\"")
        rows.append((record["text"], str(record["label"])))
    return rows


def split_rows(rows: Rows, seed: int, val_fraction: float = corpus.VAL_FRACTION) -> tuple[Rows, Rows]:
    """A seeded 90/10 split per label, so every label with two or more examples lands in both splits."""
    rng = np.random.default_rng(seed)
    train: Rows = []
    val: Rows = []
    for label in sorted({lab for _, lab in rows}):
        mine = [r for r in rows if r[1] == label]
        order = rng.permutation(len(mine))
        n_val = min(len(mine) - 1, max(1, round(len(mine) * val_fraction)))
        val += [mine[i] for i in order[:n_val]]
        train += [mine[i] for i in order[n_val:]]
    return train, val


def _find(directory: Path, stems: tuple[str, ...]) -> Path | None:
    for stem in stems:
        for suffix in SUFFIXES:
            if (directory / f"{stem}{suffix}").is_file():
                return directory / f"{stem}{suffix}"
    return None


class HFClassifierTask(HFTask):
    """Text classification with a pretrained encoder; ``test`` is the val split."""

    name = "hf-sequence-classification"
    metric = "accuracy"
    direction = "maximize"
    other_metrics = {"loss": "minimize"}
    model_space = {
        # tokens per text (longer texts are truncated); capped at the model's max positions
        "max_length": Knob("categorical", 128, choices=(32, 64, 128, 256)),
        **LORA_SPACE,
    }
    data_help = ("a CSV (text,label header) or JSONL file of {\"text\", \"label\"}, or a directory with train.* "
                 "and val.* (or validation.*) files")

    def __init__(self, data: str | None = None, cache_dir: Path | str = ".cache/autoglm", seed: int = 1337,
                 model_id: str | None = None):
        super().__init__(data=data, cache_dir=cache_dir, seed=seed, model_id=model_id)
        self._rows: dict[str, Rows] | None = None
        self._arrays: dict[tuple[str, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    # ---- data ------------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Read and split the labelled texts; the label sets of both splits must agree."""
        if self._rows is not None:
            return
        path = Path(self.data_source).expanduser()
        if path.is_dir():
            train_path, val_path = _find(path, ("train",)), _find(path, ("val", "validation"))
            if train_path is None:
                raise DataError(f"task.data directory {path} has no train.csv or train.jsonl: give {self.data_help}")
        elif path.is_file():
            train_path, val_path = path, None
        else:
            raise DataError(f"task.data={self.data_source} does not exist: give {self.data_help}")
        rows = read_rows(train_path)
        if not rows:
            raise DataError(f"task.data={train_path} holds no labelled texts: give {self.data_help}")
        if val_path is None:
            train, val = split_rows(rows, self.seed)
            single = sorted(lab for lab in {lab for _, lab in rows} if sum(r[1] == lab for r in rows) < 2)
            if single:
                raise DataError(f"label(s) {single} of {train_path} have a single example, so the validation split "
                                "cannot hold them: give each label at least 2 examples (or a val file)")
        else:
            train, val = rows, read_rows(val_path)
            if not val:
                raise DataError(f"{val_path} holds no labelled texts: fill it or remove it (then 10% of train "
                                "validates)")
        only_train = sorted({lab for _, lab in train} - {lab for _, lab in val})
        only_val = sorted({lab for _, lab in val} - {lab for _, lab in train})
        if only_train or only_val:
            raise DataError(f"the label sets of train and validation differ: only in train {only_train}, only in "
                            f"validation {only_val}; give both splits the same labels")
        self._rows = {"train": train, "val": val}

    @property
    def classes(self) -> list[str]:
        """Class id -> label: the model config's id2label if it names exactly these labels, else sorted."""
        self.prepare()
        labels = sorted({lab for _, lab in self._rows["train"]})
        id2label = getattr(self.hf_config, "id2label", None) or {}
        named = [str(id2label[i]) for i in sorted(id2label, key=int)]
        return named if sorted(named) == labels else labels

    def max_length(self, model_args: Mapping[str, Any] | None) -> int:
        """Tokens per text: the knob, at most the model's max positions."""
        length = int((model_args or {}).get("max_length", self.model_space["max_length"].default))
        context = max_positions(self.hf_config)
        return min(length, context) if context else length

    def _tokenized(self, split: str, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids (N, L), attention mask (N, L), labels (N,)) of a split, cached on disk by content."""
        name = "train" if split == "train" else "val"
        if (name, length) in self._arrays:
            return self._arrays[(name, length)]
        self.prepare()
        rows = self._rows[name]
        digest = content_digest(f"format={CACHE_FORMAT}|length={length}", json.dumps(rows),
                                tokenizer_identity(self.tokenizer), json.dumps(self.classes))
        out = self.cache_dir / self.name / digest
        files = [out / f"{key}.npy" for key in ("ids", "mask", "labels")]
        if not all(f.is_file() for f in files):
            enc = self.tokenizer([t for t, _ in rows], padding="max_length", truncation=True, max_length=length)
            index = {lab: i for i, lab in enumerate(self.classes)}
            dtype = np.uint16 if len(self.tokenizer) <= np.iinfo(np.uint16).max + 1 else np.uint32
            arrays = (np.asarray(enc["input_ids"], dtype=dtype), np.asarray(enc["attention_mask"], dtype=np.uint8),
                      np.asarray([index[lab] for _, lab in rows], dtype=np.int64))
            for path, array in zip(files, arrays, strict=True):
                with atomic_output(path) as tmp, open(tmp, "wb") as fh:
                    np.save(fh, array)
        self._arrays[(name, length)] = tuple(np.load(f, mmap_mode="r") for f in files)
        return self._arrays[(name, length)]

    def io_spec(self, model_args: Mapping[str, Any]) -> IOSpec:
        return IOSpec(inputs=(TensorSpec("input_ids", "int64", (-1,)), TensorSpec("attention_mask", "int64", (-1,))),
                      outputs=(TensorSpec("logits", "float32", (len(self.classes),)),))

    def batches(self, split: Literal["train", "val", "test"], batch_size: int, n_batches: int,
                seed: int = 0, model_args: Mapping[str, Any] | None = None,
                ) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
        """Padded texts and class ids (train: random with ``seed``; val/test: in order)."""
        ids, mask, labels = self._tokenized(split, self.max_length(model_args))

        def batch(rows: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
            return ({"input_ids": ids[rows].astype(np.int64), "attention_mask": mask[rows].astype(np.int64)},
                    np.asarray(labels[rows]))

        if split == "train":
            rng = np.random.default_rng(seed)
            for _ in range(n_batches):
                yield batch(rng.integers(0, len(labels), size=batch_size))
            return
        for start in range(0, min(len(labels), batch_size * n_batches), batch_size):
            yield batch(np.arange(start, min(start + batch_size, len(labels))))

    # ---- model -----------------------------------------------------------------------------------
    def build_model(self, model_args: Mapping[str, Any]) -> torch.nn.Module:
        classes = self.classes
        labels = {"id2label": dict(enumerate(classes)), "label2id": {c: i for i, c in enumerate(classes)}}
        return self._build(model_args, "AutoModelForSequenceClassification", config_updates=labels,
                           ignore_mismatched_sizes=True)  # other labels than the checkpoint's: a new head

    def loss(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        from torch.nn import functional as F

        return F.cross_entropy(model(inputs["input_ids"], inputs["attention_mask"]), targets)  # (B, K) logits

    def score(self, outputs: np.ndarray, targets: np.ndarray) -> dict[str, float]:
        logits = outputs.astype(np.float64)  # (B, K)
        top = logits.max(axis=1)
        log_norm = top + np.log(np.exp(logits - top[:, None]).sum(axis=1))
        nll = log_norm - np.take_along_axis(logits, targets.reshape(-1, 1), axis=1)[:, 0]
        return {"correct": float((logits.argmax(axis=1) == targets).sum()), "nll": float(nll.sum()),
                "count": float(len(targets))}

    def finish(self, totals: dict[str, float]) -> dict[str, float]:
        return {"accuracy": totals["correct"], "loss": totals["nll"]}

    def serving_metadata(self, model_args: Mapping[str, Any]) -> dict[str, Any]:
        """The tokenizer (tokenizer.json as a dict), the labels by class id and the padded length."""
        return {"tokenizer": json.loads(tokenizer_identity(self.tokenizer)), "classes": self.classes,
                "max_length": self.max_length(self.check_model_args(model_args)),
                "model_type": self.hf_config.model_type}

    def prunable_layers(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        """The MLP's inner width only (Bert's intermediate.dense); [] where none is found."""
        from autoglm.tasks.hf_model import mlp_inner_layers

        return mlp_inner_layers(model)

