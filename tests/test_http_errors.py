"""Bad input and failures at the HTTP edge, against the real stack and a real server.

Every DESIGN §7 bad-input case is one row of `CASES`: each must get its documented status
and OpenAI's error body `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import dataclasses
import json
from contextlib import aclosing

import httpx
import openai
import pytest

# The shared session fixtures; registered before the import below, which also takes
# constants from it, so pytest can still rewrite its asserts.
pytest.register_assert_rewrite("serving_fixtures")
pytest_plugins = ["serving_fixtures"]

from serving_fixtures import MODEL, live_server, wait_until_idle
from tokenpool.errors import (EmptyPromptError, InvalidSamplingError, OverloadedError,
                              PromptTooLongError, RequestFailedError, UnavailableError,
                              UnknownModelError)
from tokenpool.proxy.frontend import Frontend
from tokenpool.proxy.http_app import create_app
from tokenpool.proxy.http_errors import http_error
from tokenpool.schedulers.admission import SLOAdmission

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "Hi"}]
CONTEXT = 1456  # the fleet's max_model_len for SmolLM2 with 64 MiB of KV (checked below)
MAX_BODY = 1 << 20  # ProxyConfig's default max_body_bytes


def completion(**fields) -> dict:
    return {"json": {"model": MODEL, "prompt": "Hello", "max_tokens": 2, **fields}}


def chat(**fields) -> dict:
    return {"json": {"model": MODEL, "messages": MESSAGES, "max_tokens": 2, **fields}}


def raw(body: bytes) -> dict:
    return {"content": body, "headers": {"content-type": "application/json"}}


def chunked_oversized() -> dict:
    def parts():  # no Content-Length: the limit must hold as the chunks arrive
        yield b'{"model": "%s", "prompt": "' % MODEL.encode()
        for _ in range(2 * MAX_BODY // 65536 + 1):
            yield b"a" * 65536
        yield b'"}'
    return {"content": parts(), "headers": {"content-type": "application/json"}}


# (case, path, request kwargs (a factory: some bodies are one-shot), status, param, code)
CASES = [
    ("unknown model", COMPLETIONS, lambda: completion(model="no-such-model"), 404, "model",
     "model_not_found"),
    ("unknown model, chat", CHAT, lambda: chat(model="no-such-model"), 404, "model",
     "model_not_found"),
    ("empty prompt", COMPLETIONS, lambda: completion(prompt=""), 400, "prompt", None),
    ("empty token prompt", COMPLETIONS, lambda: completion(prompt=[]), 400, "prompt", None),
    ("no messages", CHAT, lambda: chat(messages=[]), 400, "messages", None),
    ("prompt longer than the context", COMPLETIONS,
     lambda: completion(prompt=[100] * CONTEXT), 400, "prompt", "context_length_exceeded"),
    ("chat longer than the context", CHAT,
     lambda: chat(messages=[{"role": "user", "content": "hello " * 3000}]), 400, "prompt",
     "context_length_exceeded"),
    ("max_tokens 0", COMPLETIONS, lambda: completion(max_tokens=0), 400, "max_tokens", None),
    ("max_tokens negative, chat", CHAT, lambda: chat(max_tokens=-3), 400, "max_tokens", None),
    ("max_tokens past the context", COMPLETIONS, lambda: completion(max_tokens=CONTEXT), 400,
     "max_tokens", None),
    ("max_completion_tokens past the context", CHAT,
     lambda: chat(max_completion_tokens=10 ** 6), 400, "max_tokens", None),
    ("temperature < 0", COMPLETIONS, lambda: completion(temperature=-0.1), 400, "temperature",
     None),
    ("temperature < 0, streamed", CHAT, lambda: chat(temperature=-1, stream=True), 400,
     "temperature", None),
    ("top_p 0", COMPLETIONS, lambda: completion(top_p=0), 400, "top_p", None),
    ("top_p above 1", CHAT, lambda: chat(top_p=1.01), 400, "top_p", None),
    ("top_k below -1", COMPLETIONS, lambda: completion(top_k=-2), 400, "top_k", None),
    ("n other than 1", COMPLETIONS, lambda: completion(n=2), 400, "n", None),
    ("too many top_logprobs", CHAT, lambda: chat(logprobs=True, top_logprobs=21), 400,
     "logprobs", None),
    ("non-UTF-8 body", COMPLETIONS,
     lambda: raw(b'{"model": "%s", "prompt": "caf\xe9"}' % MODEL.encode()), 400, None, None),
    ("lone surrogate in the text", COMPLETIONS,
     lambda: raw(b'{"model": "%s", "prompt": "\\ud800"}' % MODEL.encode()), 400, "prompt",
     None),
    ("malformed JSON", COMPLETIONS, lambda: raw(b'{"model": "x", "prompt": '), 400, None,
     None),
    ("JSON that is not an object", CHAT, lambda: raw(b'["hi"]'), 400, None, None),
    ("a field of the wrong type", COMPLETIONS, lambda: completion(max_tokens="many"), 400,
     "max_tokens", None),
    ("a missing field", CHAT, lambda: {"json": {"model": MODEL}}, 400, "messages", None),
    ("oversized body", COMPLETIONS, lambda: completion(prompt="a" * (2 * MAX_BODY)), 413,
     None, "body_too_large"),
    ("oversized chunked body", COMPLETIONS, chunked_oversized, 413, None, "body_too_large"),
]


def test_the_context_is_what_the_cases_assume(serving_stack):
    assert serving_stack.catalog[MODEL].max_model_len == CONTEXT
    assert serving_stack.fleet.proxy.max_body_bytes == MAX_BODY


@pytest.mark.parametrize("path, make, status, param, code",
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gets_its_status_and_an_openai_error_body(http, path, make, status, param,
                                                            code):
    reply = http.post(path, **make())
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and error["type"] == "invalid_request_error"
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code


@pytest.mark.parametrize("method, path, status", [("GET", "/v1/no-such-route", 404),
                                                  ("GET", COMPLETIONS, 405)])
def test_routing_errors_use_the_openai_body_too(http, method, path, status):
    reply = http.request(method, path)
    assert reply.status_code == status
    assert set(reply.json()["error"]) == {"message", "type", "param", "code"}


def test_a_refused_request_counts_in_the_metrics(http, serving_metrics):
    def rejected() -> float:
        return serving_metrics.registry.get_sample_value(
            "tokenpool:requests_rejected_total", {"model_name": MODEL, "reason": "invalid"}) or 0

    before = rejected()
    assert http.post(COMPLETIONS, **completion(temperature=-1)).status_code == 400
    assert http.post(COMPLETIONS, **completion(prompt="")).status_code == 400
    assert rejected() == before + 2


@pytest.mark.parametrize("exc, status", [
    (UnknownModelError("m"), 404), (EmptyPromptError(), 400), (PromptTooLongError(9, 8), 400),
    (InvalidSamplingError("bad", "top_p"), 400), (OverloadedError("busy", 2.2), 429),
    (UnavailableError("closing"), 503), (RequestFailedError("worker died"), 500),
])
def test_typed_errors_map_to_the_documented_statuses(exc, status):
    error = http_error(exc)
    assert error.status == status
    if status == 429:
        assert error.response().headers["retry-after"] == "3"  # whole seconds, rounded up


@pytest.fixture
def shedding(serving_stack):
    """The real controller's admission, told that the prefill queue is full."""
    controller = serving_stack.controller
    saved = controller.core.config.admission
    controller.core.config.admission = SLOAdmission(max_waiting=0)
    yield
    controller.core.config.admission = saved


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_overload_sheds_with_429_and_retry_after(http, client, shedding, serving_metrics,
                                                 stream):
    def shed() -> float:
        return serving_metrics.registry.get_sample_value(
            "tokenpool:requests_rejected_total",
            {"model_name": MODEL, "reason": "overloaded"}) or 0

    before = shed()
    reply = http.post(COMPLETIONS, **completion(stream=stream))
    assert reply.status_code == 429  # a streamed request too: no 200 went out before it
    assert int(reply.headers["retry-after"]) >= 1
    assert reply.json()["error"]["type"] == "rate_limit_error"
    with pytest.raises(openai.RateLimitError):
        client.completions.create(model=MODEL, prompt="Hello", max_tokens=2, stream=stream)
    assert shed() == before + 2


