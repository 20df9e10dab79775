"""gRPC servers over the session's real serving stack, for tests/test_grpc_api.py.

The stack (SmolLM2-135M-Instruct and two aliases of it on two local workers) is
serving_fixtures.py's, shared with the HTTP tests: a test module loads both with
`pytest_plugins = ["serving_fixtures", "grpc_fixtures"]`. The gRPC server runs in an asyncio
loop on a background thread, as it would beside uvicorn, and tests call it over real channels
with the generated stubs.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass

import grpc
import pytest
from hypothesis import strategies as st

from helpers import make_engine
from serving_fixtures import ALIASES, MODEL
from tokenpool.proxy.config import ProxyConfig
from tokenpool.proxy.frontend import Frontend
from tokenpool.proxy.grpc_codegen import pb2, pb2_grpc
from tokenpool.proxy.grpc_server import SERVICE, create_grpc_server, stop_grpc_server
from tokenpool.sampling import SamplingParams

API_KEY = "tp-test-5f2c9a"
HANG_S = 300  # far beyond any call here: only a hung one gets near it


class EdgeLoop:
    """An asyncio loop on a daemon thread: the server's home, as uvicorn's loop would be."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="grpc-edge-loop",
                                       daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


@dataclass(slots=True)
class GrpcEdge:
    server: grpc.aio.Server
    address: str
    frontend: Frontend
    config: ProxyConfig

    def channel(self, **options) -> grpc.Channel:
        return grpc.insecure_channel(self.address, options=list(options.items()))


@pytest.fixture(scope="session")
def edge_loop():
    loop = EdgeLoop()
    yield loop
    loop.close()


def start_edge(edge_loop: EdgeLoop, stack, config: ProxyConfig) -> GrpcEdge:
    """A started server of our own over `stack`, on a free port."""
    frontend = Frontend(stack.controller, stack.catalog, config)

    async def start():
        server = create_grpc_server(frontend, config, "127.0.0.1:0")
        await server.start()
        return server

    server = edge_loop.run(start())
    return GrpcEdge(server, f"127.0.0.1:{server.bound_port}", frontend, config)


def stop_edge(edge_loop: EdgeLoop, edge: GrpcEdge) -> None:
    edge_loop.run(stop_grpc_server(edge.server, grace_s=1))


@pytest.fixture(scope="session")
def grpc_edge(edge_loop, serving_stack):
    # A small body limit, so the oversized-message cases stay small.
    edge = start_edge(edge_loop, serving_stack, ProxyConfig(max_body_bytes=64 << 10,
                                                             max_prompt_chars=32 << 10))
    yield edge
    stop_edge(edge_loop, edge)


@pytest.fixture(scope="session")
def grpc_channel(grpc_edge):
    with grpc_edge.channel() as channel:
        yield channel


@pytest.fixture(scope="session")
def grpc_stub(grpc_channel):
    return pb2_grpc.GenerationStub(grpc_channel)


@pytest.fixture(scope="session")
def reference_engine(smollm2):
    """A standalone engine like the stack's workers' (float32, 64 MiB of KV)."""
    return make_engine(smollm2)


@pytest.fixture(scope="session")
def keyed_grpc_edge(edge_loop, serving_stack):
    edge = start_edge(edge_loop, serving_stack, ProxyConfig(api_key=API_KEY))
    yield edge
    stop_edge(edge_loop, edge)


# -- helpers of the tests -----------------------------------------------------------------


def greedy_tokens(reference, prompt_ids: list[int], max_tokens: int = 12) -> list[int]:
    return reference.generate([prompt_ids], SamplingParams(max_tokens=max_tokens,
                                                           temperature=0.0))[0]


def tokens_of(responses) -> list[int]:
    return [t for r in responses for t in r.token_ids]


def send_raw(channel, payload: bytes, **kwargs) -> list[bytes]:
    call = channel.unary_stream(f"/{SERVICE}/Generate", request_serializer=lambda b: b,
                                response_deserializer=lambda b: b)
    return list(call(payload, timeout=HANG_S, **kwargs))


