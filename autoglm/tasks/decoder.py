"""A causal decoder as plain arrays (:class:`DecoderWeights`, one :class:`DecoderLayer` per block): what a task
offers compress to build KV-cache decode graphs, whatever framework it trained in."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from autoglm.errors import ConfigError


GATED = ("swiglu", "geglu_tanh")
"""Activations of a gated MLP: ``fc_out(act(x @ gate) * (x @ fc))``."""


@dataclass(frozen=True)
class DecoderLayer:
    """One pre-norm transformer block as plain arrays; matrices are (in, out): ``y = x @ w + b``.

    ``qkv`` packs queries, keys and values along its output axis: the query heads, then the key heads,
    then the value heads (fewer key/value heads than query heads with grouped-query attention). Biases
    are None where the model has none. ``gate`` is SwiGLU's gate projection (``fc`` is then its up
    projection: ``fc_out(silu(x @ gate) * (x @ fc))``); None for a plain GELU MLP. ``q_norm`` and
    ``k_norm`` (head_size,) are the weights of an RMSNorm applied to each query and key head before the
    rotary embedding (Qwen3); None where the model has none. ``rotary`` False: this layer's attention takes
    no positions although the model's others do (SmolLM3's NoPE layers).

    Gemma's blocks add: ``post_attn_norm`` and ``post_mlp_norm``, RMSNorm weights applied to the attention's
    and the MLP's output before each joins the residual (``ln2`` is then the norm before the MLP); a sliding
    ``window`` (the query attends to the last ``window`` positions, itself included; None: all); and a layer's
    own rotary angles and scale (``rotary_inv_freq``, ``rotary_scale``; None: the model's).
    """

    ln1: tuple[np.ndarray, np.ndarray | None]
    qkv: tuple[np.ndarray, np.ndarray | None]
    proj: tuple[np.ndarray, np.ndarray | None]
    ln2: tuple[np.ndarray, np.ndarray | None]
    fc: tuple[np.ndarray, np.ndarray | None]
    fc_out: tuple[np.ndarray, np.ndarray | None]
    gate: tuple[np.ndarray, np.ndarray | None] | None = None
    q_norm: np.ndarray | None = None
    k_norm: np.ndarray | None = None
    rotary: bool = True
    post_attn_norm: np.ndarray | None = None
    post_mlp_norm: np.ndarray | None = None
    window: int | None = None
    rotary_inv_freq: np.ndarray | None = None
    rotary_scale: float | None = None


@dataclass(frozen=True)
class DecoderWeights:
    """A causal decoder as numpy arrays: what compress needs to build KV-cache decode graphs.

    Two families fit: GPT-style (learned ``position_embedding``, LayerNorm, GELU MLP) and Llama-style
    (``position_embedding`` None and rotary positions from ``rotary_inv_freq``, RMSNorm, SwiGLU MLP,
    ``n_kv_head`` < ``n_head`` for grouped-query attention). A task offers it through
    :meth:`Task.decoder_weights`. ``context`` is the number of positions the graphs and their KV cache
    hold; ``layer_norm_eps`` is the epsilon of every norm (LayerNorm or RMSNorm). ``attn_scale`` multiplies
    the query-key products (None: 1/sqrt(head_size)); ``attn_softcap`` and ``logit_softcap`` (0: none) bound
    attention scores and the output logits by ``cap * tanh(x / cap)`` (Gemma 2's).
    """

    n_head: int
    context: int
    token_embedding: np.ndarray  # (V, C)
    position_embedding: np.ndarray | None  # (context, C); None: rotary positions
    layers: tuple[DecoderLayer, ...]
    ln_f: tuple[np.ndarray, np.ndarray | None]
    head: tuple[np.ndarray, np.ndarray | None]  # (C, V)
    layer_norm_eps: float = 1e-5
    n_kv_head: int | None = None  # None: n_head (multi-head attention)
    norm: Literal["layer", "rms"] = "layer"
    # gelu: exact (erf); gelu_tanh: GPT-2's; swiglu: silu(x @ gate) * (x @ fc); geglu_tanh: gelu_tanh's (Gemma's)
    activation: Literal["gelu", "gelu_tanh", "swiglu", "geglu_tanh"] = "gelu"
    rotary_inv_freq: np.ndarray | None = None  # (head_size / 2,): rotate-half rotary angles per position
    rotary_scale: float = 1.0  # multiplies cos and sin (the rope type's attention scaling)
    head_dim: int | None = None  # None: C // n_head
    attn_scale: float | None = None
    attn_softcap: float = 0.0
    logit_softcap: float = 0.0

    def __post_init__(self):
        if (self.position_embedding is None) == (self.rotary_inv_freq is None):
            raise ConfigError("a decoder needs exactly one of position_embedding and rotary_inv_freq")
        if (self.activation in GATED) != all(layer.gate is not None for layer in self.layers):
            raise ConfigError(f"activations {', '.join(GATED)} need a gate projection in every layer, and only they")
        if any((layer.q_norm is None) != (layer.k_norm is None) for layer in self.layers):
            raise ConfigError("per-head query and key norms come together: a layer has one without the other")
        if self.n_head % self.kv_heads:
            raise ConfigError(f"{self.n_head} attention heads cannot share {self.kv_heads} key/value heads")

    @property
    def head_size(self) -> int:
        return self.head_dim or self.token_embedding.shape[1] // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def rotary_dims(self) -> list[int]:
        """Per layer, the channels of each head that rotary positions turn (the first ones); 0: none."""
        if self.rotary_inv_freq is None:
            return [0] * len(self.layers)
        return [2 * len(self.rotary_inv_freq if layer.rotary_inv_freq is None else layer.rotary_inv_freq)
                if layer.rotary else 0 for layer in self.layers]
