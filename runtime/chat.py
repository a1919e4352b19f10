"""A conversation on one loaded model that keeps its KV cache from turn to turn.

    chat = ChatSession(gen, system="You are concise.")
    print(chat.send("What is ONNX?").text)
    for piece in chat.stream("And ONNX Runtime?"):
        print(piece, end="")

Each turn renders the whole conversation with the chat template and compares it with the tokens
the cache holds (the earlier prompts and the replies as generated). When they are a prefix of the
new rendering only the new tokens are prefilled; where the template renders an earlier part
differently (a reply re-tokenized, a stop string cut off, a template that rewrites history) the
cache is rewound to the last token they share and the rest prefilled, which `reprefill_reason`
says (with nothing shared: a full prefill). The output is the same as a fresh prefill of the same
conversation. A refused call (bad options, a rewind past the start, a conversation past the
context) leaves the session as it was; a call that fails while running drops the cache (the next
turn prefills in full) and keeps the conversation.
"""

from __future__ import annotations

from typing import Any

from edgellama.errors import RuntimeInputError
from edgellama.runtime.call import Call, GenerationResult, Stream
from edgellama.runtime.generator import Generator, check_text
from edgellama.runtime.options import GenerationOptions


class ChatSession:
    """One conversation on `generator` (batch 1; one thread at a time)."""

    def __init__(self, generator: Generator, *, system: str | None = None):
        if system is not None:
            check_text(system)
        self.generator = generator
        self.system = system
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the system message stays) and its cache."""
        self._messages: list[dict[str, str]] = [] if self.system is None else [
            {"role": "system", "content": self.system}]
        self._loop: Any = None
        self._cached: list[int] = []

    @property
    def messages(self) -> list[dict[str, str]]:
        return [dict(m) for m in self._messages]

    @property
    def cached_tokens(self) -> int:
        """Tokens whose keys and values the cache holds."""
        return len(self._cached)

    # -- turns --------------------------------------------------------------------------------------
    def send(self, message: str, *, options: GenerationOptions | None = None, **kwargs: Any) -> GenerationResult:
        """One user message in, the assistant's reply out (options as Generator.generate takes them)."""
        stream = self.stream(message, options=options, **kwargs)
        for _ in stream:
            pass
        return stream.result

    def stream(self, message: str, *, options: GenerationOptions | None = None, **kwargs: Any) -> Stream:
        """`send` as a Stream of text pieces; the reply joins the conversation when the stream ends
        (a stream closed early keeps the reply so far)."""
        check_text(message)
        gen = self.generator
        opts = gen.options(options, **kwargs)
        user = {"role": "user", "content": message}
        ids = gen.encode([*self._messages, user], chat=True)
        shared, reason = self._shared(ids)
        if shared < len(self._cached):
            # The cache stays consistent whatever follows: a refused call below only costs reuse.
            self._loop.rewind(len(self._cached) - shared)
            self._cached = self._cached[:shared]
        call = Call(gen, [ids[shared:]], options=opts, loop=self._loop if shared else None, prefix=ids[:shared],
                    text=True)
        call.reprefill_reason = reason
        return Stream(call, on_close=lambda result, error: self._closed(call, user, result, error))

    def _shared(self, ids: list[int]) -> tuple[int, str | None]:
        """(tokens of the cache to keep, why not all of them) for a turn whose prompt is `ids`."""
        cached = self._cached
        if self._loop is None or not cached:
            return 0, None
        n = 0
        limit = min(len(cached), len(ids) - 1)     # at least one token is prefilled: it gives the logits
        while n < limit and cached[n] == ids[n]:
            n += 1
        if n == len(cached):
            return n, None
        what = "a full prefill" if n == 0 else f"prefilled from token {n}"
        return n, (f"the chat template renders the conversation differently from the {len(cached)} cached tokens "
                   f"(they agree on the first {n}): {what}")

    def _closed(self, call: Call, user: dict[str, str], result: GenerationResult,
                error: BaseException | None) -> None:
        if error is not None and not isinstance(error, KeyboardInterrupt):
            self._loop, self._cached = None, []      # the cache may be half-updated; the conversation is not
            return
        self._messages += [user, {"role": "assistant", "content": result.text}]
        if error is not None:
            self._loop, self._cached = None, []
        else:
            self._loop, self._cached = call.loop, call.fed_ids()

    # -- going back ---------------------------------------------------------------------------------
    def rewind(self, n_tokens: int) -> None:
        """Forget the last `n_tokens` cached tokens, and the messages that are no longer wholly
        inside what remains (RuntimeInputError past the start; the session then stays as it was)."""
        if not isinstance(n_tokens, int) or isinstance(n_tokens, bool) or n_tokens < 0:
            raise RuntimeInputError(f"rewind takes a number of tokens >= 0, got {n_tokens!r}")
        if n_tokens > len(self._cached):
            raise RuntimeInputError(f"cannot rewind {n_tokens} tokens: the session holds {len(self._cached)}")
        if n_tokens == 0:
            return
        self._loop.rewind(n_tokens)
        self._cached = self._cached[:len(self._cached) - n_tokens]
        tok = self.generator.tokenizer
        keep = 0 if self.system is None else 1
        for k in range(len(self._messages), keep, -1):
            rendered = tok.encode(tok.apply_chat_template(self._messages[:k], add_generation_prompt=False))
            if len(rendered) <= len(self._cached) and rendered == self._cached[:len(rendered)]:
                keep = k
                break
        self._messages = self._messages[:keep]

