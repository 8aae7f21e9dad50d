"""The generation model's logic (decode loop, coalesced streaming, stop strings, cancellation, refusals),
run outside Triton: its repository directory as compress writes it, with a stand-in for the python
backend's ``triton_python_backend_utils``. tests/integration/test_serve_generate.py runs it in Triton."""

import importlib.util
import json
import os
import re
import shutil
import sys
import threading
import time
import types

import numpy as np
import pytest
from google.protobuf.json_format import MessageToDict

from autoglm.config import load_settings
from autoglm.detokenizer import TABLE_FILE, DecodeTable
from autoglm.triton_config import parse_pbtxt
from compress import decode
from compress.repository import write_generate_model
from tests.compress._trained import charlm

FINAL = 1


class Tensor:
    def __init__(self, name, array):
        self.name, self.array = name, np.asarray(array)

    def as_numpy(self):
        return self.array


class Response:
    def __init__(self, output_tensors=(), error=None):
        self.outputs, self.error = {t.name: t.array for t in output_tensors}, error


class Sender:
    def __init__(self, cancel_after: int | None = None):
        self.responses, self.finished = [], threading.Event()
        self.cancel_after = cancel_after

    def send(self, response=None, flags=0):
        if response is not None:
            self.responses.append(response)
        if flags == FINAL:
            self.finished.set()

    def is_cancelled(self):
        return self.cancel_after is not None and len(self.responses) >= self.cancel_after


class Request:
    def __init__(self, sender, **inputs):
        self.sender, self.inputs = sender, {k: Tensor(k, v) for k, v in inputs.items()}

    def get_response_sender(self):
        return self.sender


class Metric:
    def __init__(self):
        self.value = 0.0

    def set(self, value):
        self.value = value

    def increment(self, value):
        self.value += value


def backend_utils() -> types.ModuleType:
    pb = types.ModuleType("triton_python_backend_utils")
    pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL = FINAL
    pb.Tensor, pb.InferenceResponse = Tensor, Response
    pb.TritonError = type("TritonError", (Exception,), {})
    pb.get_input_tensor_by_name = lambda request, name: request.inputs.get(name)
    pb.MetricFamily = type("MetricFamily", (), {"GAUGE": 0, "COUNTER": 1, "__init__": lambda self, **kw: None,
                                                "Metric": lambda self, labels: Metric()})
    return pb


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    task, model = charlm()
    graphs = decode.write_graphs(task.decoder_weights(model), tmp_path_factory.mktemp("graphs"))
    repo = tmp_path_factory.mktemp("repo")
    settings = load_settings(None, ["compress.generate.max_sequences=4", "compress.generate.max_waiting=1",
                                    "compress.generate.max_new_tokens=64"])
    name = write_generate_model(repo, settings, task, model.model_args,
                                decode.DecodeGraphs(graphs[0], graphs[1], "fp32", {}))
    return repo / "python" / name


@pytest.fixture
def generation(model_dir, monkeypatch):
    m = load(model_dir, monkeypatch)
    yield m
    m.finalize()


