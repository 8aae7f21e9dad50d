"""A second step graph for few live sequences: the measured choice, the engine running it at small batches only,
the mixed loss gate, and the served model carrying it."""

import json

import numpy as np
import pytest

from autoglm.config import load_settings
from compress import decode
from compress.decode_engine import SMALL_STEP_FILE, DecodeEngine
from compress.repository import write_generate_model
from compress import decode_speed
from compress.decode_speed import beats, served_choice, small_batch_choice
from tests.compress._trained import charlm
from tests.compress.test_triton_generate_model import load, run


def rows(*specs):
    return [{"precision": p, "kv_cache": cache, "status": status} for p, cache, status in specs]


def rounds(**by_name):
    """tokens/s per round at batches 1, 2, 4, 8 from one list of per-batch rates (the same in every round)."""
    return {name: {b: [rate] * 5 for b, rate in zip((1, 2, 4, 8), rates)} for name, rates in by_name.items()}


CANDIDATES = rows(("fp32", "fp32", "ok"), ("int8-kv8", "int8", "ok"), ("int4-kv8", "int8", "ok"))


def test_the_served_step_graph_is_the_fastest_at_the_largest_batch_where_a_small_step_may_serve_the_rest():
    speeds = {"fp32": {1: 50, 2: 90, 4: 150, 8: 200}, "int8-kv8": {1: 100, 2: 180, 4: 300, 8: 400},
              "int4-kv8": {1: 200, 2: 260, 4: 290, 8: 300}}
    assert served_choice(speeds, small_step=True) == "int8-kv8"  # 400 vs 300 at 8; int4 may take batch 1
    assert served_choice(speeds, small_step=False) == "int4-kv8"  # mean speed-up over 1 and 8: 2.75 vs 2.0
    tie = {"fp32": {1: 100, 8: 400}, "int8": {1: 100, 8: 400}}
    assert served_choice(tie, small_step=True) == served_choice(tie, small_step=False) == "fp32"


def test_a_candidate_faster_at_the_smallest_batches_serves_up_to_the_last_it_wins():
    measured = rounds(fp32=[50, 90, 150, 200], **{"int8-kv8": [100, 180, 300, 400], "int4-kv8": [150, 200, 290, 250]})
    assert small_batch_choice(measured, "int8-kv8", CANDIDATES) == ("int4-kv8", 2)


def test_wins_must_be_contiguous_from_batch_1():
    measured = rounds(**{"int8-kv8": [100, 180, 300, 400], "int4-kv8": [150, 170, 310, 250]})
    assert small_batch_choice(measured, "int8-kv8", CANDIDATES) == ("int4-kv8", 1)


def test_a_tie_or_a_win_in_too_few_rounds_engages_nothing():
    assert not beats([100.0] * 5, [100.0] * 5)
    assert not beats([130, 130, 90, 90, 90], [100] * 5)  # faster in 2 rounds of 5
    assert not beats([101, 102, 103, 1, 1], [100, 101, 102, 200, 200])  # most rounds, but not the median
    assert beats([101, 101, 101, 50, 50], [100, 100, 100, 100, 40])
    measured = rounds(**{"int8-kv8": [100, 180, 300, 400], "int4-kv8": [100, 180, 290, 250]})
    assert small_batch_choice(measured, "int8-kv8", CANDIDATES) is None


def test_only_gated_candidates_over_the_same_cache_are_eligible():
    measured = rounds(fp32=[300, 400, 500, 600], **{"int8-kv8": [100, 180, 300, 400], "int4-kv8": [150, 200, 350,
                                                                                                    450]})
    assert small_batch_choice(measured, "int8-kv8", CANDIDATES) == ("int4-kv8", 8)  # fp32 caches in fp32
    rejected = rows(("int8-kv8", "int8", "ok"), ("int4-kv8", "int8", "rejected"))
    assert small_batch_choice(measured, "int8-kv8", rejected) is None
    assert small_batch_choice(measured, "fp32", CANDIDATES) is None  # nothing beats it, and no other fp32 cache


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    task, model = charlm()
    out = tmp_path_factory.mktemp("small-step")
    fp32 = decode.write_graphs(task.decoder_weights(model), out / "fp32")
    return {"fp32": fp32, "int8": decode.quantize_graphs(fp32, out / "int8", "int8"),
            "int4": decode.quantize_graphs(fp32, out / "int4", "int4")}


def step_logits(e: DecodeEngine, prompts: list[list[int]], tokens: int = 3) -> np.ndarray:
    e.start_many(prompts)
    for _ in range(tokens):
        logits = e.step([1] * len(e.live))
    return logits


def test_the_engine_runs_the_small_step_graph_up_to_its_batch_and_the_step_graph_above(pairs):
    task, model = charlm()
    prefill, step = map(str, pairs["fp32"])
    small = str(pairs["int4"][1])
    one, two = decode.prompts(task, model.model_args, 2, 8)

    def engine(step_path, **small_step):
        return DecodeEngine(prefill, step_path, max_sequences=2, threads=1, **small_step)

    both = engine(step, small_step_path=small, small_batch=1)
    assert np.array_equal(step_logits(both, [one]), step_logits(engine(small), [one]))  # one sequence: INT4
    both = engine(step, small_step_path=small, small_batch=1)
    assert np.array_equal(step_logits(both, [one, two]), step_logits(engine(step), [one, two]))  # two: FP32
    assert not np.array_equal(step_logits(engine(small), [one]), step_logits(engine(step), [one]))
    assert engine(step, small_step_path=small, small_batch=0).small_session is None


