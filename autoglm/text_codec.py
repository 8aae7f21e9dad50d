"""Text <-> token ids for the served language models and text classifiers, from ``task.json``'s metadata.

Two metadata forms: charlm's ``itos`` (one character per token) and a Hugging Face task's ``tokenizer``
(the fast tokenizer's ``tokenizer.json`` as a dict, encoded with the ``tokenizers`` library, imported on
first use). Decoding goes through a :class:`autoglm.detokenizer.DecodeTable` (bytes per token id), so a
stream never splits a UTF-8 character, and the continuation of a prompt is exactly what transformers'
``decode(prompt + generated)[len(decode(prompt)):]`` gives (special tokens skipped).

Imports numpy and the project's own helpers only: no torch or transformers, so the gateway can use it.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence

import numpy as np

from autoglm._lazy import require
from autoglm.detokenizer import DecodeTable

BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte-fallback tokens


class EncodeError(ValueError):
    """Text the model cannot take (characters outside a character vocabulary)."""


def is_language_model(meta: dict) -> bool:
    """charlm's metadata, or a Hugging Face causal LM's (a tokenizer and a context, no classes)."""
    return "itos" in meta or ("tokenizer" in meta and "block_size" in meta and "classes" not in meta)


def is_text_classifier(meta: dict) -> bool:
    """A Hugging Face sequence classifier's metadata: a tokenizer and class labels."""
    return "tokenizer" in meta and "classes" in meta


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from bytes to printable characters, which byte-level BPE tokens are written in."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, map(chr, chars)))


def _decoders(tokenizer: dict) -> list[dict]:
    decoder = tokenizer.get("decoder") or {}
    return decoder.get("decoders", []) if decoder.get("type") == "Sequence" else [decoder] if decoder else []


def _vocab(tokenizer: dict) -> dict[int, str]:
    vocab = tokenizer["model"].get("vocab") or {}
    ids = {i: piece for piece, i in vocab.items()} if isinstance(vocab, dict) else {
        i: entry[0] for i, entry in enumerate(vocab)}  # Unigram: [[piece, score], ...]
    ids.update({t["id"]: t["content"] for t in tokenizer.get("added_tokens", [])})
    return ids


def token_bytes(meta: dict) -> list[bytes]:
    """Token id -> the bytes it contributes to the text (the decoder's own rules; special tokens: none)."""
    if "itos" in meta:
        return [piece.encode() for piece in meta["itos"]]
    tokenizer = meta["tokenizer"]
    decoders = {d.get("type"): d for d in _decoders(tokenizer)}
    pieces = _vocab(tokenizer)
    if "ByteLevel" in decoders:
        back = {c: b for b, c in bytes_to_unicode().items()}

        def piece_bytes(piece: str) -> bytes:
            return b"".join(bytes([back[c]]) if c in back else c.encode() for c in piece)
    elif "WordPiece" in decoders:
        prefix = decoders["WordPiece"].get("prefix", "##")

        def piece_bytes(piece: str) -> bytes:
            return (piece[len(prefix):] if piece.startswith(prefix) else " " + piece).encode()
    else:  # SentencePiece-style: "▁" marks a space, <0xNN> pieces are bytes (byte fallback)
        space = decoders.get("Metaspace", {}).get("replacement") or next(
            (d["pattern"].get("String") for d in decoders.values() if d.get("type") == "Replace"
             and d.get("content") == " " and isinstance(d.get("pattern"), dict)), None)
        byte_fallback = "ByteFallback" in decoders

        def piece_bytes(piece: str) -> bytes:
            if byte_fallback and (match := BYTE_PIECE.fullmatch(piece)):
                return bytes([int(match.group(1), 16)])
            return (piece.replace(space, " ") if space else piece).encode()
    table = [b""] * (max(pieces) + 1 if pieces else 0)
    for i, piece in pieces.items():
        table[i] = piece_bytes(piece)
    for added in tokenizer.get("added_tokens", []):  # decoded verbatim, special ones skipped
        table[added["id"]] = b"" if added.get("special") else added["content"].encode()
    return table


def strip_leading(meta: dict) -> int:
    """Spaces the tokenizer's decoder drops from the start of a whole text (the "▁" before the first word)."""
    if "tokenizer" not in meta:
        return 0
    for d in _decoders(meta["tokenizer"]):
        if d.get("type") == "Metaspace" and (d.get("prepend_scheme", "always") != "never"
                                             if "prepend_scheme" in d else d.get("add_prefix_space", True)):
            return 1
        if d.get("type") == "Strip" and d.get("content") == " ":
            return int(d.get("start", 0))
        if d.get("type") == "WordPiece":
            return 1
    return 0


