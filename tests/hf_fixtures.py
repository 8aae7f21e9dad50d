"""Tiny Hugging Face models for tests, built offline: no download, seconds to make.

Each builder trains a small tokenizer with the ``tokenizers`` library on :data:`CORPUS`, builds a
random-initialized model from a transformers config class at tiny sizes (2 layers, hidden 64), and saves
both with ``save_pretrained`` -- the layout a user's local model directory has:

- :func:`gpt2_dir`: GPT-2 (learned positions, LayerNorm, GELU, biases) with a byte-level BPE tokenizer.
- :func:`llama_dir`: Llama (rotary, RMSNorm, SwiGLU, 4 query / 2 key-value heads) with a SentencePiece-like
  BPE (Metaspace "▁", ``<0xNN>`` byte fallback) that adds BOS like Llama's, and a chat template.
- :func:`qwen3_dir`, :func:`phi3_dir`, :func:`gemma3_dir`: other layouts (Qwen3's per-head query and key
  norms; Phi-3's fused projections; Gemma 3's sandwich norms and sliding-window layers) with the same tokenizer.
- :func:`bert_dir`: a BertForSequenceClassification over :data:`LABELS` with a byte-level BPE tokenizer
  wrapped in [CLS] ... [SEP].

The ``*_dir()`` calls are cached per process (one temporary directory, removed at exit), so treat what
they return as read-only; ``save_*(path, ...)`` builds a fresh copy with other settings (e.g. a vocabulary
smaller than the tokenizer's, to test the mismatch error). Data files: :func:`write_text`,
:func:`write_jsonl_text`, :func:`write_labelled_csv`, :func:`write_labelled_jsonl`.
"""

from __future__ import annotations

import atexit
import csv
import functools
import json
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

SEED = 1234
LABELS = ("negative", "neutral", "positive")

_SUBJECTS = ["the cat", "a dog", "my friend", "the old man", "our teacher", "the bird", "a child", "the robot"]
_VERBS = ["sat on", "looked at", "walked to", "found", "painted", "carried", "liked", "forgot"]
_OBJECTS = ["the mat", "a red box", "the green hill", "the river", "a small house", "the garden", "the moon"]
_ENDINGS = [".", "!", " today.", " again.", " at night.", " in the morning."]
_EXTRA = ["Café au lait, s'il vous plaît.", "Grüße aus München!", "naïve façade — déjà vu.", "東京 and 中文 text.",
          "emoji 🙂 too."]
_WORDS = {"positive": ["good", "great", "lovely", "wonderful", "happy"],
          "negative": ["bad", "awful", "terrible", "sad", "horrible"],
          "neutral": ["plain", "usual", "ordinary", "average", "normal"]}


def _sentences(n: int, seed: int = SEED) -> list[str]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}{rng.choice(_ENDINGS)}"
        out.append(s[0].upper() + s[1:])
        if i % 9 == 0:  # some non-ASCII text, so byte fallback and multi-byte characters are exercised
            out.append(rng.choice(_EXTRA))
    return out


CORPUS = "\n".join(" ".join(_sentences(400)[i:i + 4]) for i in range(0, 400, 4)) + "\n"
"""About 15 KB of simple, learnable English with some accents, CJK and an emoji."""


def labelled_rows(n: int = 150, seed: int = SEED) -> list[tuple[str, str]]:
    """(text, label) pairs whose label is given away by one word: a classifier learns it in a few steps."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = LABELS[i % len(LABELS)]
        rows.append((f"{rng.choice(_SUBJECTS)} was {rng.choice(_WORDS[label])}.", label))
    rng.shuffle(rows)
    return rows


# ---- data files ------------------------------------------------------------------------------------------
def write_text(path: Path, text: str = CORPUS) -> Path:
    Path(path).write_text(text, encoding="utf-8")
    return Path(path)


def write_jsonl_text(path: Path, text: str = CORPUS) -> Path:
    """One ``{"text": line}`` per non-empty line of ``text``."""
    lines = [json.dumps({"text": line}, ensure_ascii=False) for line in text.splitlines() if line.strip()]
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return Path(path)


def write_labelled_csv(path: Path, rows: list[tuple[str, str]] | None = None) -> Path:
    with open(path, "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        writer.writerows(labelled_rows() if rows is None else rows)
    return Path(path)


def write_labelled_jsonl(path: Path, rows: list[tuple[str, str]] | None = None) -> Path:
    rows = labelled_rows() if rows is None else rows
    Path(path).write_text("".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in rows),
                          encoding="utf-8")
    return Path(path)


# ---- tokenizers ------------------------------------------------------------------------------------------
def byte_level_tokenizer(vocab_size: int = 320, special: tuple[str, ...] = ("<|endoftext|>",),
                         template: tuple[str, str] | None = None, **named: str):
    """A GPT-2 style byte-level BPE trained on :data:`CORPUS`, as a PreTrainedTokenizerFast.

    ``template`` = (first, last) special tokens wrapped around every text (Bert's [CLS] ... [SEP]);
    ``named`` maps roles to tokens, e.g. ``eos_token="<|endoftext|>"``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS.splitlines(), trainer)
    if template:
        first, last = template
        tok.post_processor = processors.TemplateProcessing(
            single=f"{first} $A {last}", pair=f"{first} $A {last} $B:1 {last}:1",
            special_tokens=[(first, tok.token_to_id(first)), (last, tok.token_to_id(last))])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **named)


CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


