"""compress's recommendation: never a published variant that another one dominates on metric and latency."""

from types import SimpleNamespace

import pytest

from autoglm.errors import AutoGLMError
from compress.recommend import LATENCY_TOLERANCE, dominates, median_noise_ms, points, recommend
from compress.variants import Variant

DIGITS = SimpleNamespace(metric="accuracy", direction="maximize")
CHARLM = SimpleNamespace(metric="val_loss", direction="minimize")


def _variant(name, value, p50=None, *, batch=1, p95=None, n=30, status="ok", metric="accuracy"):
    profile = {} if p50 is None else {batch: {"p50_ms": p50, "p95_ms": p50 if p95 is None else p95, "n": n}}
    return Variant(name, None, status=status, metrics={metric: value}, profile=profile)


def test_the_issues_case_a_slower_and_worse_preferred_variant_is_replaced_by_the_one_that_dominates_it():
    """A small tabular model: tune picked pruned-int8, which compress times at 0.016 ms with a worse metric than
    fp32 at 0.008 ms (batch 1)."""
    variants = [_variant("torch", 0.98, 0.02, status="reference"), _variant("fp32", 0.98, 0.008),
                _variant("int8", 0.975, 0.012), _variant("pruned-int8", 0.97, 0.016)]

    choice = recommend(DIGITS, variants, serving_batch=1, preferred="pruned-int8")

    assert choice.variant == "fp32" and choice.batch == 1
    assert choice.replaced == {"variant": "pruned-int8", "source": "tune", "by": "fp32", "why": choice.replaced["why"]}
    assert choice.why.startswith("tune selected pruned-int8, but fp32, int8 dominate it at batch 1 (fp32: accuracy "
                                 "0.9800, p50 0.0080 ms; pruned-int8: accuracy 0.9700, p50 0.0160 ms;")
    assert choice.dominated_by == {"int8": ["fp32"], "pruned-int8": ["fp32", "int8"]}
    assert "torch" not in choice.record()["dominated_by"]  # the reference is not published


def test_a_preferred_variant_on_the_front_is_kept():
    variants = [_variant("fp32", 0.98, 0.10), _variant("int8", 0.97, 0.05)]  # faster, slightly worse: a trade-off
    choice = recommend(DIGITS, variants, serving_batch=1, preferred="int8")
    assert choice.variant == "int8" and choice.replaced is None and choice.dominated_by == {}
    assert choice.why.startswith("selected by tune from the Pareto front")


def test_a_lower_loss_is_better_for_a_minimized_metric():
    variants = [_variant("fp32", 2.50, 0.10, metric="val_loss"), _variant("int8", 2.60, 0.12, metric="val_loss")]
    assert recommend(CHARLM, variants, serving_batch=1, preferred="int8").variant == "fp32"
    flipped = [_variant("fp32", 2.60, 0.10, metric="val_loss"), _variant("int8", 2.50, 0.12, metric="val_loss")]
    assert recommend(CHARLM, flipped, serving_batch=1, preferred="int8").variant == "int8"


def test_latencies_within_the_tolerance_are_a_tie_so_equal_metrics_keep_the_preference():
    faster = 1.0 - LATENCY_TOLERANCE / 2  # fp32 a little faster, inside the tolerance
    variants = [_variant("fp32", 0.98, faster), _variant("int8", 0.98, 1.0)]
    assert recommend(DIGITS, variants, serving_batch=1, preferred="int8").variant == "int8"
    clearly = [_variant("fp32", 0.98, 1.0 - 2 * LATENCY_TOLERANCE), _variant("int8", 0.98, 1.0)]
    assert recommend(DIGITS, clearly, serving_batch=1, preferred="int8").variant == "fp32"


def test_a_tie_in_latency_with_a_better_metric_dominates():
    variants = [_variant("fp32", 0.98, 1.01), _variant("int8", 0.95, 1.0)]  # as fast within noise, more accurate
    choice = recommend(DIGITS, variants, serving_batch=1, preferred="int8")
    assert choice.variant == "fp32" and choice.replaced["variant"] == "int8"


