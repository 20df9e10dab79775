"""Every served family's own chat template, rendered by us and by transformers.

tests/data/chat_templates/ holds the models' templates as their tokenizer_config.json (or
GGUF metadata) ships them; its README.md says where each comes from. For every template and
conversation, `Tokenizer.apply_chat_template` must give transformers'
`apply_chat_template(tokenize=False)` text byte for byte, or raise the same template error;
`encode_chat` turns such an error into a 400 that quotes the template.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import jinja2
import pytest
from fastapi.testclient import TestClient
from tokenizers import Tokenizer as Backend
from tokenizers import models

from tokenpool.controller.catalog import ModelCard
from tokenpool.errors import InvalidRequestError
from tokenpool.models import chat_template as chat_template_module
from tokenpool.models.prompts import NO_CHAT_TEMPLATE, encode_chat
from tokenpool.models.tokenizer import Tokenizer
from tokenpool.proxy.config import ProxyConfig
from tokenpool.proxy.frontend import Frontend
from tokenpool.proxy.http_app import create_app
from tokenpool.proxy.metrics import ServingMetrics
from tokenpool.schedulers.types import SLO

transformers = pytest.importorskip("transformers")
from transformers.utils import chat_template_utils  # noqa: E402

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"

# Each template's BOS and EOS as its model's tokenizer_config.json sets them (Qwen: no BOS).
SPECIAL_TOKENS = {
    "google-gemma-2-2b-it": ("<bos>", "<eos>"),
    "google-gemma-3-1b-it": ("<bos>", "<eos>"),
    "meta-llama-Llama-3.1-8B-Instruct": ("<|begin_of_text|>", "<|eot_id|>"),
    "meta-llama-Llama-3.2-3B-Instruct": ("<|begin_of_text|>", "<|eot_id|>"),
    "microsoft-Phi-3.5-mini-instruct": ("<s>", "<|endoftext|>"),
    "mistralai-Mistral-7B-Instruct-v0.1": ("<s>", "</s>"),
    "mistralai-Mistral-Nemo-Instruct-2407": ("<s>", "</s>"),
    "Qwen-Qwen2.5-7B-Instruct": (None, "<|im_end|>"),
    "Qwen-Qwen3-0.6B": (None, "<|im_end|>"),
}
# The families the engine serves -> their templates here (SmolLM2's ChatML, a llama, is
# checked against HF in test_models_tokenizer.py).
FAMILIES = {
    "llama": ["meta-llama-Llama-3.1-8B-Instruct", "meta-llama-Llama-3.2-3B-Instruct"],
    "mistral": ["mistralai-Mistral-7B-Instruct-v0.1", "mistralai-Mistral-Nemo-Instruct-2407"],
    "qwen2": ["Qwen-Qwen2.5-7B-Instruct"],
    "qwen3": ["Qwen-Qwen3-0.6B"],
    "gemma2": ["google-gemma-2-2b-it"],
    "gemma3": ["google-gemma-3-1b-it"],
    "phi3": ["microsoft-Phi-3.5-mini-instruct"],
}


def user(text: str, **extra) -> dict:
    return {"role": "user", "content": text, **extra}


def assistant(text: str, **extra) -> dict:
    return {"role": "assistant", "content": text, **extra}


SYSTEM = {"role": "system", "content": "You are terse.\n"}
CONVERSATIONS = {
    "user": [user("Name a primary color.")],
    "system, user": [SYSTEM, user("Name a primary color.")],
    "multi-turn": [user("Hi!"), assistant("Hello. How can I help?"),
                   user("  Ünïcödé ☃ <b>&\"quotes\"  \n")],
    "system, multi-turn": [SYSTEM, user("Hi!"), assistant("Hello."), user("Bye.")],
    "ends with the assistant": [user("2+2?"), assistant("4")],
    # HF drops None fields and copies `reasoning` to `reasoning_content` (Qwen3 reads it).
    "reasoning and None fields": [user("2+2?", name=None),
                                  assistant("4", reasoning="Add.", name=None)],
    "tool result": [user("Weather?"), assistant("Checking."),
                    {"role": "tool", "content": "{\"temp\": 21}"}],
    "two users in a row": [user("Hi!"), user("Anyone there?")],
    "system only": [SYSTEM],
}
ALWAYS_RENDERED = ("user", "multi-turn", "ends with the assistant")


class FrozenDatetime(dt.datetime):
    @classmethod
    def now(cls, tz=None):
        return cls(2025, 3, 5, 12, 0, 0, tzinfo=tz)


@pytest.fixture
def frozen_today(monkeypatch):
    """Llama 3.2 puts strftime_now's date in the prompt: both sides see the same day."""
    monkeypatch.setattr(chat_template_module, "datetime", FrozenDatetime)
    monkeypatch.setattr(chat_template_utils, "datetime", FrozenDatetime)


