"""Fuzzing the gateway: schemathesis cases from its own OpenAPI document, every operation, with and
without API keys configured, sent to a gateway app in-process in front of a real Triton serving a real
(tiny) model; plus hand-made hostile v2 infer bodies (lying binary-extension lengths, NaN, huge
numbers, wrong types), sent plain and gzip/deflate-compressed, whole, cut or corrupted. The property: no request makes the gateway answer 5xx, and every refusal is
JSON with an ``error`` message.

In-process (ASGI, no sockets) rather than over HTTP so that well over a thousand requests fit in
seconds on 2 cores; the upstream is the real Triton, so the gateway's validation is what stands
between a hostile request and Triton's own 500s.
"""

from __future__ import annotations

import gzip
import json
import zlib
from urllib.parse import urlencode, urlsplit

import orjson
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from hypothesis import strategies as st
from schemathesis.generation import GenerationMode

from serve.gateway import create_app
from serve.settings import GatewaySettings
from tests.reliability.conftest import API_KEY, KEYS, InProcess, gateway_settings

pytestmark = [pytest.mark.integration,
              pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export")]

SCHEMA = schemathesis.openapi.from_dict(create_app(GatewaySettings()).openapi())
OPERATIONS = [result.ok() for result in SCHEMA.get_all_operations()]
EXAMPLES = 25  # per operation, mode and auth setting: ≈20 operations × 2 modes × 25 ≈ 1,000 per auth setting
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                suppress_health_check=list(HealthCheck))
# Realistic model names next to generated ones, so generated bodies reach the real model's validation.
MODELS = st.sampled_from(["digits-fp32", "digits"])


def _request(case, auth: str | None) -> tuple[str, str, bytes, dict]:
    """(method, path with query, body, headers) of a schemathesis case, as the gateway would receive it."""
    kwargs = case.as_transport_kwargs(base_url="http://gateway")
    url = urlsplit(kwargs["url"])
    query = url.query or (urlencode(kwargs["params"], doseq=True) if kwargs.get("params") else "")
    headers = {k: str(v) for k, v in (kwargs.get("headers") or {}).items()}
    if "json" in kwargs:  # allow_nan: NaN and Infinity are what naive clients send
        body = json.dumps(kwargs["json"], allow_nan=True).encode()
        headers.setdefault("content-type", "application/json")
    else:
        data = kwargs.get("data") or b""
        body = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    if auth is not None:
        headers["authorization"] = auth
    return kwargs["method"], url.path + (f"?{query}" if query else ""), body, headers


class Tally:
    """Requests sent and the 5xx among them (with the request, to reproduce)."""

    def __init__(self):
        self.sent, self.server_errors = 0, []

    def check(self, reply, method, path, body) -> None:
        self.sent += 1
        if reply.status >= 500:
            self.server_errors.append((reply.status, method, path, body[:200], reply.body[:200]))
        if reply.status >= 400 and reply.status != 405:  # 405 is Starlette's, {"detail": ...}
            assert "error" in orjson.loads(reply.body), (method, path, reply.body[:200])


# How a body is sent: plain, compressed (whole, cut short, or with bytes flipped), or with a coding
# the gateway does not take. Compressed cases reach the same validation once inflated.
CODINGS = st.sampled_from(["gzip", "deflate"])
SENDING = st.one_of(st.none(), st.tuples(CODINGS, st.sampled_from(["whole", "cut", "flipped"])),
                   st.tuples(st.sampled_from(["br", "x-gzip", "gzip, gzip", ""]), st.just("whole")))


