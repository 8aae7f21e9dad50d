"""Tiny tokenizers trained in a second on a test corpus, in the three layouts served models use: byte-level
BPE (GPT-2), SentencePiece-style BPE with byte fallback and a BOS (Llama), WordPiece (BERT). Each builder
returns the ``tokenizer.json`` dict that a Hugging Face task writes into its serving metadata."""

from __future__ import annotations

import functools
import json

CORPUS = ["The quick brown fox jumps over the lazy dog.", "Héllo wörld, ça va? naïve café",
          "日本語のテキストです", "emoji 😀 and 🎉 party", "numbers 12345 and symbols #@!", "a stream never splits a character"] * 8
BYTES = [f"<0x{i:02X}>" for i in range(256)]


@functools.cache
def gpt2_style() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_tokens(["<|a b é|>"])  # an added token that is not special: decoded verbatim
    return tok.to_str()


@functools.cache
def llama_style() -> str:
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    # the byte pieces come first, as in Llama's vocabulary; listed as special only to place them there
    tok.train_from_iterator([c for c in CORPUS if "日" not in c],
                            trainers.BpeTrainer(vocab_size=330, special_tokens=["<unk>", "<s>", "</s>", *BYTES]))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    data = json.loads(tok.to_str())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] not in BYTES]  # plain vocabulary
    return json.dumps(data)


@functools.cache
def bert_style() -> str:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(CORPUS, trainers.WordPieceTrainer(vocab_size=200, special_tokens=[
        "[PAD]", "[UNK]", "[CLS]", "[SEP]"]))
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return tok.to_str()


def lm_metadata(style: str, block_size: int = 16, chat_template: str | None = None) -> dict:
    """A Hugging Face causal LM's serving metadata (the contract's form) around a tiny tokenizer."""
    text = {"gpt2": gpt2_style, "llama": llama_style}[style]()
    tokenizer = json.loads(text)
    eos = "<|endoftext|>" if style == "gpt2" else "</s>"
    eos_id = next(t["id"] for t in tokenizer["added_tokens"] if t["content"] == eos)
    return {"tokenizer": tokenizer, "block_size": block_size, "eos_token_ids": [eos_id],
            "chat_template": chat_template, "model_type": style, "family": style}


def classifier_metadata(classes=("negative", "positive"), max_length: int = 8) -> dict:
    return {"tokenizer": json.loads(bert_style()), "classes": list(classes), "max_length": max_length,
            "model_type": "bert"}


def transformers_tokenizer(style: str):
    """The same tokenizer wrapped as transformers wraps it: the reference decode."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    text = {"gpt2": gpt2_style, "llama": llama_style, "bert": bert_style}[style]()
    special = {"gpt2": {"eos_token": "<|endoftext|>"}, "llama": {"bos_token": "<s>", "eos_token": "</s>",
                                                               "unk_token": "<unk>"},
               "bert": {"pad_token": "[PAD]", "cls_token": "[CLS]", "sep_token": "[SEP]", "unk_token": "[UNK]"}}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(text), clean_up_tokenization_spaces=False,
                                   **special[style])
