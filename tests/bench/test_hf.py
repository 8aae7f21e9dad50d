"""The hf bench's batch-1 ceiling: the read bandwidth by several readers, and a ceiling that a variant beats
marked suspect instead of printed as more than 100%."""

import math

from bench import _hf_profile, _hf_tables


def test_every_reader_streams_the_buffer_at_a_finite_rate():
    rates = _hf_profile.read_bandwidth(gib=1 / 64, repeats=2)
    assert set(rates) == set(_hf_profile.BANDWIDTH_READERS)
    assert all(0 < r < math.inf for r in rates.values())


def test_a_share_is_printed_within_the_ceiling_and_suspect_beyond_it():
    assert _hf_tables.of_ceiling(25.0, 50.0) == "50%"
    assert _hf_tables.of_ceiling(50.0, 50.0) == "100%"
    assert _hf_tables.of_ceiling(51.0, 50.0) == "over it: bandwidth suspect"


def test_the_ceiling_table_says_which_variant_makes_the_bandwidth_suspect():
    bandwidths = {"torch sum": 10e9, "numpy max, a thread per core": 12e9}
    rows = [["GPT-2", "fp32", 472.0, 11.9, 24.0, 35.6], ["GPT-2", "int8", 118.0, 12.0, 97.0, 80.0]]
    table = _hf_tables.ceiling_table(rows, bandwidths)
    assert table.title.startswith("The batch-1 ceiling: read bandwidth (suspect)")
    assert [r[-1] for r in table.rows] == ["over it: bandwidth suspect", "82%"]
    assert any(n.startswith("SUSPECT: GPT-2 fp32 decoded faster") for n in table.notes)
    assert "torch sum 10.0 GB/s" in table.notes[0] and "numpy max, a thread per core 12.0 GB/s" in table.notes[0]
    assert "%" not in "".join(str(r[-1]) for r in table.rows if r[5] > r[4])


def test_a_ceiling_no_variant_beats_is_not_suspect():
    table = _hf_tables.ceiling_table([["Llama", "int8", 129.0, 12.7, 97.0, 60.0]], {"torch sum": 12.5e9})
    assert "suspect" not in table.title and not any("SUSPECT" in n for n in table.notes)
    assert table.rows[0][-1] == "62%"


