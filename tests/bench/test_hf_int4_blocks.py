"""``bench hf --int4-blocks``: its rows, and the development corpora and shapes it picks the default on."""

import pytest

from bench import _hf_int4_blocks
from bench.pool import SPLIT


def test_rows_give_each_blocks_median_its_ratio_to_block_32_and_the_paired_wins():
    found = {32: {1: [100.0, 90.0, 110.0], 8: [400.0, 420.0, 380.0]},
             64: {1: [120.0, 80.0, 121.0], 8: [400.0, 410.0, 370.0]},
             128: {1: [130.0, 130.0, 90.0], 8: [500.0, 520.0, 480.0]}}
    rows = _hf_int4_blocks.speed_rows("shape", found)
    assert [r[1:3] for r in rows] == [[1, 32], [1, 64], [1, 128], [8, 32], [8, 64], [8, 128]]
    assert rows[1][3:] == [120.0, "1.20×", "2/3"]  # beat block 32 in rounds 1 and 3
    assert rows[2][3:] == [130.0, "1.30×", "2/3"]
    assert rows[4][3:] == [400.0, "1.00×", "0/3"]  # equal medians; round 1 ties: not a win
    assert rows[0][-1] == rows[3][-1] == "—"


def test_losses_are_read_on_development_corpora_only(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(_hf_int4_blocks, "_speeds", lambda *a, **k: {b: {1: [1.0]} for b in _hf_int4_blocks.BLOCKS})
    monkeypatch.setattr(_hf_int4_blocks, "_losses", lambda name, *a: seen.append(name) or {32: 0.0})
    _hf_int4_blocks.run(True, ["--int4-blocks"])
    assert seen and all(SPLIT[name] == "dev" for name in seen)


def test_an_unknown_shape_set_is_refused_before_anything_is_built(capsys):
    with pytest.raises(SystemExit):
        _hf_int4_blocks.run(True, ["--int4-blocks", "--shapes", "goal-only"])
    assert "invalid choice" in capsys.readouterr().err
