"""Fuzzing the gRPC edge with hypothesis, over real channels to the session's real stack.

tests/test_grpc_api.py already sends random *well-formed* GenerateRequests; here the bytes
themselves are hostile: pure garbage, hand-assembled protobuf records with any field number
and wire type, valid requests with bytes flipped, cut or inserted, invalid UTF-8 of every
kind, and messages at and just past the size limit. Whatever comes in, the status is one
the client can act on (never UNKNOWN or INTERNAL, which would mean a bug of ours) and the
server keeps serving.
"""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.register_assert_rewrite("grpc_fixtures", "serving_fixtures")
from grpc_fixtures import HANG_S, check_one_stream, send_raw  # noqa: E402
from serving_fixtures import MODEL, wait_until_idle  # noqa: E402
from tokenpool.proxy.grpc_codegen import pb2, pb2_grpc  # noqa: E402
from tokenpool.proxy.grpc_server import SERVICE  # noqa: E402

pytest_plugins = ["serving_fixtures", "grpc_fixtures"]
Req = pb2.GenerateRequest
LIMIT = 64 << 10  # grpc_edge's max_body_bytes
# The client's fault (or a fine request): anything else from garbage is a bug of ours.
ACCEPTABLE = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}


def fuzz(examples: int):
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


def status_of(call) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as err:
        assert err.code() in ACCEPTABLE, f"{err.code()}: {err.details()}"
        return err.code()
    return grpc.StatusCode.OK


def send(channel, payload: bytes, method: str = "Generate") -> grpc.StatusCode:
    if method == "Generate":
        return status_of(lambda: send_raw(channel, payload))
    call = channel.unary_unary(f"/{SERVICE}/{method}", request_serializer=lambda b: b,
                               response_deserializer=lambda b: b)
    return status_of(lambda: call(payload, timeout=HANG_S))


def still_serving(channel) -> None:
    stub = pb2_grpc.GenerationStub(channel)
    check_one_stream(list(stub.Generate(Req(model=MODEL, prompt="Hi", max_tokens=2),
                                        timeout=HANG_S)))
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                       timeout=HANG_S)
    assert health.status == health_pb2.HealthCheckResponse.SERVING


# -- protobuf wire records, assembled by hand -------------------------------------------------


def varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative numbers go on the wire as 10-byte two's complement
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def record(field: int, wire_type: int, payload: bytes) -> bytes:
    return varint(field << 3 | wire_type) + payload


def _records():
    """One record: a real field of GenerateRequest (1..17) or any other, of any wire type,
    with a payload that may or may not fit it."""
    field = st.integers(1, 17) | st.integers(0, 2**29 - 1)
    payload = st.one_of(
        st.integers(-2**63, 2**64 - 1).map(lambda n: (0, varint(n))),
        st.binary(min_size=8, max_size=8).map(lambda b: (1, b)),
        st.binary(max_size=40).map(lambda b: (2, varint(len(b)) + b)),
        st.binary(max_size=40).map(lambda b: (2, varint(len(b) + 7) + b)),  # length lies
        st.binary(min_size=4, max_size=4).map(lambda b: (5, b)),
        st.tuples(st.sampled_from([3, 4, 6, 7]), st.binary(max_size=8)))  # groups, invalid
    return st.tuples(field, payload).map(lambda fp: record(fp[0], fp[1][0], fp[1][1]))


def _valid_prefix():
    """Usually a good model and prompt first, so the records after them decide."""
    good = Req(model=MODEL, prompt="Hello", max_tokens=1).SerializeToString()
    return st.sampled_from([b"", good])


@fuzz(200)
@given(payload=st.binary(max_size=300))
def test_garbage_bytes_get_a_clear_status(grpc_channel, payload):
    send(grpc_channel, payload)
    send(grpc_channel, payload, "ListModels")


@fuzz(200)
@given(prefix=_valid_prefix(), records=st.lists(_records(), max_size=6))
def test_hand_assembled_records_get_a_clear_status(grpc_channel, prefix, records):
    send(grpc_channel, prefix + b"".join(records))


