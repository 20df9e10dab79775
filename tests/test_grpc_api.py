"""The gRPC edge against the real stack (SmolLM2 on two workers) over real channels.

A Python client cannot even build a message with invalid UTF-8 in a string field (protobuf
raises ValueError on assignment), so such bytes, malformed protobuf and oversized messages
are sent raw, through `channel.unary_stream` with an identity serializer.
"""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings

# The fixture modules are plugins (below) and also give helpers: imported here first, they
# must be marked for pytest's assert rewriting before the import.
pytest.register_assert_rewrite("grpc_fixtures", "serving_fixtures")
from grpc_fixtures import (API_KEY, HANG_S, check_one_stream, greedy_tokens,  # noqa: E402
                           random_requests, send_raw, start_edge, tokens_of,
                           wait_until_forgotten)
from serving_fixtures import ALIASES, MODEL  # noqa: E402
from tokenpool.controller.serving_types import TokenEvent  # noqa: E402
from tokenpool.errors import UnavailableError  # noqa: E402
from tokenpool.models.prompts import encode_chat, encode_text  # noqa: E402
from tokenpool.proxy.grpc_codegen import pb2, pb2_grpc  # noqa: E402
from tokenpool.proxy.config import ProxyConfig  # noqa: E402
from tokenpool.proxy.grpc_server import (SERVICE, create_grpc_server, set_serving,  # noqa: E402
                                         stop_grpc_server)
from tokenpool.schedulers.admission import SLOAdmission  # noqa: E402

pytest_plugins = ["serving_fixtures", "grpc_fixtures"]  # the shared stack, our servers
Req = pb2.GenerateRequest
GREEDY = dict(temperature=0.0, max_tokens=12)
CHAT = [{"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is the capital of France?"}]


# -- serving ---------------------------------------------------------------------------------


@pytest.mark.parametrize("model", [MODEL, ALIASES[0]])
def test_streamed_greedy_equals_a_standalone_engine(grpc_stub, reference_engine, smollm2,
                                                    model):
    prompt = "The capital of France is"
    responses = list(grpc_stub.Generate(Req(model=model, prompt=prompt, **GREEDY), timeout=HANG_S))
    check_one_stream(responses)
    prompt_ids = encode_text(smollm2.tokenizer, prompt)
    expected = greedy_tokens(reference_engine, prompt_ids)
    assert tokens_of(responses) == expected
    assert len(responses) > 1, "the tokens came in one message, not streamed"
    assert "".join(r.text for r in responses) == smollm2.tokenizer.decode(expected)
    last = responses[-1].usage
    assert (last.prompt_tokens, last.completion_tokens) == (len(prompt_ids), len(expected))
    assert all(r.emitted_at > 0 for r in responses)


def test_prompt_ids_and_chat_messages(grpc_stub, reference_engine, smollm2):
    chat = pb2.ChatMessages(messages=[pb2.ChatMessage(**m) for m in CHAT])
    responses = list(grpc_stub.Generate(Req(model=MODEL, messages=chat, **GREEDY), timeout=HANG_S))
    check_one_stream(responses)
    chat_ids = encode_chat(smollm2.tokenizer, CHAT)
    assert tokens_of(responses) == greedy_tokens(reference_engine, chat_ids)
    by_ids = list(grpc_stub.Generate(Req(model=MODEL, prompt_ids=pb2.TokenIds(ids=chat_ids),
                                    **GREEDY), timeout=HANG_S))
    assert tokens_of(by_ids) == tokens_of(responses)


def test_logprobs_come_with_each_token(grpc_stub):
    responses = list(grpc_stub.Generate(Req(model=MODEL, prompt="Hello", temperature=0.0,
                                       max_tokens=3, logprobs=2), timeout=HANG_S))
    for r in responses:
        assert [lp.token_id for lp in r.logprobs] == list(r.token_ids)
        assert all(len(lp.top) == 2 and lp.top[0].token_id == lp.token_id for lp in r.logprobs)


def test_list_models(grpc_stub, serving_stack):
    listed = {m.id: m for m in grpc_stub.ListModels(pb2.ListModelsRequest(), timeout=HANG_S).models}
    assert set(listed) == {MODEL, *ALIASES}
    card = serving_stack.catalog[MODEL]
    assert listed[MODEL].max_model_len == card.max_model_len > 0
    assert (listed[MODEL].ttft_slo_s, listed[MODEL].tbt_slo_s) == (card.slo.ttft_s,
                                                                   card.slo.tbt_s)


def test_health_serving_until_stopped(edge_loop, serving_stack):
    edge = start_edge(edge_loop, serving_stack, ProxyConfig())
    status = health_pb2.HealthCheckResponse
    with edge.channel() as channel:
        health = health_pb2_grpc.HealthStub(channel)

        def check(service: str):
            return health.Check(health_pb2.HealthCheckRequest(service=service),
                                timeout=HANG_S).status

        assert check("") == check(SERVICE) == status.SERVING
        with pytest.raises(grpc.RpcError) as err:
            check("no.such.Service")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        edge_loop.run(set_serving(edge.server, False))
        assert check("") == check(SERVICE) == status.NOT_SERVING
        edge_loop.run(set_serving(edge.server, True))
        watch = health.Watch(health_pb2.HealthCheckRequest(service=SERVICE), timeout=HANG_S)
        assert next(watch).status == status.SERVING
        edge_loop.run(stop_grpc_server(edge.server, grace_s=1))
        assert next(watch).status == status.NOT_SERVING


