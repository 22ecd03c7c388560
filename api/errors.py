"""Every fault becomes a clear 4xx (or 503 for a store outage) with a JSON body; never a 5xx
for bad input. Bodies: {"error": code, "message": text, ...details}."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, DBAPIError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from api.metering import json_response
from meter import MeterError
from meter._http import OUTCOME_UNKNOWN_ADVICE, error_body, error_parts, field_names

__all__ = ["OUTCOME_UNKNOWN_ADVICE", "error_body", "field_names", "install_error_handlers"]

def _field(error: dict[str, Any]) -> str:
    """The offending field: `tokens`, `items.0.agent`; `body` for a body that is not valid JSON
    (whose location is a character offset, not a field)."""
    if error.get("type") == "json_invalid":
        return "body"
    parts = [str(p) for p in error.get("loc", ()) if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or "body"


def _is_data_error(exc: DBAPIError) -> bool:
    """SQLSTATE class 22 (data exception), however the driver wraps it."""
    if isinstance(exc, DataError):
        return True
    for err in (exc.orig, getattr(exc.orig, "__cause__", None)):
        if str(getattr(err, "sqlstate", "") or "").startswith("22"):
            return True
    return False


def install_error_handlers(app: FastAPI) -> None:
    async def unstorable(_: Request, exc: Exception) -> JSONResponse:
        # A value the database refuses (a NUL character in text, a number out of range): the
        # request is wrong, not the server. Nothing was written: the transaction rolled back.
        if isinstance(exc, DBAPIError) and not _is_data_error(exc):
            raise exc
        return JSONResponse(status_code=422, content=error_body(
            "invalid_input", "a value in the request cannot be stored (out of range, or a NUL character)",
            field="body"))

    app.add_exception_handler(DBAPIError, unstorable)
    app.add_exception_handler(OverflowError, unstorable)  # SQLite: an integer beyond 64 bits

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request"}
        field = _field(first)
        return JSONResponse(status_code=422, content=error_body(
            "invalid_input", f"{field}: {first.get('msg', 'invalid')}", field=field,
            errors=[{"field": _field(e), "message": e.get("msg", "")} for e in errors]))

    @app.exception_handler(MeterError)
    async def meter_fault(_: Request, exc: MeterError) -> Response:
        # 422, 404, 409, or 503 with Retry-After: the one table in meter/_http.py, which the
        # debit fast path and the ASGI middleware answer with too.
        status, body, headers = error_parts(exc)
        return json_response(status, body, headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc.detail, dict):
            body = exc.detail
        else:
            body = error_body({404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "error"),
                              str(exc.detail))
        return JSONResponse(status_code=exc.status_code, content=body, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        # A bug, not an input: Starlette's ServerErrorMiddleware logs the traceback and re-raises
        # after this answer; the client still gets the JSON shape, never a plain-text 500.
        return JSONResponse(status_code=500, content=error_body("internal_error", "an unexpected error; it was "
                                                                "logged and nothing is known to have changed"))