def _mutated():
    base = Req(model=MODEL, prompt="The sea is", max_tokens=1, temperature=0.0,
               stop=["zz"]).SerializeToString()
    edits = st.lists(st.tuples(st.sampled_from(["flip", "cut", "insert"]),
                               st.integers(0, len(base) - 1), st.integers(0, 255)),
                     min_size=1, max_size=3)

    def apply(ops) -> bytes:
        data = bytearray(base)
        for op, at, value in ops:
            at = min(at, len(data) - 1) if data else 0
            if op == "flip" and data:
                data[at] ^= 1 << (value % 8)
            elif op == "cut":
                del data[at:at + 1 + value % 4]
            else:
                data.insert(at, value)
        return bytes(data)

    return edits.map(apply)


@fuzz(80)
@given(payload=_mutated())
def test_a_damaged_request_gets_a_clear_status(grpc_channel, payload):
    send(grpc_channel, payload)


# -- invalid UTF-8 and sizes -------------------------------------------------------------------

BAD_UTF8 = {
    "0xff": b"\xff",
    "a surrogate, UTF-8 encoded": b"\xed\xa0\x80",
    "overlong NUL": b"\xc0\x80",
    "overlong slash": b"\xe0\x80\xaf",
    "truncated sequence": b"caf\xc3",
    "a continuation byte alone": b"\x80",
    "past U+10FFFF": b"\xf4\x90\x80\x80",
}
MARK = "@@@@"  # a placeholder the serialized message holds where the bad bytes go
WHERE = {
    "prompt": Req(model=MODEL, prompt=MARK),
    "model": Req(model=MARK, prompt="hi"),
    "stop string": Req(model=MODEL, prompt="hi", stop=[MARK]),
    "chat role": Req(model=MODEL, messages=pb2.ChatMessages(
        messages=[pb2.ChatMessage(role=MARK, content="hi")])),
    "chat content": Req(model=MODEL, messages=pb2.ChatMessages(
        messages=[pb2.ChatMessage(role="user", content=MARK)])),
}


@pytest.mark.parametrize("where", list(WHERE))
@pytest.mark.parametrize("bad", list(BAD_UTF8))
def test_invalid_utf8_anywhere_is_invalid_argument(grpc_channel, where, bad):
    # As long as the mark, so the length prefixes stay true (lying ones are fuzzed above).
    payload = WHERE[where].SerializeToString().replace(
        MARK.encode(), BAD_UTF8[bad].ljust(len(MARK), b"a"))
    with pytest.raises(grpc.RpcError) as err:
        send_raw(grpc_channel, payload)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert "UTF-8" in err.value.details()


def _padded(size: int) -> bytes:
    """A good request of exactly `size` bytes: an unknown field (which protobuf keeps and
    tokenpool ignores) pads it, so nothing but its size is unusual."""
    head = Req(model=MODEL, prompt="Hi", max_tokens=1).SerializeToString()
    tag = varint(999 << 3 | 2)
    for pad in range(size - len(head), 0, -1):
        payload = head + tag + varint(pad) + b"p" * pad
        if len(payload) == size:
            return payload
    raise AssertionError(f"cannot pad to {size} bytes")


def test_the_size_limit_holds_at_both_edges(grpc_channel):
    at_limit, past_limit = _padded(LIMIT), _padded(LIMIT + 1)
    assert len(at_limit) == LIMIT and len(past_limit) == LIMIT + 1
    responses = [pb2.GenerateResponse.FromString(b) for b in send_raw(grpc_channel, at_limit)]
    check_one_stream(responses)
    with pytest.raises(grpc.RpcError) as err:
        send_raw(grpc_channel, past_limit)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "more than the limit" in err.value.details()


def test_the_server_still_serves_after_the_fuzzing(grpc_channel, serving_stack):
    still_serving(grpc_channel)
    snap = wait_until_idle(serving_stack.controller, timeout_s=120)
    assert all(w["kv_pages_used"] == 0 for w in snap["workers"])
    assert snap["loop_errors"] == 0
