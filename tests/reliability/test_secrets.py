"""Security: an API key never appears in the gateway's logs, metrics or error replies, right or wrong."""

from __future__ import annotations

import logging

import orjson
import pytest

from serve.gateway.app import create_app
from tests.reliability.conftest import API_KEY, KEYS, InProcess, gateway_settings

pytestmark = [pytest.mark.integration,
              pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export")]
WRONG_KEY = "agk_a-wrong-key-that-must-not-leak"
BODY = orjson.dumps({"images": [[[4.0] * 8] * 8]})


def test_api_keys_never_reach_logs_metrics_or_replies(stack, caplog):
    _, serving = stack
    app = create_app(gateway_settings(serving, api_keys=KEYS))
    replies = []
    with caplog.at_level(logging.DEBUG), InProcess(app) as gw:
        for key in (API_KEY, WRONG_KEY, None):
            headers = {"content-type": "application/json"} | ({"authorization": f"Bearer {key}"} if key else {})
            replies.append(gw.request("POST", "/v1/models/digits:predict", BODY, headers))
            replies.append(gw.request("POST", "/v1/models/nosuchmodel:predict", b"{bad json", headers))
        metrics = gw.request("GET", "/metrics", headers={"authorization": f"Bearer {API_KEY}"})

    assert [r.status for r in replies[::2]] == [200, 401, 401]  # the key works, the others are refused
    exposed = b"".join(r.body for r in replies) + metrics.body + caplog.text.encode()
    for secret in (API_KEY, WRONG_KEY):
        assert secret.encode() not in exposed