def test_the_tables_hold_every_shapes_rows_the_spinning_modes_the_rounds_and_what_serving_costs():
    def rates(a, b=None, c=None):
        return {"tokens_per_s": {"1": a, **({"8": b} if b else {}), **({"32": c} if c else {})}}

    rows = {"transformers generate() (torch eager, KV cache, padded batch)": rates(20.0, 80.0, 160.0) | {
                "ttft_ms": [90.0]},
            "decode graphs int8-kv8, in process (no serving)": rates(80.0, None, 800.0),
            "decode graphs int8-kv8, in process, continuous batching (no serving)": {"tokens_per_s": {"32": 720.0}},
            "served :generate through the gateway (int8-kv8)": rates(60.0, 300.0, 640.0) | {
                "ttft_p50": 40.0, "ttft_p95": 45.0, "peak_rss_mb": 2000.0, "cpu_ms_per_token_1": 30.5,
                "errors": 1}}
    rounds = {32: [{"transformers generate() (torch eager, KV cache, padded batch)": 150.0 + k,
                    "decode graphs int8-kv8, in process (no serving)": 790.0 + k,
                    "decode graphs int8-kv8, in process, continuous batching (no serving)": 710.0 + k,
                    "served :generate through the gateway (int8-kv8)": 630.0 + k} for k in (0, 20)],
              1: [{"transformers generate() (torch eager, KV cache, padded batch)": 20.0 + k,
                   "decode graphs int8-kv8, in process (no serving)": 80.0 + k,
                   "served :generate through the gateway (int8-kv8)": 60.0 + k} for k in (-5, 0, 5)]}
    shape = {"rows": rows, "served_precision": "int8-kv8", "rounds": rounds, "load": (1.5, 2.25),
             "ceilings": [["M", "int8-kv8", 118.0, 12.0, 101.0, 80.0]],
             "spinning": [["M", "int8-kv8", mode, 80.0, 300.0, 600.0] for mode in ("off", "run", "on")]}
    tables = {t.title.split(":")[0]: t for t in _hf_tables.tables({"M": shape}, [], {"torch sum": 12e9})}
    goals = {r[1]: r[2] for r in tables["Goals"].rows}
    assert goals["served / transformers, tokens/s @1"] == "3.00×"
    assert goals["served @1 / the same graphs in process @1 (what serving costs per token)"] == "0.75×"
    assert goals["served @1 / its ceiling (int8-kv8)"] == "59%"
    assert goals["served @1: CPU of Triton and the gateway per token, ms (the decode step's included)"] == "30.50"
    assert goals["served / transformers, aggregate tokens/s @32"] == "4.00×"
    assert goals["served @32 / the same graphs in process, continuous batching @32 (what serving costs at 32)"] == \
        "0.89×"
    assert goals["in process @32: continuous batching / a static batch (what joining at any time costs)"] == "0.90×"
    in_rounds = tables["Tokens/s at 1 and 32 concurrent requests, in alternating rounds"]
    assert in_rounds.columns[-4:] == ["round 1", "round 2", "round 3", "median"]
    by_path = {(r[1], r[2]): r[3:] for r in in_rounds.rows}
    assert by_path["transformers generate() (torch eager, KV cache, padded batch)", 32] == [150.0, 170.0, None, 160.0]
    assert by_path["served :generate through the gateway (int8-kv8)", 1] == [55.0, 60.0, 65.0, 60.0]
    assert len(in_rounds.rows) == 7
    speed_notes = tables["Decode speed at real sizes (random weights)"].notes
    assert "served requests that failed: M: 1" in speed_notes[-2] and "M: 1.5 / 2.2" in speed_notes[-1]
    spinning = next(t for title, t in tables.items() if title.startswith("The decode loop's ONNX Runtime pool"))
    assert [r[2] for r in spinning.rows] == ["off", "run", "on"]
    assert len(tables["Decode speed at real sizes (random weights)"].rows) == 4


def test_with_a_small_batch_step_the_in_process_twin_and_the_batch_1_ceiling_are_the_graphs_served():
    served_label = "int8-kv8 + int4-kv8 at ≤ 2"
    rows = {"transformers generate() (torch eager, KV cache, padded batch)": {"tokens_per_s": {"1": 20.0, "32": 100.}},
            "decode graphs int8-kv8, in process (no serving)": {"tokens_per_s": {"1": 70.0, "8": 300.0}},
            "decode graphs int4-kv8, in process (no serving)": {"tokens_per_s": {"1": 90.0, "8": 200.0}},
            f"decode graphs {served_label}, in process (no serving)": {"tokens_per_s": {"1": 90.0, "32": 500.0}},
            f"decode graphs {served_label}, in process, continuous batching (no serving)": {
                "tokens_per_s": {"32": 450.0}},
            f"served :generate through the gateway ({served_label})": {"tokens_per_s": {"1": 81.0, "32": 400.0}}}
    shape = {"rows": rows, "served_precision": served_label, "batch1_precision": "int4-kv8", "rounds": {},
             "load": (1.0, 1.0), "spinning": [],
             "ceilings": [["M", "int8-kv8", 118.0, 12.0, 101.0, 70.0], ["M", "int4-kv8", 76.0, 12.0, 162.0, 90.0]]}
    tables = {t.title.split(":")[0]: t for t in _hf_tables.tables({"M": shape}, [], {"torch sum": 12e9})}
    goals = {r[1]: r[2] for r in tables["Goals"].rows}
    assert goals["served @1 / the same graphs in process @1 (what serving costs per token)"] == "0.90×"
    assert goals["served @1 / its ceiling (int4-kv8)"] == "50%"
    assert goals["served @32 / the same graphs in process, continuous batching @32 (what serving costs at 32)"] == \
        "0.89×"
