"""OpenAI-style error replies: `{"error": {"message", "type", "param", "code"}}` with a 4xx status for
every client mistake (FastAPI's own 422 for a bad body becomes OpenAI's 400), 500 only for a bug."""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from edgellama.errors import EdgellamaError

log = logging.getLogger("edgellama.serve")


class APIError(Exception):
    """A request the server refuses, with the HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def from_user_error(e: EdgellamaError, *, param: str | None = None) -> APIError:
    """The runtime's typed refusal (bad prompt, bad option, invalid schema) as a 400."""
    return APIError(400, str(e), param=param)


def _validation_error(exc: RequestValidationError) -> APIError:
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return APIError(400, f"the request body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})",
                        code="invalid_json")
    if not loc and first.get("type") in ("model_attributes_type", "dict_type", "missing"):
        return APIError(400, "the request body must be a JSON object (sent as Content-Type: application/json)",
                        code="invalid_json")
    if first.get("type") == "extra_forbidden":
        return APIError(400, f"unrecognized request argument supplied: {'.'.join(loc)}", param=".".join(loc) or None,
                        code="unknown_parameter")
    message = first.get("msg", "invalid request")
    if first.get("type") == "missing":
        message = "missing required field"
    where = ".".join(loc)
    return APIError(400, f"{where}: {message}" if where else message, param=where or None, code="invalid_value")


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return _validation_error(exc).response()

    @app.exception_handler(EdgellamaError)
    async def _user_error(request: Request, exc: EdgellamaError):
        return from_user_error(exc).response()

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", type=kind).response()

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):
        log.exception("internal error on %s", request.url.path)
        return APIError(500, f"internal server error ({type(exc).__name__})", type="server_error").response()


def sse_error(err: APIError) -> str:
    """An error after a stream has started (its status line is already sent): one event, as OpenAI sends it."""
    return f"data: {json.dumps(err.body(), ensure_ascii=False)}\n\n"
