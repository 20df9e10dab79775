"""A cancellation storm: 400 streams over both edges (1,000 with `-m slow`), each dropped at
a random point.

The edges are `tokenpool serve`'s own (`EdgeServers`: uvicorn and grpc.aio in one asyncio
loop) over the session's real stack. HTTP clients are raw sockets, so the test decides the
moment the connection drops (after the headers, after k chunks, or after a random delay);
gRPC clients cancel their call after k messages. Afterwards nothing may be left of the
storm: no KV page in use, no request held by the controller, no live request in the
metrics, and no more asyncio tasks or threads than before it.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time

import grpc
import pytest

pytest.register_assert_rewrite("grpc_fixtures", "serving_fixtures")
from serving_fixtures import MODEL, wait_until_idle  # noqa: E402
from tokenpool.proxy.config import ProxyConfig  # noqa: E402
from tokenpool.proxy.grpc_codegen import pb2, pb2_grpc  # noqa: E402
from tokenpool.proxy.server import EdgeServers  # noqa: E402

pytest_plugins = ["serving_fixtures", "grpc_fixtures"]
# The default suite's storm, and the soak's; the suite runs near its time budget.
NUM_STREAMS = 400
SOAK_STREAMS = 1000
CONCURRENCY = 50
GRPC_SHARE = 0.3
MAX_TOKENS = 6  # short, so some streams finish before their cancel: that race is tested too
PROMPTS = ("The sea is", "Once upon a time", "One, two, three,", "My favourite colour is")


@pytest.fixture(scope="module")
def edges(edge_loop, serving_stack):
    servers = EdgeServers(serving_stack, ProxyConfig(http_port=0, grpc_port=0))
    listening = edge_loop.run(servers.start())
    yield servers, listening
    edge_loop.run(servers.stop(), timeout=60)


def _body(rng: random.Random) -> dict:
    return {"model": MODEL, "prompt": rng.choice(PROMPTS), "max_tokens": MAX_TOKENS,
            "temperature": 0.0, "ignore_eos": True, "stream": True}


async def http_stream_dropped(address: str, rng: random.Random) -> str:
    """One streamed completion whose connection drops at a random point; how it ended."""
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    payload = json.dumps(_body(rng)).encode()
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: storm\r\n"
                 b"Content-Type: application/json\r\n"
                 + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    point = rng.choice(["at once", "after headers", "after chunks", "after a delay"])
    try:
        if point == "after headers":
            await reader.readuntil(b"\r\n\r\n")
        elif point == "after chunks":
            for _ in range(rng.randint(1, MAX_TOKENS)):
                await reader.readuntil(b"\n\n")
        elif point == "after a delay":
            await asyncio.sleep(rng.uniform(0, 0.3))
    except asyncio.IncompleteReadError:
        pass  # it finished first: fine, but then nothing was cancelled
    finally:
        writer.close()
    return "http"


async def grpc_call_cancelled(stub, rng: random.Random) -> str:
    body = _body(rng)
    call = stub.Generate(pb2.GenerateRequest(model=MODEL, prompt=body["prompt"],
                                             max_tokens=MAX_TOKENS, temperature=0.0,
                                             ignore_eos=True), timeout=300)
    try:
        for _ in range(rng.randint(0, MAX_TOKENS)):
            await call.read()
    except grpc.aio.AioRpcError as err:
        assert err.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.RESOURCE_EXHAUSTED)
    call.cancel()
    return "grpc"


async def storm(listening, num_streams: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    gate = asyncio.Semaphore(CONCURRENCY)
    async with grpc.aio.insecure_channel(listening.grpc) as channel:
        stub = pb2_grpc.GenerationStub(channel)

        async def one(i: int) -> str:
            own = random.Random(rng.random())  # each stream's choices, fixed by the seed
            async with gate:
                if own.random() < GRPC_SHARE:
                    return await grpc_call_cancelled(stub, own)
                return await http_stream_dropped(listening.http, own)

        return await asyncio.gather(*(one(i) for i in range(num_streams)))


def _tasks(edge_loop) -> int:
    async def count() -> int:
        return len(asyncio.all_tasks()) - 1  # not this one
    return edge_loop.run(count())


def _settles(measure, limit: int, timeout_s: float = 30.0) -> int:
    """`measure()` once it is at most `limit` (idle pool threads take a while to go)."""
    deadline = time.monotonic() + timeout_s
    while (value := measure()) > limit and time.monotonic() < deadline:
        time.sleep(0.2)
    return value


def _unbounded_new_threads(names_before: set[str], loop) -> set[str]:
    """Threads started since `names_before` that no bounded pool accounts for. The edge
    loop's default executor (threads "asyncio_N") may grow after the warm-up, but never past
    its max_workers: that is growth to a working size, not a leak."""
    pooled = [t.name for t in threading.enumerate() if t.name.startswith("asyncio_")]
    executor = loop._default_executor
    assert len(pooled) <= (executor._max_workers if executor else 0), pooled
    return {t.name for t in threading.enumerate()} - names_before - set(pooled)


def _forgotten(controller) -> dict:
    """What the controller still holds for requests: all must be empty."""
    core = controller.core
    return {"requests": len(core.requests), "cancelled": len(core.cancelled),
            "handoffs": len(core.handoffs), "streams": len(controller._streams)}


@pytest.mark.parametrize("num_streams", [
    NUM_STREAMS, pytest.param(SOAK_STREAMS, marks=pytest.mark.slow)])
def test_cancelled_streams_leave_nothing_behind(edges, edge_loop, serving_stack, num_streams):
    servers, listening = edges
    controller = serving_stack.controller
    # A small storm first: the thread pools (anyio's, asyncio's) and grpc's own threads
    # grow to their working size, so the counts below are of leaks, not of warm-up.
    asyncio.run(storm(listening, CONCURRENCY, seed=1))
    wait_until_idle(controller, timeout_s=120)
    tasks_before = _tasks(edge_loop)
    names_before = {t.name for t in threading.enumerate()}
    cancelled_before = controller.snapshot().as_json()["cancelled"]

    kinds = asyncio.run(asyncio.wait_for(storm(listening, num_streams, seed=7), timeout=600))

    assert len(kinds) == num_streams and {"http", "grpc"} == set(kinds)
    snap = wait_until_idle(controller, timeout_s=120)
    assert [w["kv_pages_used"] for w in snap["workers"]] == [0, 0]
    assert all(w["state"] == "idle" for w in snap["workers"])
    assert snap["loop_errors"] == 0
    # Most drops land mid-stream; a few streams win the race and finish first.
    assert snap["cancelled"] - cancelled_before >= num_streams // 2
    assert _forgotten(controller) == {"requests": 0, "cancelled": 0, "handoffs": 0,
                                    "streams": 0}
    assert _settles(lambda: servers.metrics.num_live, 0, timeout_s=10) == 0
    assert _settles(lambda: _tasks(edge_loop), tasks_before) <= tasks_before
    # Threads started by the storm must go, but for bounded pools' (which may keep a
    # worker or two): wait for those, not for the total to fall back, which a pool's
    # idle thread can keep one above for good.
    assert _settles(lambda: len(_unbounded_new_threads(names_before, edge_loop.loop)), 0) == 0
    # And it still serves, over both edges.
    with grpc.insecure_channel(listening.grpc) as channel:
        replies = list(pb2_grpc.GenerationStub(channel).Generate(
            pb2.GenerateRequest(model=MODEL, prompt="Hi", max_tokens=2), timeout=300))
    assert replies[-1].finished and replies[-1].finish_reason == "length"
