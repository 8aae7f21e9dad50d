"""A minimal in-process ASGI client for the gateway tests (Starlette's TestClient needs httpx2, absent here).

``async with AsgiClient(app) as client:`` runs the app's lifespan; ``await client.post(path, json=...)``
returns a :class:`Reply`. Bodies can be sent in chunks to exercise streaming limits.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import orjson


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self):
        return orjson.loads(self.body)

    @property
    def error(self) -> str:
        return self.json()["error"]


class AsgiClient:
    def __init__(self, app, client=("127.0.0.1", 50000)):
        self.app, self.client = app, client
        self._lifespan: asyncio.Task | None = None
        self._to_app: asyncio.Queue = asyncio.Queue()
        self._from_app: asyncio.Queue = asyncio.Queue()

    async def __aenter__(self) -> AsgiClient:
        scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
        self._lifespan = asyncio.create_task(self.app(scope, self._to_app.get, self._from_app.put))
        await self._to_app.put({"type": "lifespan.startup"})
        message = await self._from_app.get()
        assert message["type"] == "lifespan.startup.complete", message
        return self

    async def __aexit__(self, *exc) -> None:
        await self._to_app.put({"type": "lifespan.shutdown"})
        await self._from_app.get()
        await self._lifespan

    async def request(self, method: str, path: str, body: bytes | list[bytes] = b"", headers: dict | None = None,
                      content_length: bool = True) -> Reply:
        chunks = body if isinstance(body, list) else [body]
        raw = [(k.lower().encode(), str(v).encode()) for k, v in (headers or {}).items()]
        if content_length and not isinstance(body, list):
            raw.append((b"content-length", str(len(body)).encode()))
        path, _, query = path.partition("?")
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
                 "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": query.encode(),
                 "root_path": "", "headers": raw, "client": self.client, "server": ("127.0.0.1", 8080),
                 "state": {}}
        events = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
        events.append({"type": "http.disconnect"})
        sent: list[dict] = []

        async def receive():
            return events.pop(0) if len(events) > 1 else (await asyncio.sleep(3600) or events[0])

        async def send(message):
            sent.append(message)

        await self.app(scope, receive, send)
        start = next(m for m in sent if m["type"] == "http.response.start")
        body_out = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
        return Reply(start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, body_out)

    async def get(self, path: str, headers: dict | None = None) -> Reply:
        return await self.request("GET", path, headers=headers)

    async def post(self, path: str, json=None, body: bytes | list[bytes] | None = None, headers: dict | None = None,
                   content_length: bool = True) -> Reply:
        if json is not None:
            body = orjson.dumps(json)
            headers = {"content-type": "application/json", **(headers or {})}
        return await self.request("POST", path, body if body is not None else b"", headers, content_length)


def gateway_client(gw) -> AsgiClient:
    """A client of a gateway app whose Gateway is ``gw`` (e.g. one built on the fake Triton)."""
    from serve.gateway import create_app, get_gateway

    app = create_app(gw.settings)
    app.dependency_overrides[get_gateway] = lambda: gw
    return AsgiClient(app)


async def schema_and_route_agree(gw, path: str, body) -> tuple[bool, bool]:
    """(the route's documented request schema takes ``body``, the route answers it 200), for a POST route
    whose request body is the ``PredictRequest`` schema."""
    import pytest

    jsonschema = pytest.importorskip("jsonschema")
    async with gateway_client(gw) as c:
        schema = (await c.get("/openapi.json")).json()
        reply = await c.post(path, json=body)
    assert reply.status < 500, reply.body
    documented = {"$ref": "#/components/schemas/PredictRequest", "components": schema["components"]}
    return jsonschema.Draft202012Validator(documented).is_valid(body), reply.status == 200