def check_one_stream(responses) -> None:
    """One request id throughout; exactly the last response is finished, with a reason."""
    assert responses and len({r.request_id for r in responses}) == 1
    assert [r.finished for r in responses] == [False] * (len(responses) - 1) + [True]
    assert responses[-1].finish_reason in ("stop", "length")


def wait_until_forgotten(controller, cancelled_before: int) -> dict:
    """Until the controller has counted a new cancel, holds no request and every worker is
    idle with no KV page in use; its snapshot then."""
    give_up = time.monotonic() + HANG_S
    while time.monotonic() < give_up:
        snap = controller.snapshot().as_json()
        if (snap["cancelled"] > cancelled_before
                and not any(m["waiting"] or m["running"] for m in snap["models"])
                and all(w["state"] == "idle" and not w["kv_pages_used"]
                        for w in snap["workers"])):
            return snap
        time.sleep(0.05)
    pytest.fail(f"the controller never forgot the request: {controller.snapshot().as_json()}")



# -- random requests, for the hypothesis test -------------------------------------------------
# A request good in every field but a few (often none), which get any value at all: most
# examples then reach the model, and every field is also tried with garbage.


def _maybe(values):
    return st.none() | values


_text = st.text(max_size=30)
_int32 = st.integers(-2**31, 2**31 - 1)


def _chat(content, min_size: int):
    roles = st.sampled_from(["user", "system", "assistant", "x"])
    messages = st.lists(st.builds(pb2.ChatMessage, role=roles, content=content),
                        min_size=min_size, max_size=3)
    return messages.map(lambda ms: {"messages": pb2.ChatMessages(messages=ms)})


def _ids(ids, min_size: int):
    return st.lists(ids, min_size=min_size, max_size=12).map(
        lambda ids: {"prompt_ids": pb2.TokenIds(ids=ids)})


_GOOD = {
    "model": st.sampled_from([MODEL, ALIASES[0]]),
    "input": st.one_of(st.text(min_size=1, max_size=30).map(lambda t: {"prompt": t}),
                       _chat(_text, 1), _ids(st.integers(0, 49151), 1)),
    "max_tokens": _maybe(st.integers(1, 4)),  # small: each good example runs the model
    "temperature": _maybe(st.floats(0, 2)),
    "top_p": _maybe(st.floats(0, 1, exclude_min=True)),
    "top_k": _maybe(st.integers(-1, 60000)),
    "seed": _maybe(st.integers(-2**63, 2**63 - 1)),
    "logprobs": _maybe(st.integers(0, 20)),
    "stop": st.lists(st.text(min_size=1, max_size=5), max_size=2),
    "stop_token_ids": st.lists(st.integers(0, 49151), max_size=3),
    "ignore_eos": st.booleans(),
}
_ANY = {
    "model": st.sampled_from(["", "nope"]) | _text,
    "input": st.one_of(st.just({}), _text.map(lambda t: {"prompt": t}), _chat(_text, 0),
                       _ids(_int32, 0)),
    "max_tokens": st.integers(-2**31, 0) | st.integers(2000, 2**31 - 1),  # never a long run
    "temperature": st.floats(), "top_p": st.floats(), "top_k": _int32, "logprobs": _int32,
    "stop": st.lists(_text, max_size=3), "stop_token_ids": st.lists(_int32, max_size=3),
}


def _request(fields: dict) -> pb2.GenerateRequest:
    given_input = fields.pop("input")
    set_fields = {name: value for name, value in fields.items() if value is not None}
    return pb2.GenerateRequest(**given_input, **set_fields)


def random_requests():
    """GenerateRequests with any field values, valid or not."""
    spoilt = st.sets(st.sampled_from(sorted(_ANY)), max_size=3)
    return spoilt.flatmap(lambda bad: st.fixed_dictionaries(
        {name: _ANY[name] if name in bad else good for name, good in _GOOD.items()})
    ).map(_request)
