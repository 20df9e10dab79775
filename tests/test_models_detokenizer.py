"""IncrementalDetokenizer: property tests over real SmolLM2 token ids and random stop strings."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fixtures_models import *  # noqa: F403
from tokenpool.models import IncrementalDetokenizer, Tokenizer
from tokenpool.models.synth import smollm2_tokenizer

_TOK = smollm2_tokenizer()  # strategies are built at import time; this takes ~0.3 s
_TRICKY_TEXT = "😀👨‍👩‍👧🇫🇷 中文字符 héllo ñ ü Привет \ufffd ½² \n\n  \t <|im_start|><|im_end|>"
# Single tokens that are a piece of a multi-byte character, emoji pieces, specials, whitespace.
_TRICKY_IDS = sorted(set(_TOK.encode(_TRICKY_TEXT)) | set(range(17)) | set(range(130, 260)))

token_ids = st.one_of(st.integers(0, _TOK.vocab_size - 1), st.sampled_from(_TRICKY_IDS))
id_lists = st.one_of(
    st.lists(token_ids, max_size=40),
    st.text(max_size=30).map(_TOK.encode),  # realistic: whole characters split over tokens
)
settings_ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _expected(full: str, stops: list[str]) -> tuple[str, int | None]:
    cuts = [full.find(s) for s in stops if s in full]
    return (full[: min(cuts)], min(cuts)) if cuts else (full, None)


def _run(tok: Tokenizer, ids: list[int], stops: list[str], skip: bool):
    detok = IncrementalDetokenizer(tok, stop=stops, skip_special_tokens=skip)
    chunks, cumulative = [], []
    for i in ids:
        chunks.append(detok.add(i))
        cumulative.append("".join(chunks))
    tail = detok.finish()
    return detok, chunks, cumulative, tail


@settings_
@given(ids=id_lists, data=st.data(), skip=st.booleans())
def test_stream_equals_decode_cut_at_first_stop(ids, data, skip):
    full = _TOK.decode(ids, skip_special_tokens=skip)
    # Stops drawn from the text itself hit; random ones mostly do not; both must be handled.
    from_text = st.integers(0, max(len(full) - 1, 0)).flatmap(
        lambda i: st.integers(1, 6).map(lambda n: full[i:i + n]))
    stop = st.one_of(from_text, st.text(min_size=1, max_size=4))
    stops = [s for s in data.draw(st.lists(stop, max_size=3)) if s]
    if data.draw(st.booleans()):  # a stop inside another completes first but starts later
        stops += [s[1:-1] for s in stops if len(s) > 2]
    expected, cut = _expected(full, stops)

    detok, chunks, cumulative, tail = _run(_TOK, ids, stops, skip)

    assert "".join(chunks) + tail == expected == detok.text
    for emitted in cumulative:
        # Nothing shown ever has to be taken back: no half character, no half stop string.
        assert expected.startswith(emitted)
    if cut is None:
        assert detok.stop_hit is None
    else:
        assert detok.stop_hit is not None and full[cut:].startswith(detok.stop_hit)


@settings_
@given(ids=id_lists, skip=st.booleans())
def test_no_replacement_char_unless_decode_has_it(ids, skip):
    full = _TOK.decode(ids, skip_special_tokens=skip)
    pos = 0
    detok = IncrementalDetokenizer(_TOK, skip_special_tokens=skip)
    for i in ids:
        chunk = detok.add(i)
        for k, ch in enumerate(chunk):
            if ch == "\ufffd":
                assert full[pos + k] == "\ufffd"
        pos += len(chunk)
    assert detok.text + detok.finish() == full


def test_multibyte_character_is_held_until_complete(smollm2_tok):
    ids = smollm2_tok.encode("😀")
    assert len(ids) > 1  # the emoji is split over byte tokens
    detok = IncrementalDetokenizer(smollm2_tok)
    assert [detok.add(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.add(ids[-1]) == "😀"


def test_incomplete_character_is_flushed_by_finish(smollm2_tok):
    ids = smollm2_tok.encode("a😀")[:-1]
    detok = IncrementalDetokenizer(smollm2_tok)
    assert "".join(detok.add(i) for i in ids) == "a"
    assert detok.finish() == smollm2_tok.decode(ids)[1:]
    assert detok.text == smollm2_tok.decode(ids)


def test_stop_string_is_held_then_cut(smollm2_tok):
    ids = smollm2_tok.encode("Hello, world. END of text")
    detok = IncrementalDetokenizer(smollm2_tok, stop=["END", "xyz"])
    out = [detok.add(i) for i in ids]
    assert "".join(out) == "Hello, world. " and detok.stop_hit == "END"
    assert detok.add(ids[0]) == "" and detok.finish() == ""


def test_prefix_of_stop_is_released_when_it_goes_nowhere(smollm2_tok):
    detok = IncrementalDetokenizer(smollm2_tok, stop=["ab!"])
    emitted = [detok.add(i) for i in smollm2_tok.encode("x ab")]
    assert "".join(emitted) == "x "  # "ab" might still become "ab!"
    assert detok.finish() == "ab" and detok.stop_hit is None


def test_earlier_stop_wins_even_if_it_completes_later(smollm2_tok):
    """Truncation is at the first occurrence, so a longer stop starting earlier wins."""
    ids = smollm2_tok.encode("abcd tail")
    detok = IncrementalDetokenizer(smollm2_tok, stop=["c", "abcd"])
    text = "".join(detok.add(i) for i in ids) + detok.finish()
    assert text == "" and detok.stop_hit == "abcd"


def test_work_per_token_stays_bounded(smollm2_tok):
    """Each add() decodes a few tokens, not the whole output."""
    widths = []

    class Counting(Tokenizer):
        def decode(self, ids, skip_special_tokens=True):
            widths.append(len(ids))
            return super().decode(ids, skip_special_tokens)

    tok = Counting(smollm2_tok.backend, bos_token=smollm2_tok.bos_token, eos_tokens=["<|im_end|>"])
    ids = smollm2_tok.encode("Streaming 😀 text, ünïcode and 中文. " * 100)
    detok = IncrementalDetokenizer(tok, stop=["never appears"])
    text = "".join(detok.add(i) for i in ids) + detok.finish()
    assert text == smollm2_tok.decode(ids)
    assert len(ids) > 1000 and max(widths) <= 8


def test_empty_stop_string_is_rejected(smollm2_tok):
    with pytest.raises(ValueError, match="non-empty"):
        IncrementalDetokenizer(smollm2_tok, stop=["ok", ""])
