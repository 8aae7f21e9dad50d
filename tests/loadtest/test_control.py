"""Serving-config overrides built from Triton's own config JSON (the live application is in test_live.py)."""

import copy

import pytest

from autoglm.errors import AutoGLMError
from loadtest.control import ModelControl, ServingConfig, override, serving_knobs
from autoglm.config import SweepGrid
from loadtest.sweep import serving_configs, sweep_models
from serve.triton import free_port

BASE = {  # the shape of GET /v2/models/<m>/config (HTTP JSON), trimmed
    "name": "digits-fp32", "backend": "python", "max_batch_size": 64,
    "dynamic_batching": {"preferred_batch_size": [64], "max_queue_delay_microseconds": 0,
                         "default_queue_policy": {"timeout_action": "REJECT", "default_timeout_microseconds": 5,
                                                  "max_queue_size": 256}},
    "instance_group": [{"name": "digits-fp32_0", "kind": "KIND_CPU", "count": 1}],
    "parameters": {"intra_op_threads": {"string_value": "1"}},
}


def test_override_changes_only_the_swept_knobs():
    original = copy.deepcopy(BASE)
    out = override(BASE, ServingConfig("digits-fp32", max_queue_delay_us=2000, preferred_batch_sizes=(8, 16),
                                       instances=3))
    assert original == BASE  # the base is reused for every config: never modified
    assert serving_knobs(out) == {"max_queue_delay_us": 2000, "preferred_batch_sizes": [8, 16], "instances": 3,
                                  "max_queue_size": 256, "max_batch_size": BASE["max_batch_size"]}
    assert out["parameters"] == BASE["parameters"] and out["instance_group"][0]["kind"] == "KIND_CPU"


def test_none_keeps_the_models_value():
    assert override(BASE, ServingConfig("digits-fp32")) == BASE


def test_unbounded_queue_restores_the_default_queue_policy():
    policy = override(BASE, ServingConfig("digits-fp32", max_queue_size=0))["dynamic_batching"]["default_queue_policy"]
    assert policy["max_queue_size"] == 0 and policy["default_timeout_microseconds"] == 0


def test_impossible_overrides_name_the_fix():
    with pytest.raises(AutoGLMError, match="no dynamic batching"):
        override({**BASE, "dynamic_batching": None}, ServingConfig("digits-fp32", max_queue_delay_us=10))
    with pytest.raises(AutoGLMError, match=r"outside 1\.\.max_batch_size=64"):
        override(BASE, ServingConfig("digits-fp32", preferred_batch_sizes=(8, 128)))
    with pytest.raises(AutoGLMError, match="instances=0"):
        ServingConfig("digits-fp32", instances=0)


def test_labels_say_what_changed():
    assert ServingConfig("m", 2000, (8, 16), 2, 0).label() == "m delay=2000µs pref=[8,16] x2 queue=unbounded"
    assert ServingConfig("m").label() == "m"


def test_grid_order_keeps_instance_changes_innermost():
    grid = SweepGrid(max_queue_delay_us=[0, 500], instances=[1, 2], preferred_batch_sizes=[None, [8]])
    configs = serving_configs(["a"], grid)
    assert len(configs) == 8 == grid.size(1, 16) // 2  # two concurrencies (1 and 16) per config
    assert [c.instances for c in configs[:4]] == [1, 2, 1, 2]
    assert [c.max_queue_delay_us for c in configs[:4]] == [0, 0, 500, 500]


def test_sweep_models_from_variant_names():
    info = {"models": {"fp32": "d-fp32", "int8": "d-int8"}, "recommended": "d-int8"}
    assert sweep_models(info, [], "d-int8") == ["d-int8"]
    assert sweep_models(info, ["all"], "d-int8") == ["d-fp32", "d-int8"]
    assert sweep_models(info, ["int8", "d-fp32"], "x") == ["d-int8", "d-fp32"]
    with pytest.raises(AutoGLMError, match="choose from"):
        sweep_models(info, ["pruned"], "x")


def test_unreachable_triton_names_the_fix():
    with pytest.raises(AutoGLMError, match="--triton-url"):
        ModelControl(f"http://127.0.0.1:{free_port()}", timeout_s=2).config("m")
