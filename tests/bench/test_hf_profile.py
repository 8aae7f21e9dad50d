"""The hf bench's step profile: a batched step's time split by kind, adding up to the step."""

import numpy as np

from bench._hf_profile import step_profile
from compress import decode
from tests.compress._trained import charlm


def test_a_step_profile_splits_the_step_and_counts_the_cache_it_reads(tmp_path):
    task, model = charlm()
    prefill, step = decode.write_graphs(task.decoder_weights(model), tmp_path / "fp32")
    prompts = [np.arange(1, 9).tolist()] * 3  # 8 tokens each, then the 16 profiled steps
    prof = step_profile(str(prefill), str(step), prompts, threads=1, new_tokens=8)
    ms = prof["ms"]
    assert prof["batch"] == 3
    assert ms["attention over the KV cache (GroupQueryAttention)"] > 0 and ms["weight GEMMs"] > 0
    assert all(v >= 0 for v in ms.values())
    assert abs(sum(ms.values()) - prof["step_ms"]) < 0.05 * prof["step_ms"] + 0.05  # parts of the wall time
    # 2 layers x K and V x 64 channels x 4 bytes per cached position; after the profiled steps 3 rows of 24
    assert prof["kv_mib"] * 2**20 == 3 * 24 * 2 * 2 * 64 * 4
    assert prof["weights_mib"] > 0
