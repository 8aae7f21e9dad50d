"""The gRPC canary split's pieces, frame by frame: the version written into a message however the message is cut
into DATA frames, and the flow-control books that keep both peers' windows exact when messages grow."""

import random
from types import SimpleNamespace

import pytest

from serve.gateway import http2 as h2
from serve.gateway.canary import Routing, Split, write_routing
from serve.gateway.grpc_versions import DEFAULT_WINDOW, MessageRouter, Windows

pb = pytest.importorskip("tritonclient.grpc.service_pb2")


@pytest.fixture
def routing(tmp_path):
    write_routing(tmp_path / "routing.json", {"digits-fp32": Split(1, 2)}, 100.0)  # every pick: the canary
    return Routing(tmp_path / "routing.json")


def framed(request, compressed: bool = False) -> bytes:
    body = request.SerializeToString()
    return bytes((int(compressed),)) + len(body).to_bytes(4, "big") + body


def messages(data: bytes) -> list[bytes]:
    out, at = [], 0
    while at < len(data):
        size = int.from_bytes(data[at + 1:at + 5], "big")
        out.append(data[at + 5:at + 5 + size])
        at += 5 + size
    assert at == len(data)
    return out


def request(**fields):
    return pb.ModelInferRequest(**{"model_name": "digits-fp32", "id": "r1",
                                   "raw_input_contents": [bytes(range(256)) * 40], **fields})


@pytest.mark.parametrize("cut", [1, 3, 7, 16384])
def test_the_picked_version_is_written_into_each_message_however_it_is_cut(routing, cut):
    router = MessageRouter(routing, None, 1 << 20)
    data = framed(request()) + framed(request(id="r2"))
    out = b"".join(router.feed(data[i:i + cut], i + cut >= len(data)) for i in range(0, len(data), cut))
    parsed = [pb.ModelInferRequest.FromString(m) for m in messages(out)]
    assert [(p.model_version, p.id) for p in parsed] == [("2", "r1"), ("2", "r2")]
    assert parsed[0].raw_input_contents == request().raw_input_contents
    assert router.seen == {("digits-fp32", 2, "canary")}


def test_a_named_version_another_model_or_a_compressed_message_pass_unchanged(routing):
    for message, seen in ((framed(request(model_version="1")), {("digits-fp32", 1, "pinned")}),
                          (framed(pb.ModelInferRequest(model_name="other", id="x")), set()),
                          (framed(request(), compressed=True), set())):
        router = MessageRouter(routing, None, 1 << 20)
        assert router.feed(message[:3], False) + router.feed(message[3:], False) == message
        assert router.seen == seen


def test_a_message_above_the_limit_is_refused_from_its_prefix(routing):
    router = MessageRouter(routing, None, 100)
    assert router.feed(framed(request())[:5], False) is None and router.size > 100


def test_a_message_cut_off_by_the_streams_end_goes_on_as_it_came(routing):
    router = MessageRouter(routing, None, 1 << 20)
    partial = framed(request())[:9]
    assert router.feed(partial, True) == partial


