"""The FastAPI app: routes, API key, and the bridge from worker-thread events to replies and SSE streams."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import time
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from edgellama.errors import EdgellamaError
from edgellama.serve import errors, generation
from edgellama.serve.batcher import Batcher
from edgellama.serve.engine import ERROR, PIECE, Admission, Job
from edgellama.serve.errors import APIError
from edgellama.serve.models import ServedModel
from edgellama.serve.openai_format import DONE_EVENT, Reply, logprobs
from edgellama.serve.schemas import ChatRequest, CompletionRequest
from edgellama.serve.settings import ServeSettings

# How often a non-streaming request looks whether its client is still there.
_DISCONNECT_POLL_S = 0.25


def create_app(models: dict[str, ServedModel], settings: ServeSettings | None = None) -> FastAPI:
    settings = settings or ServeSettings()
    if not models:
        raise EdgellamaError("no models to serve")
    admission = Admission(parallel=settings.parallel, queue=settings.queue)
    batcher = Batcher(admission, window_ms=settings.batch_window_ms, max_batch=settings.max_batch)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        # uvicorn has already waited for in-flight replies; this joins the threads that served them.
        admission.pool.shutdown(wait=True, cancel_futures=True)

    app = FastAPI(title="edgellama", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.models, app.state.admission, app.state.settings = models, admission, settings
    app.state.batcher = batcher
    errors.install(app)
    if settings.api_key:
        app.add_middleware(_KeyCheck, key=settings.api_key)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "models": list(models), **admission.snapshot(),
                "chat_sessions": {n: len(m.chats) if m.chats else 0 for n, m in models.items()},
                "chat_cache_hits": sum(m.chats.hits for m in models.values() if m.chats)}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [m.card() for m in models.values()]}

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str) -> dict[str, Any]:
        return _model(models, name).card()

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        return await _complete(req, request, models=models, batcher=batcher, settings=settings)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        return await _complete(req, request, models=models, batcher=batcher, settings=settings)

    return app


def _model(models: dict[str, ServedModel], name: str) -> ServedModel:
    if name not in models:
        raise APIError(404, f"the model {name!r} does not exist (served: {', '.join(models)})", param="model",
                       code="model_not_found")
    return models[name]


def _as_api_error(e: BaseException) -> APIError:
    if isinstance(e, APIError):
        return e
    if isinstance(e, EdgellamaError):
        return errors.from_user_error(e)
    raise e


async def _complete(req: ChatRequest | CompletionRequest, request: Request, *, models: dict[str, ServedModel],
                    batcher: Batcher, settings: ServeSettings):
    model = _model(models, req.model)
    call = generation.plan(model, req)
    job = await batcher.start(call, deadline=time.monotonic() + settings.timeout)
    chat = isinstance(req, ChatRequest)
    reply = Reply(model=model.name, chat=chat)
    want_logprobs = req.n_logprobs is not None
    try:
        # The first event decides the status line: a refusal found while starting is still a 4xx.
        first = await _next(job, request)
        if first is None:
            return None
        if first[0] == ERROR:
            raise _as_api_error(first[1])
        if req.stream:
            stream = _sse(job, first, reply=reply, prompt_tokens=call.prompt_tokens, usage=req.include_usage,
                          decode=model.generator.decode if want_logprobs else None)
            job = None    # the stream owns it now
            return StreamingResponse(stream, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        event = first
        while event is not None and event[0] == PIECE:
            event = await _next(job, request)
        if event is None:
            return None
        if event[0] == ERROR:
            raise _as_api_error(event[1])
        result = event[1]
        lps = logprobs(_shown(result), decode=model.generator.decode, chat=chat) if want_logprobs else None
        return reply.full(text=result.text, finish_reason=result.finish_reason, prompt_tokens=call.prompt_tokens,
                          completion_tokens=len(result.token_ids), logprobs=lps,
                          cached_tokens=result.reused_tokens)
    finally:
        if job is not None:
            job.cancel()      # a no-op once the job is done; stops it when this handler ends early


async def _next(job: Job, request: Request) -> tuple[str, Any] | None:
    """The job's next event, or None once the client has gone (the job is then cancelled)."""
    while True:
        try:
            return await asyncio.wait_for(job.events.get(), timeout=_DISCONNECT_POLL_S)
        except (asyncio.TimeoutError, TimeoutError):
            if await request.is_disconnected():
                job.cancel()
                return None


def _shown(result: Any) -> list:
    """The logprobs of the tokens a reply shows: an EOS that ended it is not part of the text."""
    entries = list(result.logprobs or ())
    ids = result.token_ids
    if entries and isinstance(result.stop_reason, int) and ids and ids[-1] == result.stop_reason:
        entries = entries[:-1]
    return entries


async def _sse(job: Job, first: tuple[str, Any], *, reply: Reply, prompt_tokens: int, usage: bool,
               decode: Any) -> AsyncIterator[str]:
    """Server-sent events: a role chunk, one chunk per text piece, the finish chunk, usage if asked, [DONE].
    A client that goes away cancels this generator at its next await, which cancels the job."""
    sent_lps = 0
    sent_text = 0

    def lps(entries: list) -> Any:
        return logprobs(entries, decode=decode, chat=reply.chat, offset=sent_text) if decode else None

    try:
        event = first
        opened = False
        while True:
            kind, value = event
            if kind == PIECE:
                text, entries = value
                yield reply.chunk(text, first=not opened, logprobs=lps(entries))
                opened = True
                sent_lps += len(entries)
                sent_text += len(text)
            elif kind == ERROR:
                try:
                    err = _as_api_error(value)
                except BaseException as bug:  # noqa: BLE001 - the status line is sent: report it in the stream
                    errors.log.exception("internal error in a stream", exc_info=bug)
                    err = APIError(500, f"internal server error ({type(bug).__name__})", type="server_error")
                yield errors.sse_error(err)
                return
            else:
                if not opened:
                    yield reply.chunk("", first=True)
                yield reply.chunk(None, finish_reason=value.finish_reason, logprobs=lps(_shown(value)[sent_lps:]))
                if usage:
                    yield reply.usage_chunk(prompt_tokens, len(value.token_ids), value.reused_tokens)
                yield DONE_EVENT
                return
            event = await job.events.get()
    finally:
        job.cancel()


class _KeyCheck:
    """`Authorization: Bearer KEY` on every /v1 route (an ASGI middleware: it leaves streaming alone)."""

    def __init__(self, app, *, key: str):
        self.app = app
        self._key = key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            auth = dict(scope.get("headers") or ()).get(b"authorization", b"")
            scheme, _, given = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self._key):
                err = APIError(401, "invalid or missing API key (send Authorization: Bearer KEY)",
                               code="invalid_api_key")
                await err.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)
