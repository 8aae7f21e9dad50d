"""KV-cache decode graphs: greedy parity with torch, in-flight batching, sliding past the context, INT8
judged by loss, and a broken graph refused."""

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch

from compress import decode
from compress.decode_engine import DecodeEngine, PrefillError
from tests.compress._trained import charlm


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    task, model = charlm()
    out = tmp_path_factory.mktemp("decode")
    return decode.write_graphs(task.decoder_weights(model), out / "fp32")


def engine(graphs, slots=4) -> DecodeEngine:
    return DecodeEngine(str(graphs[0]), str(graphs[1]), max_sequences=slots, threads=1)


def test_greedy_tokens_equal_torch_for_the_same_prompts(graphs):
    task, model = charlm()
    report = decode.check_greedy_parity(model, engine(graphs), task, model.model_args, n_prompts=4)
    assert report["passed"], report
    assert all(r["new_tokens"] == 24 and r["prompt_tokens"] == 8 for r in report["prompts"])  # context 32


def test_prefill_logits_equal_torch_at_every_position(graphs):
    task, model = charlm()
    inputs, _ = next(task.batches("val", 3, 1, seed=0, model_args=model.model_args))
    ids = inputs["idx"]
    want = model(torch.from_numpy(ids)).detach().numpy()
    e = engine(graphs)
    for row, expected in zip(ids, want):
        seq, last = e.start(row.tolist())
        np.testing.assert_allclose(last, expected[-1], atol=1e-4)
        e.release(seq)


def test_the_engine_asks_the_prefill_for_each_prompts_last_logits_only(graphs):
    e = engine(graphs)
    real, shapes = e.prefill, []

    class Spy:  # the prefill session, recording what each run asked for and got
        def run(self, names, feed):
            out = real.run(names, feed)
            shapes.append((bool(feed["last_only"]), out[0].shape))
            return out

    e.prefill = Spy()
    full = [real.run(["logits"], {**feed, "input_ids": np.asarray([p])})[0][0, -1] for p, feed in
            [(p, _prefill_feed(e, len(p))) for p in ([3, 5, 7], [2, 4])]]
    started = e.start_many([[3, 5, 7], [2, 4]])  # right-padded to 3: the second row's last position is 1
    assert shapes == [(True, (2, 1, e.vocab_size))]
    for (_, logits), want in zip(started, full):
        np.testing.assert_allclose(logits, want, rtol=0, atol=1e-5)


def _prefill_feed(e: DecodeEngine, n: int) -> dict:
    """A one-row prefill feed of ``n`` positions (no past), every position's logits."""
    empty = np.zeros((1, e.n_head, n, e.head_size), np.float32)
    return {"position_ids": np.arange(n)[None], "seqlens_k": np.asarray([n - 1], np.int32),
            "total_sequence_length": np.asarray(n, np.int32), "query_seqlens": np.asarray([n], np.int32),
            "last_only": np.asarray(False),
            **{f"past_{k}_{i}": empty for i in range(e.n_layer) for k in ("key", "value")}}


def test_sequences_joining_and_leaving_between_steps_decode_as_if_alone(graphs):
    task, model = charlm()
    e = engine(graphs, slots=3)
    prompts = decode.prompts(task, model.model_args, 3, 6)
    alone = [e.generate(p, 20) for p in prompts]
    out = {}
    # A starts; B joins after 3 steps; C after 6; A leaves early (slot compaction moves C); all in one batch
    live = {}
    for step in range(30):
        if step in (0, 3, 6):
            k = (0, 3, 6).index(step)
            seq, logits = e.start(prompts[k])
            live[k], out[k] = seq, [int(logits.argmax())]
        done = [k for k, s in live.items() if len(out[k]) == (8 if k == 0 else 20)]
        for k in done:
            e.release(live.pop(k))
        if not live:
            break
        order = sorted(live, key=lambda k: live[k].slot)
        assert [live[k].slot for k in order] == list(range(len(order)))  # the cache stays compact
        logits = e.step([out[k][-1] for k in order])
        for k in order:
            out[k].append(int(logits[live[k].slot].argmax()))
    assert out[0] == alone[0][:8] and out[1] == alone[1] and out[2] == alone[2]
    assert e.free_slots == 3


