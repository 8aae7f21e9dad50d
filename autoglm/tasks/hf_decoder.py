"""A Hugging Face causal LM as :class:`~autoglm.tasks.DecoderWeights`, for KV-cache decode graphs.

Three families are read: GPT-2 (learned positions, LayerNorm, GELU MLP, biases, tied head), Llama (rotary
positions, RMSNorm, SwiGLU MLP, grouped-query heads; Llama, Qwen2 with its q/k/v biases, Qwen3 with its
per-head query and key norms, Mistral, Phi-3 with its fused projections and Phi-4-mini's partial rotary,
SmolLM3 with its layers without positions, Granite with its multipliers, SmolLM and TinyLlama checkpoints) and
Gemma 1 to 3 (see :func:`_gemma`). Rotary angles are the model's own ``inv_freq`` buffer and attention
scaling, so every static rope type (default, linear, llama3, yarn) is read the same way; longrope (Phi-3's) is
static up to its original context, where the decode graphs stop; a rope that changes with the sequence length
(dynamic) is not supported. Other architectures get None: they can still be tuned and served through v2,
without decode graphs.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from autoglm.errors import ConfigError
from autoglm.tasks.decoder import DecoderLayer, DecoderWeights

FAMILIES = {"gpt2": "gpt2", "llama": "llama", "qwen2": "llama", "qwen3": "llama", "mistral": "llama",
            "phi3": "llama", "smollm3": "llama", "granite": "llama", "gemma": "gemma", "gemma2": "gemma",
            "gemma3_text": "gemma"}
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
    what = (f"model type {model_type!r} has no KV-cache decode graphs (supported: {names})" if family(model_type)
            is None else f"this {model_type!r} model's configuration has no KV-cache decode graphs (an activation "
            "other than silu, a dynamic rope, or a rotary part GroupQueryAttention cannot take)")
    return f"{what}; it can still be tuned and served through v2, without :generate's cached decoding"


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
    if kind == "gemma":
        return _gemma(hf_model, config, context)
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
    rope_type = getattr(rotary, "rope_type", "default")
    if config.hidden_act != "silu" or rope_type == "dynamic":
        return None
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    # longrope switches to its long factors past the original context: the short ones (the initial buffer) hold
    # up to there, and the graphs stop there
    limit = config.max_position_embeddings
    if rope_type == "longrope":
        inv_freq, limit = _arr(rotary.original_inv_freq), config.rope_parameters["original_max_position_embeddings"]
    else:
        inv_freq = _arr(rotary.inv_freq)
    # a partial rotary (Phi-4-mini's) turns the first dimensions of each head; GroupQueryAttention takes
    # rotary tables of a multiple of 8 angles
    if inv_freq.shape[0] * 2 > head_dim or inv_freq.shape[0] % 8:
        return None
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    if window or rope_type == "longrope":  # within a window attention is full causal attention: exact as is
        n = _context(context, min(limit, window or limit), hard_limit=True)
    else:
        n = _context(context, limit)

    def rms(m):
        return _arr(m.weight), None

    def qkv(a):
        if hasattr(a, "qkv_proj"):  # Phi-3: one projection, already queries, keys, values
            return _linear(a.qkv_proj)
        (q, qb), (k, kb), (v, vb) = _linear(a.q_proj), _linear(a.k_proj), _linear(a.v_proj)
        bias = None if qb is None else np.concatenate([qb, kb, vb])
        return np.concatenate([q, k, v], axis=1), bias  # (C, (H + 2 KV) D): queries, keys, values

    def up_gate(m):
        if hasattr(m, "gate_up_proj"):  # Phi-3: one projection, the gate's half first
            w, b = _linear(m.gate_up_proj)
            f = w.shape[1] // 2
            return (w[:, f:].copy(), None if b is None else b[f:]), (w[:, :f].copy(), None if b is None else b[:f])
        return _linear(m.up_proj), _linear(m.gate_proj)

    # Granite multiplies the embedding, each block's output (before the residual) and the scores by constants
    # and divides the logits by one: folded into the arrays those products come from
    residual = np.float32(getattr(config, "residual_multiplier", 1.0))

    def scaled(wb, factor):
        return wb if factor == 1 else (wb[0] * factor, None if wb[1] is None else wb[1] * factor)

    def layer(b):
        a, (up, gate) = b.self_attn, up_gate(b.mlp)
        q_norm, k_norm = getattr(a, "q_norm", None), getattr(a, "k_norm", None)  # Qwen3's, per head
        return DecoderLayer(ln1=rms(b.input_layernorm), qkv=qkv(a), proj=scaled(_linear(a.o_proj), residual),
                            ln2=rms(b.post_attention_layernorm), fc=up,
                            fc_out=scaled(_linear(b.mlp.down_proj), residual), gate=gate,
                            q_norm=None if q_norm is None else _arr(q_norm.weight),
                            k_norm=None if k_norm is None else _arr(k_norm.weight),
                            rotary=bool(getattr(a, "use_rope", True)))  # SmolLM3: no positions in every 4th

    layers = tuple(layer(b) for b in model.model.layers)
    embedding = _arr(model.model.embed_tokens.weight) * np.float32(getattr(config, "embedding_multiplier", 1.0))
    scale = getattr(config, "attention_multiplier", None)
    return DecoderWeights(n_head=heads, context=n, token_embedding=embedding, position_embedding=None,
                          layers=layers, ln_f=rms(model.model.norm),
                          head=scaled(_linear(model.lm_head), 1 / np.float32(getattr(config, "logits_scaling", 1.0))),
                          layer_norm_eps=config.rms_norm_eps, n_kv_head=kv_heads, norm="rms", activation="swiglu",
                          rotary_inv_freq=inv_freq, rotary_scale=float(getattr(rotary, "attention_scaling", 1.0)),
                          head_dim=head_dim, attn_scale=None if scale is None else float(scale))


def _gemma(model, config, context: int | None) -> DecoderWeights | None:
    """Gemma 1, 2 and 3 (text): the Llama family's layout plus GeGLU, RMSNorm weights stored as ``w - 1``, the
    embedding scaled by sqrt(width), and from Gemma 2 on norms around each block's output (``post_*``), local
    layers with a sliding window, scores scaled by ``query_pre_attn_scalar``; Gemma 2's softcaps; Gemma 3's
    per-head query and key norms and its local layers' own rotary base."""
    act = getattr(config, "hidden_activation", None) or config.hidden_act
    if act != "gelu_pytorch_tanh" or getattr(config, "use_bidirectional_attention", False):
        return None
    rotary, heads = model.model.rotary_emb, config.num_attention_heads
    kv_heads, head_dim = config.num_key_value_heads, config.head_dim
    types = list(getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers)

    def angles(kind: str) -> tuple[np.ndarray, float] | None:  # Gemma 3 keeps a rotary per layer type
        prefix = f"{kind}_" if hasattr(rotary, f"{kind}_inv_freq") else ""
        rope_type = rotary.rope_type[kind] if isinstance(rotary.rope_type, dict) else rotary.rope_type
        if rope_type in ("dynamic", "longrope"):
            return None
        return _arr(getattr(rotary, f"{prefix}inv_freq")), float(getattr(rotary, f"{prefix}attention_scaling"))

    ropes = {kind: angles(kind) for kind in set(types)}
    if None in ropes.values() or any(len(a) * 2 != head_dim for a, _ in ropes.values()):
        return None
    model_rope = ropes.get("full_attention") or next(iter(ropes.values()))

    def rms(m):  # Gemma's RMSNorm multiplies by 1 + weight
        return _arr(m.weight) + np.float32(1.0)

    def layer(b, kind: str):
        a, m = b.self_attn, b.mlp
        (q, qb), (k, kb), (v, vb) = _linear(a.q_proj), _linear(a.k_proj), _linear(a.v_proj)
        qkv = np.concatenate([q, k, v], axis=1), None if qb is None else np.concatenate([qb, kb, vb])
        sandwich = hasattr(b, "pre_feedforward_layernorm")  # Gemma 2 and 3
        own = ropes[kind] if ropes[kind] is not model_rope else (None, None)
        return DecoderLayer(
            ln1=(rms(b.input_layernorm), None), qkv=qkv, proj=_linear(a.o_proj),
            ln2=(rms(b.pre_feedforward_layernorm if sandwich else b.post_attention_layernorm), None),
            fc=_linear(m.up_proj), fc_out=_linear(m.down_proj), gate=_linear(m.gate_proj),
            q_norm=rms(a.q_norm) if hasattr(a, "q_norm") else None,
            k_norm=rms(a.k_norm) if hasattr(a, "k_norm") else None,
            post_attn_norm=rms(b.post_attention_layernorm) if sandwich else None,
            post_mlp_norm=rms(b.post_feedforward_layernorm) if sandwich else None,
            window=config.sliding_window if kind == "sliding_attention" else None,
            rotary_inv_freq=own[0], rotary_scale=own[1])

    embed = model.model.embed_tokens
    scale = getattr(config, "query_pre_attn_scalar", None)
    return DecoderWeights(
        n_head=heads, context=_context(context, config.max_position_embeddings),
        token_embedding=_arr(embed.weight) * np.float32(embed.embed_scale.item()), position_embedding=None,
        layers=tuple(layer(b, kind) for b, kind in zip(model.model.layers, types, strict=True)),
        ln_f=(rms(model.model.norm), None), head=_linear(model.lm_head), layer_norm_eps=config.rms_norm_eps,
        n_kv_head=kv_heads, norm="rms", activation="geglu_tanh", rotary_inv_freq=model_rope[0],
        rotary_scale=model_rope[1], head_dim=head_dim, attn_scale=None if scale is None else float(scale) ** -0.5,
        attn_softcap=float(getattr(config, "attn_logit_softcapping", None) or 0.0),
        logit_softcap=float(getattr(config, "final_logit_softcapping", None) or 0.0))