def sentencepiece_tokenizer(vocab_size: int = 400):
    """A Llama style BPE: "▁" marks spaces, unknown bytes fall back to ``<0xNN>`` tokens, BOS is prepended."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<unk>", "<s>", "</s>"]
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  special_tokens=special + [f"<0x{i:02X}>" for i in range(256)])
    tok.train_from_iterator(CORPUS.splitlines(), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B:1",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


# ---- models ----------------------------------------------------------------------------------------------
def _save(path: Path, model: Any, tokenizer: Any) -> Path:
    from transformers.utils import logging

    logging.disable_progress_bar()  # "Writing model shards" bars are noise in test output
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)  # config.json + model.safetensors
    tokenizer.save_pretrained(path)  # tokenizer.json + tokenizer_config.json
    return path


def save_gpt2(path: Path, vocab_size: int | None = None, **config: Any) -> Path:
    """A tiny GPT-2 LM head model and its byte-level tokenizer in ``path``; ``config`` overrides GPT2Config."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = byte_level_tokenizer(eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    eos = tokenizer.eos_token_id
    torch.manual_seed(SEED)
    cfg = GPT2Config(vocab_size=vocab_size or len(tokenizer), n_positions=128, n_embd=64, n_layer=2, n_head=4,
                     bos_token_id=eos, eos_token_id=eos, **config)
    return _save(path, GPT2LMHeadModel(cfg).eval(), tokenizer)


def _save_rotary(path: Path, kind: str, model: str | None = None, pad_is_eos: bool = False, **config: Any) -> Path:
    """A tiny rotary decoder (transformers' ``<kind>Config`` and ``<model or kind>ForCausalLM``: 2 layers,
    hidden 64, 4 query heads sharing 2 key/value heads) and the SentencePiece-like tokenizer in ``path``;
    ``pad_is_eos`` for configs whose default padding id lies past this vocabulary."""
    import torch
    import transformers

    tokenizer = sentencepiece_tokenizer()
    torch.manual_seed(SEED)
    shape = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                 bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    if pad_is_eos:
        shape["pad_token_id"] = tokenizer.eos_token_id
    cfg = getattr(transformers, f"{kind}Config")(**shape | config)
    return _save(path, getattr(transformers, f"{model or kind}ForCausalLM")(cfg).eval(), tokenizer)


def save_llama(path: Path, vocab_size: int | None = None, tie_word_embeddings: bool = False,
               **config: Any) -> Path:
    """A tiny Llama (GQA: 4 query heads, 2 key/value heads) and its SentencePiece-like tokenizer in ``path``."""
    vocab = {"vocab_size": vocab_size} if vocab_size else {}
    return _save_rotary(path, "Llama", tie_word_embeddings=tie_word_embeddings, **vocab | config)


def save_qwen3(path: Path, **config: Any) -> Path:
    """A tiny Qwen3: per-head query and key norms, head_dim 32 with 4 heads of a 64-wide model."""
    return _save_rotary(path, "Qwen3", head_dim=32, **config)


def save_phi3(path: Path, **config: Any) -> Path:
    """A tiny Phi-3: fused query/key/value and gate/up projections."""
    return _save_rotary(path, "Phi3", pad_is_eos=True, **config)


def save_gemma3(path: Path, **config: Any) -> Path:
    """A tiny Gemma 3: a sliding-window local layer and a global one, norms around each block, GeGLU."""
    return _save_rotary(path, "Gemma3Text", "Gemma3", head_dim=16, layer_types=["sliding_attention", "full_attention"],
                        sliding_window=16, pad_is_eos=True, **config)


def save_bert(path: Path, labels: tuple[str, ...] = LABELS, **config: Any) -> Path:
    """A tiny BertForSequenceClassification over ``labels`` (id2label in that order) and its tokenizer.

    ``max_position_embeddings`` is 64, below the classifier task's default max_length, so capping is tested."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    tokenizer = byte_level_tokenizer(special=("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"),
                                     template=("[CLS]", "[SEP]"), pad_token="[PAD]", unk_token="[UNK]",
                                     cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    torch.manual_seed(SEED)
    settings = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
                    num_labels=len(labels), id2label=dict(enumerate(labels)),
                    label2id={lab: i for i, lab in enumerate(labels)})
    cfg = BertConfig(**(settings | config))
    return _save(path, BertForSequenceClassification(cfg).eval(), tokenizer)


@functools.cache
def _root() -> Path:
    root = Path(tempfile.mkdtemp(prefix="autoglm-hf-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return root


@functools.cache
def gpt2_dir() -> Path:
    """The shared tiny GPT-2 directory (read-only)."""
    return save_gpt2(_root() / "gpt2")


@functools.cache
def llama_dir() -> Path:
    """The shared tiny Llama directory (read-only), untied embeddings."""
    return save_llama(_root() / "llama")


@functools.cache
def llama_tied_dir() -> Path:
    """The shared tiny Llama directory with tied input/output embeddings (read-only)."""
    return save_llama(_root() / "llama-tied", tie_word_embeddings=True)


@functools.cache
def qwen3_dir() -> Path:
    """The shared tiny Qwen3 directory (read-only)."""
    return save_qwen3(_root() / "qwen3")


@functools.cache
def phi3_dir() -> Path:
    """The shared tiny Phi-3 directory (read-only)."""
    return save_phi3(_root() / "phi3")


@functools.cache
def gemma3_dir() -> Path:
    """The shared tiny Gemma 3 directory (read-only)."""
    return save_gemma3(_root() / "gemma3")


@functools.cache
def bert_dir() -> Path:
    """The shared tiny Bert classifier directory (read-only)."""
    return save_bert(_root() / "bert")
