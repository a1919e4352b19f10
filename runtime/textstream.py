"""Token ids in, text pieces out, never splitting a UTF-8 character across two pieces.

Byte-level BPE vocabularies (Llama 3, SmolLM2) spell one character over several tokens; decoding
each token alone prints U+FFFD. Like transformers' `TextStreamer` and text-generation-inference's
`decode_token`, this decodes a short window that ends at the newest token and emits the text past
the previous window only once it no longer ends in an incomplete character.
"""

from __future__ import annotations

from typing import Callable, Sequence

REPLACEMENT = "\ufffd"


class TextStream:
    def __init__(self, decode: Callable[[Sequence[int]], str]):
        self._decode = decode
        self._ids: list[int] = []
        self._prefix = 0    # window start: the decode of ids[_prefix:_read] was already emitted
        self._read = 0

    def push(self, token_id: int) -> str:
        """The new text that `token_id` completes ('' while a character is still incomplete)."""
        self._ids.append(int(token_id))
        done = self._decode(self._ids[self._prefix:self._read])
        text = self._decode(self._ids[self._prefix:])
        if len(text) > len(done) and not text.endswith(REPLACEMENT):
            self._prefix, self._read = self._read, len(self._ids)
            return text[len(done):]
        return ""

    def flush(self) -> str:
        """Whatever is left at the end (an incomplete character comes out as U+FFFD, as decode gives it)."""
        done = self._decode(self._ids[self._prefix:self._read])
        text = self._decode(self._ids[self._prefix:])
        self._prefix = self._read = len(self._ids)
        return text[len(done):]
