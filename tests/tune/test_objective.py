"""A trial times the untrained model's compressed graph and lets it stand for the trained one's: the two
graphs must be the same op for op, for every compression a trial can draw."""

import pytest
import torch

from autoglm.tasks.charlm import CharLMTask
from autoglm.tasks.digits import DigitsTask
from compress import VariantBuilder, graph_signature
from tune.objective import untrained_model

VARIANTS = ("fp32", "int8-dynamic", "int8-static", "pruned", "pruned-int8")  # all that tune.space draws
CASES = {
    "digits": (DigitsTask, {"channels": 8, "hidden": 32}),
    # zero-initialized biases: the ONNX simplifier drops an Add of zeros that a trained model keeps
    "charlm with biases": (CharLMTask, {"n_layer": 1, "n_embd": 32, "n_head": 2, "block_size": 16, "bias": True}),
    "charlm": (CharLMTask, {"n_layer": 1, "n_embd": 32, "n_head": 2, "block_size": 16, "bias": False}),
}
COMPRESS = ["compress.exporter='legacy'", "compress.quantize.calibration_batches=2", "compress.prune.ratio=0.5"]


def _trained(task, model_args):
    """The model with weights no initializer makes (what training leaves behind, as far as a graph can tell)."""
    model = task.build_model(model_args)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    return model


@pytest.mark.parametrize("case", CASES)
def test_the_untrained_graph_a_trial_times_is_the_trained_one(case, settings_in, tmp_path):
    cls, overrides = CASES[case]
    task = cls(cache_dir=tmp_path / "data")
    args = task.check_model_args(overrides)
    trained = VariantBuilder(task, _trained(task, args), args,
                             settings_in(f"task.name='{task.name}'", *COMPRESS, "compress.prune.finetune_steps=2"),
                             tmp_path / "trained")
    # as a trial's probe builds it: pruned without fine-tune
    untrained = VariantBuilder(task, untrained_model(task, args), args,
                               settings_in(f"task.name='{task.name}'", *COMPRESS, "compress.prune.finetune_steps=0"),
                               tmp_path / "untrained")

    for name in VARIANTS:
        assert graph_signature(untrained.build(name).path) == graph_signature(trained.build(name).path), name


def test_graphs_that_differ_in_an_op_or_a_shape_have_different_signatures(settings_in, tmp_path):
    task = DigitsTask()
    settings = settings_in(*COMPRESS)
    signatures = {}
    for hidden, variant in ((32, "fp32"), (32, "int8-dynamic"), (48, "fp32")):
        args = task.check_model_args({"channels": 8, "hidden": hidden})
        builder = VariantBuilder(task, untrained_model(task, args), args, settings, tmp_path / f"{hidden}-{variant}")
        signatures[hidden, variant] = graph_signature(builder.build(variant).path)

    assert len(set(signatures.values())) == 3
    assert graph_signature(None) == () and graph_signature(tmp_path / "model.plan") == ()


def test_a_trial_applies_every_compression_knob_it_draws():
    from autoglm.config import load_settings
    from tune.objective import trial_settings
    from tune.space import split_params

    settings = load_settings(None, ["compress.quantize.calibration='minmax'"])
    groups = split_params({"quantize.mode": "static", "quantize.calibration": "entropy", "prune.ratio": 0.0})
    applied = trial_settings(settings, groups, "int8-static").compress

    assert applied.variants == ["int8-static"]
    assert applied.quantize.mode == "static" and applied.quantize.calibration == "entropy"
    assert applied.prune.ratio == settings.compress.prune.ratio  # ratio 0 means no pruning, not a ratio to set


def test_a_trial_drawing_qat_builds_pruned_qat_and_its_probe_times_the_same_graph(settings_in, tmp_path):
    from compress import untrained_settings, variant_for
    from tune.objective import trial_settings
    from tune.space import split_params

    task = DigitsTask(cache_dir=tmp_path / "data")
    args = task.check_model_args({"channels": 8, "hidden": 32})
    groups = split_params({"quantize.mode": "qat", "prune.ratio": 0.5, "qat.steps": 4})
    name = variant_for(groups)
    settings = trial_settings(settings_in(*COMPRESS, "compress.prune.finetune_steps=2", "train.batch_size=16"),
                              groups, name)
    probe = settings.model_copy(update={"compress": untrained_settings(settings.compress)})

    trained = VariantBuilder(task, _trained(task, args), args, settings, tmp_path / "trained").build(name)
    untrained = VariantBuilder(task, untrained_model(task, args), args, probe, tmp_path / "probe").build(name)

    assert name == "pruned-qat" and settings.compress.variants == ["pruned-qat"]
    assert settings.compress.qat.steps == 4 and probe.compress.qat.steps == 0  # the probe skips QAT's fine-tune
    assert trained.recipe["then"]["steps"] == 4 and graph_signature(untrained.path) == graph_signature(trained.path)
