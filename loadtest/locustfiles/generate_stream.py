"""Scenario ``generate``: streaming generation (``:generate`` with ``stream: true``) through the gateway.

Each request reads the Server-Sent Events as they arrive and reports, besides the whole request (its
time is the full stream, first byte to summary), two stream metrics as their own locust entries:
``time to first token`` and ``inter-token`` (the gap between two deltas divided by the tokens the
later one brought, once per token), and the tokens of each completed stream (tokens/s per window and
step). Prompts come from the validation set (the payload file).
"""

import time

import orjson

from loadtest.locustfiles.common import HEADERS, STREAM, PayloadUser


class GenerateStreamUser(PayloadUser):
    scenario = "generate"

    def request(self, path: str, name: str, body: bytes) -> None:
        started = time.perf_counter()
        last, tokens, first_ms, gaps, problem, finished = started, 0, None, [], None, False
        with self.client.post(path, data=body, headers=HEADERS, name=name, stream=True,
                              catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}")
                return
            # locust's own iter_content reads the same geventhttpclient response; readline returns each
            # event as soon as it is complete (iter_content would wait for a whole chunk_size)
            stream = response._response
            while event := stream.readline(b"\n\n"):
                now = time.perf_counter()
                if event.startswith(b"event: error"):
                    problem = event.split(b"data: ", 1)[-1].decode(errors="replace").strip()
                    break
                if not event.startswith(b"data: "):
                    continue
                data = orjson.loads(event[6:])
                if "delta" in data:
                    new = data["tokens"] - tokens
                    if first_ms is None:
                        first_ms = (now - started) * 1000
                    elif new > 0:
                        gaps += [(now - last) * 1000 / new] * new
                    tokens, last = data["tokens"], now
                elif "finish_reason" in data:
                    tokens = max(tokens, data.get("tokens") or 0)  # tokens that added no text come with no delta
                    finished = True
                    break
            response.request_meta["response_time"] = (time.perf_counter() - started) * 1000  # the whole stream
            if problem or first_ms is None or not finished:
                response.failure(problem or ("the stream ended without a token" if first_ms is None else
                                             "the stream ended without its final event (cut off)"))
                return
        STREAM.record(self.environment, "time to first token", [first_ms])
        STREAM.record(self.environment, "inter-token", gaps)
        STREAM.completed(tokens)
