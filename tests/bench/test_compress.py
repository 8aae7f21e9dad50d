"""The article-comparison table of ``make bench ARGS=compress``, from a hand-made measurement."""

from types import SimpleNamespace

from bench.compress import ARTICLE, article_table, measurement
from compress.variants import Variant


def _m(metric, p1, p32, joules, method="estimated:cpu-s×10W"):
    return {"metric": metric, "p50_ms": {1: p1, 32: p32}, "j_per_item": joules, "energy_method": method}


MEASURED = {
    "digits": {"metric": "accuracy", "prune_ratio": 0.5, "variants": {
        "torch": _m(0.96, 2.0, 10.0, 4.0), "fp32": _m(0.96, 1.0, 5.0, 2.0),
        "int8-static": _m(0.95, 0.5, 2.5, 1.0), "pruned": _m(0.90, 0.8, 4.0, 1.5)}},
    "charlm": {"metric": "perplexity", "prune_ratio": 0.5, "variants": {
        "torch": _m(5.0, 4.0, 40.0, 8.0, "rapl"), "fp32": _m(5.0, 2.0, 20.0, 4.0, "rapl"),
        "int8-dynamic": _m(5.1, 1.0, 30.0, 5.0, "rapl")}},  # no pruned row: its rows are left out
}


def _rows(table):
    return [dict(zip(table.columns, row, strict=True)) for row in table.rows]


def test_the_article_rows_carry_its_figures():
    rows = [r for r in _rows(article_table(MEASURED)) if r["source"] == "article"]

    assert [r["claim"] for r in rows] == list(ARTICLE)
    int8, pruning = rows
    assert int8["Δ quality"] == "accuracy −1.2%" and int8["Δ p50 latency @32"] == "−35.0%"
    assert int8["Δ energy / inference @32"].startswith("−40.0%")
    assert pruning["Δ quality"] == "accuracy −3.8%" and pruning["Δ p50 latency @1"] == "−52.0%"
    assert pruning["Δ energy / inference @32"].startswith("−58.0%")


def test_each_variant_is_compared_with_fp32_onnx_and_torch_eager():
    rows = {(r["claim"], r["source"], r["relative to"]): r for r in _rows(article_table(MEASURED))}

    vs_onnx = rows[("INT8", "digits int8-static", "FP32 ONNX")]
    vs_torch = rows[("INT8", "digits int8-static", "torch eager FP32")]
    assert vs_onnx["Δ quality"] == "accuracy −1.0%"
    assert (vs_onnx["Δ p50 latency @1"], vs_onnx["Δ p50 latency @32"]) == ("−50.0%", "−50.0%")
    assert (vs_torch["Δ p50 latency @1"], vs_torch["Δ p50 latency @32"]) == ("−75.0%", "−75.0%")
    assert vs_onnx["Δ energy / inference @32"] == "−50.0% (estimated)"
    pruned = rows[("50% channel pruning", "digits pruned (ratio 0.5)", "FP32 ONNX")]
    assert pruned["Δ quality"] == "accuracy −6.2%" and pruned["Δ energy / inference @32"] == "−25.0% (estimated)"
    charlm = rows[("INT8", "charlm int8-dynamic", "FP32 ONNX")]
    assert charlm["Δ quality"] == "perplexity +2.0%" and charlm["Δ p50 latency @32"] == "+50.0%"
    assert charlm["Δ energy / inference @32"] == "+25.0% (measured)"
    assert not any(k[1].startswith("charlm pruned") for k in rows)
    assert len(rows) == 2 + 2 * 2 + 2  # article rows; digits int8-static and pruned, charlm int8-dynamic


def test_the_measurement_reads_the_variants_and_skips_those_not_built():
    profile = {b: {"p50_ms": b / 10, "j_per_item": 0.01, "energy_method": "estimated:x"} for b in (1, 32)}
    task = SimpleNamespace(name="charlm", metric="val_loss")
    variants = [Variant("torch", None, metrics={"val_loss": 1.6, "perplexity": 5.0}, profile=profile,
                        status="reference"),
                Variant("int8-static", None, status="skipped", reason="no calibration data")]

    m = measurement(task, variants, 0.5)

    assert m["metric"] == "perplexity" and list(m["variants"]) == ["torch"]
    assert m["variants"]["torch"] == {"metric": 5.0, "p50_ms": {1: 0.1, 32: 3.2}, "j_per_item": 0.01,
                                      "energy_method": "estimated:x"}
