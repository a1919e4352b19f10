"""Stop strings, matched on the decoded text as tokens arrive, across token boundaries.

A stop string may end in the middle of a token, or span several; so the check runs on the text,
not on token ids (as transformers' `StopStringCriteria` and vLLM do). The text before the first
stop string found is the answer; the stop string itself is never emitted. A stream holds back
only what could still become a stop string: the longest end of the text that is the beginning of
one of them; everything before it is released at once.
"""

from __future__ import annotations

from typing import Callable, Sequence

from edgellama.runtime.textstream import TextStream


def find_stop(text: str, stops: Sequence[str], start: int = 0) -> tuple[int, str] | None:
    """(position, stop string) of the earliest stop string in `text[start:]` (the longest of those
    that start there), or None."""
    best: tuple[int, str] | None = None
    for s in stops:
        p = text.find(s, start)
        if p >= 0 and (best is None or p < best[0] or (p == best[0] and len(s) > len(best[1]))):
            best = (p, s)
    return best


def held_back(text: str, stops: Sequence[str]) -> int:
    """Characters at the end of `text` that begin some stop string (and so may still complete one)."""
    longest = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:k]):
                longest = k
                break
    return longest


class StopText:
    """One sequence's text as its tokens arrive: UTF-8 safe pieces (TextStream), stop strings found
    across pieces, and the text that is safe to show released.

    `push(token)` returns the newly released text; `match` is the stop string once one is found
    and `cut` its position in `text` (everything before it was released, nothing after it is)."""

    def __init__(self, decode: Callable[[Sequence[int]], str], stops: Sequence[str] = ()):
        self._stream = TextStream(decode)
        self.stops = tuple(stops)
        self._longest = max((len(s) for s in self.stops), default=0)
        self.text = ""
        self.released = 0
        self.match: str | None = None
        self.cut: int | None = None

    def push(self, token_id: int) -> str:
        if self.match is not None:
            return ""
        return self._add(self._stream.push(token_id), final=False)

    def flush(self) -> str:
        """The rest once no token will come (an incomplete character as U+FFFD, as decode gives it)."""
        if self.match is not None:
            return ""
        return self._add(self._stream.flush(), final=True)

    def _add(self, piece: str, *, final: bool) -> str:
        start = max(0, len(self.text) - self._longest + 1)
        self.text += piece
        hit = find_stop(self.text, self.stops, start) if self.stops and piece else None
        if hit is not None:
            self.cut, self.match = hit
            end = self.cut
        else:
            end = len(self.text) - (0 if final else held_back(self.text, self.stops))
        out = self.text[self.released:end] if end > self.released else ""
        self.released = max(self.released, end)
        return out
