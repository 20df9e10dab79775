"""Fuzzing the HTTP edge: schemathesis cases from the live server's own /openapi.json, and
hand-made hostile bodies (invalid UTF-8, lone surrogates, bodies at and just past the
size limit), against the session's real stack behind real uvicorn.

Whatever arrives, the answer is never a 5xx, and every error carries OpenAI's body
`{"error": {"message", "type", "param", "code"}}` (DESIGN §6, §7).

Speed: a case that names a real model and valid values runs the model, so such cases are
capped at a few tokens (`_affordable`); a case naming a random model is refused at once
with a 404. Seeds are fixed (`derandomize`), so a run is the same every time.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

pytest.register_assert_rewrite("serving_fixtures")
pytest_plugins = ["serving_fixtures"]

from serving_fixtures import MODEL, live_server, wait_until_idle  # noqa: E402
from tokenpool.proxy.http_app import create_app  # noqa: E402

ERROR_KEYS = {"message", "type", "param", "code"}
MAX_TOKENS = 2  # what a case that reaches the model may generate at most
POSITIVE, NEGATIVE = GenerationMode.POSITIVE, GenerationMode.NEGATIVE
# (path, mode, examples): 1,000 POST cases in all under `-m slow`, half that by default
# (the default suite's 15-minute budget), plus the GET endpoints'. More of the cheaper
# completions cases: generating a chat body costs hypothesis 3x more.
SOAK = [("/v1/completions", POSITIVE, 400), ("/v1/completions", NEGATIVE, 300),
        ("/v1/chat/completions", POSITIVE, 150), ("/v1/chat/completions", NEGATIVE, 150)]
PLAN = [pytest.param(path, mode, n // 2, id=f"{path[4:]}-{mode}") for path, mode, n in SOAK] + \
    [pytest.param(path, mode, n, id=f"{path[4:]}-{mode}-soak", marks=pytest.mark.slow)
     for path, mode, n in SOAK]


def check_answer(response) -> None:
    """No 5xx; an error has OpenAI's body; a stream ends with [DONE]."""
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == ERROR_KEYS, error
        assert isinstance(error["message"], str) and error["message"]
    elif "text/event-stream" in str(response.headers.get("content-type")):
        events = [line.removeprefix("data: ") for line in response.text.splitlines() if line]
        assert events[-1] == "[DONE]", events
        for event in events[:-1]:
            payload = json.loads(event)
            if "error" in payload:
                assert set(payload["error"]) == ERROR_KEYS


def _affordable(body, model: str | None) -> None:
    """At most MAX_TOKENS from the model; a bad max_tokens (<= 0, a string) stays bad."""
    if not isinstance(body, dict):
        return
    if model is not None:
        body["model"] = model
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > MAX_TOKENS:
            body[name] = MAX_TOKENS
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = MAX_TOKENS  # chat's default is the rest of the context


@pytest.fixture(scope="module")
def schema(server):
    return schemathesis.openapi.from_url(server.url + "/openapi.json")


@pytest.fixture(scope="module")
def session():
    with requests.Session() as s:
        yield s


def test_the_schema_describes_the_request_bodies(schema):
    body = schema["/v1/completions"]["POST"].definition.raw["requestBody"]
    assert body["required"] and "application/json" in body["content"]
    assert "CompletionRequest" in json.dumps(body)


@pytest.mark.parametrize("path, mode, examples", PLAN)
def test_schemathesis_cases_never_get_a_5xx(server, schema, session, serving_stack, path,
                                            mode, examples):
    operation = schema[path]["POST"]
    sent = []

    # A quarter of the cases name the fleet's model, so they get past the model lookup and
    # reach the value checks and, when valid, the model itself (one model: no switches).
    @settings(max_examples=examples, derandomize=True, deadline=None, database=None,
              phases=[Phase.explicit, Phase.generate, Phase.shrink],
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode),
           model=st.sampled_from([None, None, None, MODEL]))
    def run(case, model):
        _affordable(case.body, model)
        response = case.call(base_url=server.url, session=session, timeout=120)
        sent.append(response.status_code)
        check_answer(response)

    run()
    assert len(sent) >= examples * 0.9  # hypothesis ran (about) as many cases as planned
    if mode == POSITIVE:
        assert 200 in sent, "no generated case was served: the fuzzing never got deep"
    snap = wait_until_idle(serving_stack.controller, timeout_s=120)
    assert all(w["kv_pages_used"] == 0 for w in snap["workers"])


