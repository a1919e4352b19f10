"""A request turned into one Generator call: the prompt, its token count checked against the context,
and the GenerationOptions fields; `start()` runs on the worker thread and opens the Stream, or
serve/batcher.py runs it as one row of a batch when `batch_key()` lets it."""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import numpy as np

from edgellama.errors import EdgellamaError
from edgellama.runtime.call import shared_options
from edgellama.serve.errors import APIError, from_user_error
from edgellama.serve.models import ServedModel
from edgellama.serve.schemas import ChatRequest, CompletionRequest

# response_format json_object: any JSON object (llguidance's JSON schema support gives the grammar).
_ANY_OBJECT = {"type": "object"}


@dataclasses.dataclass
class Call:
    model: ServedModel
    prompt: Any                 # text, chat messages, or token ids
    chat: bool
    prompt_tokens: int
    kwargs: dict[str, Any]
    ids: list[int]              # the prompt's token ids (what a batch row prefills)
    options: Any                # the GenerationOptions the kwargs make

    @property
    def max_new_tokens(self) -> int:
        return self.options.max_new_tokens

    def batch_key(self) -> tuple | None:
        """What this request must share with the other rows of a batch (model and every option but
        max_tokens, stop and seed, which the call keeps per row), or None: it runs alone. Alone: a
        constraint (one matcher per call, on its own thread), and a chat turn continuing a conversation,
        which may find its kept session (a batch's rows keep no session)."""
        if self.options.constrained:
            return None
        chats = self.model.chats
        if self.chat and chats is not None and chats.size > 0 and any(m["role"] == "assistant" for m in self.prompt):
            return None
        return (self.model.name, shared_options(self.options))

    def start(self) -> "Running":
        gen = self.model.generator
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], int):
            return Running(gen.stream_ids(self.prompt, **self.kwargs))
        if self.chat and self.model.chats is not None:
            session = self.model.chats.session_for(self.prompt)
            if session is not None:
                stream = session.stream(self.prompt[-1]["content"], **self.kwargs)
                return Running(stream, on_complete=lambda: self.model.chats.file(session))
        return Running(gen.stream(self.prompt, chat=self.chat, **self.kwargs))


class Running:
    """A started call as one (text piece, logprobs of the tokens since the last item) pair per token: the
    piece is often "" (a character still incomplete, text held back for a stop string), but the worker
    sees every token, so a cancel or a deadline takes effect at the next token, not the next piece.
    Driven the way `Stream` drives its call; the Stream keeps the result (finish "cancelled" when closed
    early)."""

    def __init__(self, stream: Any, *, on_complete: Any = None):
        self.stream = stream
        self._on_complete = on_complete
        self._steps = self._run()
        self._seen = 0

    def _run(self) -> Iterator[tuple[str, list]]:
        call = self.stream.call
        for _ in call.steps():
            yield call.take_text(0), self.new_logprobs()
        yield call.take_text(0, final=True), self.new_logprobs()

    def __iter__(self) -> Iterator[tuple[str, list]]:
        return self._steps

    def new_logprobs(self) -> list:
        rows = self.stream.call.logprobs
        if rows is None:
            return []
        fresh = rows[0][self._seen:]
        self._seen += len(fresh)
        return fresh

    def close(self) -> None:
        self._steps.close()
        self.stream.close()

    def result(self) -> Any:
        result = self.stream.result
        if self._on_complete is not None and result.finish_reason != "cancelled":
            self._on_complete()
        return result


def plan(model: ServedModel, req: ChatRequest | CompletionRequest) -> Call:
    """Check the request against the model (prompt and max_tokens within the context) before any slot is
    taken, so a refused request costs no queue place and gets its 400 before a stream starts."""
    chat = isinstance(req, ChatRequest)
    prompt: Any = req.chat_messages() if chat else req.prompt
    where = "messages" if chat else "prompt"
    gen = model.generator
    try:
        if isinstance(prompt, list) and not chat:    # a completion's prompt as token ids
            ids = list(prompt)
            gen.model.check_ids(np.asarray(ids))
        else:
            ids = gen.encode(prompt, chat=chat)
    except EdgellamaError as e:
        raise from_user_error(e, param=where) from None
    n, context = len(ids), model.context
    want = req.limit
    if n >= context or (want is not None and n + want > context):
        asked = (f"{n + want} tokens ({n} in the prompt, {want} in the completion)" if want
                 else f"{n} tokens in the prompt")
        raise APIError(400, f"this model's maximum context length is {context} tokens; you requested {asked}. "
                            "Shorten the prompt or lower max_tokens.", param=where, code="context_length_exceeded")
    kwargs: dict[str, Any] = {"max_new_tokens": want if want is not None else context - n,
                              "logprobs": req.n_logprobs, "stop": tuple(req.stop) if req.stop else None}
    for name in ("temperature", "top_k", "top_p", "seed", "repetition_penalty"):
        kwargs[name] = getattr(req, name)
    if chat and req.response_format is not None and req.response_format.type != "text":
        fmt = req.response_format
        kwargs["json_schema"] = fmt.json_schema.schema_ if fmt.type == "json_schema" else _ANY_OBJECT
    if req.ignore_eos:
        kwargs["eos"] = False
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    try:
        options = gen.options(**kwargs)   # the options' own refusals (a stop string, a penalty) as a 400 here
    except EdgellamaError as e:
        raise from_user_error(e) from None
    return Call(model=model, prompt=prompt, chat=chat, prompt_tokens=n, kwargs=kwargs, ids=list(ids), options=options)