class FailsAfterTheFirstToken(Frontend):
    """The real stream, failing after its first event as if its worker had died."""

    async def stream(self, req):
        async with aclosing(super().stream(req)) as events:  # cancels the real request
            async for event in events:
                yield event
                raise RequestFailedError("worker 0 failed: simulated")


def test_a_failure_mid_stream_sends_an_error_chunk_then_done(serving_stack, frontend,
                                                             serving_metrics):
    failing = FailsAfterTheFirstToken(frontend.controller, frontend.catalog, frontend.config,
                                      observer=serving_metrics)
    app = create_app(failing, serving_stack.controller, frontend.config, serving_metrics)
    body = completion(max_tokens=500, stream=True, ignore_eos=True)
    with live_server(app) as live, httpx.Client(base_url=live.url, timeout=600) as http:
        with http.stream("POST", COMPLETIONS, **body) as reply:
            assert reply.status_code == 200
            events = [line.removeprefix("data: ") for line in reply.iter_lines() if line]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "server_error" and "simulated" in error["message"]
    assert all("choices" in json.loads(e) for e in events[:-2]) and len(events) >= 3
    snap = wait_until_idle(serving_stack.controller, timeout_s=240)  # it was cancelled
    assert [w["kv_pages_used"] for w in snap["workers"]] == [0, 0]


def test_the_api_key_guards_v1_only(serving_stack, frontend, serving_metrics):
    key = "tp-http-test-key"
    config = dataclasses.replace(frontend.config, api_key=key)
    app = create_app(frontend, serving_stack.controller, config, serving_metrics)
    with live_server(app) as live, httpx.Client(base_url=live.url, timeout=600) as http:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": key}):
            reply = http.get("/v1/models", headers=headers)
            assert reply.status_code == 401
            assert reply.json()["error"]["code"] == "invalid_api_key"
        assert http.post(COMPLETIONS, **completion()).status_code == 401  # before parsing
        assert http.get("/v1/models", headers={"Authorization": f"Bearer {key}"}
                        ).status_code == 200
        assert http.get("/health").status_code == 200  # operators' endpoints stay open
        with openai.OpenAI(base_url=live.url + "/v1", api_key="wrong", max_retries=0) as bad:
            with pytest.raises(openai.AuthenticationError):
                bad.models.list()
        with openai.OpenAI(base_url=live.url + "/v1", api_key=key, max_retries=0) as good:
            assert MODEL in [m.id for m in good.models.list().data]
