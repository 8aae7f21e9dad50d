"""``bench hf --spinning`` / ``--prefill-thread``: its rows, and its development shapes kept apart from the goal
shapes."""

import pytest

from bench import _hf_models, _hf_modes


def test_rows_give_every_round_the_median_the_ratio_to_off_and_the_paired_wins():
    found = {"off": {1: [100.0, 90.0, 110.0], 32: [500.0, 520.0, 480.0]},
             "run": {1: [120.0, 80.0, 121.0], 32: [500.0, 510.0, 470.0]}}
    ttft = {"off": {1: [30.0, 50.0, 40.0], 32: [900.0, 800.0, 1000.0]}, "run": {1: [20.0, 20.0, 30.0], 32: [1.0] * 3}}
    rows = _hf_modes.rows_of("shape", found, ttft)
    assert [r[:3] for r in rows] == [["shape", 1, "off"], ["shape", 1, "run"], ["shape", 32, "off"],
                                     ["shape", 32, "run"]]
    assert rows[1][3:] == [120.0, 80.0, 121.0, 120.0, "1.20×", "2/3", 20.0]  # beat off in rounds 1 and 3
    assert rows[3][-4:] == [500.0, "1.00×", "0/3", 1.0]  # equal medians; round 1 ties off: not a win
    assert rows[0][-2:] == ["—", 40.0] and rows[2][-1] == 900.0  # TTFT: the median of the rounds


def test_the_development_shapes_are_not_the_goal_shapes():
    goal = [config for _, config in _hf_models.SHAPES.values()]
    assert _hf_models.DEV_SHAPES and all(config not in goal for _, config in _hf_models.DEV_SHAPES.values())
    assert set(_hf_models.DEV_SHAPES).isdisjoint(_hf_models.SHAPES)


def test_an_unknown_shape_set_is_refused_before_anything_is_built(capsys):
    with pytest.raises(SystemExit):
        _hf_modes.run(True, ["--spinning", "--shapes", "goal-only"])
    assert "invalid choice" in capsys.readouterr().err


def test_the_reference_is_the_first_value_and_each_flag_measures_its_own_parameter(monkeypatch):
    rows = _hf_modes.rows_of("shape", {"true": {1: [100.0], 32: [500.0]}, "false": {1: [90.0], 32: [600.0]}},
                             {"true": {1: [5.0], 32: [50.0]}, "false": {1: [6.0], 32: [70.0]}})
    assert [r[2] for r in rows] == ["true", "false", "true", "false"]
    assert rows[1][-3:] == ["0.90×", "0/1", 6.0] and rows[3][-3:] == ["1.20×", "1/1", 70.0] and rows[0][-2] == "—"
    seen = []
    monkeypatch.setattr(_hf_modes, "_shape", lambda *a: seen.append(a[-1]) or ([], []))
    monkeypatch.setattr(_hf_modes.hf_models, "DEV_SHAPES", {"dev": ("llama", {})})
    tables = _hf_modes.run(True, ["--prefill-thread"]) + _hf_modes.run(True, ["--spinning"])
    assert seen == ["prefill_thread", "spinning"]
    assert [t.columns[2] for t in tables] == ["prefill_thread", "intra_op_spinning"]


def test_in_process_rows_compare_the_loop_with_the_thread_per_step_thread_count_and_name_autos_pick(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    found = {(1, True): [900.0, 950.0, 910.0], (1, False): [700.0, 960.0, 690.0],
             (4, True): [1000.0, 1100.0, 1050.0], (4, False): [1200.0, 1150.0, 1000.0]}
    rows = _hf_modes.in_process_rows("shape", found)
    assert [r[:3] for r in rows] == [["shape", 1, "thread"], ["shape", 1, "loop"], ["shape", 4, "thread"],
                                     ["shape", 4, "loop"]]
    assert rows[0][-4:] == [910.0, "1.00×", "—", "thread"]  # one step thread leaves three cores: auto's thread
    assert rows[1][-4:] == [700.0, "0.77×", "1/3", "thread"]
    assert rows[3][-4:] == [1150.0, "1.10×", "2/3", "loop"]  # the step on every core: auto encodes on the loop


def test_one_parameter_at_a_time(capsys):
    with pytest.raises(SystemExit):
        _hf_modes.run(True, ["--spinning", "--prefill-thread"])
    assert "not allowed with argument" in capsys.readouterr().err