def test_a_sequence_sliding_while_others_step_leaves_them_exact(graphs):
    task, model = charlm()
    e = engine(graphs, slots=2)
    long, short = decode.prompts(task, model.model_args, 2, 31)
    alone = e.generate(short[:5], 12)
    a, logits_a = e.start(long)
    b, logits_b = e.start(short[:5])
    out_b = [int(logits_b.argmax())]
    for k in range(11):  # a fills its cache at step 1 and slides at step 2, b steps on beside it
        order = list(e.live)  # the slide moves a behind b: rows follow the order at the call
        rows = dict(zip(order, e.step([int(logits_a.argmax()) if s is a else out_b[-1] for s in order])))
        logits_a = rows[a]
        out_b.append(int(rows[b].argmax()))
    assert out_b == alone and a.length < 32 and e.live == [b, a]


def test_generation_past_the_context_slides_and_continues(graphs):
    task, model = charlm()
    e = engine(graphs, slots=1)
    prompt = decode.prompts(task, model.model_args, 1, 31)[0]
    tokens = e.generate(prompt, 100)  # context 32: slides several times
    assert len(tokens) == 100 and all(0 <= t < e.vocab_size for t in tokens)
    # a full cache slides: the sequence goes on from its last context // 2 tokens, as a fresh prefill of them
    e2 = engine(graphs, slots=1)
    seq, _ = e2.start(prompt[:31])
    e2.step([prompt[30]])  # position 31: the cache is now full (32)
    logits = e2.step([7])[0]  # no position 32: slide
    ids = prompt[:31] + [prompt[30], 7]
    _, expected = engine(graphs, slots=1).start(ids[-16:])
    np.testing.assert_allclose(logits, expected, atol=1e-5)
    assert seq.length == 16


def test_int8_graphs_are_judged_by_validation_loss(graphs, tmp_path):
    task, model = charlm()
    q = decode.quantize_graphs(graphs, tmp_path / "int8")
    base = decode.graph_val_loss(graphs[0], task, model.model_args, 4)
    int8 = decode.graph_val_loss(q[0], task, model.model_args, 4)
    torch_loss = task.evaluate(lambda x: model(torch.from_numpy(x["idx"])).detach().numpy(), "val", n_batches=4,
                               batch_size=16, model_args=model.model_args)["val_loss"]
    assert abs(base - torch_loss) < 1e-4  # the prefill graph is the model
    assert abs(int8 - base) / base < 0.02
    assert q[0].stat().st_size < graphs[0].stat().st_size


def test_build_publishes_a_report_and_refuses_graphs_that_decode_differently(tmp_path, monkeypatch):
    task, model = charlm()
    built = decode.build_decode_graphs(task, model, model.model_args, tmp_path / "ok", eval_batches=2)
    report = json.loads((tmp_path / "ok" / "decode.json").read_text())
    names = {"fp32", "int8", "int4", "int8-kv8", "int4-kv8"}  # each quantized pair also with an int8 cache
    assert report["published"] and report["parity"]["passed"] and built.precision in names
    assert {c["precision"] for c in report["candidates"]} == names
    assert {c["kv_cache"] for c in report["candidates"] if c["precision"].endswith("-kv8")} == {"int8"}
    # a pair with an int8 cache stands in for its FP32-cache pair in the speed rounds when the gate passes it
    raced = {c["precision"] for c in report["candidates"] if "tokens_per_s" in c}
    assert {"int8-kv8", "int4-kv8"} <= raced and not raced & {"int8", "int4"}

    weights = task.decoder_weights(model)
    broken = dataclasses.replace(weights, position_embedding=weights.position_embedding[::-1].copy())
    monkeypatch.setattr(type(task), "decoder_weights", lambda self, m: broken)
    with pytest.raises(decode.DecodeParityError, match="differ from torch"):
        decode.build_decode_graphs(task, copy.deepcopy(model), model.model_args, tmp_path / "bad", eval_batches=2)
    assert json.loads((tmp_path / "bad" / "decode.json").read_text())["published"] is False


def test_tasks_without_a_decoder_get_no_graphs(tmp_path):
    from tests.compress._trained import digits

    task, model = digits()
    assert decode.build_decode_graphs(task, model, {}, tmp_path) is None and not list(tmp_path.iterdir())


def test_sequences_that_slide_in_the_same_step_are_encoded_together_exactly(graphs):
    task, model = charlm()
    e = engine(graphs, slots=2)
    p, q = decode.prompts(task, model.model_args, 2, 32)
    e.start(p)
    e.start(q)
    logits = e.step([3, 5])  # both caches are full: both slide in one batched prefill
    for prompt, token, row in ((p, 3, logits[0]), (q, 5, logits[1])):
        _, alone = engine(graphs, slots=1).start((prompt + [token])[-16:])
        np.testing.assert_allclose(row, alone, atol=1e-5)
    assert [s.length for s in e.live] == [16, 16]