def test_a_port_in_use_is_an_error(grpc_edge, edge_loop):
    async def bind_again():  # not shared silently (SO_REUSEPORT is off)
        create_grpc_server(grpc_edge.frontend, grpc_edge.config, grpc_edge.address)
    with pytest.raises(OSError, match="cannot bind"):
        edge_loop.run(bind_again())


def test_reflection_lists_the_services(grpc_channel):
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase)

    database = ProtoReflectionDescriptorDatabase(grpc_channel)
    assert {SERVICE, "grpc.health.v1.Health"} <= set(database.get_services())
    request = DescriptorPool(database).FindMessageTypeByName("tokenpool.v1.GenerateRequest")
    assert {"model", "prompt", "prompt_ids", "messages", "max_tokens"} <= \
        set(request.fields_by_name)


# -- bad input (DESIGN §7) -----------------------------------------------------------------

INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
LIMIT = 64 << 10  # grpc_edge's max_body_bytes


def _hi(**fields) -> pb2.GenerateRequest:
    """A good request but for `fields`."""
    return Req(**{"model": MODEL, "prompt": "hi", **fields})


def _non_utf8(**fields) -> bytes:
    """A serialized request whose marked string field holds bytes that are not UTF-8."""
    return Req(**fields).SerializeToString().replace(b"@@@", b"\xff\xfe\xc0")


