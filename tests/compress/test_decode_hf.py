"""Decode graphs of Hugging Face causal LMs (GPT-2, Llama, Qwen2, Qwen3, Mistral, Phi-3, SmolLM3, Granite, Gemma):
the graphs' greedy tokens are transformers' own generate() tokens, prefill logits are the model's, and other
architectures get none."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from autoglm.errors import ConfigError
from autoglm.tasks import hf_decoder
from compress import decode
from compress.decode_engine import DecodeEngine

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

VOCAB = 256


def tiny(kind: str, seed: int = 0, **overrides):
    """A seeded random tiny causal LM. Weights drawn wider than transformers' 0.02 spread the logits, so
    greedy choices are not near-ties that float rounding could flip."""
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, initializer_range=0.1, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if kind == "gpt2":
        config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=64, **common | overrides)
        return transformers.GPT2LMHeadModel(config).eval()
    llama_like = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    if kind == "qwen2":  # q/k/v biases (zero at init: drawn, so they count)
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**llama_like | common | overrides)).eval()
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.1)
        return model
    if kind == "qwen3":  # per-head query and key norms (ones at init: drawn, so they count); head_dim is its own
        config = transformers.Qwen3Config(**llama_like | {"head_dim": 32} | common | overrides)
        model = transformers.Qwen3ForCausalLM(config).eval()
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_norm.weight.normal_(1, 0.3)
                layer.self_attn.k_norm.weight.normal_(1, 0.3)
        return model
    if kind == "phi3":  # fused q/k/v and gate/up projections
        return transformers.Phi3ForCausalLM(transformers.Phi3Config(**llama_like | common | overrides)).eval()
    if kind == "smollm3":  # a layer without positions (NoPE) beside a rotary one
        config = transformers.SmolLM3Config(**llama_like | {"no_rope_layers": [1, 0]} | common | overrides)
        return transformers.SmolLM3ForCausalLM(config).eval()
    if kind.startswith("gemma"):  # norm weights (zeros at init, used as 1 + w) drawn, so they count
        gemma = {"head_dim": 16, "hidden_activation": "gelu_pytorch_tanh"}
        if kind == "gemma":
            model = transformers.GemmaForCausalLM(transformers.GemmaConfig(**llama_like | gemma | common | overrides))
        else:  # a local layer (a sliding window of 8) and a global one; scores scaled by 1/sqrt(24)
            local = {"layer_types": ["sliding_attention", "full_attention"], "sliding_window": 8,
                     "query_pre_attn_scalar": 24}
            if kind == "gemma2":  # softcaps small enough to bind
                config = transformers.Gemma2Config(**llama_like | gemma | local | common | {
                    "attn_logit_softcapping": 3.0, "final_logit_softcapping": 5.0} | overrides)
                model = transformers.Gemma2ForCausalLM(config)
            else:  # Gemma 3: per-head query/key norms, the local layers' own rotary base
                config = transformers.Gemma3TextConfig(**llama_like | gemma | local | common | overrides)
                model = transformers.Gemma3ForCausalLM(config)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "norm" in name:
                    param.normal_(0, 0.3)
        return model.eval()
    if kind == "granite":  # multipliers of the embedding, the scores, each block's output, the logits
        config = transformers.GraniteConfig(**llama_like | common | {
            "embedding_multiplier": 3.0, "attention_multiplier": 0.2, "residual_multiplier": 0.5,
            "logits_scaling": 2.0} | overrides)
        return transformers.GraniteForCausalLM(config).eval()
    if kind == "mistral":
        return transformers.MistralForCausalLM(transformers.MistralConfig(**llama_like | common | overrides)).eval()
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**llama_like | common | overrides)).eval()


MODELS = {
    "gpt2": lambda: tiny("gpt2"),
    "llama": lambda: tiny("llama", tie_word_embeddings=False),
    "llama-tied": lambda: tiny("llama", seed=1, tie_word_embeddings=True),
    "llama-linear-rope": lambda: tiny("llama", seed=2, rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                                         "rope_theta": 10000.0}),
    "llama-yarn-rope": lambda: tiny("llama", seed=3, rope_parameters={  # cos and sin scaled too
        "rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32, "rope_theta": 10000.0}),
    "qwen2": lambda: tiny("qwen2"),
    "qwen3": lambda: tiny("qwen3"),
    "phi3": lambda: tiny("phi3"),
    "phi3-partial-rope": lambda: tiny("phi3", seed=5, hidden_size=128, rope_parameters={  # Phi-4-mini's: part of
        "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}),  # each head turns
    "phi3-longrope": lambda: tiny("phi3", seed=4, max_position_embeddings=128, original_max_position_embeddings=64,
                                  rope_parameters={  # Phi-3.5's rope; cos and sin scaled too
        "rope_type": "longrope", "original_max_position_embeddings": 64, "rope_theta": 10000.0,
        "short_factor": [1.0 + 0.1 * j for j in range(8)], "long_factor": [4.0 + j for j in range(8)]}),
    "mistral": lambda: tiny("mistral", sliding_window=None),
    "smollm3": lambda: tiny("smollm3"),
    "granite": lambda: tiny("granite"),
    "gemma": lambda: tiny("gemma", tie_word_embeddings=False),  # tied, its scaled embedding echoes the input
    "gemma2": lambda: tiny("gemma2", seed=1),
    "gemma3": lambda: tiny("gemma3"),
}


def graphs_of(model, out, **kw):
    return decode.write_graphs(hf_decoder.decoder_weights(model, **kw), out)


def engine(paths, slots=4) -> DecodeEngine:
    return DecodeEngine(str(paths[0]), str(paths[1]), max_sequences=slots, threads=1)


def greedy_together(e: DecodeEngine, prompts: list[list[int]], n_new: int) -> list[list[int]]:
    """Every prompt decoded greedily in one batch: one padded prefill, then batched steps."""
    started = e.start_many(prompts)
    out = {seq: [int(logits.argmax())] for seq, logits in started}
    for _ in range(n_new - 1):
        live = list(e.live)
        for seq, row in zip(live, e.step([out[seq][-1] for seq in live])):
            out[seq].append(int(row.argmax()))
    return [out[seq] for seq, _ in started]


@pytest.mark.parametrize("name", list(MODELS))
def test_greedy_tokens_equal_transformers_generate(name, tmp_path):
    model = MODELS[name]()
    e = engine(graphs_of(model, tmp_path))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, VOCAB, n).tolist() for n in (3, 17, 8, 1)]
    got = greedy_together(e, prompts, 32)
    for prompt, tokens in zip(prompts, got):
        want = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=32)[0, len(prompt):]
        assert tokens == want.tolist()
    assert len({t for tokens in got for t in tokens}) > 8  # real continuations, not one repeated token


@pytest.mark.parametrize("name", ["gpt2", "llama", "qwen2", "qwen3", "phi3", "smollm3", "granite", "gemma",
                                  "gemma2", "gemma3"])
def test_prefill_logits_equal_the_model_at_every_position_of_a_padded_batch(name, tmp_path):
    model = MODELS[name]()
    e = engine(graphs_of(model, tmp_path))
    rng = np.random.default_rng(1)
    rows = [rng.integers(0, VOCAB, n).tolist() for n in (5, 20, 12)]
    ids = np.zeros((3, 20), np.int64)
    for j, row in enumerate(rows):
        ids[j, :len(row)] = row
    lengths = np.array([len(r) for r in rows])
    feed = {"input_ids": ids, "position_ids": np.tile(np.arange(20), (3, 1)),
            "seqlens_k": (lengths - 1).astype(np.int32), "total_sequence_length": np.asarray(20, np.int32),
            "query_seqlens": lengths.astype(np.int32), "last_only": np.asarray(False)}
    empty = np.zeros((3, e.n_head, 20, e.head_size), np.float32)
    feed |= {f"past_{k}_{i}": empty for i in range(e.n_layer) for k in ("key", "value")}
    logits = e.prefill.run(["logits"], feed)[0]
    last = e.prefill.run(["logits"], feed | {"last_only": np.asarray(True)})[0]  # what the engine asks for
    assert logits.shape == (3, 20, e.vocab_size) and last.shape == (3, 1, e.vocab_size)
    for j, row in enumerate(rows):
        want = model(torch.tensor([row])).logits[0].detach().numpy()
        np.testing.assert_allclose(logits[j, :len(row)], want, atol=1e-4)
        np.testing.assert_array_equal(last[j, 0], logits[j, len(row) - 1])


def test_rotary_generation_past_the_context_slides_like_a_fresh_prefill(tmp_path):
    model = MODELS["llama"]()
    paths = graphs_of(model, tmp_path, context=16)
    e = engine(paths, slots=1)
    prompt = np.random.default_rng(2).integers(0, VOCAB, 15).tolist()
    assert len(e.generate(prompt, 40)) == 40  # slides several times
    seq, _ = e.start(prompt)
    e.step([prompt[-1]])  # 16 tokens: the cache is full
    logits = e.step([7])[0]  # re-encoded from the last 8, at positions 0..7
    _, expected = engine(paths, slots=1).start((prompt + [prompt[-1], 7])[-8:])
    np.testing.assert_allclose(logits, expected, atol=1e-5)
    assert seq.length == 8


def test_decoder_weights_describe_each_family():
    gpt2 = hf_decoder.decoder_weights(MODELS["gpt2"]())
    assert (gpt2.norm, gpt2.activation, gpt2.kv_heads, gpt2.context) == ("layer", "gelu_tanh", 4, 64)
    assert gpt2.position_embedding.shape == (64, 64) and gpt2.layers[0].qkv[0].shape == (64, 192)
    tied = MODELS["llama-tied"]()
    w = hf_decoder.decoder_weights(tied, context=32)
    assert (w.norm, w.activation, w.n_head, w.kv_heads, w.context) == ("rms", "swiglu", 4, 2, 32)
    assert w.layers[0].qkv[0].shape == (64, (4 + 2 * 2) * 16) and w.layers[0].qkv[1] is None
    np.testing.assert_array_equal(w.head[0], w.token_embedding.T)
    assert hf_decoder.decoder_weights(tiny("qwen2")).layers[0].qkv[1].shape == ((4 + 2 * 2) * 16,)
    long = tiny("llama", max_position_embeddings=32768)
    assert hf_decoder.decoder_weights(long).context == hf_decoder.MAX_CONTEXT  # the KV cache stays bounded
    with pytest.raises(ConfigError, match="use 1..64"):  # GPT-2 has no position past its learned ones
        hf_decoder.decoder_weights(MODELS["gpt2"](), context=65)
    windowed = tiny("mistral", sliding_window=24)  # full attention within the window: the cache stops there
    assert hf_decoder.decoder_weights(windowed).context == 24
    assert hf_decoder.decoder_weights(MODELS["llama-yarn-rope"]()).rotary_scale > 1
    qwen3 = hf_decoder.decoder_weights(MODELS["qwen3"]())  # head_dim 32 with 4 heads of a 64-wide model
    assert qwen3.head_size == 32 and qwen3.layers[0].qkv[0].shape == (64, (4 + 2 * 2) * 32)
    assert qwen3.layers[0].q_norm.shape == qwen3.layers[0].k_norm.shape == (32,)
    phi3 = MODELS["phi3"]()
    w = hf_decoder.decoder_weights(phi3)
    gate_up = phi3.model.layers[0].mlp.gate_up_proj.weight.detach().numpy()
    np.testing.assert_array_equal(w.layers[0].gate[0], gate_up[:128].T)  # the gate is the first half
    np.testing.assert_array_equal(w.layers[0].fc[0], gate_up[128:].T)
    assert w.layers[0].qkv[0].shape == (64, (4 + 2 * 2) * 16) and w.layers[0].q_norm is None
    gemma3 = MODELS["gemma3"]()
    w = hf_decoder.decoder_weights(gemma3)
    local, full = w.layers
    embed = gemma3.model.embed_tokens.weight.detach().numpy()
    np.testing.assert_array_equal(w.token_embedding, embed * np.float32(8.0))  # scaled by sqrt(64)
    np.testing.assert_array_equal(w.head[0], embed.T)  # the tied head reads it unscaled
    np.testing.assert_array_equal(full.ln1[0], 1 + gemma3.model.layers[1].input_layernorm.weight.detach().numpy())
    assert (w.activation, local.window, full.window, w.attn_scale) == ("geglu_tanh", 8, None, 24 ** -0.5)
    assert local.post_attn_norm.shape == full.post_mlp_norm.shape == (64,) and full.q_norm.shape == (16,)
    assert local.rotary_inv_freq[1] > w.rotary_inv_freq[1] and full.rotary_inv_freq is None  # base 1e4 vs 1e6
    gemma2 = hf_decoder.decoder_weights(MODELS["gemma2"]())
    assert (gemma2.attn_softcap, gemma2.logit_softcap, gemma2.layers[0].q_norm) == (3.0, 5.0, None)
    granite = MODELS["granite"]()
    w = hf_decoder.decoder_weights(granite)
    np.testing.assert_array_equal(w.head[0], granite.lm_head.weight.detach().numpy().T / np.float32(2.0))
    assert w.attn_scale == 0.2  # the multipliers folded into the arrays their products come from
    nope = hf_decoder.decoder_weights(MODELS["smollm3"]())
    assert [layer.rotary for layer in nope.layers] == [True, False] and nope.rotary_dims == [16, 0]
    partial = hf_decoder.decoder_weights(MODELS["phi3-partial-rope"]())
    assert partial.head_size == 32 and partial.rotary_inv_freq.shape == (8,)  # the first 16 dims of 32 turn
    odd = tiny("phi3", hidden_size=192, rope_parameters={"rope_type": "default", "partial_rotary_factor": 0.75})
    assert hf_decoder.decoder_weights(odd) is None  # 18 angles: GroupQueryAttention takes multiples of 8
    assert "this 'phi3' model's configuration has no KV-cache decode graphs" in hf_decoder.unsupported_message("phi3")
    longrope = MODELS["phi3-longrope"]()
    longrope(torch.zeros((1, 100), dtype=torch.long))  # past the original 64: transformers swaps in the long factors
    w = hf_decoder.decoder_weights(longrope)
    assert w.context == 64 and w.rotary_scale > 1  # the short factors hold up to the original context only
    np.testing.assert_array_equal(w.rotary_inv_freq, longrope.model.rotary_emb.original_inv_freq.numpy())
    assert not np.allclose(w.rotary_inv_freq, longrope.model.rotary_emb.inv_freq.numpy())
    with pytest.raises(ConfigError, match="use 1..64"):
        hf_decoder.decoder_weights(longrope, context=65)
    supported = ("gpt2", "llama", "qwen2", "qwen3", "mistral", "phi3", "smollm3", "granite", "gemma", "gemma2",
                 "gemma3_text")
    assert {hf_decoder.FAMILIES[t] for t in supported} == {"gpt2", "llama", "gemma"}


def test_other_architectures_get_no_decoder_and_a_one_line_reason():
    config = transformers.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, intermediate_size=128)
    neox = transformers.GPTNeoXForCausalLM(config)
    assert hf_decoder.decoder_weights(neox) is None
    bert = transformers.BertForMaskedLM(transformers.BertConfig(vocab_size=VOCAB, hidden_size=32,
                                                                num_hidden_layers=1, num_attention_heads=2,
                                                                intermediate_size=64))
    assert hf_decoder.decoder_weights(bert) is None
    message = hf_decoder.unsupported_message("gpt_neox")
    assert "\n" not in message and "'gpt_neox'" in message
    assert all(name in message for name in ("gpt2", "llama", "qwen2", "mistral")) and "v2" in message


class Wrapper(torch.nn.Module):
    """What an hf-causal-lm task builds: forward(input_ids) -> logits, the transformers model at ``.hf``."""

    def __init__(self, hf):
        super().__init__()
        self.hf = hf

    def forward(self, input_ids):
        return self.hf(input_ids).logits


@pytest.mark.parametrize("name", ["llama", "qwen3", "phi3", "smollm3", "gemma2", "gemma3"])
def test_the_gates_and_the_build_take_a_wrapped_transformers_model(name, tmp_path):
    model = Wrapper(MODELS[name]())
    paths = graphs_of(model.hf, tmp_path, context=32)
    rows = np.random.default_rng(3).integers(0, VOCAB, (4, 32))

    def batches(split, batch_size, n_batches, seed=0, model_args=None):  # a causal LM's: input_ids, targets
        yield {"input_ids": rows[:batch_size, :-1]}, rows[:batch_size, 1:]

    def evaluate(predict, split, n_batches, batch_size, model_args):
        (inputs, targets), = batches(split, batch_size, n_batches)
        logits = predict(inputs).astype(np.float64)
        top = logits.max(-1, keepdims=True)
        logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
        return {"val_loss": float(-np.take_along_axis(logp, targets[..., None], -1).mean())}

    spec = SimpleNamespace(inputs=(SimpleNamespace(name="input_ids"),))
    task = SimpleNamespace(batches=batches, io_spec=lambda args: spec, evaluate=evaluate, metric="val_loss",
                           direction="minimize", decoder_weights=lambda m: hf_decoder.decoder_weights(m.hf, context=32))
    report = decode.check_greedy_parity(model, engine(paths), task, {}, n_prompts=3)
    assert report["passed"] and [r["new_tokens"] for r in report["prompts"]] == [24] * 3, report
    with torch.no_grad():
        want = evaluate(lambda x: model(torch.from_numpy(x["input_ids"])).numpy(), "val", 1, 4, {})["val_loss"]
    assert abs(decode.graph_val_loss(paths[0], task, {}, 1, batch_size=4) - want) < 1e-4
    built = decode.build_decode_graphs(task, model, {}, tmp_path / "built", eval_batches=1)
    assert built.parity["passed"] and {c["precision"] for c in built.candidates} == {
        "fp32", "int8", "int4", "int8-kv8", "int4-kv8"}  # rotary keys: calibrated by channel pairs


def test_llama_graphs_fuse_each_residual_add_with_the_next_rms_norm(tmp_path):
    onnx = pytest.importorskip("onnx")
    model = MODELS["llama"]()
    for path in graphs_of(model, tmp_path):
        ops = [n.op_type for n in onnx.load(str(path)).graph.node]
        n_layer = model.config.num_hidden_layers
        # the first layer's norm stands alone; each later add + norm (and the final norm's) is one node
        assert ops.count("SkipSimplifiedLayerNormalization") == 2 * n_layer
        assert ops.count("RMSNormalization") == 1 and "Add" not in ops
