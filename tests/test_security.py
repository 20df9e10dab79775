"""Security at the edges (DESIGN §7): loopback by default, the API key on both edges with a
constant-time comparison, the key checked before a body is read, and no prompt text in the
logs. The edges are `tokenpool serve`'s own (`EdgeServers`) over the session's real stack.

The body size limits are tested at both of their edges (exactly the limit, one byte more)
in tests/test_fuzz_http.py and tests/test_fuzz_grpc.py.
"""

from __future__ import annotations

import argparse
import hmac
import logging
import socket

import grpc
import httpx
import pytest

pytest.register_assert_rewrite("grpc_fixtures", "serving_fixtures")
from serving_fixtures import MODEL, wait_until_idle  # noqa: E402
from tokenpool.cli.serve import apply_overrides  # noqa: E402
from tokenpool.fleet import load_fleet  # noqa: E402
from tokenpool.proxy.config import ProxyConfig  # noqa: E402
from tokenpool.proxy.grpc_codegen import pb2, pb2_grpc  # noqa: E402
from tokenpool.proxy.server import EdgeServers  # noqa: E402

pytest_plugins = ["serving_fixtures", "grpc_fixtures"]
KEY = "tp-sec-0c7e1f"
BEARER = {"Authorization": f"Bearer {KEY}"}
SECRET = "octarine-walrus-7731"  # in every prompt below: must appear in no log


def _args(**given) -> argparse.Namespace:
    flags = dict(host=None, http_port=None, grpc_port=None, api_key=None, backend=None,
                 num_workers=None, scheduler=None, baseline_switch_overhead=None)
    return argparse.Namespace(**{**flags, **given})


def test_loopback_and_no_key_are_the_defaults(fleet_path, monkeypatch):
    monkeypatch.delenv("TOKENPOOL_API_KEY", raising=False)
    assert ProxyConfig().host == "127.0.0.1" and ProxyConfig().api_key is None
    fleet = load_fleet(fleet_path)  # a fleet file without a proxy block
    proxy = apply_overrides(fleet, _args()).proxy
    assert (proxy.host, proxy.api_key) == ("127.0.0.1", None)


def test_the_key_comes_from_the_flag_then_the_environment(fleet_path, monkeypatch):
    fleet = load_fleet(fleet_path)
    monkeypatch.setenv("TOKENPOOL_API_KEY", "from-env")
    assert apply_overrides(fleet, _args()).proxy.api_key == "from-env"
    assert apply_overrides(fleet, _args(api_key="from-flag")).proxy.api_key == "from-flag"


@pytest.fixture(scope="module")
def keyed_edges(edge_loop, serving_stack):
    """Both edges, with an API key, on free ports and the default host."""
    servers = EdgeServers(serving_stack, ProxyConfig(http_port=0, grpc_port=0, api_key=KEY))
    listening = edge_loop.run(servers.start())
    yield listening
    edge_loop.run(servers.stop(), timeout=60)


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def _connects(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=5).close()
        return True
    except OSError:
        return False


def test_both_edges_listen_on_127_0_0_1_only(keyed_edges):
    for address in (keyed_edges.http, keyed_edges.grpc):
        assert address.startswith("127.0.0.1:")
        assert _connects("127.0.0.1", _port(address))
        # Another loopback address reaches every socket bound to 0.0.0.0, so this fails
        # only because the edge is bound to 127.0.0.1 itself.
        assert not _connects("127.0.0.2", _port(address))


@pytest.fixture
def comparisons(monkeypatch):
    """The real hmac.compare_digest, with a record of what it compared."""
    seen, real = [], hmac.compare_digest

    def recorded(a, b):
        seen.append((a, b))
        return real(a, b)
    monkeypatch.setattr(hmac, "compare_digest", recorded)
    return seen


def _compared_the_key(seen) -> bool:
    return any(KEY.encode() in (bytes(a) if not isinstance(a, str) else a.encode()) or
               KEY.encode() in (bytes(b) if not isinstance(b, str) else b.encode())
               for a, b in seen)