def _send_as(body: bytes, sent, headers: dict) -> bytes:
    if sent is None:
        return body
    coding, damage = sent
    headers["content-encoding"] = coding
    packed = gzip.compress(body) if coding == "gzip" else zlib.compress(body) if coding == "deflate" else body
    if damage == "cut":
        return packed[:len(packed) // 2]
    if damage == "flipped":
        middle = len(packed) // 2
        return packed[:middle] + bytes([packed[middle] ^ 0xFF]) + packed[middle + 1:]
    return packed


def _fuzz_operation(gateway: InProcess, tally: Tally, operation, mode, auths) -> None:
    path_params = {"model": MODELS} if "model" in (operation.path_parameters or {}) else {}
    strategy = operation.as_strategy(generation_mode=mode) if not path_params else st.one_of(
        operation.as_strategy(generation_mode=mode),
        operation.as_strategy(generation_mode=GenerationMode.POSITIVE, path_parameters={"model": "digits-fp32"}))

    @FUZZ
    @given(case=strategy, auth=st.sampled_from(auths), sent=SENDING)
    def run(case, auth, sent):
        method, path, body, headers = _request(case, auth)
        if method == "POST":  # every POST body also plain, compressed, damaged, or in a coding not taken
            body = _send_as(body, sent, headers)
        reply = gateway.request(method, path, body, headers)
        tally.check(reply, method, path, body)

    try:
        run()
    except Unsatisfiable:  # negative mode on an operation with nothing to get wrong (e.g. GET /healthz)
        assert mode is GenerationMode.NEGATIVE, operation.label


@pytest.mark.parametrize("keys", [False, True], ids=["open", "api-keys"])
def test_schemathesis_cases_never_get_a_5xx(stack, keys):
    _, serving = stack
    tally = Tally()
    # With keys configured: the right key, a wrong one, none, and a malformed header, drawn per case.
    auths = [f"Bearer {API_KEY}", "Bearer agk_wrong", None, "Basic Zm9vOmJhcg=="] if keys else [None]
    app = create_app(gateway_settings(serving, api_keys=KEYS if keys else []))
    with InProcess(app) as gateway:
        for operation in OPERATIONS:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                _fuzz_operation(gateway, tally, operation, mode, auths)
    print(f"\n{len(OPERATIONS)} operations, {tally.sent} requests, {len(tally.server_errors)} 5xx "
          f"({'with' if keys else 'without'} API keys)")
    assert tally.sent >= 500, tally.sent  # and ≥ 1,000 over both settings: see the next test
    assert not tally.server_errors, tally.server_errors[:5]
    SENT[keys] = tally.sent


SENT: dict[bool, int] = {}


def test_at_least_a_thousand_fuzzed_requests_in_total():
    if len(SENT) < 2:
        pytest.skip("the fuzzing runs above did not both run")
    assert sum(SENT.values()) >= 1000, SENT


# --- hand-made hostile v2 bodies: what schemathesis's schema-derived cases rarely reach ---------------

FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-2**70, 2**70), st.booleans(),
                   st.text(max_size=3), st.none())
SHAPES = st.one_of(st.just([1, 1, 8, 8]), st.lists(st.one_of(st.integers(-3, 2**40), st.text(max_size=2),
                                                             st.floats()), max_size=5), st.text(max_size=4))
ITEM = st.fixed_dictionaries({"name": st.sampled_from(["image", "idx", "", "../x"]),
                              "datatype": st.sampled_from(["FP32", "FP64", "INT64", "BYTES", "fp32", "XX"]),
                              "shape": SHAPES},
                             optional={"data": st.one_of(st.lists(FLOATS, max_size=70), FLOATS),
                                       "parameters": st.fixed_dictionaries(
                                           {"binary_data_size": st.one_of(st.integers(-10, 2**63), st.floats(),
                                                                          st.text(max_size=3))})})
BODIES = st.fixed_dictionaries({"inputs": st.one_of(st.lists(ITEM, max_size=3), FLOATS)},
                               optional={"outputs": st.lists(st.dictionaries(st.text(max_size=6), FLOATS,
                                                                             max_size=2), max_size=2)})
HEADER_LENGTHS = st.one_of(st.none(), st.integers(-5, 2**64).map(str), st.text(max_size=8), st.just("1e3"))


