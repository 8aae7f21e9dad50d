"""The autoscaling rules: the design's defaults, their bounds, and override tables layered over them."""

import json

import pytest
from pydantic import ValidationError

from autoglm.autoscaling import AutoscaleRules, rules_from
from autoglm.errors import ConfigError


def test_defaults_are_the_design_rules():
    rules = AutoscaleRules()
    assert (rules.latency_ms, rules.up_after_s, rules.up_factor) == (200, 30, 1.5)
    assert (rules.utilization_below, rules.down_after_s, rules.down_factor) == (0.30, 300, 1.2)
    assert [rules.scaled_up(n) for n in (1, 2, 3)] == [2, 3, 4]  # ceil(1.5), ceil(3), ceil(4.5) capped at 4
    assert [rules.scaled_down(n) for n in (4, 3, 2, 1)] == [3, 2, 1, 1]  # floor(n / 1.2), at least min
    with pytest.raises(ValidationError, match="min_instances=3 is above max_instances=2"):
        AutoscaleRules(min_instances=3, max_instances=2)
    assert json.loads(rules.model_dump_json())["latency_ms"] == 200  # plain data deploy/ can render


def test_later_override_tables_win_and_an_error_names_the_key():
    rules = rules_from({"max_instances": 3, "latency_ms": 150}, {"max_instances": 8})

    assert (rules.max_instances, rules.latency_ms, rules.min_instances) == (8, 150, 1)
    with pytest.raises(ConfigError, match=r"^deploy\.autoscale: rules: min_instances=5 is above max_instances=4"):
        rules_from({"min_instances": 5}, key="deploy.autoscale")
    with pytest.raises(ConfigError, match=r"serve\.autoscale_rules: latncy_ms: Extra inputs.*valid keys are"):
        rules_from({"latncy_ms": 1})
