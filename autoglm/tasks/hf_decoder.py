"""A Hugging Face causal LM as :class:`~autoglm.tasks.DecoderWeights`, for KV-cache decode graphs.

Two families are read: GPT-2 (learned positions, LayerNorm, GELU MLP, biases, tied head) and Llama
(rotary positions, RMSNorm, SwiGLU MLP, grouped-query heads; Llama, Qwen2 with its q/k/v biases,
Mistral, SmolLM and TinyLlama checkpoints). Rotary angles are the model's own ``inv_freq`` buffer and
attention scaling, so every static rope type (default, linear, llama3, yarn) is read the same way; a
rope that changes with the sequence length (dynamic) is not supported. Other architectures get None:
they can still be tuned and served through v2, without decode graphs.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from autoglm.errors import ConfigError
from autoglm.tasks.base import DecoderLayer, DecoderWeights

FAMILIES = {"gpt2": "gpt2", "llama": "llama", "qwen2": "llama", "mistral": "llama"}
"""transformers ``model_type`` -> decode-graph family (SmolLM and TinyLlama are ``llama``)."""

MAX_CONTEXT = 1024
"""Default cap of the KV cache length. Each cache slot holds layers x kv_heads x context x head_size x
2 (K, V) x 4 bytes with an fp32 cache (1 byte with the int8 cache of quantized graphs): at 1024 positions
75 MB (19 MB) for GPT-2 small, 24 MB (6 MB) for a 135M Llama (30 layers, 3 kv heads), so 32 slots stay within
a few GB; pass ``context`` for longer generations."""

_GELU = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}  # HF name -> ours


def family(model_type: str | None) -> str | None:
    """The decode-graph family of a transformers ``model_type``; None: no decode graphs."""
    return FAMILIES.get(model_type or "")


def unsupported_message(model_type: str | None) -> str:
    """One line saying the model gets no decode graphs, which families do, and what still works."""
    names = ", ".join(sorted(FAMILIES))
    return (f"model type {model_type!r} has no KV-cache decode graphs (supported: {names}); it can still be "
            "tuned and served through v2, without :generate's cached decoding")


def decoder_weights(hf_model: Any, context: int | None = None) -> DecoderWeights | None:
    """The arrays of a transformers causal LM (GPT2LMHeadModel, LlamaForCausalLM, Qwen2ForCausalLM, ...).

    ``context``: positions the decode graphs and their KV cache hold; default the model's maximum
    capped at :data:`MAX_CONTEXT` (and at a sliding attention window, within which attention is full).
    None for an unsupported architecture or activation (see :func:`unsupported_message`).
    """
    config = hf_model.config
    kind = family(config.model_type)
    if kind == "gpt2":
        return _gpt2(hf_model, config, context)
    if kind == "llama":
        return _llama(hf_model, config, context)
    return None


def _arr(t) -> np.ndarray | None:
    return None if t is None else t.detach().float().cpu().numpy().copy()


def _linear(m) -> tuple[np.ndarray, np.ndarray | None]:
    """torch Linear (out, in) -> (in, out) and its bias."""
    return _arr(m.weight).T.copy(), _arr(m.bias)


def _context(context: int | None, limit: int, hard_limit: bool = False) -> int:
    """The KV cache length: ``context``, or the model's ``limit`` capped at MAX_CONTEXT. A ``hard_limit`` is
    one the graphs cannot pass (GPT-2's learned positions, a sliding attention window)."""
    if context is None:
        return min(limit, MAX_CONTEXT)
    if context < 1 or (hard_limit and context > limit):
        raise ConfigError(f"decode context {context} is impossible for this model: use 1.."
                          f"{limit if hard_limit else 'its maximum'}")
    return int(context)


def _gpt2(model, config, context: int | None) -> DecoderWeights | None:
    activation = _GELU.get(config.activation_function)
    if activation is None or config.scale_attn_by_inverse_layer_idx or not config.scale_attn_weights:
        return None  # another MLP, or attention not scaled by 1/sqrt(head size)
    n = _context(context, config.n_positions, hard_limit=True)
    t = model.transformer

    def conv(m):  # GPT-2's Conv1D already stores (in, out)
        return _arr(m.weight), _arr(m.bias)

    def norm(m):
        return _arr(m.weight), _arr(m.bias)

    layers = tuple(DecoderLayer(ln1=norm(b.ln_1), qkv=conv(b.attn.c_attn), proj=conv(b.attn.c_proj),
                                ln2=norm(b.ln_2), fc=conv(b.mlp.c_fc), fc_out=conv(b.mlp.c_proj)) for b in t.h)
    return DecoderWeights(n_head=config.n_head, context=n, token_embedding=_arr(t.wte.weight),
                          position_embedding=_arr(t.wpe.weight)[:n], layers=layers, ln_f=norm(t.ln_f),
                          head=_linear(model.lm_head), layer_norm_eps=config.layer_norm_epsilon,
                          activation=activation)


def _llama(model, config, context: int | None) -> DecoderWeights | None:
    rotary = model.model.rotary_emb
    if config.hidden_act != "silu" or getattr(rotary, "rope_type", "default") == "dynamic":
        return None
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    inv_freq = _arr(rotary.inv_freq)
    if inv_freq.shape != (head_dim // 2,):  # partial rotary (a fraction of each head): not this family
        return None
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    if window:  # within the window attention is full causal attention: exact without windowed graphs
        n = _context(context, min(config.max_position_embeddings, window), hard_limit=True)
    else:
        n = _context(context, config.max_position_embeddings)

    def rms(m):
        return _arr(m.weight), None

    def qkv(a):
        (q, qb), (k, kb), (v, vb) = _linear(a.q_proj), _linear(a.k_proj), _linear(a.v_proj)
        bias = None if qb is None else np.concatenate([qb, kb, vb])
        return np.concatenate([q, k, v], axis=1), bias  # (C, (H + 2 KV) D): queries, keys, values

    layers = tuple(DecoderLayer(ln1=rms(b.input_layernorm), qkv=qkv(b.self_attn), proj=_linear(b.self_attn.o_proj),
                                ln2=rms(b.post_attention_layernorm), fc=_linear(b.mlp.up_proj),
                                fc_out=_linear(b.mlp.down_proj), gate=_linear(b.mlp.gate_proj))
                   for b in model.model.layers)
    return DecoderWeights(n_head=heads, context=n, token_embedding=_arr(model.model.embed_tokens.weight),
                          position_embedding=None, layers=layers, ln_f=rms(model.model.norm),
                          head=_linear(model.lm_head), layer_norm_eps=config.rms_norm_eps, n_kv_head=kv_heads,
                          norm="rms", activation="swiglu", rotary_inv_freq=inv_freq,
                          rotary_scale=float(getattr(rotary, "attention_scaling", 1.0)), head_dim=head_dim)
