"""What the gateway answers when it does not serve a request: a status, a message, extra headers.

Errors use KServe's shape, ``{"error": "..."}``, which stock Triton clients display as the message.
"""

from __future__ import annotations

import orjson
from starlette.responses import Response


class Refused(Exception):
    """A request the gateway will not serve; ``status``, message and extra headers go back as JSON.

    ``shed`` names why a request was refused to protect the service (counted in the metrics).
    """

    def __init__(self, status: int, message: str, headers: tuple[tuple[bytes, bytes], ...] = (),
                 shed: str | None = None):
        super().__init__(message)
        self.status, self.headers, self.shed = status, headers, shed


class BadInput(Refused):
    """A client's mistake (400 unless said otherwise): the message names the input and the fix."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(status, message)


def error_body(message: str) -> bytes:
    return orjson.dumps({"error": message})


class JSONResponse(Response):
    """A JSON response rendered with orjson (FastAPI deprecated its own ORJSONResponse)."""

    media_type = "application/json"

    def render(self, content) -> bytes:
        return orjson.dumps(content)
