"""Token ids -> text as a stream that never splits a UTF-8 character (standard library only).

A :class:`DecodeTable` holds, for every token id, the bytes that token adds to the text (built from the
tokenizer by :mod:`autoglm.text_codec`): byte-level BPE tokens map back through GPT-2's byte alphabet,
SentencePiece pieces turn "▁" into a space and ``<0xNN>`` into that byte, special tokens add nothing.
A :class:`TextStream` joins those bytes through an incremental UTF-8 decoder: a character whose bytes
come in several tokens (an emoji, a CJK character in byte-fallback pieces) is emitted once complete,
and bytes that can never form a character become U+FFFD as they would in a one-shot decode.

The gateway imports it as ``autoglm.detokenizer``; the Triton generation model gets this file copied
next to its ``model.py`` (with the table as ``detokenizer.json``), so it imports nothing from the project.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

TABLE_FILE = "detokenizer.json"  # the table's file next to the generation model's model.py


@dataclass(frozen=True)
class DecodeTable:
    """Bytes per token id, the ids that end a generation, and the leading spaces the tokenizer's decoder
    drops from the start of a whole text (SentencePiece's "▁" before the first word)."""

    tokens: tuple[bytes, ...]
    eos_ids: frozenset[int] = frozenset()
    strip_leading: int = 0

    def __len__(self) -> int:
        return len(self.tokens)

    def padded(self, vocab_size: int) -> DecodeTable:
        """The table for a model with ``vocab_size`` logits: embeddings are often padded past the tokenizer's
        vocabulary, and those ids add no text. ValueError if the tokenizer has more tokens than the model."""
        if vocab_size < len(self.tokens):
            raise ValueError(f"the tokenizer has {len(self.tokens)} tokens but the model only {vocab_size}: "
                             f"they do not belong together")
        return DecodeTable(self.tokens + (b"",) * (vocab_size - len(self.tokens)), self.eos_ids, self.strip_leading)

    def stream(self, prompt_ids: Iterable[int] = ()) -> TextStream:
        """A decoder for the continuation of ``prompt_ids``."""
        return TextStream(self, prompt_ids)

    def decode(self, ids: Sequence[int]) -> str:
        """The whole text of ``ids`` (special tokens add nothing), as the tokenizer decodes it."""
        stream = self.stream()
        return "".join(stream.push(i) for i in ids) + stream.flush()

    def to_json(self) -> str:
        return json.dumps({"tokens": [t.hex() for t in self.tokens], "eos_token_ids": sorted(self.eos_ids),
                           "strip_leading_space": self.strip_leading}, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> DecodeTable:
        data = json.loads(text)
        return cls(tuple(bytes.fromhex(t) for t in data["tokens"]), frozenset(int(i) for i in data["eos_token_ids"]),
                   int(data.get("strip_leading_space", 0)))


class TextStream:
    """One sequence's text, token by token: :meth:`push` returns only complete characters, :meth:`flush`
    what is left when the sequence ends (an incomplete character becomes U+FFFD there)."""

    def __init__(self, table: DecodeTable, prompt_ids: Iterable[int] = ()):
        self.tokens, self.strip = table.tokens, table.strip_leading
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        # the decoder strips the start of the whole text: past it once the prompt has any text
        self._started = any(self.tokens[i] for i in prompt_ids)

    def push(self, token: int) -> str:
        piece = self.tokens[token]
        if not self._started and piece:
            self._started = True
            if self.strip and piece.startswith(b" " * self.strip):
                piece = piece[self.strip:]
        return self._utf8.decode(piece)

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)
