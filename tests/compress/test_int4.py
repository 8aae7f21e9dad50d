"""INT4 weight-only quantization (MatMulNBits): the graph it writes, its error, the int4 variant through the
registry and its loss gate, and the int4 decode-graph candidate."""

import json

import numpy as np
import onnx
import pytest
import torch

from autoglm.errors import ConfigError
from autoglm.config import load_settings
from compress import VariantBuilder, check_settings, decode, variant_for, variant_settings
from compress.int4 import Int4Recipe, quantizable_matmuls, quantize_int4, weight_bytes
from compress.variants import relative_loss
from tests.compress._trained import charlm


@pytest.fixture(scope="module")
def decode_fp32(tmp_path_factory):
    task, model = charlm()
    return decode.write_graphs(task.decoder_weights(model), tmp_path_factory.mktemp("int4") / "fp32")


def ops(path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def prefill_logits(path, ids: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    from compress.decode_engine import session_options

    # the decode graphs' own options: ORT's default SkipLayerNormFusion crashes on them
    session = ort.InferenceSession(str(path), session_options(1), providers=["CPUExecutionProvider"])
    b, t = ids.shape
    past = [i for i in session.get_inputs() if i.name.startswith("past_")]
    feed = {"input_ids": ids, "position_ids": np.tile(np.arange(t), (b, 1)), "seqlens_k": np.full(b, t - 1, np.int32),
            "total_sequence_length": np.asarray(t, np.int32), "query_seqlens": np.full(b, t, np.int32),
            "last_only": np.asarray(False)}
    feed |= {i.name: np.zeros((b, i.shape[1], t, i.shape[3]), np.float32) for i in past}
    return session.run(["logits"], feed)[0]


@pytest.mark.parametrize("recipe", [Int4Recipe(), Int4Recipe(128, symmetric=True, accuracy_level=0)])
def test_every_matmul_weight_becomes_int4_and_the_logits_stay_close(decode_fp32, tmp_path, recipe):
    task, model = charlm()
    n_weights = len(quantizable_matmuls(onnx.load(str(decode_fp32[0]))))
    ids = next(task.batches("val", 4, 1, seed=0, model_args=model.model_args))[0]["idx"].astype(np.int64)

    q = quantize_int4(decode_fp32[0], tmp_path / "prefill.onnx", recipe)  # block 128 > K = 64: padded

    assert ops(q).count("MatMulNBits") == n_weights == 2 * 4 + 1  # qkv, proj, fc, fc_out per layer; the head
    assert not quantizable_matmuls(onnx.load(str(q)))  # no FP32 MatMul weight left
    assert weight_bytes(q) < weight_bytes(decode_fp32[0]) / 2
    want, got = prefill_logits(decode_fp32[0], ids), prefill_logits(q, ids)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.05  # measured 0.023, 0.025


def test_a_rows_logits_do_not_depend_on_the_rows_beside_it(decode_fp32, tmp_path):
    task, model = charlm()
    ids = next(task.batches("val", 3, 1, seed=0, model_args=model.model_args))[0]["idx"].astype(np.int64)
    q = quantize_int4(decode_fp32[0], tmp_path / "prefill.onnx")  # accuracy_level 4: activations per row

    together = prefill_logits(q, ids)

    for row in range(3):  # dynamic INT8's activation scale is the batch's; INT4's is each row's own
        np.testing.assert_allclose(prefill_logits(q, ids[row:row + 1])[0], together[row], rtol=0, atol=1e-5)


def test_a_graph_without_matmul_weights_and_an_impossible_block_are_refused(decode_fp32, tmp_path):
    once = quantize_int4(decode_fp32[1], tmp_path / "step.onnx")

    with pytest.raises(ConfigError, match="has no MatMul with a constant weight: INT4 would change nothing"):
        quantize_int4(once, tmp_path / "twice.onnx")
    assert not (tmp_path / "twice.onnx").exists()
    with pytest.raises(ConfigError, match="block_size=48: MatMulNBits takes a power of two >= 16"):
        Int4Recipe(block_size=48)
    head_only = quantize_int4(decode_fp32[1], tmp_path / "head.onnx", Int4Recipe(keep_head=True))
    assert ops(head_only).count("MatMulNBits") == 8 and len(quantizable_matmuls(onnx.load(str(head_only)))) == 1


def test_the_int4_variant_builds_through_the_registry_and_is_gated_on_the_metric(settings_in, tmp_path):
    task, model = charlm()
    settings = settings_in("compress.exporter='legacy'", "compress.max_metric_loss=0", "train.eval_batches=2")
    builder = VariantBuilder(task, model, model.model_args, settings, tmp_path / "out")
    baseline = task.evaluate(lambda x: model(torch.from_numpy(x["idx"])).detach().numpy(), "val", n_batches=2,
                             model_args=model.model_args)[task.metric]

    variant = builder.build("int4")
    strict = builder.score(variant, builder.predictor(variant, threads=1), baseline)

    assert variant_for({"quantize": {"mode": "int4"}, "prune": {"ratio": 0.0}}) == "int4"
    check_settings(load_settings(None, ["compress.variants=['int4', 'pruned-int4']",
                                        "compress.quantize.calibration_batches=0"]))  # it needs no calibration
    assert variant_settings("int4", settings.compress)["int4"] == {"block_size": 128, "symmetric": False,
                                                                   "accuracy_level": 4, "keep_head": False}
    assert variant.path == tmp_path / "out" / "int4.onnx" and "MatMulNBits" in ops(variant.path)
    assert variant.recipe == {"pass": "int4", "block_size": 128, "symmetric": False, "accuracy_level": 4,
                              "keep_head": False}
    assert 0 < strict.metric_loss < 0.01  # 4-bit weights cost a little loss, well within the default 1%
    assert strict.status == "rejected" and "limit compress.max_metric_loss=0" in strict.reason
    builder.cfg = builder.cfg.model_copy(update={"max_metric_loss": 0.01})
    loose = builder.score(type(variant)("int4", variant.path, variant.recipe), builder.predictor(variant, 1), baseline)
    assert loose.status == "ok" and loose.metric_loss == pytest.approx(relative_loss(task, loose.metrics[
        task.metric], baseline))


def test_the_decode_graphs_try_int4_and_report_it(tmp_path):
    task, model = charlm()

    built = decode.build_decode_graphs(task, model, model.model_args, tmp_path, eval_batches=2,
                                       precisions=("int4",), int4=Int4Recipe(64), kv_cache="fp32")

    report = json.loads((tmp_path / "decode.json").read_text())
    fp32, int4 = report["candidates"]
    assert (fp32["precision"], int4["precision"], int4["recipe"]["block_size"]) == ("fp32", "int4", 64)
    assert int4["status"] == "ok" and abs(int4["metric_loss"]) < 0.01
    assert int4["weight_bytes"] < fp32["weight_bytes"] / 2
    assert set(int4["tokens_per_s"]) == {"batch 1", "batch 2", "batch 4", "batch 8"}
    assert "MatMulNBits" in ops(tmp_path / "int4" / "step.onnx")
    assert built.precision in ("fp32", "int4") and report["precision"] == built.precision  # the faster one


def test_a_finer_block_is_half_the_block_down_to_32():
    assert Int4Recipe().block_size == 128
    assert [Int4Recipe(128).finer().block_size, Int4Recipe(64).finer().block_size] == [64, 32]
    assert Int4Recipe(32).finer() is None and Int4Recipe(16).finer() is None
    assert Int4Recipe(128, symmetric=True).finer() == Int4Recipe(64, symmetric=True)  # the rest kept


def graph_block(prefill_path) -> int:
    """The block size of the graph's MatMulNBits nodes (one recipe: all alike)."""
    sizes = {a.i for n in onnx.load(str(prefill_path)).graph.node if n.op_type == "MatMulNBits"
             for a in n.attribute if a.name == "block_size"}
    assert len(sizes) == 1
    return sizes.pop()


@pytest.mark.parametrize("cache", ["int8", "fp32"])
def test_the_decode_graphs_fall_back_to_finer_blocks_while_the_gate_rejects(tmp_path, monkeypatch, cache):
    task, model = charlm()
    score = decode.graph_val_loss
    # INT4 graphs coarser than 32 lose 5% (the gate allows 1%): 128 and 64 are rejected, 32 is served
    monkeypatch.setattr(decode, "graph_val_loss", lambda path, *a, **k: score(path, *a, **k) * (
        1.05 if "MatMulNBits" in ops(path) and graph_block(path) > 32 else 1.0))
    decode.build_decode_graphs(task, model, model.model_args, tmp_path, eval_batches=2, precisions=("int4",),
                               int4=Int4Recipe(128), kv_cache=cache)

    report = json.loads((tmp_path / "decode.json").read_text())
    rows = [c for c in report["candidates"] if c.get("weights") == "int4"]
    assert [r["precision"] for r in rows] == ["int4"] + (["int4-kv8"] if cache == "int8" else [])
    assert all(r["status"] == "ok" and r["recipe"]["block_size"] == 32 for r in rows)
    assert [b["block_size"] for b in rows[-1]["rejected_blocks"]] == [128, 64]
    assert all(b[rows[-1]["precision"]] > 0.04 for b in rows[-1]["rejected_blocks"])
    assert graph_block(tmp_path / rows[-1]["precision"] / "step.onnx") == 32  # the graphs left are the served ones


def test_the_decode_graphs_keep_the_first_block_the_gate_passes(tmp_path):
    task, model = charlm()
    decode.build_decode_graphs(task, model, model.model_args, tmp_path, eval_batches=2, precisions=("int4",),
                               int4=Int4Recipe(128))
    rows = [c for c in json.loads((tmp_path / "decode.json").read_text())["candidates"] if c.get("weights") == "int4"]
    assert all(r["recipe"]["block_size"] == 128 and "rejected_blocks" not in r for r in rows)
    assert graph_block(tmp_path / "int4-kv8" / "step.onnx") == 128
