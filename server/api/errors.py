"""The one table from errors to OpenAI-shaped bodies and status codes."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from indexes.pgstore import StoreUnavailable

from .. import errors as E
from .auth import Unauthorized

log = logging.getLogger(__name__)

# most specific first
STATUS = [
    (Unauthorized, 401),
    (E.ContextLengthExceeded, 400),
    (E.PayloadTooLarge, 413),
    (E.InvalidRequest, 400),
    (E.ModelNotFound, 404),
    (E.NotFound, 404),
    (E.StrategyUnavailable, 409),
    (E.Conflict, 409),
    (E.QueueFull, 429),
    (E.EngineUnavailable, 503),
    (E.EngineError, 500),
    (E.KnowmuxError, 500),
]


def error_body(message: str, type_: str, param=None, code=None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def status_of(exc: E.KnowmuxError) -> int:
    return next(status for cls, status in STATUS if isinstance(exc, cls))


def to_response(exc: E.KnowmuxError) -> JSONResponse:
    headers = {}
    retry = getattr(exc, "retry_after", None)
    if retry is not None:
        headers["Retry-After"] = str(retry)
    if isinstance(exc, Unauthorized):
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), status_code=status_of(exc),
                        headers=headers)


def install(app: FastAPI) -> None:
    @app.exception_handler(E.KnowmuxError)
    async def _domain(request: Request, exc: E.KnowmuxError):
        return to_response(exc)

    @app.exception_handler(StoreUnavailable)
    async def _store(request: Request, exc: StoreUnavailable):
        log.warning("%s: %s", request.url.path, exc)
        return JSONResponse(error_body(str(exc), "server_error", None, "store_unavailable"), status_code=503,
                            headers={"Retry-After": "5"})

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            msg, param = "the request body is not valid JSON", None
        else:
            where = ".".join(loc) or "body"
            msg, param = f"{where}: {first.get('msg', 'invalid value')}", (".".join(loc) or None)
        return JSONResponse(error_body(msg, "invalid_request_error", param, "invalid_value"), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), type_, None, None), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse(error_body("internal server error", "server_error", None, None), status_code=500)
