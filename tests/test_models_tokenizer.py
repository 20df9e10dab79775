"""SmolLM2's tokenizer built from GGUF metadata, against HF's GGUF tokenizer and templates."""

from __future__ import annotations

import pytest

from fixtures_models import *  # noqa: F403
from tokenpool.errors import CheckpointError
from tokenpool.models import Tokenizer

SAME_AS_HF = [
    "Hello world!", "hello", " leading space", "  two leading spaces", "trailing   ",
    "x 12345", "$1,000.50", "1e-10", "3.14159", "version 2.0.1-rc3", "x²+y³=z¹", "½ cup",
    "Ⅻ roman numeral", "٣ arabic digit", "héllo wörld façade", "Ünïcödé ÅNGSTRÖM", "naïve café",
    "中文字符测试", "日本語のテキスト", "한국어 텍스트", "Привет, мир", "مرحبا بالعالم", "עברית",
    "emoji 😀🎉", "family 👨‍👩‍👧 zwj", "flags 🇫🇷🇯🇵", "skin 👍🏽", "a\u00a0b nbsp", "zero\u200bwidth",
    "tabs\t\tand\r\nCRLF", "\n", "      ", "", "it's I'll we've they're", "CAPS 'S 'LL",
    "<|im_start|>user\nhi<|im_end|>\n", "x  <|im_end|>  y", "<|endoftext|>text",
    "<|im_start|><|im_start|>", "<|im_start", "<repo_name>foo<file_sep>",
    "def f(x):\n    return x*2\n",
    "{\"json\": [1, 2, null]}", "https://example.com/a?b=c&d=e", "e = mc^2 /* comment */",
    "\u0301 combining only", "replacement \ufffd char", "a" * 300,
]

# HF's GGUF conversion gives the "smollm" pre-tokenizer GPT-2's regex alone. llama.cpp (and
# SmolLM2's own tokenizer.json) first split off every digit, so a whitespace run before a
# digit stays one token: "a␣␣1" is [a, ĠĠ, 1], where HF gives [a, Ġ, Ġ, 1]. We follow
# llama.cpp, which is how the model was trained; these are checked against token strings.
DIGIT_SPLIT_CASES = {
    "a  1": ["a", "ĠĠ", "1"],
    "\n\n1. Do it": ["ĊĊ", "1", ".", "ĠDo", "Ġit"],
    "x   42": ["x", "ĠĠĠ", "4", "2"],
}


@pytest.mark.parametrize("text", SAME_AS_HF)
def test_encode_equals_hf(smollm2_tok, hf_smollm2_tokenizer, text):
    assert smollm2_tok.encode(text) == hf_smollm2_tokenizer.encode(text, add_special_tokens=False)


def test_enough_varied_strings():
    assert len(SAME_AS_HF) >= 30


@pytest.mark.parametrize("text", list(DIGIT_SPLIT_CASES))
def test_digits_split_like_llama_cpp(smollm2_tok, text):
    expected = [smollm2_tok.token_to_id(t) for t in DIGIT_SPLIT_CASES[text]]
    assert None not in expected
    assert smollm2_tok.encode(text) == expected


@pytest.mark.parametrize("text", SAME_AS_HF + list(DIGIT_SPLIT_CASES))
def test_decode_round_trips(smollm2_tok, hf_smollm2_tokenizer, text):
    ids = smollm2_tok.encode(text)
    assert smollm2_tok.decode(ids, skip_special_tokens=False) == text
    for skip in (True, False):
        assert smollm2_tok.decode(ids, skip_special_tokens=skip) == \
            hf_smollm2_tokenizer.decode(ids, skip_special_tokens=skip)


def test_special_tokens(smollm2_tok, hf_smollm2_tokenizer):
    assert smollm2_tok.vocab_size == 49152
    assert smollm2_tok.bos_token_id == hf_smollm2_tokenizer.bos_token_id == 1
    assert smollm2_tok.eos_token_ids == (hf_smollm2_tokenizer.eos_token_id,) == (2,)
    assert smollm2_tok.encode("<|im_start|>") == [1]
    assert smollm2_tok.decode([1, 6004, 2]) == "hi"
    # SmolLM2's GGUF says add_bos_token = false, like HF's tokenizer built from it.
    assert smollm2_tok.encode("hi", add_special_tokens=True) == \
        hf_smollm2_tokenizer.encode("hi", add_special_tokens=True)


CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hello"},
     {"role": "assistant", "content": "Hi! How can I help?"},
     {"role": "user", "content": "Tell me a joke 😀"}],
    [{"role": "user", "content": "line one\nline two\n\n  indented"}],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_equals_hf(smollm2_tok, hf_smollm2_tokenizer, messages,
                                 add_generation_prompt):
    ours = smollm2_tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    theirs = hf_smollm2_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours == theirs
    if add_generation_prompt:
        assert ours.endswith("<|im_start|>assistant\n")


def test_chat_template_is_sandboxed_and_can_raise(smollm2_tok):
    tok = Tokenizer(smollm2_tok.backend, bos_token="<|im_start|>", eos_tokens=["<|im_end|>"],
                    chat_template="{{ raise_exception('no ' + messages[0]['role']) }}")
    with pytest.raises(Exception, match="no user"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])
    sneaky = Tokenizer(smollm2_tok.backend, bos_token=None, eos_tokens=[],
                       chat_template="{{ messages.__class__.__mro__ }}")
    with pytest.raises(Exception, match="unsafe|not safely"):
        sneaky.apply_chat_template([])


def test_no_chat_template_is_an_error(smollm2_tok):
    tok = Tokenizer(smollm2_tok.backend, bos_token=None, eos_tokens=[])
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


def test_save_pretrained_loads_in_hf_and_back(smollm2_tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    smollm2_tok.save_pretrained(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ours = Tokenizer.from_hf_dir(tmp_path)
    for text in SAME_AS_HF + list(DIGIT_SPLIT_CASES):
        ids = smollm2_tok.encode(text)
        assert hf.encode(text, add_special_tokens=False) == ours.encode(text) == ids, text
        assert hf.decode(ids, skip_special_tokens=True) == ours.decode(ids), text
    assert hf.chat_template == ours.chat_template == smollm2_tok.chat_template
    assert (hf.bos_token_id, hf.eos_token_id) == (1, 2)
    assert (ours.bos_token_id, ours.eos_token_ids) == (1, (2,))
    msgs = CONVERSATIONS[2]
    assert hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        ours.apply_chat_template(msgs)


def test_unsupported_gguf_tokenizers():
    with pytest.raises(CheckpointError, match="tokenizer model 'llama' is not supported"):
        Tokenizer.from_gguf({"tokenizer.ggml.model": "llama"})
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "mystery",
            "tokenizer.ggml.tokens": ["a"]}
    with pytest.raises(CheckpointError, match="pre-tokenizer 'mystery'"):
        Tokenizer.from_gguf(meta)


def test_from_hf_dir_without_tokenizer_json(tmp_path):
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path)