def load(model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", backend_utils())
    spec = importlib.util.spec_from_file_location("generate_model_under_test", model_dir / "1" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = MessageToDict(parse_pbtxt((model_dir / "config.pbtxt").read_text()), preserving_proto_field_name=True)
    m = module.TritonPythonModel()
    m.initialize({"model_config": json.dumps(config), "model_repository": str(model_dir), "model_version": "1"})
    return m


def run(m, timeout=20, **inputs) -> Sender:
    sender = Sender(inputs.pop("cancel_after", None))
    m.execute([Request(sender, **inputs)])
    assert sender.finished.wait(timeout), "the final flag never came"
    return sender


def text_of(sender):
    return "".join(r.outputs["text"][0].decode() for r in sender.responses)


def test_streams_the_greedy_text_first_token_at_once_and_ends_with_the_reason(generation):
    task, model = charlm()
    prompt = decode.prompts(task, model.model_args, 1, 8)[0]
    sender = run(generation, input_ids=np.array(prompt), max_new_tokens=np.array([20], np.int32),
                 temperature=np.array([0.0], np.float32))
    want = decode.torch_greedy(model, prompt, 20)
    ids = [i for r in sender.responses for i in r.outputs["token_ids"].tolist()]
    assert ids == want and text_of(sender) == "".join(task.vocab[i] for i in want)
    assert len(sender.responses[0].outputs["token_ids"]) == 1  # the first token goes out alone, at once
    assert [r.outputs["finish_reason"][0] for r in sender.responses][-1] == b"length"
    assert not any(r.outputs["finish_reason"][0] for r in sender.responses[:-1])


def test_later_tokens_are_coalesced_by_the_stream_interval(generation):
    generation.interval_s = 60.0  # nothing is due after the first token: the rest comes with the final flag
    sender = run(generation, input_ids=np.array([1, 2, 3]), max_new_tokens=np.array([30], np.int32))
    assert [len(r.outputs["token_ids"]) for r in sender.responses] == [1, 29]


def test_a_stop_string_ends_the_text_before_it(generation):
    free = text_of(run(generation, input_ids=np.array([1, 2, 3]), max_new_tokens=np.array([40], np.int32),
                       temperature=np.array([0.0], np.float32)))
    stop = free[10:12]
    sender = run(generation, input_ids=np.array([1, 2, 3]), max_new_tokens=np.array([40], np.int32),
                 temperature=np.array([0.0], np.float32), stop=np.array([stop.encode()], np.object_))
    assert text_of(sender) == free[:free.index(stop)]
    assert sender.responses[-1].outputs["finish_reason"][0] == b"stop"


def test_a_cancelled_request_frees_its_slot(generation, monkeypatch):
    generation.interval_s = 0.0
    real, rounds = generation.engine.advance, []

    def advance(fed, *args, **kwargs):
        # a tiny model steps faster than the outbox thread sends: hold the loop after a few rounds until the outbox
        # has seen the client go (after its 2nd response), as a real model's slower steps would let it
        rounds.append(len(fed))
        deadline = time.monotonic() + 5
        while len(rounds) > 4 and generation.engine.live and not any(s.tag.cancelled for s in generation.engine.live) \
                and time.monotonic() < deadline:
            time.sleep(0.001)
        return real(fed, *args, **kwargs)

    monkeypatch.setattr(generation.engine, "advance", advance)
    sender = run(generation, input_ids=np.array([1, 2, 3]), max_new_tokens=np.array([64], np.int32),
                 cancel_after=2)
    deadline = time.monotonic() + 5
    while generation.engine.live and time.monotonic() < deadline:
        time.sleep(0.01)
    produced = sum(len(r.outputs["token_ids"]) for r in sender.responses)
    assert not generation.engine.live and produced < 64 and generation.live_gauge.value == 0


def test_a_failed_prefill_fails_its_own_request_and_the_others_go_on(generation, monkeypatch):
    generation.interval_s = 0.0
    poison = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9]
    real = generation.engine.prefill

    class Failing:  # the prefill graph fails on the poisoned prompt only
        def run(self, names, feed):
            if any(row[:len(poison)].tolist() == poison for row in feed["input_ids"]):
                raise RuntimeError("out of memory")
            return real.run(names, feed)

    monkeypatch.setattr(generation.engine, "prefill", Failing())
    good = Sender(None)
    generation.execute([Request(good, input_ids=np.array([1, 2, 3]), max_new_tokens=np.array([64], np.int32))])
    deadline = time.monotonic() + 10
    while not good.responses and time.monotonic() < deadline:  # decoding: the next prefill overlaps its steps
        time.sleep(0.005)
    bad = run(generation, input_ids=np.array(poison), max_new_tokens=np.array([8], np.int32))
    assert len(bad.responses) == 1 and "generation failed: out of memory" in str(bad.responses[0].error)
    assert good.finished.wait(20)
    assert sum(len(r.outputs["token_ids"]) for r in good.responses) == 64 and not good.responses[-1].error
    assert not generation.engine.live


@pytest.mark.parametrize(("inputs", "words"), [
    ({"input_ids": np.array([], np.int64)}, "empty"),
    ({"input_ids": np.array([1]), "max_new_tokens": np.array([65], np.int32)}, "within 1..64"),
    ({"input_ids": np.array([999])}, "token ids"),
])
def test_bad_requests_are_refused_with_a_final_error(generation, inputs, words):
    sender = run(generation, **inputs)
    assert len(sender.responses) == 1 and words in str(sender.responses[0].error)


def test_text_comes_from_the_token_table_whole_characters_only_and_eos_stops(model_dir, tmp_path, monkeypatch):
    task, model = charlm()
    want = decode.torch_greedy(model, [1, 2, 3], 12)
    first, second = want[0], next(i for i in want[1:] if i != want[0])
    euro = "€".encode()  # its three bytes come in two tokens
    tokens = [b"x"] * len(task.vocab)
    tokens[first], tokens[second] = euro[:2], euro[2:]
    eos = want[6]
    table = DecodeTable(tuple(tokens), frozenset({eos}))
    copy = shutil.copytree(model_dir, tmp_path / "generate")
    (copy / "1" / TABLE_FILE).write_text(table.to_json())
    m = load(copy, monkeypatch)
    try:
        m.interval_s = 0.0
        sender = run(m, input_ids=np.array([1, 2, 3]), max_new_tokens=np.array([12], np.int32),
                     temperature=np.array([0.0], np.float32))
    finally:
        m.finalize()
    ids = [i for r in sender.responses for i in r.outputs["token_ids"].reshape(-1).tolist()]
    assert ids == want[:want.index(eos) + 1]  # the end-of-sequence token ends it, and is counted
    texts = [r.outputs["text"][0].decode() for r in sender.responses]
    assert texts[0] == "" and "\ufffd" not in "".join(texts)  # half a character is held back, never sent
    assert "".join(texts) == table.decode(ids) and "€" in "".join(texts)
    assert sender.responses[-1].outputs["finish_reason"][0] == b"stop"


def test_graphs_with_an_int8_cache_are_served_alike(tmp_path, monkeypatch):
    from compress import kv_cache
    from compress.decode_engine import DecodeEngine

    task, model = charlm()
    fp32 = decode.write_graphs(task.decoder_weights(model), tmp_path / "fp32")
    scales = kv_cache.calibrate(fp32[0], decode._calibration_batches(task, model.model_args), rotary_dims=0)
    kv8 = kv_cache.write_int8_cache_graphs(fp32, tmp_path / "fp32-kv8", scales)
    settings = load_settings(None, ["compress.generate.max_sequences=2", "compress.generate.max_new_tokens=64"])
    name = write_generate_model(tmp_path / "repo", settings, task, model.model_args,
                                decode.DecodeGraphs(kv8[0], kv8[1], "fp32-kv8", {}))
    m = load(tmp_path / "repo" / "python" / name, monkeypatch)
    try:
        assert m.engine.cache_dtype == np.int8
        prompt = decode.prompts(task, model.model_args, 1, 8)[0]
        sender = run(m, input_ids=np.array(prompt), max_new_tokens=np.array([20], np.int32),
                     temperature=np.array([0.0], np.float32))
    finally:
        m.finalize()
    want = DecodeEngine(str(kv8[0]), str(kv8[1]), max_sequences=1, threads=1).generate(prompt, 20)
    assert [i for r in sender.responses for i in r.outputs["token_ids"].tolist()] == want


@pytest.mark.parametrize("setting, threads, thread", [("true", 4, True), ("false", 1, False), ("auto", 1, True),
                                                     ("auto", 4, False), ("auto", 0, False)])
def test_prefill_thread_decides_whether_the_served_engine_encodes_on_a_thread(tmp_path, monkeypatch, setting,
                                                                              threads, thread):
    """On a 4-core host: ``auto`` gives prefills a thread only where the step's threads leave a core free."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    task, model = charlm()
    graphs = decode.write_graphs(task.decoder_weights(model), tmp_path / "fp32")
    settings = load_settings(None, [f"compress.generate.prefill_thread={setting}",
                                    f"compress.generate.intra_op_threads={threads}"])
    name = write_generate_model(tmp_path / "repo", settings, task, model.model_args,
                                decode.DecodeGraphs(graphs[0], graphs[1], "fp32", {}))
    model_dir = tmp_path / "repo" / "python" / name
    m = load(model_dir, monkeypatch)
    try:
        assert (m.engine._worker is not None) == thread
        prompt = decode.prompts(task, model.model_args, 1, 8)[0]
        sender = run(m, input_ids=np.array(prompt), max_new_tokens=np.array([12], np.int32),
                     temperature=np.array([0.0], np.float32))
        assert [i for r in sender.responses for i in r.outputs["token_ids"].tolist()] == \
            decode.torch_greedy(model, prompt, 12)
    finally:
        m.finalize()
    config = model_dir / "config.pbtxt"
    text, edits = re.subn(r'(key: "prefill_thread"\s*value \{\s*string_value: )"(auto|true|false)"',
                          r'\1"yes"', config.read_text())
    assert edits == 1  # that parameter's value only, not every true/false in the config
    config.write_text(text)
    with pytest.raises(ValueError, match="prefill_thread='yes' must be one of auto, true, false"):
        load(model_dir, monkeypatch)


@pytest.mark.parametrize("mode, stop", [("run", "1"), ("off", "0")])
def test_the_pool_spinning_setting_reaches_the_served_step_session_only(tmp_path, monkeypatch, mode, stop):
    task, model = charlm()
    graphs = decode.write_graphs(task.decoder_weights(model), tmp_path / "fp32")
    settings = load_settings(None, [f"compress.generate.intra_op_spinning='{mode}'"])
    name = write_generate_model(tmp_path / "repo", settings, task, model.model_args,
                                decode.DecodeGraphs(graphs[0], graphs[1], "fp32", {}))
    m = load(tmp_path / "repo" / "python" / name, monkeypatch)
    try:
        step = m.engine.step_session.get_session_options()
        assert step.get_session_config_entry("session.intra_op.allow_spinning") == str(int(mode != "off"))
        assert step.get_session_config_entry("session.force_spinning_stop") == stop
        # prefills run beside the steps on their own thread: their pool never spins
        prefill = m.engine.prefill.get_session_options()
        assert prefill.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    finally:
        m.finalize()