@pytest.fixture(scope="module")
def open_gateway(stack):
    _, serving = stack
    with InProcess(create_app(gateway_settings(serving))) as gateway:
        yield gateway


@settings(max_examples=200, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(header=BODIES, tail=st.binary(max_size=300), header_length=HEADER_LENGTHS, sent=SENDING,
       route=st.sampled_from(["/v2/models/digits-fp32/infer", "/v2/models/digits-fp32/versions/1/infer"]))
def test_hostile_infer_bodies_are_refused_with_a_json_4xx(open_gateway, header, tail, header_length, sent, route):
    head = json.dumps(header, allow_nan=True).encode()
    headers = {"content-type": "application/json"}
    if header_length is not None:  # a binary-extension request whose stated header length may lie
        headers["inference-header-content-length"] = header_length
    reply = open_gateway.request("POST", route, _send_as(head + tail, sent, headers), headers)
    assert reply.status < 500, (reply.status, reply.body[:300], head[:300], header_length)
    if reply.status >= 400:
        assert isinstance(orjson.loads(reply.body)["error"], str)


IMAGES = st.one_of(st.lists(st.lists(st.lists(FLOATS, min_size=8, max_size=8), min_size=8, max_size=8),
                            max_size=3), st.recursive(FLOATS, lambda inner: st.lists(inner, max_size=3), max_leaves=20))


@settings(max_examples=100, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(images=IMAGES, extra=st.dictionaries(st.text(max_size=5), FLOATS, max_size=2), raw=st.binary(max_size=40),
       sent=SENDING)
def test_hostile_predict_bodies_are_refused_with_a_json_4xx(open_gateway, images, extra, raw, sent):
    for body in (json.dumps({"images": images, **extra}, allow_nan=True).encode(), raw):
        headers = {"content-type": "application/json"}
        body = _send_as(body, sent, headers)
        reply = open_gateway.request("POST", "/v1/models/digits:predict", body, headers)
        assert reply.status < 500, (reply.status, reply.body[:300], body[:300])
        assert reply.status == 200 or isinstance(orjson.loads(reply.body)["error"], str)


# --- hand-made hostile KServe v1 / TF-Serving bodies: rows and columns of anything, near and far from 1x8x8 ---

PIXELS = st.lists(st.lists(st.floats(0, 1, width=32), min_size=8, max_size=8), min_size=8, max_size=8)  # valid
ROW = st.one_of(PIXELS, st.lists(st.lists(FLOATS, min_size=8, max_size=8), min_size=8, max_size=8),
                st.recursive(FLOATS, lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(
                    st.sampled_from(["image", "x", ""]), inner, max_size=2)), max_leaves=20))
ROWS = st.one_of(st.lists(ROW, max_size=3), FLOATS, st.dictionaries(st.text(max_size=3), FLOATS, max_size=2))
TENSOR_BODIES = st.one_of(st.fixed_dictionaries({"instances": ROWS}), st.fixed_dictionaries({"inputs": st.one_of(
    ROWS, st.dictionaries(st.sampled_from(["image", "x"]), ROWS, max_size=2))}))


@settings(max_examples=150, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(body=TENSOR_BODIES, extra=st.dictionaries(st.sampled_from(["images", "inputs", "signature_name", "x"]),
                                                 FLOATS, max_size=1),
       model=st.sampled_from(["digits", "digits-fp32"]))
def test_hostile_instances_bodies_are_refused_with_a_json_4xx(open_gateway, body, extra, model):
    raw = json.dumps({**body, **extra}, allow_nan=True).encode()
    reply = open_gateway.request("POST", f"/v1/models/{model}:predict", raw, {"content-type": "application/json"})
    assert reply.status < 500, (reply.status, reply.body[:300], raw[:300])
    assert reply.status == 200 or isinstance(orjson.loads(reply.body)["error"], str)


# --- hostile OpenAI bodies on a real charlm KV-cache model: generation reached, never a 5xx -------------

TEXT = st.text(alphabet=st.sampled_from("ab \n:Z\u00e9\x00"), max_size=12)
JSONISH = st.one_of(FLOATS, TEXT, st.lists(st.one_of(TEXT, st.integers(-3, 3)), max_size=5),
                    st.dictionaries(st.sampled_from(["type", "text", "include_usage"]), st.one_of(TEXT, FLOATS),
                                    max_size=2))
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "x"]),
                                 "content": st.one_of(TEXT, st.lists(st.fixed_dictionaries(
                                     {"type": st.sampled_from(["text", "image_url"]), "text": TEXT}), max_size=2),
                                     FLOATS)})