def test_a_small_step_graph_over_another_cache_is_refused(pairs, tmp_path):
    from compress import kv_cache

    task, model = charlm()
    scales = kv_cache.calibrate(pairs["fp32"][0], decode._calibration_batches(task, model.model_args), rotary_dims=0)
    kv8 = kv_cache.write_int8_cache_graphs(pairs["int4"], tmp_path / "int4-kv8", scales)
    with pytest.raises(ValueError, match="different KV caches"):
        DecodeEngine(str(pairs["fp32"][0]), str(pairs["fp32"][1]), 2, 1, small_step_path=str(kv8[1]), small_batch=1)


def test_the_mixed_gate_alternates_chunks_between_the_two_graphs(pairs):
    task, model = charlm()
    score = {name: decode.graph_val_loss(pairs[name][0], task, model.model_args, 2) for name in ("fp32", "int4")}
    alone = decode.graph_val_loss(pairs["fp32"][0], task, model.model_args, 2, alternate=pairs["fp32"][0])
    mixed = decode.graph_val_loss(pairs["fp32"][0], task, model.model_args, 2, alternate=pairs["int4"][0])
    assert alone == pytest.approx(score["fp32"], rel=1e-6)
    assert mixed not in (pytest.approx(score["fp32"], rel=1e-6), pytest.approx(score["int4"], rel=1e-6))
    assert abs(mixed - score["fp32"]) / score["fp32"] < 0.02


def faster_int4(monkeypatch):
    """decode_rounds as a host where INT4 decodes batches 1 and 2 fastest and INT8 the larger ones."""
    def measured(engines, prompt, n_new, batches=(1, 8), rounds=5):
        rates = {"fp32": [50, 80, 120, 150], "int8-kv8": [100, 180, 300, 400], "int4-kv8": [150, 200, 250, 200]}
        return {name: {b: [rates[name][i]] * rounds for i, b in enumerate(batches)} for name in engines}
    monkeypatch.setattr(decode_speed, "decode_rounds", measured)


def test_build_serves_the_measured_small_step_and_the_generation_model_runs_it(tmp_path, monkeypatch):
    task, model = charlm()
    faster_int4(monkeypatch)
    built = decode.build_decode_graphs(task, model, model.model_args, tmp_path / "decode", eval_batches=2,
                                       max_metric_loss=0.05)
    report = json.loads((tmp_path / "decode" / "decode.json").read_text())
    assert built.precision == report["precision"] == "int8-kv8"
    assert report["small_step"]["precision"] == "int4-kv8" and report["small_step"]["max_batch"] == 2
    assert report["small_step"]["mixed"]["status"] == "ok" and report["small_step"]["step"] == "int4-kv8/step.onnx"
    assert built.small_step_path == tmp_path / "decode" / "int4-kv8" / "step.onnx"
    assert built.describe() == "int8-kv8 decode graphs, an int4-kv8 step for up to 2 sequences"
    tokens = {c["precision"]: set(c["tokens_per_s"]) for c in report["candidates"] if "tokens_per_s" in c}
    assert tokens["int4-kv8"] == {"batch 1", "batch 2", "batch 4", "batch 8"}

    settings = load_settings(None, ["compress.generate.max_sequences=4", "compress.generate.max_new_tokens=64"])
    name = write_generate_model(tmp_path / "repo", settings, task, model.model_args, built)
    model_dir = tmp_path / "repo" / "python" / name
    assert (model_dir / "1" / SMALL_STEP_FILE).read_bytes() == built.small_step_path.read_bytes()
    assert 'key: "small_step_max_batch"' in (model_dir / "config.pbtxt").read_text()
    m = load(model_dir, monkeypatch)
    try:
        assert m.engine.small_batch == 2 and m.engine.small_session is not None
        prompt = decode.prompts(task, model.model_args, 1, 8)[0]
        sender = run(m, input_ids=np.array(prompt), max_new_tokens=np.array([12], np.int32),
                     temperature=np.array([0.0], np.float32))
    finally:
        m.finalize()
    small = DecodeEngine(str(built.prefill), str(built.small_step_path), max_sequences=1, threads=1)
    assert [i for r in sender.responses for i in r.outputs["token_ids"].tolist()] == small.generate(prompt, 12)


def test_a_mix_outside_the_gate_or_the_setting_off_serves_one_step_graph(tmp_path, monkeypatch):
    task, model = charlm()
    faster_int4(monkeypatch)
    off = decode.build_decode_graphs(task, model, model.model_args, tmp_path / "off", eval_batches=2,
                                     max_metric_loss=0.05, small_step=False)
    assert off.small_step is None and json.loads((tmp_path / "off" / "decode.json").read_text())["small_step"] is None

    score = decode.graph_val_loss
    monkeypatch.setattr(decode, "graph_val_loss", lambda *a, alternate=None, **k: score(*a, **k) * (
        2 if alternate is not None else 1))
    built = decode.build_decode_graphs(task, model, model.model_args, tmp_path / "mixed", eval_batches=2,
                                       max_metric_loss=0.05)
    assert built.small_step["mixed"]["status"] == "rejected" and built.small_step_path is None
    assert built.describe() == f"{built.precision} decode graphs"
    name = write_generate_model(tmp_path / "repo", load_settings(None, []), task, model.model_args, built)
    assert not (tmp_path / "repo" / "python" / name / "1" / SMALL_STEP_FILE).exists()