def test_every_get_endpoint_answers(server, schema, session):
    operations = [op.ok() for op in schema.get_all_operations()]
    gets = [op for op in operations if op.method.upper() == "GET"]
    assert {op.path for op in gets} >= {"/health", "/version", "/metrics", "/v1/models"}
    for op in gets:
        @settings(max_examples=5, derandomize=True, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy())
        def run(case):
            response = case.call(base_url=server.url, session=session, timeout=60)
            assert response.status_code == 200, (op.path, response.text)

        run()


# -- hand-made hostile bodies ----------------------------------------------------------------

JSON = {"content-type": "application/json"}
M = MODEL.encode()
HOSTILE = {
    "0xff in a string": b'{"model": "%s", "prompt": "a\xffb", "max_tokens": 1}' % M,
    "0xff outside strings": b'{"model": "%s", \xff "prompt": "a"}' % M,
    "0xff alone": b"\xff",
    "overlong UTF-8 (NUL as 0xc0 0x80)": b'{"model": "%s", "prompt": "a\xc0\x80"}' % M,
    "UTF-8 of a surrogate (0xed 0xa0 0x80)": b'{"model": "%s", "prompt": "\xed\xa0\x80"}' % M,
    "truncated UTF-8": b'{"model": "%s", "prompt": "caf\xc3"}' % M,
    "UTF-16 body": '{"model": "m", "prompt": "hi"}'.encode("utf-16"),
    "lone surrogate in a chat message": (b'{"model": "%s", "messages": [{"role": "user", '
                                         b'"content": "\\udc00"}]}' % M),
    "lone surrogate in a text part": (b'{"model": "%s", "messages": [{"role": "user", '
                                      b'"content": [{"type": "text", "text": "\\ud800"}]}]}'
                                      % M),
    "lone surrogate in a stop string": (b'{"model": "%s", "prompt": "hi", '
                                        b'"stop": ["\\ud800"]}' % M),
    "lone surrogate in the model name": b'{"model": "\\ud800x", "prompt": "hi"}',
    "lone surrogate in a role": (b'{"model": "%s", "messages": [{"role": "\\ud800", '
                                 b'"content": "hi"}]}' % M),
    "NaN": b'{"model": "%s", "prompt": "hi", "temperature": NaN}' % M,
    "Infinity": b'{"model": "%s", "prompt": "hi", "top_p": Infinity}' % M,
    "huge integer": b'{"model": "%s", "prompt": "hi", "max_tokens": 1%s}' % (M, b"0" * 5000),
    "huge token id": b'{"model": "%s", "prompt": [1%s]}' % (M, b"0" * 40),
    "deeply nested": b'{"model": "%s", "prompt": %s%s}' % (M, b"[" * 5000, b"]" * 5000),
    "empty body": b"",
    "only whitespace": b" \n\t ",
    "NUL bytes": b"\x00" * 64,
    "trailing garbage": b'{"model": "%s", "prompt": "hi"} trailing' % M,
}


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_bodies_get_an_openai_4xx(http, case, path):
    response = http.post(path, content=HOSTILE[case], headers=JSON)
    assert 400 <= response.status_code < 500, response.text
    assert set(response.json()["error"]) == ERROR_KEYS


LIMIT = 4096


@pytest.fixture(scope="module")
def small_limit_server(serving_stack, frontend, serving_metrics):
    """The real app with a 4 KiB body limit, so both edges of it are cheap to reach."""
    config = dataclasses.replace(frontend.config, max_body_bytes=LIMIT)
    app = create_app(frontend, serving_stack.controller, config, serving_metrics)
    with live_server(app) as live:
        yield live


def _body_of_size(size: int) -> bytes:
    """A valid completion request of exactly `size` bytes (the prompt pads it)."""
    head = b'{"model": "%s", "max_tokens": 1, "prompt": "' % M
    return head + b"a" * (size - len(head) - 2) + b'"}'


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_the_body_limit_holds_at_both_edges(small_limit_server, chunked):
    import httpx

    def post(body: bytes):
        # A generator makes httpx send it chunked, without a Content-Length.
        content = iter([body[:100], body[100:]]) if chunked else body
        return httpx.post(small_limit_server.url + "/v1/completions", content=content,
                          headers=JSON, timeout=120)

    at_limit, past_limit = _body_of_size(LIMIT), _body_of_size(LIMIT + 1)
    assert len(at_limit) == LIMIT and json.loads(at_limit)
    ok = post(at_limit)
    assert ok.status_code == 200, ok.text
    refused = post(past_limit)
    assert refused.status_code == 413
    assert refused.json()["error"]["code"] == "body_too_large"