BAD_INPUT = {
    "unknown model": (_hi(model="no-such-model"), NOT_FOUND, "unknown model"),
    "no model": (_hi(model=""), INVALID, "model is required"),
    "no prompt at all": (Req(model=MODEL), INVALID, "exactly one"),
    "empty prompt": (Req(model=MODEL, prompt=""), INVALID, "empty"),
    "empty prompt ids": (Req(model=MODEL, prompt_ids=pb2.TokenIds()), INVALID, "empty"),
    "empty messages": (Req(model=MODEL, messages=pb2.ChatMessages()), INVALID, "empty"),
    "prompt ids outside the vocabulary": (Req(model=MODEL, prompt_ids=pb2.TokenIds(
        ids=[1, -4])), INVALID, "prompt token ids"),
    "prompt longer than context": (Req(model=MODEL, prompt="hello " * 3000), INVALID,
                                   "context"),
    "prompt over the character limit": (Req(model=MODEL, prompt="a" * (40 << 10)), INVALID,
                                        "characters"),
    "max_tokens 0": (_hi(max_tokens=0), INVALID, "max_tokens"),
    "max_tokens negative": (_hi(max_tokens=-5), INVALID, "max_tokens"),
    "max_tokens past the context": (_hi(max_tokens=10**6), INVALID, "max_tokens"),
    "temperature < 0": (_hi(temperature=-0.1), INVALID, "temperature"),
    "temperature nan": (_hi(temperature=float("nan")), INVALID, "temperature"),
    "temperature inf": (_hi(temperature=float("inf")), INVALID, "temperature"),
    "top_p 0": (_hi(top_p=0.0), INVALID, "top_p"),
    "top_p > 1": (_hi(top_p=1.5), INVALID, "top_p"),
    "top_k < -1": (_hi(top_k=-2), INVALID, "top_k"),
    "logprobs > 20": (_hi(logprobs=21), INVALID, "logprobs"),
    "empty stop string": (_hi(stop=[""]), INVALID, "stop"),
    "non-UTF-8 prompt": (_non_utf8(model=MODEL, prompt="x@@@"), INVALID, "UTF-8"),
    "non-UTF-8 model": (_non_utf8(model="m@@@", prompt="hi"), INVALID, "UTF-8"),
    "non-UTF-8 chat content": (_non_utf8(model=MODEL, messages=pb2.ChatMessages(
        messages=[pb2.ChatMessage(role="user", content="@@@")])), INVALID, "UTF-8"),
    # A long stop string: nothing but the message's size is wrong with it.
    "oversized message": (_hi(max_tokens=1, stop=["x" * LIMIT]), INVALID,
                          "bytes, more than the limit"),
    # Past TRANSPORT_LIMIT_FACTOR x the limit, gRPC refuses it unread, with its own status.
    "far oversized message": (Req(model=MODEL, prompt="a" * (5 * LIMIT)),
                              grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max"),
    "malformed protobuf": (b"\xff\xff\xff\xff\xff", INVALID, "malformed"),
    "truncated protobuf": (Req(model=MODEL, prompt="hello").SerializeToString()[:-2],
                           INVALID, "malformed"),
    "a wire type that does not exist": (b"\x0f\x00", INVALID, "malformed"),
    "field number 0": (b"\x00", INVALID, "malformed"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_refused_with_a_clear_status(grpc_channel, serving_stack, monkeypatch,
                                                   case):
    request, code, says = BAD_INPUT[case]
    payload = request if isinstance(request, bytes) else request.SerializeToString()
    controller, submitted = serving_stack.controller, []
    submit = controller.submit
    monkeypatch.setattr(controller, "submit",
                        lambda req, sink: (submitted.append(req), submit(req, sink)))
    with pytest.raises(grpc.RpcError) as err:
        send_raw(grpc_channel, payload)
    assert err.value.code() == code, err.value.details()
    assert says.lower() in err.value.details().lower()
    assert not submitted, "a refused request reached the controller"


def test_a_python_client_cannot_send_non_utf8():
    with pytest.raises(ValueError):  # so the cases above send raw bytes
        Req(prompt=b"\xff\xfe")


# -- deadline, cancel, API key ---------------------------------------------------------------

LONG = dict(prompt="Count to a thousand:", temperature=0.0, ignore_eos=True,
            max_tokens=1400)  # far longer than the deadline below allows


def test_deadline_exceeded_cancels_the_request(grpc_stub, serving_stack):
    cancelled_before = serving_stack.controller.snapshot().as_json()["cancelled"]
    with pytest.raises(grpc.RpcError) as err:
        list(grpc_stub.Generate(Req(model=MODEL, **LONG), timeout=3.0))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_until_forgotten(serving_stack.controller, cancelled_before)


def test_client_cancel_mid_stream_frees_the_request(grpc_stub, serving_stack):
    cancelled_before = serving_stack.controller.snapshot().as_json()["cancelled"]
    call = grpc_stub.Generate(Req(model=ALIASES[1], **LONG), timeout=HANG_S)
    assert next(call).request_id and next(call).token_ids
    call.cancel()
    with pytest.raises(grpc.RpcError) as err:
        list(call)
    assert err.value.code() == grpc.StatusCode.CANCELLED
    wait_until_forgotten(serving_stack.controller, cancelled_before)


@pytest.mark.parametrize("metadata, ok", [
    ((), False),
    ((("authorization", "Bearer wrong-key"),), False),
    ((("x-api-key", API_KEY[:-1]),), False),
    ((("authorization", f"Basic {API_KEY}"),), False),
    ((("authorization", f"Bearer {API_KEY}"),), True),
    ((("x-api-key", API_KEY),), True),
])
def test_api_key(keyed_grpc_edge, metadata, ok):
    with keyed_grpc_edge.channel() as ch:
        stub = pb2_grpc.GenerationStub(ch)
        calls = [lambda: list(stub.Generate(Req(model=MODEL, prompt="Hi", max_tokens=2),
                                            metadata=metadata, timeout=HANG_S)),
                 lambda: stub.ListModels(pb2.ListModelsRequest(), metadata=metadata,
                                         timeout=HANG_S)]
        for call in calls:
            if ok:
                assert call()
                continue
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING  # probes need no key


def _shed_everything(controller, monkeypatch):
    monkeypatch.setattr(controller.core.config, "admission", SLOAdmission(ttft_factor=1e-12))


def _refuse_everything(controller, monkeypatch):
    def refuse(req, sink):
        raise UnavailableError("the server is not accepting requests")
    monkeypatch.setattr(controller, "submit", refuse)


def _fail_after_admission(controller, monkeypatch):
    """What the client sees of a worker's death: the controller fails the request."""
    submit = controller.submit

    def submit_then_fail(req, sink):
        submit(req, sink)
        controller.cancel(req.request_id)  # the worker frees it; its client hears only this:
        sink(TokenEvent(req.request_id, finished=True, finish_reason="error",
                        error="worker 0 failed: injected"))
    monkeypatch.setattr(controller, "submit", submit_then_fail)


@pytest.mark.parametrize("fault, code, says", [
    (_shed_everything, grpc.StatusCode.RESOURCE_EXHAUSTED, "predicted time to first token"),
    (_refuse_everything, grpc.StatusCode.UNAVAILABLE, "not accepting"),
    (_fail_after_admission, grpc.StatusCode.UNAVAILABLE, "injected"),
])
def test_overload_and_failures(grpc_stub, serving_stack, monkeypatch, fault, code, says):
    fault(serving_stack.controller, monkeypatch)
    with pytest.raises(grpc.RpcError) as err:
        list(grpc_stub.Generate(Req(model=MODEL, prompt="Hi", max_tokens=2), timeout=HANG_S))
    assert err.value.code() == code and says in err.value.details()
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        assert float(dict(err.value.trailing_metadata())["retry-after"]) >= 0


# -- random requests -------------------------------------------------------------------------


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(request=random_requests())
def test_random_requests_end_cleanly(grpc_stub, request):
    try:
        check_one_stream(list(grpc_stub.Generate(request, timeout=HANG_S)))
    except grpc.RpcError as err:
        assert err.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), \
            f"{err.code()}: {err.details()}"
