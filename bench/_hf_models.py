"""Random-initialized Hugging Face checkpoints at real sizes, and tiny ones to fine-tune, for ``bench hf``.

No hub here: each checkpoint is built from transformers' config classes and saved with ``save_pretrained``
next to a tokenizer trained on the built-in Shakespeare text with the `tokenizers` library (byte-level BPE
for GPT-2, SentencePiece-style BPE with byte fallback and a BOS template for the Llama family). The
tokenizer's vocabulary is filled up to the model's embedding table with plain added tokens, so every id a random
model draws adds text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    "GPT-2 small shape (124M)": ("gpt2", {}),  # GPT2Config's defaults are GPT-2 small
    "Llama-family shape (135M, SmolLM-135M's)": ("llama", {
        "hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
        "intermediate_size": 1536, "vocab_size": 49152, "max_position_embeddings": 2048, "tie_word_embeddings": True,
        "rope_theta": 10000.0, "rms_norm_eps": 1e-5}),
}
# Development shapes for serving and compression defaults (bench hf --spinning, --prefill-thread, --int4-blocks):
# Llama-family, unlike the goal shapes above in width and depth -- a default is picked on these, and only reported
# on SHAPES.
DEV_SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    "Llama-family, 12 layers x 768 (dev)": ("llama", {
        "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "num_key_value_heads": 4,
        "intermediate_size": 2048, "vocab_size": 32000, "max_position_embeddings": 2048,
        "tie_word_embeddings": False, "rope_theta": 10000.0, "rms_norm_eps": 1e-6}),
    "Llama-family, 24 layers x 512 (dev)": ("llama", {
        "hidden_size": 512, "num_hidden_layers": 24, "num_attention_heads": 8, "num_key_value_heads": 2,
        "intermediate_size": 1536, "vocab_size": 32000, "max_position_embeddings": 2048,
        "tie_word_embeddings": True, "rope_theta": 10000.0, "rms_norm_eps": 1e-6}),
}
TINY_LLAMA = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "intermediate_size": 176, "max_position_embeddings": 256, "tie_word_embeddings": True}


def corpus_text() -> str:
    from autoglm.tasks import corpus

    return corpus.shakespeare_text()


def train_tokenizer(family: str, text: str, vocab_size: int):
    """A fast tokenizer of ``family``'s kind trained on ``text`` (transformers' PreTrainedTokenizerFast)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if family == "gpt2":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator([text], trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def save_checkpoint(out: Path, family: str, config: dict[str, Any], text: str, vocab_size: int = 4096,
                    seed: int = 0) -> Path:
    """A seeded random model of ``family`` with ``config`` and its tokenizer, in ``save_pretrained`` layout."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tokenizer = train_tokenizer(family, text, vocab_size)
    torch.manual_seed(seed)
    if family == "gpt2":
        cfg = GPT2Config(**{"vocab_size": 50257, **config}, bos_token_id=tokenizer.eos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
        model = GPT2LMHeadModel(cfg)
    else:
        cfg = LlamaConfig(**{"vocab_size": max(len(tokenizer), 512), **config}, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id)
        model = LlamaForCausalLM(cfg)
    if len(tokenizer) > cfg.vocab_size:
        raise ValueError(f"tokenizer of {len(tokenizer)} tokens for a {cfg.vocab_size}-row embedding")
    # a random model draws ids from its whole table: give every id text (plain added tokens), so what is
    # streamed, timed and counted is text as with a real checkpoint's vocabulary
    tokenizer.add_tokens([f"<w{i}>" for i in range(len(tokenizer), cfg.vocab_size)])
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def prompts(model_dir: Path, text: str, n: int, length: int) -> list[list[int]]:
    """``n`` prompts of exactly ``length`` token ids, cut from ``text`` at spread offsets (BOS first where the
    tokenizer adds one)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer(text[: 400 * length * 4], add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer("a")["input_ids"][0] == tokenizer.bos_token_id else []
    body = length - len(bos)
    starts = [int(s) for s in range(0, len(ids) - body, max(1, (len(ids) - body) // n))][:n]
    return [bos + ids[s:s + body] for s in starts]