SAYABLE = st.text(alphabet=st.sampled_from("ab \n:Z"), min_size=1, max_size=12)  # in charlm's vocabulary
VALID = {"max_tokens": st.integers(1, 6), "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1),
         "seed": st.integers(-2**63, 2**63 - 1), "stop": st.one_of(SAYABLE, st.lists(SAYABLE, max_size=4)),
         "stream": st.booleans(), "stream_options": st.just({"include_usage": True}), "n": st.just(1)}
HOSTILE = ["model", "prompt", "messages", "max_tokens", "temperature", "top_p", "seed", "stop", "stream",
           "stream_options", "n", "logprobs", "tools", "response_format", "echo", "max_completion_tokens", "x"]
# a valid body with at most one field made hostile: most reach the model, the rest probe one check each
BODIES_OPENAI = st.tuples(
    st.fixed_dictionaries({"model": st.sampled_from(["charlm", "charlm-generate"]), "prompt": SAYABLE,
                           "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system"]),
                                                                       "content": SAYABLE}), min_size=1, max_size=2)},
                          optional=VALID),
    st.one_of(st.none(), st.tuples(st.sampled_from(HOSTILE), st.one_of(JSONISH, st.lists(MESSAGE, max_size=2)))))


GENERATED: list[str] = []  # the fuzzed requests that reached the model


@pytest.fixture(scope="module")
def charlm_gateway():
    from serve import start_serving
    from tests.serve.fixtures import on_free_ports, published_run, require_triton

    require_triton()
    settings = on_free_ports(published_run("charlm"))
    with start_serving(settings, GatewaySettings(port=settings.serve.gateway_port)) as serving:
        with InProcess(create_app(gateway_settings(serving))) as gateway:
            yield gateway


@settings(max_examples=150, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(route=st.sampled_from(["/v1/completions", "/v1/chat/completions"]), bodies=BODIES_OPENAI)
def test_hostile_openai_bodies_are_refused_with_openais_4xx(charlm_gateway, route, bodies):
    body, hostile = bodies
    body.pop("messages" if route == "/v1/completions" else "prompt")
    if not body.get("stream"):
        body.pop("stream_options", None)
    if hostile:
        body[hostile[0]] = hostile[1]
    raw = json.dumps(body, allow_nan=True).encode()
    reply = charlm_gateway.request("POST", route, raw, {"content-type": "application/json"})
    assert reply.status < 500, (reply.status, reply.body[:300], raw[:300])
    if reply.status >= 400:
        assert set(orjson.loads(reply.body)["error"]) == {"message", "type", "param", "code"}, reply.body[:300]
    else:
        GENERATED.append(route)
    if reply.status == 200 and body.get("stream") is True:
        assert reply.body.endswith(b"data: [DONE]\n\n") and b'"error"' not in reply.body, reply.body[-300:]


def test_fuzzed_openai_bodies_reached_generation_on_both_routes():
    if not GENERATED:
        pytest.skip("the OpenAI fuzzing above did not run")
    assert {"/v1/completions", "/v1/chat/completions"} <= set(GENERATED), len(GENERATED)
