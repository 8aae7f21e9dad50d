"""Sampling and stop strings shared by the decode loops."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from autoglm.sampling import Sampler, StopMatcher

LOGITS = np.log(np.array([0.5, 0.3, 0.15, 0.05]))


def draws(sampler: Sampler, n: int = 4000) -> np.ndarray:
    return np.bincount([sampler(LOGITS) for _ in range(n)], minlength=4) / n


def test_greedy_takes_the_most_likely_token():
    assert Sampler(temperature=0)(LOGITS) == 0


def test_temperature_one_samples_the_model_distribution():
    np.testing.assert_allclose(draws(Sampler(seed=0)), [0.5, 0.3, 0.15, 0.05], atol=0.03)


def test_top_k_and_top_p_cut_the_tail():
    assert set(np.flatnonzero(draws(Sampler(top_k=2, seed=1)))) == {0, 1}
    # top_p 0.7: 0.5 alone is not enough, 0.5 + 0.3 reaches it; renormalized 5/8, 3/8
    np.testing.assert_allclose(draws(Sampler(top_p=0.7, seed=2)), [0.625, 0.375, 0, 0], atol=0.03)


def test_a_seed_reproduces_the_sequence_and_seeds_are_independent():
    a, b, c = Sampler(seed=5), Sampler(seed=5), Sampler(seed=6)
    first = [a(LOGITS) for _ in range(50)]
    assert first == [b(LOGITS) for _ in range(50)] != [c(LOGITS) for _ in range(50)]


def test_a_tiny_temperature_is_greedy_not_nan():
    assert {Sampler(temperature=1e-308, seed=k)(LOGITS) for k in range(20)} == {0}
    assert Sampler(temperature=1e-308, top_k=2, seed=0)(LOGITS) == 0


@pytest.mark.parametrize("kwargs", [{"temperature": -1}, {"top_k": 0}, {"top_p": 0}, {"top_p": 1.5}])
def test_bad_parameters_raise(kwargs):
    with pytest.raises(ValueError):
        Sampler(**kwargs)


def test_stop_strings_hold_back_possible_prefixes_and_are_never_emitted():
    m = StopMatcher(["\n\n", "END"])
    assert m.push("ab") == ("ab", False)
    assert m.push("\n") == ("", False)  # may start "\n\n"
    assert m.push("c") == ("\nc", False)  # it did not
    assert m.push("E") == ("", False)
    assert m.push("N") == ("", False)
    assert m.push("D") == ("", True)
    assert StopMatcher(["xy"]).push("axyb") == ("a", True)


@given(st.text(alphabet="abx", max_size=30), st.lists(st.text(alphabet="abx", min_size=1, max_size=3), max_size=3))
def test_streamed_text_is_the_text_up_to_the_first_stop(text, stops):
    m, out, stopped = StopMatcher(stops), [], False
    for ch in text:
        piece, stopped = m.push(ch)
        out.append(piece)
        if stopped:
            break
    if not stopped:
        out.append(m.flush())
    # generation ends when the first stop string completes; the text ends where that string starts
    ends = [(text.find(s) + len(s), text.find(s)) for s in stops if s in text]
    expected = text[:min(ends)[1]] if ends else text
    assert "".join(out) == expected and stopped == bool(ends)
