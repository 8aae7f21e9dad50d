"""One real stack (a tiny trained digits model in a real Triton, behind the gateway) shared by the
reliability tests, and helpers to drive gateway apps in-process against that Triton.

The stack is started once per session: training and Triton's start cost ≈20 s on 2 cores, far more
than the tests themselves.
"""

from __future__ import annotations

import asyncio

import pytest

from autoglm.gateway_spec import ApiKey, hash_api_key
from serve.settings import GatewaySettings

API_KEY = "agk_reliability-test-key"  # a test-only key; the gateway stores only its sha256
KEYS = [ApiKey(name="fuzz", sha256=hash_api_key(API_KEY))]


@pytest.fixture(scope="session")
def stack():
    """(settings, Serving) of a running digits stack; skipped where no Triton is installed."""
    from serve import start_serving
    from tests.serve.fixtures import on_free_ports, published_run, require_triton

    require_triton()
    settings = on_free_ports(published_run("digits"))
    serving = start_serving(settings, GatewaySettings(port=settings.serve.gateway_port))
    with serving:
        yield settings, serving


def gateway_settings(serving, **overrides) -> GatewaySettings:
    """Settings for an in-process gateway in front of the stack's Triton and repository."""
    return GatewaySettings(triton_url=serving.triton_url, repository=serving.run.stage_dir("repository"),
                           **overrides)


class InProcess:
    """A gateway app run in-process (ASGI, no sockets) on its own event loop, driven synchronously.

    Hypothesis tests are synchronous; the app's upstream pool belongs to one loop, so every request
    runs on that same loop.
    """

    def __init__(self, app):
        from tests.serve.asgi import AsgiClient

        self.loop = asyncio.new_event_loop()
        self.client = AsgiClient(app)

    def __enter__(self) -> InProcess:
        self.loop.run_until_complete(self.client.__aenter__())
        return self

    def __exit__(self, *exc) -> None:
        self.loop.run_until_complete(self.client.__aexit__(*exc))
        self.loop.close()

    def request(self, method: str, path: str, body: bytes = b"", headers: dict | None = None):
        return self.loop.run_until_complete(self.client.request(method, path, body, headers))
