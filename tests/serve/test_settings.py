"""Gateway settings refuse unsafe or impossible combinations with an error that names the fix."""

import json

import pytest
from pydantic import ValidationError

from autoglm.errors import ConfigError
from serve.settings import ApiKey, GatewaySettings, hash_api_key, is_loopback, new_api_key, read_key_file


def test_beyond_loopback_without_keys_is_refused():
    with pytest.raises(ValidationError, match="API keys are required.*--api-keys-file"):
        GatewaySettings(host="0.0.0.0")
    key = ApiKey(name="ci", sha256=hash_api_key(new_api_key()))
    assert GatewaySettings(host="0.0.0.0", api_keys=[key]).api_keys == [key]
    assert GatewaySettings(host="127.0.0.2").api_keys == []


@pytest.mark.parametrize(("host", "loopback"), [("127.0.0.1", True), ("::1", True), ("localhost", True),
                                                 ("0.0.0.0", False), ("10.1.2.3", False), ("example.org", False)])
def test_loopback_detection(host, loopback):
    assert is_loopback(host) is loopback


def test_plain_keys_are_not_accepted_as_hashes():
    with pytest.raises(ValidationError, match="store the hash, never the key"):
        ApiKey(name="ci", sha256="my-secret-key")


def test_key_file_lines_comments_and_errors(tmp_path):
    path = tmp_path / "keys"
    path.write_text(f"# team keys\nalice:{hash_api_key('a')}\n\n bob : {hash_api_key('b').upper()}  # rotated\n")
    assert [k.name for k in read_key_file(path)] == ["alice", "bob"]
    path.write_text("alice\n")
    with pytest.raises(ConfigError, match=r"keys:1: expected 'name:sha256'"):
        read_key_file(path)
    with pytest.raises(ConfigError, match="does not exist.*--new-api-key"):
        read_key_file(tmp_path / "absent")


def test_upstream_address_and_pool_size():
    settings = GatewaySettings(triton_url="http://127.0.0.1:8123", max_in_flight=40)
    assert settings.upstream_address == ("127.0.0.1", 8123) and settings.pool_size == 40
    with pytest.raises(ValidationError, match="http://host:port"):
        GatewaySettings(triton_url="grpc://x:1")
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
