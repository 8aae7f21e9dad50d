"""The int8 KV cache: calibrated scales, graphs whose cache is int8, the engine holding it, and the gate."""

import json

import numpy as np
import pytest

from compress import decode, kv_cache
from compress.decode_engine import DecodeEngine
from tests.compress._trained import charlm


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """FP32 graphs of the trained charlm, the same with an int8 cache, and the scales."""
    task, model = charlm()
    out = tmp_path_factory.mktemp("kv")
    fp32 = decode.write_graphs(task.decoder_weights(model), out / "fp32")
    scales = kv_cache.calibrate(fp32[0], decode._calibration_batches(task, model.model_args), rotary_dims=0)
    return fp32, kv_cache.write_int8_cache_graphs(fp32, out / "fp32-kv8", scales), scales


def test_scales_are_each_channels_largest_magnitude_over_127(pairs):
    task, model = charlm()
    fp32, _, scales = pairs
    weights = task.decoder_weights(model)
    assert scales.shape == (len(weights.layers), 2, weights.kv_heads, weights.head_size)
    # the first layer's keys of one calibration batch, by hand: no channel of them may exceed 127 steps
    ids = decode._calibration_batches(task, model.model_args)[0]
    e = DecodeEngine(str(fp32[0]), str(fp32[1]), max_sequences=len(ids), threads=1)
    e.start_many([row.tolist() for row in ids])
    keys = e.keys[0][:len(ids), :, :ids.shape[1]]
    assert (np.abs(keys).max(axis=(0, 2)) <= scales[0, 0] * 127 * (1 + 1e-6)).all()
    assert (scales > 0).all()


def test_rotary_keys_share_a_scale_across_each_rotated_pair(tmp_path):
    transformers = pytest.importorskip("transformers")
    from autoglm.tasks import hf_decoder
    from tests.compress.test_decode_hf import MODELS, tiny

    weights = hf_decoder.decoder_weights(tiny("llama"), context=32)
    paths = decode.write_graphs(weights, tmp_path / "full")
    ids = np.random.default_rng(0).integers(0, 256, (4, 32))
    scales = kv_cache.calibrate(paths[0], [ids], rotary_dims=weights.rotary_dims)
    half = scales.shape[-1] // 2
    assert weights.rotary_dims == [2 * half] * 2  # each layer's
    np.testing.assert_array_equal(scales[:, 0, :, :half], scales[:, 0, :, half:])  # keys: by pairs
    assert not np.array_equal(scales[:, 1, :, :half], scales[:, 1, :, half:])  # values: by channel
    # a partial rotary (Phi-4-mini's) turns the first 16 channels of 32: pairs (i, i + 8) there, the rest alone
    weights = hf_decoder.decoder_weights(MODELS["phi3-partial-rope"](), context=32)
    paths = decode.write_graphs(weights, tmp_path / "partial")
    scales = kv_cache.calibrate(paths[0], [ids], rotary_dims=weights.rotary_dims)
    assert weights.rotary_dims == [16, 16] and scales.shape[-1] == 32
    np.testing.assert_array_equal(scales[:, 0, :, :8], scales[:, 0, :, 8:16])
    assert not np.array_equal(scales[:, 0, :, 16:24], scales[:, 0, :, 24:])
    e = DecodeEngine(str(paths[0]), str(paths[1]), max_sequences=4, threads=1)
    e.start_many([row.tolist() for row in ids])  # every cached key within its channel's int8 range
    for layer, keys in enumerate(e.keys):
        assert (np.abs(keys[:4, :, :32]).max(axis=(0, 2)) <= scales[layer, 0] * 127 * (1 + 1e-6)).all()
    assert transformers


def test_an_int8_cache_holds_a_quarter_of_the_bytes_and_decodes_alike(pairs):
    task, model = charlm()
    fp32, kv8, _ = pairs
    a = DecodeEngine(str(fp32[0]), str(fp32[1]), max_sequences=3, threads=1)
    b = DecodeEngine(str(kv8[0]), str(kv8[1]), max_sequences=3, threads=1)
    assert b.cache_dtype == np.int8 and b.keys[0].nbytes * 4 == a.keys[0].nbytes
    prompts = decode.prompts(task, model.model_args, 3, 8)
    la = np.stack([logits for _, logits in a.start_many(prompts)])
    lb = np.stack([logits for _, logits in b.start_many(prompts)])
    for _ in range(16):  # batched steps reading the quantized cache
        tokens = la.argmax(-1)
        la, lb = a.step(tokens), b.step(tokens)
    assert np.abs(la - lb).max() < 0.05 * np.abs(la).max()  # close, not equal: int8 rounding
    assert (la.argmax(-1) == lb.argmax(-1)).mean() >= 2 / 3
    assert not np.array_equal(la, lb)


def test_the_loss_is_read_through_the_cache(pairs):
    task, model = charlm()
    fp32, kv8, scales = pairs
    base = decode.graph_val_loss(fp32[0], task, model.model_args, 2)
    assert abs(decode.graph_val_loss(kv8[0], task, model.model_args, 2) - base) / base < 0.01
    # scales a fiftieth of the calibrated ones saturate most cached values: a scoring that read only the chunk's own
    # floating-point keys and values would not see it
    crushed = kv_cache.write_int8_cache_graphs(fp32, kv8[0].parent.parent / "crushed", scales / 50)
    assert decode.graph_val_loss(crushed[0], task, model.model_args, 2) > base * 1.05


def test_an_int8_cache_the_gate_rejects_leaves_its_weights_with_an_fp32_cache(tmp_path, monkeypatch):
    task, model = charlm()
    real = kv_cache.calibrate
    monkeypatch.setattr(kv_cache, "calibrate", lambda *a, **k: real(*a, **k) / 50)  # saturating scales
    built = decode.build_decode_graphs(task, model, model.model_args, tmp_path, eval_batches=2, precisions=("int8",))
    rows = {c["precision"]: c for c in json.loads((tmp_path / "decode.json").read_text())["candidates"]}
    assert rows["int8-kv8"]["status"] == "rejected" and rows["int8"]["status"] == "ok"
    assert "tokens_per_s" in rows["int8"] and "tokens_per_s" not in rows["int8-kv8"]
    assert built.precision in ("fp32", "int8")


def test_an_unknown_cache_type_is_refused(tmp_path):
    task, model = charlm()
    with pytest.raises(ValueError, match="use one of"):
        decode.build_decode_graphs(task, model, model.model_args, tmp_path, kv_cache="fp16")
