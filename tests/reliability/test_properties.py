"""Property tests of the parsers that face untrusted or hand-written input: config overrides, stage
manifests, and the gateway's v2 tensor decoding. Each may refuse its input, but only with the
project's own error type (one that names the problem), never with whatever exception a library
happened to raise."""

from __future__ import annotations

import json

import numpy as np
import orjson
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from autoglm.artifacts import Manifest
from autoglm.config import load_settings, parse_overrides
from autoglm.errors import ConfigError, IntegrityError
from serve.gateway.errors import BadInput
from serve.gateway.tensors import DTYPES, ModelSignature, split_body, validate

FAST = settings(deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# --- config ------------------------------------------------------------------------------------------

SECTIONS = ["run", "task", "train", "measure", "tune", "compress", "serve", "loadtest", "deploy", "nope", ""]
KEYS = st.one_of(st.sampled_from(["lr", "max_steps", "name", "batch_size", "variants", "workers", "x", ""]),
                 st.text(max_size=6))
VALUES = st.one_of(st.sampled_from(["3e-4", "-1", "0", "nan", "inf", "1e999", "true", "[1, 'a']", "{a=1}", "'x'",
                                    "[", "{", "\"", "'''", "9" * 40]), st.text(max_size=12))
OVERRIDE = st.one_of(st.builds(lambda s, k, v: f"{s}.{k}={v}", st.sampled_from(SECTIONS), KEYS, VALUES),
                     st.text(max_size=20))


@FAST
@given(pairs=st.lists(OVERRIDE, max_size=4))
@example(pairs=["train.lr=nan"]).via("NaN learning rate")
@example(pairs=["train=1", "train.lr=1"]).via("a section overridden by a scalar")
@example(pairs=["train.lr=1", "train.lr.x=2"]).via("a scalar then a key under it")
def test_config_overrides_fail_only_with_config_error(pairs, tmp_path_factory):
    root = tmp_path_factory.getbasetemp() / "config-props"
    try:
        parse_overrides(pairs)
        load_settings(None, [*pairs, f"run.root='{root}'"])
    except ConfigError as exc:
        assert str(exc)  # names the problem


@FAST
@given(text=st.one_of(st.text(max_size=200), st.binary(max_size=200).map(lambda b: b.decode("latin-1"))))
def test_config_files_fail_only_with_config_error(text, tmp_path_factory):
    path = tmp_path_factory.getbasetemp() / "config-props.toml"
    path.write_text(text, encoding="utf-8", errors="surrogateescape")
    try:
        load_settings(path)
    except ConfigError as exc:
        assert str(exc)


# --- manifests ---------------------------------------------------------------------------------------

JSONISH = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=5)),
                       lambda inner: st.one_of(st.lists(inner, max_size=3),
                                               st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                       max_leaves=10)
MANIFEST_FIELDS = ["stage", "config", "inputs", "outputs", "metrics", "energy", "libraries", "host", "created",
                   "schema_version"]
MANIFESTS = st.one_of(
    st.binary(max_size=300),
    JSONISH.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(st.sampled_from(MANIFEST_FIELDS), JSONISH, max_size=6).map(lambda v: json.dumps(v).encode()),
    st.dictionaries(st.sampled_from(MANIFEST_FIELDS), JSONISH, max_size=6).map(
        lambda v: json.dumps({**v, "schema_version": 1}).encode()))


@settings(FAST)
@given(raw=MANIFESTS)
@example(raw=b"[]").via("a JSON array, not an object")
@example(raw=b"\xff\xfe").via("not UTF-8")
def test_manifest_load_fails_only_with_integrity_error(raw, tmp_path_factory):
    path = tmp_path_factory.getbasetemp() / "manifest-props.json"
    path.write_bytes(raw)
    try:
        Manifest.load(path)
    except IntegrityError as exc:
        assert str(exc)


# --- v2 tensor decoding ------------------------------------------------------------------------------

SIG = ModelSignature.from_config({"name": "m", "max_batch_size": 4,
                                  "input": [{"name": "x", "data_type": "TYPE_FP32", "dims": [2, -1]},
                                            {"name": "ids", "data_type": "TYPE_INT64", "dims": [3]}],
                                  "output": [{"name": "y", "data_type": "TYPE_FP32", "dims": [2]}]})
DATATYPES = st.sampled_from([*DTYPES, "fp32", "", "TYPE_FP32"])
DIMS = st.lists(st.integers(-2, 6), max_size=4)


@st.composite
def binary_requests(draw):
    """A binary-extension request whose parts may each be right, slightly wrong, or lying."""
    inputs, tensors = [], []
    for name in draw(st.lists(st.sampled_from(["x", "ids", "z"]), max_size=3)):
        datatype = draw(st.one_of(st.just({"x": "FP32", "ids": "INT64"}.get(name, "FP32")), DATATYPES))
        shape = draw(st.one_of(st.just({"x": [1, 2, 3], "ids": [1, 3]}.get(name, [1])), DIMS))
        dtype = DTYPES.get(datatype) or np.uint8
        count = int(np.prod([max(d, 0) for d in shape])) if shape else 1
        data = draw(st.binary(min_size=0, max_size=64)) if draw(st.booleans()) else bytes(
            np.zeros(min(count, 64), dtype).tobytes())
        size = draw(st.one_of(st.just(len(data)), st.integers(-2, 300), st.floats(), st.text(max_size=2)))
        inputs.append({"name": name, "datatype": datatype, "shape": shape, "parameters": {"binary_data_size": size}})
        tensors.append(data)
    head = orjson.dumps({"inputs": inputs})
    claimed = draw(st.one_of(st.just(str(len(head))), st.integers(-3, len(head) + 400).map(str),
                             st.text(max_size=4)))
    return head + b"".join(tensors), claimed.encode()


@settings(FAST, max_examples=300)
@given(request=binary_requests())
def test_v2_decoding_gives_rows_or_bad_input(request):
    body, header_length = request
    sig = ModelSignature(SIG.name, SIG.max_batch_size, SIG.inputs, SIG.outputs)  # a fresh plan cache
    try:
        rows = validate(sig, body, header_length)
    except BadInput as exc:
        assert 400 <= exc.status < 500 and str(exc)
        return
    # Accepted: then the request really is well formed, and decodes to the arrays its header declares.
    header, binary = split_body(body, header_length)
    offset = 0
    assert 1 <= rows <= SIG.max_batch_size
    for item in header["inputs"]:
        spec = SIG.inputs[item["name"]]
        size = item["parameters"]["binary_data_size"]
        array = np.frombuffer(binary[offset:offset + size], DTYPES[spec.datatype]).reshape(item["shape"])
        offset += size
        assert array.shape[0] == rows and list(array.shape[1:])[:1] == [spec.dims[0]]
        if array.dtype.kind == "f":
            assert np.isfinite(array).all()
    assert offset == len(binary)


@FAST
@given(body=st.one_of(st.binary(max_size=200), JSONISH.map(lambda v: json.dumps(v, allow_nan=True).encode())),
       header_length=st.one_of(st.none(), st.binary(max_size=6), st.integers(-2, 300).map(lambda n: str(n).encode())))
def test_v2_json_or_garbage_gives_rows_or_bad_input(body, header_length):
    try:
        validate(SIG, body, header_length)
    except BadInput as exc:
        assert 400 <= exc.status < 500 and str(exc)