def test_prompts_of_different_lengths_join_in_one_padded_prefill(graphs):
    task, model = charlm()
    rows = [p[:n] for p, n in zip(decode.prompts(task, model.model_args, 3, 20), (5, 20, 11))]
    together = engine(graphs, slots=3).start_many(rows)
    for row, (seq, logits) in zip(rows, together):
        want = model(torch.tensor([row])).detach().numpy()[0, -1]
        np.testing.assert_allclose(logits, want, atol=1e-4)
        assert seq.length == len(row)
    with pytest.raises(RuntimeError, match="slots are free"):
        engine(graphs, slots=1).start_many(rows[:2])


def assert_compact(e: DecodeEngine) -> None:
    """Slots 0..n-1 are taken in order, sequences that can step first, those being encoded last."""
    assert [s.slot for s in e.live] == list(range(len(e.live)))
    assert [s.encoding for s in e.live] == [False] * e.ready + [True] * (len(e.live) - e.ready)


def drive(e: DecodeEngine, prompts: list[list[int]], n_new: int, joins: dict[int, int]) -> tuple[dict, int]:
    """Decode ``prompts`` through submit/advance, prompt k joining at round joins[k]; each one's greedy tokens
    and the number of rounds in which some sequence stepped while another's prefill was under way."""
    out, fed, overlapped = {}, [], 0
    for round_ in range(10_000):
        for k in [k for k, at in joins.items() if at == round_]:
            e.submit([prompts[k]], [k])
            out[k] = []
        stepped = {seq for seq, _ in fed}
        ready = e.advance(fed)
        assert_compact(e)
        overlapped += any(s in stepped for s, _ in ready) and any(s.encoding for s in e.live)
        fed = []
        for seq, logits in ready:
            out[seq.tag].append(int(logits.argmax()))
            if len(out[seq.tag]) == n_new:
                e.release(seq)
            else:
                fed.append((seq, out[seq.tag][-1]))
        if len(out) == len(prompts) and not e.live:
            return out, overlapped
    raise AssertionError("decoding did not finish")


def test_prefills_on_their_own_thread_overlap_steps_and_every_sequence_decodes_as_if_alone(graphs):
    task, model = charlm()
    lengths = (31, 5, 32, 12, 40, 3)  # context 32: some prompts fill it at once, so their first token slides
    prompts = [p[:n] for p, n in zip(decode.prompts(task, model.model_args, 6, 40), lengths)]
    alone = [engine(graphs, slots=1).generate(p, 40) for p in prompts]
    e = DecodeEngine(str(graphs[0]), str(graphs[1]), max_sequences=6, threads=1, prefill_thread=True)
    try:
        out, overlapped = drive(e, prompts, 40, {0: 0, 1: 0, 2: 3, 3: 7, 4: 8, 5: 20})
    finally:
        e.close()
    assert [out[k] for k in range(6)] == alone  # FP32 graphs: exactly the same tokens
    assert overlapped > 0 and e.free_slots == 6


def test_sequences_that_skip_rounds_sit_out_as_idle_rows_and_decode_as_if_alone(graphs):
    task, model = charlm()
    prompts = [p[:n] for p, n in zip(decode.prompts(task, model.model_args, 3, 32), (32, 7, 19))]
    alone = [engine(graphs, slots=1).generate(p, 20) for p in prompts]
    e = engine(graphs, slots=3)
    started = e.start_many(prompts)  # the first prompt fills the context: its cache is full until it slides
    out = {seq: [int(logits.argmax())] for seq, logits in started}
    for round_ in range(60):
        # each round one sequence (in turn) is not fed: it sits out as an idle row, its cache untouched
        fed = [(seq, toks[-1]) for k, (seq, toks) in enumerate(out.items())
               if k != round_ % 3 and len(toks) < 20]
        for seq, logits in e.advance(fed, wait=True):
            out[seq].append(int(logits.argmax()))
        assert_compact(e)
    assert [out[seq] for seq, _ in started] == alone  # FP32: exactly the solo tokens
    with pytest.raises(ValueError, match="fed once per round"):
        seq = started[1][0]
        e.advance([(seq, 1), (seq, 2)])