def test_http_needs_the_key_compared_in_constant_time(keyed_edges, comparisons):
    url = f"http://{keyed_edges.http}"
    for headers in ({}, {"Authorization": "Bearer tp-sec-0c7e1e"}, {"Authorization": KEY}):
        reply = httpx.get(url + "/v1/models", headers=headers)
        assert reply.status_code == 401
        assert set(reply.json()["error"]) == {"message", "type", "param", "code"}
    assert _compared_the_key(comparisons)
    assert httpx.get(url + "/v1/models", headers=BEARER).status_code == 200
    assert httpx.get(url + "/health").status_code == 200  # probes carry no key


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_without_the_key_a_huge_body_is_not_even_read(keyed_edges, chunked):
    body = b'{"prompt": "' + b"a" * (4 << 20) + b'"}'  # 4x the 1 MiB limit
    content = iter([body[i:i + 65536] for i in range(0, len(body), 65536)]) if chunked \
        else body
    reply = httpx.post(f"http://{keyed_edges.http}/v1/completions", content=content,
                       headers={"content-type": "application/json"}, timeout=120)
    assert reply.status_code == 401  # not 413: refused before its size was counted


def test_grpc_needs_the_key_compared_in_constant_time(keyed_edges, comparisons):
    request = pb2.GenerateRequest(model=MODEL, prompt="Hi", max_tokens=1)
    with grpc.insecure_channel(keyed_edges.grpc) as channel:
        stub = pb2_grpc.GenerationStub(channel)
        for metadata in ((), (("x-api-key", "tp-sec-0c7e1e"),)):
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Generate(request, metadata=metadata, timeout=120))
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert _compared_the_key(comparisons)
        replies = list(stub.Generate(request, metadata=(("authorization", f"Bearer {KEY}"),),
                                     timeout=120))
        assert replies[-1].finished


def test_no_prompt_text_in_the_logs_at_info(keyed_edges, serving_stack, caplog, capfd):
    """Served, streamed, cancelled and refused requests on both edges, with every logger
    at INFO and the process's own stderr and stdout captured."""
    caplog.set_level(logging.INFO)
    url, prompt = f"http://{keyed_edges.http}", f"Tell me about {SECRET}."
    completion = {"model": MODEL, "prompt": prompt, "max_tokens": 2}
    chat = {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": prompt}]}
    with httpx.Client(base_url=url, headers=BEARER, timeout=120) as http:
        assert http.post("/v1/completions", json=completion).status_code == 200
        assert http.post("/v1/chat/completions", json={**chat, "stream": True}
                         ).status_code == 200
        for bad in ({"temperature": -1}, {"max_tokens": 10**6}, {"n": 3}):
            assert http.post("/v1/completions", json={**completion, **bad}).status_code == 400
        assert http.post("/v1/chat/completions", json={**chat, "messages": [
            {"role": "wizard", "content": prompt}]}).status_code == 400
        long = {**completion, "max_tokens": 1000, "ignore_eos": True, "stream": True}
        with http.stream("POST", "/v1/completions", json=long) as reply:
            next(reply.iter_lines())  # then drop it: the cancel path logs at INFO
    metadata = (("authorization", f"Bearer {KEY}"),)
    with grpc.insecure_channel(keyed_edges.grpc) as channel:
        stub = pb2_grpc.GenerationStub(channel)
        list(stub.Generate(pb2.GenerateRequest(model=MODEL, prompt=prompt, max_tokens=2),
                           metadata=metadata, timeout=120))
        with pytest.raises(grpc.RpcError):
            list(stub.Generate(pb2.GenerateRequest(model=MODEL, prompt=prompt, top_p=7.0),
                               metadata=metadata, timeout=120))
        call = stub.Generate(pb2.GenerateRequest(model=MODEL, prompt=prompt, max_tokens=1000,
                                                 ignore_eos=True), metadata=metadata,
                             timeout=120)
        next(call)
        call.cancel()
    wait_until_idle(serving_stack.controller, timeout_s=120)
    logged = "\n".join(r.getMessage() + str(r.exc_text or "") for r in caplog.records)
    out, err = capfd.readouterr()
    assert SECRET not in logged and SECRET not in caplog.text
    assert SECRET not in out and SECRET not in err