def decode_table(meta: dict) -> DecodeTable:
    """The table a generation decodes with: bytes per token, end-of-sequence ids, the start's strip."""
    return DecodeTable(tuple(token_bytes(meta)), frozenset(int(i) for i in meta.get("eos_token_ids") or ()),
                       strip_leading(meta))


class TextCodec:
    """Encoder and decode table of one served model. Build it once (:meth:`from_metadata`): a Hugging
    Face tokenizer takes milliseconds to load."""

    def __init__(self, meta: dict):
        self.meta = meta
        self.table = decode_table(meta)
        self._stoi = {ch: i for i, ch in enumerate(meta["itos"])} if "itos" in meta else None
        self._tokenizer = None
        if self._stoi is None:
            tokenizers = require("tokenizers", "serve", "Hugging Face tokenizers")
            self._tokenizer = tokenizers.Tokenizer.from_str(json.dumps(meta["tokenizer"]))
            # a saved tokenizer.json may carry truncation or padding: a prompt must be encoded whole
            self._tokenizer.no_truncation()
            self._tokenizer.no_padding()

    @classmethod
    def from_metadata(cls, meta: dict) -> TextCodec:
        if "itos" not in meta and "tokenizer" not in meta:
            raise ValueError("the metadata has neither 'itos' nor 'tokenizer': the model takes no text")
        return cls(meta)

    @property
    def vocab_size(self) -> int:
        return len(self.table)

    @property
    def eos_ids(self) -> frozenset[int]:
        return self.table.eos_ids

    def encode(self, text: str, special_tokens: bool = True) -> np.ndarray:
        """Token ids (int64) of ``text``; ``special_tokens`` adds the tokenizer's own (Llama's BOS), as
        transformers does, except for a chat template's output, which writes them itself."""
        if self._stoi is None:
            return np.asarray(self._tokenizer.encode(text, add_special_tokens=special_tokens).ids, dtype=np.int64)
        unknown = sorted({ch for ch in text if ch not in self._stoi})
        if unknown:
            raise EncodeError(f"characters {''.join(unknown)!r} are not in the model's vocabulary of "
                              f"{len(self._stoi)}")
        return np.fromiter((self._stoi[ch] for ch in text), dtype=np.int64, count=len(text))

    def encode_batch(self, texts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, attention_mask), both (B, T) int64: each text truncated to ``max_length`` tokens
        (special tokens included), padded to the longest, as ``tokenizer(texts, truncation=True,
        padding=True)`` gives."""
        if self._tokenizer is None:
            rows = [self.encode(t)[:max_length] for t in texts]
        else:
            rows = [np.asarray(e.ids, np.int64) for e in self._truncating(max_length).encode_batch(list(texts))]
        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), self.pad_id, np.int64)
        mask = np.zeros((len(rows), width), np.int64)
        for i, row in enumerate(rows):
            ids[i, :len(row)], mask[i, :len(row)] = row, 1
        return ids, mask

    @functools.lru_cache(maxsize=2)  # noqa: B019 -- one codec per served model, kept for its life
    def _truncating(self, max_length: int):
        """A copy of the tokenizer that truncates (the shared one must not change under other requests)."""
        tokenizer = type(self._tokenizer).from_str(json.dumps(self.meta["tokenizer"]))
        tokenizer.no_padding()  # padded here, to the longest text of the request
        tokenizer.enable_truncation(max_length)
        return tokenizer

    @functools.cached_property
    def pad_id(self) -> int:
        """The tokenizer's padding id (its padding setting, else a ``[PAD]``/``<pad>`` token, else 0):
        padded positions are masked out, so any id the model knows would do."""
        tokenizer = self.meta.get("tokenizer") or {}
        padding = tokenizer.get("padding") or {}
        if "pad_id" in padding:
            return int(padding["pad_id"])
        pads = [t["id"] for t in tokenizer.get("added_tokens", []) if t["content"] in ("[PAD]", "<pad>", "<|pad|>")]
        return pads[0] if pads else 0

    @functools.cached_property
    def special_tokens(self) -> dict[str, str]:
        """{"bos", "eos"}: the texts of the special token the tokenizer puts first (Llama's BOS) and of the
        first end-of-sequence id, for chat templates that write them (``{{ bos_token }}``)."""
        if self._tokenizer is None:
            return {}
        out = {}
        first = self._tokenizer.encode("").ids
        specials = {t["id"]: t["content"] for t in self.meta["tokenizer"].get("added_tokens", []) if t.get("special")}
        if first and first[0] in specials:
            out["bos"] = specials[first[0]]
        if self.eos_ids:
            out["eos"] = self._tokenizer.id_to_token(min(self.eos_ids)) or ""
        return out

    def decode(self, ids: Sequence[int]) -> str:
        return self.table.decode(ids)
