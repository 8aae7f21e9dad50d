"""The pass registry: what compress.variants may name, what needs calibration data, and where the config is checked."""

import re

import pytest

from autoglm.cli import cli
from autoglm.config import load_settings
from autoglm.errors import ConfigError
from compress import check_settings, variant_names

CALIBRATION = "static INT8 needs calibration data: set compress.quantize.calibration_batches > 0"


def test_the_registry_names_every_variant_in_its_order():
    assert variant_names() == ["fp32", "int8", "int8-dynamic", "int8-static", "pruned", "pruned-int8", "qat",
                               "trt-fp16", "trt-int8"]


def test_an_unknown_variant_is_refused_by_compress_not_by_the_core_config():
    settings = load_settings(None, ["compress.variants=['fp32', 'int4']"])  # the core knows no variant names

    with pytest.raises(ConfigError, match=re.escape(f"unknown variant(s) ['int4']: choose from {variant_names()}")):
        check_settings(settings)


@pytest.mark.parametrize(("variants", "mode", "refused"), [
    # int8 of a CNN goes static: without calibration batches it would fail after the fp32 export
    (["fp32", "int8"], "auto", True),
    (["pruned-int8"], "static", True),
    (["int8-static"], "dynamic", True),  # the variant fixes its mode
    (["trt-int8"], "auto", True),  # its engine is built from the static QDQ graph
    (["fp32", "int8", "pruned-int8"], "dynamic", False),
    (["int8-dynamic", "pruned", "qat", "trt-fp16"], "auto", False),
])
def test_variants_that_need_calibration_data_are_refused_without_it(variants, mode, refused):
    settings = load_settings(None, [f"compress.variants={variants}", f"compress.quantize.mode='{mode}'",
                                    "compress.quantize.calibration_batches=0"])

    if refused:
        with pytest.raises(ConfigError, match=re.escape(CALIBRATION)):
            check_settings(settings)
    else:
        check_settings(settings)


@pytest.mark.parametrize("command", ["compress", "tune"])
def test_the_stage_commands_refuse_an_unknown_variant_before_writing_anything(command, tmp_path, capsys):
    code = cli([command, "--run", "bad", "--set", f"run.root='{tmp_path}'", "--set", "compress.variants=['int4']"])

    err = capsys.readouterr().err
    assert code == 2 and "unknown variant(s) ['int4']: choose from ['fp32'," in err and "Traceback" not in err
    assert not (tmp_path / "bad").exists()
