"""Prompts to token ids, the same way for the CLI and for the serving edge."""

from __future__ import annotations

from tokenpool.errors import InvalidRequestError


def encode_text(tokenizer, text: str) -> list[int]:
    """Plain prompts get the tokenizer's special tokens (BOS where the model wants one), as
    HF does."""
    return tokenizer.encode(text, add_special_tokens=True)


def encode_chat(tokenizer, messages: list[dict]) -> list[int]:
    """A chat through the model's own template; the template spells out special tokens."""
    if tokenizer.chat_template is None:
        raise InvalidRequestError("this model has no chat template; send a plain prompt",
                                  "messages")
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)