def test_a_window_with_a_wide_spread_does_not_flip_the_recommendation():
    """fp32's median is 20% lower, but its window of 5 calls spread to 10 ms: within its own noise."""
    noisy = [_variant("fp32", 0.98, 0.8, p95=10.0, n=5), _variant("int8", 0.98, 1.0, p95=1.1, n=5)]
    assert median_noise_ms(noisy[0].profile[1]) > 0.2
    assert recommend(DIGITS, noisy, serving_batch=1, preferred="int8").variant == "int8"
    steady = [_variant("fp32", 0.98, 0.8, p95=0.85, n=30), _variant("int8", 0.98, 1.0, p95=1.1, n=30)]
    assert recommend(DIGITS, steady, serving_batch=1, preferred="int8").variant == "fp32"


def test_a_variant_without_a_latency_cannot_dominate_or_be_dominated():
    variants = [_variant("fp32", 0.99, 0.5), _variant("int8", 0.90)]  # int8 was never timed at this batch
    points_at = points(variants, "accuracy", 1)
    assert not dominates(points_at["fp32"], points_at["int8"], "maximize")
    choice = recommend(DIGITS, variants, serving_batch=1, preferred="int8")
    assert choice.variant == "int8" and "no accuracy or latency at batch 1: not compared" in choice.why
    untimed = [_variant("fp32", 0.99), _variant("int8", 0.90, 0.5)]  # the better metric has no latency
    assert recommend(DIGITS, untimed, serving_batch=1, preferred="int8").variant == "int8"


def test_without_a_preference_the_fastest_variant_nothing_dominates_is_chosen():
    variants = [_variant("fp32", 0.98, 1.0), _variant("int8", 0.97, 0.5), _variant("pruned", 0.90, 0.49)]
    choice = recommend(DIGITS, variants, serving_batch=1)  # pruned is 2% faster than int8: a tie, and worse
    assert choice.variant == "int8" and choice.replaced is None
    assert choice.dominated_by == {"pruned": ["int8"]} and choice.why.startswith("lowest p50 latency at batch 1")


def test_a_preference_that_was_not_published_is_said_and_the_fastest_undominated_variant_chosen():
    variants = [_variant("fp32", 0.98, 1.0), _variant("int8", 0.80, 0.5, status="rejected")]
    variants[1].reason = "accuracy 0.8000 is 18.37% worse than FP32 torch's 0.9800"
    choice = recommend(DIGITS, variants, serving_batch=1, preferred="int8")
    assert choice.variant == "fp32" and choice.why.startswith(
        "tune selected int8, which is not published (rejected: accuracy 0.8000 is 18.37% worse than FP32 torch's "
        "0.9800); lowest p50 latency at batch 1")


def test_the_replacement_is_followed_until_no_variant_dominates_it():
    """Dominance with a tolerance is not transitive: b beats the preferred a, c beats b but not a; c is served."""
    variants = [_variant("a", 0.90, 1.00), _variant("b", 0.91, 1.04), _variant("c", 0.92, 1.08)]
    choice = recommend(DIGITS, variants, serving_batch=1, preferred="a")
    assert choice.dominated_by == {"a": ["b"], "b": ["c"]}
    assert choice.variant == "c" and choice.replaced["by"] == "c" and choice.why.endswith(
        "c is dominated by no published variant")


def test_the_serving_batch_is_compared_where_compress_timed_it_else_the_largest_batch():
    def at(name, value, b1, b32):
        v = _variant(name, value, b1)
        v.profile[32] = {"p50_ms": b32, "p95_ms": b32, "n": 30}
        return v

    variants = [at("fp32", 0.98, 0.01, 2.0), at("int8", 0.98, 0.02, 1.0)]  # int8 wins at 32, loses at 1
    assert recommend(DIGITS, variants, serving_batch=32, preferred="fp32").variant == "int8"
    assert recommend(DIGITS, variants, serving_batch=1, preferred="int8").variant == "fp32"
    untimed = recommend(DIGITS, variants, serving_batch=8, preferred="fp32")
    assert untimed.variant == "int8" and untimed.batch == 32
    assert "the largest compress timed; tune.serving_batch=8 was not timed" in untimed.why


def test_nothing_published_is_an_error_naming_the_fix():
    with pytest.raises(AutoGLMError, match="raise compress.max_metric_loss"):
        recommend(DIGITS, [_variant("int8", 0.5, 1.0, status="rejected")], serving_batch=1)
