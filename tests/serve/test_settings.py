"""Gateway settings refuse unsafe or impossible combinations with an error that names the fix."""

import json

import pytest

from autoglm.errors import ConfigError
from autoglm.gateway_spec import hash_api_key
from serve.settings import GatewaySettings


def test_upstream_address_and_pool_size():
    settings = GatewaySettings(triton_url="http://127.0.0.1:8123", max_in_flight=40)
    assert settings.upstream_address == ("127.0.0.1", 8123) and settings.pool_size == 40
    with pytest.raises(ConfigError, match="explicit port"):
        GatewaySettings(triton_url="http://triton").upstream_address


def test_the_gateway_comes_from_the_shared_config_file_then_environment_then_flags(tmp_path, monkeypatch):
    from autoglm.config import load_settings

    keys = tmp_path / "keys"
    keys.write_text(f"ci:{hash_api_key('k')}\n")
    config = tmp_path / "serve.toml"
    config.write_text(f"[serve]\nhost = '0.0.0.0'\n[serve.gateway]\nmax_in_flight = 64\nrate_limit_rps = 5.0\n"
                      f"api_keys_file = '{keys.as_posix()}'\n")
    monkeypatch.setenv("AUTOGLM_SERVE__GATEWAY__RATE_LIMIT_RPS", "7")
    settings = load_settings(config, ["serve.gateway.workers=2", "measure.watts_per_core=12"])

    gateway = GatewaySettings.from_settings(settings, port=0)

    assert (gateway.host, gateway.port, gateway.max_in_flight, gateway.rate_limit_rps, gateway.workers) == \
        ("0.0.0.0", 0, 64, 7.0, 2)
    assert [k.name for k in gateway.api_keys] == ["ci"] and gateway.watts_per_core == 12
    assert gateway.pool_size == 64  # the gateway's own settings, not only the spec deploy renders
    assert json.loads(settings.to_json())["serve"]["gateway"]["max_in_flight"] == 64  # saved resolved with the run
    with pytest.raises(ConfigError, match=r"serve\.gateway\.max_in_flight"):
        load_settings(config, ["serve.gateway.max_in_flight=0"])


def test_the_serve_flags_are_shorthands_of_the_serve_section(tmp_path):
    from autoglm.cli import build_parser, settings_from_args
    from serve.__main__ import FLAGS, check, gateway_settings

    def resolve(*argv):
        settings = settings_from_args(build_parser("autoglm serve", None, FLAGS).parse_args(argv), FLAGS)
        check(settings)
        return settings, gateway_settings(settings)

    keys = tmp_path / "keys"
    keys.write_text(f"ci:{hash_api_key('k')}\n")
    settings, gateway = resolve("-g", "max_in_flight=32", "--workers", "2", "--api-keys-file", str(keys),
                                "--set", "serve.host='0.0.0.0'", "--models", "fp32,int8", "--flavour", "native",
                                "--control-port", "0", "-a", "max_instances=3")

    assert (settings.serve.models, settings.serve.flavour, settings.serve.control_port, settings.serve.autoscale) == \
        (["fp32", "int8"], "native", 0, True)  # -a implies --autoscale
    assert json.loads(settings.to_json())["serve"]["autoscale_rules"] == {"max_instances": 3}  # saved resolved

    assert settings.serve.gateway.model_dump(include={"max_in_flight", "workers", "api_keys_file"}) == \
        {"max_in_flight": 32, "workers": 2, "api_keys_file": keys}  # in the config saved with the run
    assert (gateway.max_in_flight, gateway.workers, gateway.host, [k.name for k in gateway.api_keys]) == \
        (32, 2, "0.0.0.0", ["ci"])
    with pytest.raises(ConfigError, match="API keys are required"):
        resolve("--set", "serve.host='0.0.0.0'")
    with pytest.raises(ConfigError, match=r"serve\.autoscale_rules: latency_ms: .*greater than 0"):
        resolve("-a", "latency_ms=0")  # refused before anything starts
    with pytest.raises(ConfigError, match=r"serve\.gateway\.workers: .*greater than or equal to 1"):
        resolve("--workers", "0")  # not dropped for the config's 1