def _backend() -> Backend:
    # Rendering never tokenizes; a one-word vocabulary keeps building these cheap.
    return Backend(models.WordLevel({"<unk>": 0}, unk_token="<unk>"))


def template(name: str) -> str:
    return (TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8")


def ours(name: str) -> Tokenizer:
    bos, eos = SPECIAL_TOKENS[name]
    return Tokenizer(_backend(), bos_token=bos, eos_tokens=[eos],
                     chat_template=template(name))


def theirs(name: str):
    bos, eos = SPECIAL_TOKENS[name]
    tokens = {k: v for k, v in {"bos_token": bos, "eos_token": eos}.items() if v is not None}
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=_backend(), chat_template=template(name),
        **tokens)


def outcome(render) -> tuple[str, str]:
    """("text", the prompt) or ("error", the template's message)."""
    try:
        return "text", render()
    except jinja2.TemplateError as e:
        return "error", str(e)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
@pytest.mark.parametrize("name", list(SPECIAL_TOKENS))
def test_rendering_equals_transformers(frozen_today, name, conversation,
                                       add_generation_prompt):
    messages = CONVERSATIONS[conversation]
    got = outcome(lambda: ours(name).apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt))
    want = outcome(lambda: theirs(name).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt))
    assert got == want
    if conversation in ALWAYS_RENDERED:
        assert got[0] == "text" and messages[-1]["content"].strip() in got[1]


def test_every_family_has_its_own_template():
    files = sorted(p.stem for p in TEMPLATES.glob("*.jinja"))
    assert files == sorted(SPECIAL_TOKENS)
    assert sorted(n for names in FAMILIES.values() for n in names) == files


def test_llama_3_2_dates_the_prompt_today_or_as_told(frozen_today):
    name, messages = "meta-llama-Llama-3.2-3B-Instruct", CONVERSATIONS["user"]
    today = ours(name).apply_chat_template(messages)
    assert "Today Date: 05 Mar 2025\n" in today
    told = {"date_string": "01 Jan 2030"}
    assert ours(name).apply_chat_template(messages, **told) == \
        theirs(name).apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                         **told)


# What HF's environment and call give a template beyond Jinja's defaults, each one shown.
ENVIRONMENT_CASES = {
    "generation block": "{% for m in messages %}{% generation %}{{ m.content }}"
                        "{% endgeneration %}{% endfor %}",
    "tools and documents are None": "{{ tools is defined }} {{ tools is none }} "
                                    "{{ documents is none }}",
    "unset special tokens are undefined": "{{ bos_token is defined }} {{ unk_token is defined }}"
                                          " {{ pad_token is defined }} [{{ eos_token }}]",
    "namespace": "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
                 "{% endfor %}{{ ns.n }}",
    "loop controls": "{% for m in messages %}{% if loop.first %}{% continue %}{% endif %}"
                     "{{ m.content }}{% break %}{% endfor %}",
    "tojson keeps HTML and unicode": "{{ messages | tojson(indent=2) }} {{ '<a&b>' | tojson }}",
    "dict": "{{ dict(a=1) | tojson }} {{ dict.fromkeys(['a']) }}",
    "None fields dropped, reasoning aliased": "{% for m in messages %}{{ m.name is defined }}"
                                              "{{ m.thinking }}|{{ m.reasoning_content }};"
                                              "{% endfor %}",
}
ENVIRONMENT_MESSAGES = [user("é<x>", name=None), assistant("b", reasoning="think")]


