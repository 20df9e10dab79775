"""Streaming token ids -> text: never a broken character, never part of a stop string."""

from __future__ import annotations

from collections.abc import Sequence

from tokenpool.models.tokenizer import Tokenizer

_REPLACEMENT = "\ufffd"


class _Utf8Window:
    """Decodes a growing id list a few tokens at a time, releasing only text that is final.

    Decoding ids[start:] and diffing against what was already released keeps the work per
    token O(window), and handles decoders that treat the first token of a call specially
    (Metaspace drops its leading space) because `start` stays put within a window. Trailing
    U+FFFD may be an incomplete multi-byte character that later tokens complete, so it is held
    back until something else follows it, or until flush().
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._start = 0  # first id of the decode window
        self._pending = 0  # first id whose text is not fully released
        self._released = 0  # chars of decode(ids[start:]) already released

    def add(self, token_id: int) -> str:
        self._ids.append(token_id)
        window = self._decode(self._start)
        safe = len(window.rstrip(_REPLACEMENT))
        new = window[self._released:safe] if safe > self._released else ""
        self._released = max(self._released, safe)
        if safe == len(window):  # all final: slide so the window stays a few tokens long
            self._start, self._pending = self._pending, len(self._ids)
            self._released = len(self._decode(self._start))
        return new

    def flush(self) -> str:
        """Release everything, including trailing U+FFFD that will now never be completed."""
        return self._decode(self._start)[self._released:]

    def _decode(self, start: int) -> str:
        return self._tok.decode(self._ids[start:], skip_special_tokens=self._skip)


class _StopScanner:
    """Holds back any tail that could still grow into a stop string; cuts at the first one."""

    def __init__(self, stop: Sequence[str]):
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty")
        self.stop = tuple(dict.fromkeys(stop))
        self.hit: str | None = None
        self._held = ""

    def feed(self, text: str, final: bool = False) -> str:
        if self.hit is not None:
            return ""
        buf = self._held + text
        cut, hit = self._first_match(buf)
        # A stop that could still complete at an earlier position wins over a complete later one.
        open_at = len(buf) if final else self._first_open_prefix(buf)
        if hit is not None and cut <= open_at:
            self.hit, self._held = hit, ""
            return buf[:cut]
        keep = min(open_at, cut)
        self._held = buf[keep:]
        return buf[:keep]

    def _first_match(self, buf: str) -> tuple[int, str | None]:
        best, hit = len(buf), None
        for s in self.stop:
            i = buf.find(s)
            if i != -1 and (hit is None or (i, len(s)) < (best, len(hit))):
                best, hit = i, s
        return best, hit

    def _first_open_prefix(self, buf: str) -> int:
        """Earliest i where buf[i:] is a proper prefix of some stop string (else len(buf))."""
        longest = max(len(s) for s in self.stop) - 1
        for i in range(max(0, len(buf) - longest), len(buf)):
            tail = buf[i:]
            if any(len(s) > len(tail) and s.startswith(tail) for s in self.stop):
                return i
        return len(buf)


class IncrementalDetokenizer:
    """Feed generated ids one at a time; get back only text that is safe to show.

    Everything returned by add() plus finish() equals tokenizer.decode(ids) cut before the first
    occurrence of any stop string (the whole decode when there is none).
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = (),
                 skip_special_tokens: bool = True):
        self._utf8 = _Utf8Window(tokenizer, skip_special_tokens)
        self._stops = _StopScanner(stop) if stop else None
        self._parts: list[str] = []
        self._finished = False

    @property
    def stop_hit(self) -> str | None:
        return self._stops.hit if self._stops is not None else None

    @property
    def text(self) -> str:
        return "".join(self._parts)

    def add(self, token_id: int) -> str:
        if self._finished or self.stop_hit is not None:
            return ""
        return self._emit(self._utf8.add(token_id), final=False)

    def finish(self) -> str:
        """Flush held-back text at the end of generation (never past a stop string)."""
        if self._finished or self.stop_hit is not None:
            return ""
        self._finished = True
        return self._emit(self._utf8.flush(), final=True)

    def _emit(self, text: str, final: bool) -> str:
        if self._stops is not None:
            text = self._stops.feed(text, final)
        if text:
            self._parts.append(text)
        return text
