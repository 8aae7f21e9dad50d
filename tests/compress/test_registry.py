"""The pass registry: what compress.variants may name, what needs calibration data, and where the config is checked."""

import re
from typing import get_args, get_origin

import pytest

from autoglm.cli import cli
from autoglm.config import load_settings
from autoglm.errors import ConfigError
from autoglm.tasks import Knob
from autoglm.tasks.digits import DigitsTask
from compress import Variant, VariantBuilder, check_settings, variant_for, variant_names, variant_settings
from compress import registry
from compress.registry import Pass, VariantSpec, passes, register, variant, variants
from tune.space import build_space

CALIBRATION = "static INT8 needs calibration data: set compress.quantize.calibration_batches > 0"


def test_the_registry_names_every_variant_in_its_order():
    # int4.py imports int8.py and pruned.py first, pruned_qat.py imports qat.py first
    assert variant_names() == ["fp32", "int8", "int8-dynamic", "int8-static", "pruned", "pruned-int8", "int4",
                               "pruned-int4", "qat", "pruned-qat", "trt-fp16", "trt-int8"]


def test_an_unknown_variant_is_refused_by_compress_not_by_the_core_config():
    settings = load_settings(None, ["compress.variants=['fp32', 'fp8']"])  # the core knows no variant names

    with pytest.raises(ConfigError, match=re.escape(f"unknown variant(s) ['fp8']: choose from {variant_names()}")):
        check_settings(settings)


@pytest.mark.parametrize(("variants", "mode", "refused"), [
    # int8 of a CNN goes static: without calibration batches it would fail after the fp32 export
    (["fp32", "int8"], "auto", True),
    (["pruned-int8"], "static", True),
    (["int8-static"], "dynamic", True),  # the variant fixes its mode
    (["trt-int8"], "auto", True),  # its engine is built from the static QDQ graph
    (["fp32", "int8", "pruned-int8"], "dynamic", False),
    (["int8-dynamic", "pruned", "qat", "pruned-qat", "trt-fp16"], "auto", False),  # QAT calibrates on its own
])
def test_variants_that_need_calibration_data_are_refused_without_it(variants, mode, refused):
    settings = load_settings(None, [f"compress.variants={variants}", f"compress.quantize.mode='{mode}'",
                                    "compress.quantize.calibration_batches=0"])

    if refused:
        with pytest.raises(ConfigError, match=re.escape(CALIBRATION)):
            check_settings(settings)
    else:
        check_settings(settings)


@pytest.mark.parametrize("dry_run", [[], ["--dry-run"]])
@pytest.mark.parametrize("command", ["compress", "tune"])
def test_the_stage_commands_refuse_an_unknown_variant_before_writing_anything(command, dry_run, tmp_path, capsys):
    code = cli([command, *dry_run, "--run", "bad", "--set", f"run.root='{tmp_path}'",
                "--set", "compress.variants=['fp8']"])

    err = capsys.readouterr().err
    assert code == 2 and "unknown variant(s) ['fp8']: choose from ['fp32'," in err and "Traceback" not in err
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("name", [name for name, p in passes().items() if p.knobs])
def test_a_passes_knobs_default_to_its_config_settings(name):
    found = passes()[name]
    fields = found.section.model_fields
    for key, knob in found.knobs.items():
        if key == found.switch:  # off by default in a trial; the config's own value is an "on" one
            assert not found.on({key: knob.default}) and found.on({key: fields[key].default}), key
            continue
        assert knob.default == fields[key].default, key
        if get_origin(fields[key].annotation) is not None:
            assert knob.choices == get_args(fields[key].annotation), key
    assert set(found.searched) <= set(found.knobs)


def test_a_name_registers_once_and_a_variant_only_applies_registered_passes():
    with pytest.raises(ValueError, match="Pass 'quantize' is registered twice"):
        register(Pass("quantize"))
    with pytest.raises(ValueError, match="VariantSpec 'fp32' is registered twice"):
        register(VariantSpec("fp32", build=lambda builder, name: None, passes=("export",)))
    with pytest.raises(ValueError, match=r"applies passes \['fp8'\] that are not registered"):
        register(VariantSpec("fp8", build=lambda builder, name: None, passes=("export", "fp8")))
    assert "fp8" not in variants()
    assert all(set(spec.passes) <= set(passes()) for spec in variants().values())