def test_a_group_joining_at_once_is_split_so_its_first_chunk_steps_while_the_rest_is_encoded(graphs):
    task, model = charlm()
    prompts = [p[:n] for p, n in zip(decode.prompts(task, model.model_args, 7, 40), (20, 9, 31, 32, 14, 3, 25))]
    alone = [engine(graphs, slots=1).generate(p, 30) for p in prompts]
    e = DecodeEngine(str(graphs[0]), str(graphs[1]), max_sequences=7, threads=1, prefill_thread=True,
                     prefill_chunk=2)
    try:
        first = e.submit(prompts[:2])
        assert e.ready == 0 and [s.encoding for s in e.live] == [True, True]  # nothing could overlap: at once
        e.advance([], wait=True)
        assert e.ready == 2
        group = e.submit(prompts[2:], [2, 3, 4, 5, 6])  # five join while two can step: all in the background
        assert e.ready == 2 and all(s.encoding for s in group)
        for seq, k in zip(first, (0, 1)):
            seq.tag = k
        e.release(first[1])  # the last ready one leaves: a sequence being encoded takes its slot
        assert_compact(e)
        e.release(first[0])
        assert e.ready == 0 and len(e.live) == 5
        assert_compact(e)
        # all five were queued together and none can step: they come back in chunks of two, in order
        back = [s.tag for s, _ in e.advance([])]
        assert back in ([2, 3], [2, 3, 4, 5], [2, 3, 4, 5, 6])
    finally:
        e.close()
    # and decoding a group that joins at once gives every sequence its solo tokens
    e = DecodeEngine(str(graphs[0]), str(graphs[1]), max_sequences=7, threads=1, prefill_thread=True,
                     prefill_chunk=2)
    try:
        out, _ = drive(e, prompts, 30, dict.fromkeys(range(7), 0))
    finally:
        e.close()
    assert [out[k] for k in range(7)] == alone


def test_without_a_prefill_thread_a_joining_group_is_encoded_a_chunk_per_round_between_steps(graphs):
    task, model = charlm()
    prompts = [p[:n] for p, n in zip(decode.prompts(task, model.model_args, 7, 40), (20, 9, 31, 32, 14, 3, 25))]
    alone = [engine(graphs, slots=1).generate(p, 30) for p in prompts]
    e = DecodeEngine(str(graphs[0]), str(graphs[1]), max_sequences=7, threads=1, prefill_chunk=2)
    first = e.start_many(prompts[:2])
    group = e.submit(prompts[2:], [2, 3, 4, 5, 6])  # five join while two can step: encoded after the steps
    assert e.ready == 2 and all(s.encoding for s in group)
    e.release(group[1])  # leaves while it waits: its prefill is never run
    fed = [(seq, int(logits.argmax())) for seq, logits in first]
    back = [s.tag for s, _ in e.advance(fed) if s in group]
    assert back == [2, 4] and e.ready == 4  # one step of the two, then one chunk of two
    back = [s.tag for s, _ in e.advance([])]
    assert back == [5, 6] and e.ready == 6 and not e._backlog
    for seq in list(e.live):
        e.release(seq)
    # and decoding a group that joins at once gives every sequence its solo tokens
    out, _ = drive(e, prompts, 30, dict.fromkeys(range(7), 0))
    assert [out[k] for k in range(7)] == alone and e.free_slots == 7


def test_a_sequence_released_while_it_is_encoded_is_dropped_and_a_failed_prefill_is_raised(graphs):
    e = DecodeEngine(str(graphs[0]), str(graphs[1]), max_sequences=2, threads=1, prefill_thread=True)
    try:
        a, = e.submit([[1, 2, 3]])
        assert [s for s, _ in e.advance([])] == [a]
        b, = e.submit([[4, 5, 6]])  # a is live and ready: b is encoded in the background
        e.release(b)
        assert [s for s, _ in e.advance([(a, 7)], wait=True)] == [a] and e.live == [a]
    finally:
        e.close()
    inline = engine(graphs, slots=2)
    bad, = inline.submit([[e.vocab_size + 5]])  # not a token id: the prefill graph fails
    assert inline.advance([]) == [] and bad.slot == -1 and inline.free_slots == 2  # released, and said so
    (failed, error), = inline.failures
    assert failed is bad and isinstance(error, Exception)
    inline.failures.clear()
    with pytest.raises(PrefillError, match="prefill failed"):  # the synchronous API raises, freeing every slot
        inline.start_many([[1, 2], [e.vocab_size + 6]])  # (one padded batch: both prompts failed)
    assert inline.free_slots == 2 and not inline.failures
    (good, logits), = inline.start_many([[1, 2, 3]])  # and the engine decodes on
    assert inline.live == [good] and logits.shape == (e.vocab_size,)