@pytest.mark.parametrize("seed", range(4))
def test_the_windows_never_overrun_triton_and_give_the_client_back_every_byte(seed):
    """A client sending as far as its windows allow, the relay adding bytes to some frames and dropping padding
    from others, Triton crediting what it receives in random amounts: Triton's windows never go below zero, its
    bytes arrive in order, and once all is credited the client's windows are whole again."""
    rng = random.Random(seed)
    client_view = {0: DEFAULT_WINDOW, 1: DEFAULT_WINDOW, 3: DEFAULT_WINDOW}
    windows = Windows(lambda sid, n: client_view.__setitem__(sid, client_view[sid] + n))
    calls = {sid: SimpleNamespace(window=DEFAULT_WINDOW, debt=0, client_ended=False) for sid in (1, 3)}
    sent = {1: bytearray(), 3: bytearray()}  # what the relay meant to send, per stream
    arrived = {1: bytearray(), 3: bytearray()}  # what Triton got
    owed = {0: 0, 1: 0, 3: 0}  # bytes Triton got and has not credited yet
    queued = [0]
    for _ in range(3000):
        if rng.random() < 0.6:  # the client sends a frame within its view; the relay re-frames it
            sid = rng.choice((1, 3))
            room = min(client_view[0], client_view[sid])
            if room <= 0:
                continue
            size = rng.randint(1, min(room, 20_000))
            payload = rng.randbytes(max(0, size + rng.choice((-3, 0, 4, 9, 9))))  # padding dropped, a version added
            client_view[0] -= size
            client_view[sid] -= size
            sent[sid] += payload
            windows.owe(sid, calls[sid], len(payload) - size)
            out = []
            windows.send(sid, calls[sid], False, payload, out, calls)
            queued[0] += bool(windows.queue)
            deliver(out, arrived, owed)
        else:  # Triton credits part of what it got
            sid = rng.choice((0, 1, 3))
            if owed[sid]:
                credit(windows, calls, sid, rng.randint(1, owed[sid]), owed, client_view, arrived)
        assert windows.window >= 0 and all(c.window >= 0 for c in calls.values())
    for sid in (0, 1, 3, 0):  # Triton credits the rest; queued DATA goes out, is credited in turn
        while owed[sid] or windows.queue:
            for s in (sid, 0, 1, 3):
                if owed[s]:
                    credit(windows, calls, s, owed[s], owed, client_view, arrived)
    assert arrived == sent
    assert client_view == {0: DEFAULT_WINDOW, 1: DEFAULT_WINDOW, 3: DEFAULT_WINDOW}
    assert windows.window == DEFAULT_WINDOW and windows.debt == 0
    assert queued[0] > 0  # the client's view ran ahead of Triton's windows, and DATA waited


def deliver(out: list, arrived: dict, owed: dict) -> None:
    for kind, _, sid, pos, end in h2.frames(bytearray(b"".join(out)))[0]:
        assert kind == h2.DATA
        payload = b"".join(out)[pos + 9:end]
        arrived[sid] += payload
        owed[sid] += len(payload)
        owed[0] += len(payload)


def credit(windows: Windows, calls: dict, sid: int, n: int, owed: dict, client_view: dict, arrived: dict) -> None:
    owed[sid] -= n
    passed = windows.credited(sid, calls.get(sid), n)
    client_view[sid] += passed
    out = []
    windows.flush(out, calls)
    deliver(out, arrived, owed)


def test_an_empty_end_of_stream_needs_no_window_but_keeps_its_place():
    windows = Windows(lambda sid, n: None)
    call = SimpleNamespace(window=10, debt=0, client_ended=False)
    calls, out = {1: call}, []
    windows.send(1, call, False, b"x" * 30, out, calls)  # 10 go, 20 wait for Triton's window
    windows.send(1, call, True, b"", out, calls)  # the empty END_STREAM frame waits behind them
    assert [(f[0], f[1], f[4] - f[3] - 9) for f in h2.frames(bytearray(b"".join(out)))[0]] == [(h2.DATA, 0, 10)]
    windows.credited(1, call, 100)
    windows.credited(0, None, 100)
    out.clear()
    windows.flush(out, calls)
    frames = [(f[0], f[1], f[4] - f[3] - 9) for f in h2.frames(bytearray(b"".join(out)))[0]]
    assert frames == [(h2.DATA, 0, 20), (h2.DATA, h2.END_STREAM, 0)] and not windows.queue
    call.window = -5  # Triton's SETTINGS shrank the stream's window below what is in flight
    out.clear()
    windows.send(1, call, True, b"", out, calls)
    assert h2.frames(bytearray(b"".join(out)))[0][0][:2] == (h2.DATA, h2.END_STREAM)