@pytest.mark.parametrize("case", list(ENVIRONMENT_CASES))
def test_the_environment_is_transformers(case):
    template = ENVIRONMENT_CASES[case]
    tok = Tokenizer(_backend(), bos_token=None, eos_tokens=["<eos>"], chat_template=template)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=_backend(),
                                              chat_template=template, eos_token="<eos>")
    assert tok.apply_chat_template(ENVIRONMENT_MESSAGES) == hf.apply_chat_template(
        ENVIRONMENT_MESSAGES, tokenize=False, add_generation_prompt=True)


def test_a_namespace_refuses_underscore_names_as_transformers_does():
    template = "{% set ns = namespace(_x=1) %}{{ ns._x }}"
    tok = Tokenizer(_backend(), bos_token=None, eos_tokens=[], chat_template=template)
    with pytest.raises(jinja2.exceptions.SecurityError, match="underscore"):
        tok.apply_chat_template([user("x")])


REFUSED = [
    ("google-gemma-2-2b-it", "system, user", "System role not supported"),
    ("google-gemma-3-1b-it", "two users in a row", "Conversation roles must alternate"),
    ("mistralai-Mistral-Nemo-Instruct-2407", "two users in a row",
     "After the optional system message, conversation roles must alternate"),
]


@pytest.mark.parametrize("name, conversation, message", REFUSED)
def test_encode_chat_turns_a_refusal_into_an_invalid_request(name, conversation, message):
    with pytest.raises(InvalidRequestError) as caught:
        encode_chat(ours(name), CONVERSATIONS[conversation])
    assert message in str(caught.value) and caught.value.param == "messages"


def test_encode_chat_leaves_a_broken_template_a_server_error():
    tok = Tokenizer(_backend(), bos_token=None, eos_tokens=[], chat_template="{% for %}")
    with pytest.raises(jinja2.TemplateSyntaxError):
        encode_chat(tok, [user("x")])


def test_encode_chat_without_a_template_says_so():
    tok = Tokenizer(_backend(), bos_token=None, eos_tokens=[])
    with pytest.raises(InvalidRequestError, match="no chat template") as caught:
        encode_chat(tok, [user("x")])
    assert caught.value.param == "messages"


@pytest.fixture(scope="module")
def http():
    """The HTTP app over two models and no workers: these requests never get past encoding."""
    cards = {model: ModelCard(model, tok, 4096, 16, 1, (), SLO(1.0, 0.1), 0)
             for model, tok in [("gemma-2", ours("google-gemma-2-2b-it")),
                                ("base", Tokenizer(_backend(), bos_token=None, eos_tokens=[]))]}
    config = ProxyConfig()
    app = create_app(Frontend(None, cards, config), None, config, ServingMetrics(None, cards))
    with TestClient(app) as client:
        yield client


@pytest.mark.parametrize("model, messages, says", [
    ("gemma-2", CONVERSATIONS["system, user"], "System role not supported"),
    ("base", CONVERSATIONS["user"], NO_CHAT_TEMPLATE),
], ids=["refused by the template", "no template"])
def test_http_answers_400_with_the_reason(http, model, messages, says):
    reply = http.post("/v1/chat/completions", json={"model": model, "messages": messages})
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert says in error["message"] and error["param"] == "messages"
    assert error["type"] == "invalid_request_error"