@pytest.fixture
def fake_pass(monkeypatch):
    """A pass with one knob and its variant, registered from this module as a new file in compress/passes would
    register them; and a pass that cannot run here. Both are gone after the test."""
    monkeypatch.setattr(registry, "_PASSES", passes())
    monkeypatch.setattr(registry, "_VARIANTS", variants())
    register(Pass("fake", knobs={"level": Knob("categorical", 0, choices=(0, 1, 2))}, searched=("level",),
                  switch="level"))
    register(Pass("absent", available=lambda: (False, "absent needs hardware this host lacks")))

    @variant("fake", passes=("export", "fake"), tuned=True, calibrates=True)
    def fake(builder, name):
        return Variant(name, builder.fp32(), {"pass": "fake"})

    @variant("fake-absent", passes=("export", "absent"))
    def absent(builder, name):
        raise AssertionError("a variant whose pass cannot run here is never built")


def test_a_registered_pass_reaches_the_config_check_tunes_space_and_a_trials_variant(fake_pass):
    settings = load_settings(None, ["compress.variants=['fp32', 'fake']", "compress.quantize.calibration_batches=4"])

    check_settings(settings)
    with pytest.raises(ConfigError, match=re.escape(CALIBRATION)):  # it said it needs calibration data
        check_settings(load_settings(None, ["compress.variants=['fake']", "compress.quantize.calibration_batches=0"]))
    assert build_space(DigitsTask(), "compression") == {
        "quantize.mode": passes()["quantize"].searched_knob("mode"), "prune.ratio": passes()["prune"].knobs["ratio"],
        "fake.level": Knob("categorical", 0, choices=(0, 1, 2))}
    assert variant_for({"fake": {"level": 2}, "quantize": {"mode": "none"}}) == "fake"
    assert variant_for({"fake": {"level": 0}, "quantize": {"mode": "static"}}) == "int8-static"
    assert variant_settings("fake", settings.compress) == {"variants": ["fake"]}  # no config section of its own
    with pytest.raises(ConfigError, match=re.escape("no compress variant applies the passes ['fake', 'quantize']")):
        variant_for({"fake": {"level": 1}, "quantize": {"mode": "static"}})


def test_a_registered_variant_builds_through_the_registry_and_is_skipped_where_its_pass_cannot_run(
        fake_pass, settings_in, tmp_path):
    task = DigitsTask(cache_dir=tmp_path / "data")
    args = task.check_model_args({"channels": 8, "hidden": 32})
    builder = VariantBuilder(task, task.build_model(args), args, settings_in("compress.exporter='legacy'"),
                             tmp_path / "out")

    built, skipped = builder.build("fake"), builder.build("fake-absent")

    assert (built.name, built.path, built.recipe, built.status) == ("fake", tmp_path / "out" / "fp32.onnx",
                                                                    {"pass": "fake"}, "ok")
    assert (skipped.status, skipped.reason, skipped.path) == ("skipped", "absent needs hardware this host lacks", None)
    assert skipped.recipe == {"pass": "absent"}


def test_quantize_mode_qat_selects_the_qat_variants_and_sets_no_config_value():
    quantize = passes()["quantize"]
    settings = load_settings(None, ["compress.variants=['fp32', 'pruned-qat']", "compress.quantize.mode='dynamic'"])
    groups = {"quantize": {"mode": "qat"}, "prune": {"ratio": 0.5}, "qat": {"steps": 30}}

    check_settings(settings)
    assert variant_for({"quantize": {"mode": "qat"}, "prune": {"ratio": 0.0}}) == "qat"
    assert variant_for(groups) == "pruned-qat"
    applied = registry.apply_knobs(settings.compress, groups)
    assert applied.quantize.mode == "dynamic" and applied.qat.steps == 30 and applied.prune.ratio == 0.5
    registry.check_knob("quantize.mode", "qat", "tune.space.quantize.mode")  # a choice, though no config value
    assert variant_settings("pruned-qat", applied)["qat"] == {"steps": 30, "lr_frac": 0.2}
    assert "qat" in quantize.knobs["mode"].choices and "qat" not in quantize.searched_knob("mode").choices
    assert [n for n, s in variants().items() if s.fine_tunes] == ["pruned", "pruned-int8", "pruned-int4", "qat",
                                                                   "pruned-qat"]


def test_two_tuned_variants_that_match_the_same_knobs_are_refused(fake_pass):
    @variant("fake-too", passes=("export", "fake"), tuned=True)
    def fake_too(builder, name):
        raise AssertionError("never built")

    with pytest.raises(ConfigError, match=re.escape("variants ['fake', 'fake-too'] both match")):
        variant_for({"fake": {"level": 1}})


def test_the_untrained_settings_skip_every_passes_training():
    cfg = registry.untrained_settings(load_settings(None, []).compress)

    assert (cfg.prune.finetune_steps, cfg.qat.steps) == (0, 0)
