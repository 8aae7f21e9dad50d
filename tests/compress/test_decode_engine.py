"""The decode engine's ONNX Runtime options: how its intra-op pool waits (spinning), set per engine and per
served model; where its prefills run."""

import numpy as np
import pytest

from compress import decode
from compress.decode_engine import SPINNING, DecodeEngine, prefill_on_thread, session_options
from tests.compress._trained import charlm


@pytest.mark.parametrize("mode, allow, stop", [("off", "0", "0"), ("run", "1", "1"), ("on", "1", "0")])
def test_each_spinning_mode_sets_onnx_runtimes_two_entries(mode, allow, stop):
    options = session_options(2, mode)
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == allow
    assert options.get_session_config_entry("session.force_spinning_stop") == stop
    assert options.intra_op_num_threads == 2


def test_an_unknown_spinning_mode_is_refused_naming_the_known_ones():
    with pytest.raises(ValueError, match="'fast'.*'off', 'run', 'on'"):
        session_options(0, "fast")
    assert set(SPINNING) == {"off", "run", "on"}


@pytest.mark.parametrize("threads, cores, thread", [(1, 2, True), (3, 4, True), (2, 2, False), (4, 2, False),
                                                   (0, 16, False), (1, 1, False)])
def test_auto_gives_prefills_a_thread_only_where_the_steps_pool_leaves_a_core_free(threads, cores, thread):
    assert prefill_on_thread("auto", threads, cores) is thread
    assert prefill_on_thread("true", threads, cores) is True and prefill_on_thread("false", threads, cores) is False


def test_auto_reads_the_cores_this_process_may_run_on(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    assert prefill_on_thread("auto", 2) and not prefill_on_thread("auto", 3)


def test_an_unknown_prefill_thread_setting_is_refused_naming_the_known_ones():
    with pytest.raises(ValueError, match="prefill_thread='yes' must be one of auto, true, false"):
        prefill_on_thread("yes", 1)


def test_engines_decode_the_same_tokens_whatever_their_pool_does(tmp_path):
    task, model = charlm()
    graphs = decode.write_graphs(task.decoder_weights(model), tmp_path / "fp32")
    prompt = decode.prompts(task, model.model_args, 1, 8)[0]
    tokens = {mode: DecodeEngine(str(graphs[0]), str(graphs[1]), max_sequences=2, threads=2,
                                 spinning=mode).generate(prompt, 12) for mode in SPINNING}
    assert tokens["off"] == tokens["run"] == tokens["on"] == decode.torch_greedy(model, prompt, 12)
    assert np.unique([len(t) for t in tokens.values()]).tolist() == [12]
