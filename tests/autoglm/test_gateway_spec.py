"""The gateway's spec and API keys refuse unsafe or impossible values with an error that names the fix."""

import pytest
from pydantic import ValidationError

from autoglm.errors import ConfigError
from autoglm.gateway_spec import ApiKey, GatewaySpec, hash_api_key, is_loopback, new_api_key, read_key_file


def test_beyond_loopback_without_keys_is_refused():
    with pytest.raises(ValidationError, match="API keys are required.*--api-keys-file"):
        GatewaySpec(host="0.0.0.0")
    key = ApiKey(name="ci", sha256=hash_api_key(new_api_key()))
    assert GatewaySpec(host="0.0.0.0", api_keys=[key]).api_keys == [key]
    assert GatewaySpec(host="127.0.0.2").api_keys == []


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


def test_triton_url_must_be_http():
    with pytest.raises(ValidationError, match="http://host:port"):
        GatewaySpec(triton_url="grpc://x:1")


def test_the_grpc_port_comes_from_the_runs_config_and_must_differ_from_http(settings_in):
    assert GatewaySpec().grpc_port == 0  # built by hand: off unless given
    assert GatewaySpec.from_settings(settings_in()).grpc_port == 8081
    assert GatewaySpec.from_settings(settings_in("serve.gateway.grpc_port=0")).grpc_port == 0
    with pytest.raises(ValidationError, match="HTTP and gRPC ports are both 8080"):
        GatewaySpec(grpc_port=8080)
    with pytest.raises(ValidationError, match="host:port"):
        GatewaySpec(triton_grpc_url="grpc://triton:8001")
