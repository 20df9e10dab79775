"""Prompts to token ids, the same way for the CLI and for the serving edge."""

from __future__ import annotations

import jinja2

from tokenpool.errors import InvalidRequestError

NO_CHAT_TEMPLATE = ("this model has no chat template, so it cannot take chat messages; "
                    "send a plain prompt (a completion request) instead")


def encode_text(tokenizer, text: str) -> list[int]:
    """Plain prompts get the tokenizer's special tokens (BOS where the model wants one), as
    HF does."""
    return tokenizer.encode(text, add_special_tokens=True)


def encode_chat(tokenizer, messages: list[dict]) -> list[int]:
    """A chat through the model's own template; the template spells out special tokens.

    A template that refuses the messages (Gemma's "System role not supported", roles that
    do not alternate) makes the request invalid, with the template's own words."""
    if tokenizer.chat_template is None:
        raise InvalidRequestError(NO_CHAT_TEMPLATE, "messages")
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    except jinja2.TemplateSyntaxError:
        raise  # the model's template itself is broken: the server's fault, not the request's
    except jinja2.TemplateError as e:
        raise InvalidRequestError(f"the model's chat template refused these messages: {e}",
                                  "messages") from e
    return tokenizer.encode(text, add_special_tokens=False)
