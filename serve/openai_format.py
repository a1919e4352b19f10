"""Reply bodies and stream chunks in OpenAI's shapes (chat.completion, text_completion and their chunks)."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Callable


class Reply:
    """The fixed parts of one reply (id, created, model, kind) and the bodies built from them."""

    def __init__(self, *, model: str, chat: bool):
        self.chat = chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.model = model

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None}

    @staticmethod
    def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
        """OpenAI's usage; `cached_tokens`: the prompt tokens a kept chat session did not prefill again."""
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
                "prompt_tokens_details": {"cached_tokens": cached_tokens}}

    def full(self, *, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int,
             logprobs: Any = None, cached_tokens: int = 0) -> dict[str, Any]:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                      "logprobs": logprobs, "finish_reason": finish_reason}
            body = self._head("chat.completion")
        else:
            choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
            body = self._head("text_completion")
        return {**body, "choices": [choice], "usage": self.usage(prompt_tokens, completion_tokens, cached_tokens)}

    def chunk(self, text: str | None, *, finish_reason: str | None = None, first: bool = False,
              logprobs: Any = None) -> str:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": text or ""} if first else (
                {"content": text} if text is not None else {})
            choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
            body = self._head("chat.completion.chunk")
        else:
            choice = {"index": 0, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}
            body = self._head("text_completion")
        return event({**body, "choices": [choice]})

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> str:
        """The last chunk when the client asked for `stream_options.include_usage`: no choices, the usage."""
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        usage = self.usage(prompt_tokens, completion_tokens, cached_tokens)
        return event({**self._head(obj), "choices": [], "usage": usage})


def event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


DONE_EVENT = "data: [DONE]\n\n"


def logprobs(entries: list, *, decode: Callable[[list[int]], str], chat: bool,
             offset: int = 0) -> dict[str, Any] | None:
    """TokenLogprob entries (runtime/sampling.py) in OpenAI's chat or completions layout; `offset` is the
    text length before the first entry (completions' text_offset)."""
    if not entries:
        return None

    def token(i: int) -> str:
        return decode([i])

    if chat:
        def one(i: int, lp: float) -> dict[str, Any]:
            t = token(i)
            return {"token": t, "logprob": lp, "bytes": list(t.encode("utf-8"))}

        return {"content": [{**one(e.token_id, e.logprob), "top_logprobs": [one(i, lp) for i, lp in e.top]}
                            for e in entries], "refusal": None}
    tokens = [token(e.token_id) for e in entries]
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{token(i): lp for i, lp in e.top} for e in entries], "text_offset": offsets}
