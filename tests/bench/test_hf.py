"""The hf bench's batch-1 ceiling: the read bandwidth by several readers, and a ceiling that a variant beats
marked suspect instead of printed as more than 100%."""

import math

from bench import hf


def test_every_reader_streams_the_buffer_at_a_finite_rate():
    rates = hf.read_bandwidth(gib=1 / 64, repeats=2)
    assert set(rates) == set(hf.BANDWIDTH_READERS)
    assert all(0 < r < math.inf for r in rates.values())


def test_a_share_is_printed_within_the_ceiling_and_suspect_beyond_it():
    assert hf.of_ceiling(25.0, 50.0) == "50%"
    assert hf.of_ceiling(50.0, 50.0) == "100%"
    assert hf.of_ceiling(51.0, 50.0) == "over it: bandwidth suspect"


def test_the_ceiling_table_says_which_variant_makes_the_bandwidth_suspect():
    bandwidths = {"torch sum": 10e9, "numpy max, a thread per core": 12e9}
    rows = [["GPT-2", "fp32", 472.0, 11.9, 24.0, 35.6], ["GPT-2", "int8", 118.0, 12.0, 97.0, 80.0]]
    table = hf._ceiling_table(rows, bandwidths)
    assert table.title.startswith("The batch-1 ceiling: read bandwidth (suspect)")
    assert [r[-1] for r in table.rows] == ["over it: bandwidth suspect", "82%"]
    assert any(n.startswith("SUSPECT: GPT-2 fp32 decoded faster") for n in table.notes)
    assert "torch sum 10.0 GB/s" in table.notes[0] and "numpy max, a thread per core 12.0 GB/s" in table.notes[0]
    assert "%" not in "".join(str(r[-1]) for r in table.rows if r[5] > r[4])


def test_a_ceiling_no_variant_beats_is_not_suspect():
    table = hf._ceiling_table([["Llama", "int8", 129.0, 12.7, 97.0, 60.0]], {"torch sum": 12.5e9})
    assert "suspect" not in table.title and not any("SUSPECT" in n for n in table.notes)
    assert table.rows[0][-1] == "62%"
