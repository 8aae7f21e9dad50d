"""A fake Triton behind the gateway's pool interface: canned configs, deterministic models, failure modes.

digits: logits[k] = mean pixel * (k + 1), so brighter images pick class 9. charlm (vocabulary
"abcd"): the next character after id i is id (i + 1) % 4 with overwhelming probability.
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

import numpy as np
import orjson

from autoglm.sampling import StopMatcher
from serve.gateway.catalog import TaskCatalog
from serve.gateway.tensors import DTYPES, split_body
from serve.gateway.upstream import UpstreamResponse, UpstreamUnavailable
from serve.gateway.worker import Gateway
from serve.settings import GatewaySettings

CLASSES = [str(i) for i in range(10)]
VOCAB = list("abcd")
CONFIGS = {
    "digits-fp32": {"name": "digits-fp32", "max_batch_size": 8,
                    "input": [{"name": "image", "data_type": "TYPE_FP32", "dims": [1, 8, 8]}],
                    "output": [{"name": "logits", "data_type": "TYPE_FP32", "dims": [10]}]},
    "charlm-fp32": {"name": "charlm-fp32", "max_batch_size": 8,
                    "input": [{"name": "idx", "data_type": "TYPE_INT64", "dims": [-1]}],
                    "output": [{"name": "logits", "data_type": "TYPE_FP32", "dims": [-1, 4]}]},
}
DIGITS = TaskCatalog("digits", {"fp32": "digits-fp32"}, "digits-fp32", {"pixel_max": 16.0, "classes": CLASSES},
                     {"inputs": [{"name": "image", "dtype": "float32", "shape": [1, 8, 8]}],
                      "outputs": [{"name": "logits", "dtype": "float32", "shape": [10]}]})
CHARLM = TaskCatalog("charlm", {"fp32": "charlm-fp32"}, "charlm-fp32", {"itos": VOCAB, "block_size": 4},
                     {"inputs": [{"name": "idx", "dtype": "int64", "shape": [-1]}],
                      "outputs": [{"name": "logits", "dtype": "float32", "shape": [-1, 4]}]})

CHARLM_KV = TaskCatalog("charlm", {"fp32": "charlm-fp32"}, "charlm-fp32", {"itos": VOCAB, "block_size": 4},
                        CHARLM.io, generate="charlm-generate")


def _json(status: int, payload) -> UpstreamResponse:
    return UpstreamResponse(status, {b"content-type": b"application/json"}, orjson.dumps(payload))


def _model(name: str, x: np.ndarray) -> np.ndarray:
    if name == "digits-fp32":
        return (x.reshape(len(x), -1).mean(axis=1, keepdims=True) * np.arange(1, 11)).astype(np.float32)
    return (np.eye(4, dtype=np.float32)[(x + 1) % 4] * 20.0).astype(np.float32)  # (B, T, 4)


class FakeTriton:
    """Stands in for :class:`serve.gateway.upstream.UpstreamPool`."""

    def __init__(self):
        self.down = False
        self.fail_status: int | None = None  # answer infers with this status
        self.hold: asyncio.Event | None = None  # infers wait for it
        self.requests: list[tuple[bytes, bytes, bytes, dict]] = []
        self.token_delay_s = 0.0  # time the fake KV model takes per token
        self.live = 0  # generations streaming now (the KV model's in-flight sequences)
        self.stream_error: tuple[int, str] | None = None  # answer generate_stream with this status and error
        self.stream_raw: tuple[int, bytes] | None = None  # or with this status and these bytes, verbatim
        self.infer_raw: tuple[dict, bytes] | None = None  # answer infers 200 with these headers and bytes, verbatim

    async def request(self, method: bytes, target: bytes, body: bytes = b"", headers=(), timeout_s: float = 30):
        self.requests.append((method, target, body, dict(headers)))
        if self.down:
            raise UpstreamUnavailable("connection refused")
        path = target.decode().split("?")[0]
        parts = path.split("/")
        if path in ("/v2", "/v2/health/live", "/v2/health/ready"):
            return _json(200, {"name": "triton"}) if path == "/v2" else UpstreamResponse(200, {}, b"")
        if path == "/v2/models/stats":
            return _json(200, {"model_stats": [{"name": m, "version": "1"} for m in CONFIGS]})
        model = parts[3] if len(parts) > 3 else ""
        if model not in CONFIGS:
            return _json(404, {"error": f"Request for unknown model: '{model}' is not found"})
        if path.endswith("/config"):
            return _json(200, CONFIGS[model])
        if path.endswith("/ready"):
            return UpstreamResponse(200, {}, b"")
        if path.endswith("/stats"):
            return _json(200, {"model_stats": [{"name": model, "version": "1"}]})
        if path.endswith("/infer"):
            if self.hold is not None:
                await asyncio.wait_for(self.hold.wait(), timeout_s)
            if self.fail_status:
                return _json(self.fail_status, {"error": "backend exploded"})
            if self.infer_raw is not None:
                return UpstreamResponse(200, *self.infer_raw)
            return self._infer(model, body, dict(headers))
        return _json(200, {"name": model})

    def _infer(self, model: str, body: bytes, headers: dict) -> UpstreamResponse:
        header, binary = split_body(body, headers.get(b"Inference-Header-Content-Length"))
        item = header["inputs"][0]
        dtype = DTYPES[item["datatype"]]
        if "data" in item:
            x = np.asarray(item["data"], dtype=dtype).reshape(item["shape"])
        else:
            x = np.frombuffer(binary, dtype, count=int(np.prod(item["shape"]))).reshape(item["shape"])  # the first
        y = _model(model, x)
        binary_out = any((o.get("parameters") or {}).get("binary_data") for o in header.get("outputs") or [])
        if not binary_out:
            return _json(200, {"model_name": model, "outputs": [{"name": "logits", "datatype": "FP32",
                                                                  "shape": list(y.shape), "data": y.ravel().tolist()}]})
        head = orjson.dumps({"model_name": model, "outputs": [{"name": "logits", "datatype": "FP32",
                                                                "shape": list(y.shape),
                                                                "parameters": {"binary_data_size": y.nbytes}}]})
        return UpstreamResponse(200, {b"content-type": b"application/octet-stream",
                                      b"inference-header-content-length": str(len(head)).encode()}, head + y.tobytes())

    @asynccontextmanager
    async def stream(self, method: bytes, target: bytes, body: bytes = b"", headers=(), timeout_s: float = 30):
        """``generate_stream`` of a fake KV model: greedy next = (last + 1) % 4, honouring stop strings."""
        self.requests.append((method, target, body, dict(headers)))
        if self.down:
            raise UpstreamUnavailable("connection refused")
        reply = _FakeStream(self, orjson.loads(body))
        self.live += 1
        try:
            yield reply
        finally:
            self.live -= 1  # the connection closes: Triton frees the sequence

    async def aclose(self) -> None:
        pass


class _FakeStream:
    def __init__(self, triton: FakeTriton, request: dict):
        self.triton, self.request = triton, request
        self.status = self.triton.stream_error[0] if self.triton.stream_error else 200
        if self.triton.stream_raw:
            self.status = self.triton.stream_raw[0]

    async def body(self, idle_timeout_s: float):
        if self.triton.stream_raw:
            yield self.triton.stream_raw[1]
            return
        if self.triton.stream_error:
            yield b"data: " + orjson.dumps({"error": self.triton.stream_error[1]}) + b"\n\n"
            return
        last, stops = self.request["input_ids"][-1], StopMatcher(self.request.get("stop", []))
        for n in range(1, self.request["max_new_tokens"] + 1):
            if self.triton.hold is not None:
                await asyncio.wait_for(self.triton.hold.wait(), idle_timeout_s)
            await asyncio.sleep(self.triton.token_delay_s)
            last = (last + 1) % 4
            text, stopped = stops.push(VOCAB[last])
            reason = "stop" if stopped else "length" if n == self.request["max_new_tokens"] else ""
            event = {"model_name": "charlm-generate", "token_ids": last, "text": text, "finish_reason": reason}
            yield b"data: " + orjson.dumps(event) + b"\n\n"  # one event per chunk, as Triton sends them
            if reason:
                return


def fake_gateway(catalog: TaskCatalog | None = DIGITS, **settings) -> tuple[Gateway, FakeTriton]:
    triton = FakeTriton()
    return Gateway(GatewaySettings(**settings), pool=triton, catalog=catalog), triton


class FakeTritonServer:
    """:class:`FakeTriton` over HTTP/1.1 on a free port, in a thread of its own: for a gateway started as real
    uvicorn processes. ``with FakeTritonServer() as server:`` then ``server.url``."""

    def __init__(self, triton: FakeTriton | None = None):
        import threading

        from serve.triton import free_port

        self.triton, self.port = triton or FakeTriton(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._ready, self._thread = threading.Event(), threading.Thread(target=self._run, daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).split(b"\r\n")
                method, target, _ = head[0].split(b" ", 2)
                headers = [tuple(line.split(b": ", 1)) for line in head[1:] if line]
                length = next((int(v) for k, v in headers if k.lower() == b"content-length"), 0)
                reply = await self.triton.request(method, target, await reader.readexactly(length), headers)
                out = b"".join(b"%s: %s\r\n" % (k, v) for k, v in reply.headers.items())
                writer.write(b"HTTP/1.1 %d X\r\n%scontent-length: %d\r\n\r\n%s"
                             % (reply.status, out, len(reply.body), reply.body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def _run(self) -> None:
        async def main():
            self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
            async with await asyncio.start_server(self._handle, "127.0.0.1", self.port):
                self._ready.set()
                await self._stop.wait()

        asyncio.run(main())

    def __enter__(self) -> FakeTritonServer:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
