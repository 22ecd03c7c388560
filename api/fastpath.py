"""The gateways' hot path as pure ASGI: `POST /api/v1/meter/debit` answered before Starlette's
routing, request objects, dependency solving and response classes.

Mounted by `create_app` as the app's outermost middleware. It runs the very same code as the
FastAPI route (`api.routes.meter.debit_decision`: key and scope, body validation, one meter
call) and sends the same status, body and headers: a decision or a meter fault (422, 404, 409,
503) is rendered by meter/_http.py, as the route and the ASGI middleware render it; any other
error (401, 403, 413, a body's 422) by the app's own exception handlers. Every other
request, and anything that is not a plain POST to the debit path, goes to the app untouched.
The route stays registered: it documents the endpoint in the OpenAPI schema and serves it
wherever this layer is not mounted.

Why: on a small box the framework's per-request work was worth more than the meter call itself
(see README, "Performance"); here the debit costs header lookups, one pydantic parse, the meter
call and two ASGI messages.
"""

from __future__ import annotations

import inspect
import json
import time
from typing import Any, cast

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from api.metering import observe
from api.routes.meter import MAX_BODY_BYTES, debit_decision, decision_body
from meter import MeterError
from meter._http import PRIVATE_HEADERS, decision_parts, error_parts, process_time, send_json

__all__ = ["DEBIT_PATH", "MAX_BODY_BYTES", "MeterFastPath"]

DEBIT_PATH = "/api/v1/meter/debit"
_AUTHORIZATION = b"authorization"
_API_KEY = b"x-api-key"
_IDEMPOTENCY_KEY = b"idempotency-key"


class MeterFastPath:
    """Serves the debit endpoint directly; passes everything else to `app`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or _route_path(scope) != DEBIT_PATH or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        authorization = api_key = idempotency_key = None
        for name, value in scope["headers"]:  # the first of a repeated header wins, as in Starlette
            if name == _AUTHORIZATION and authorization is None:
                authorization = value.decode("latin-1")
            elif name == _API_KEY and api_key is None:
                api_key = value.decode("latin-1")
            elif name == _IDEMPOTENCY_KEY and idempotency_key is None:
                idempotency_key = value.decode("latin-1")
        raw = await _body(receive)
        if raw is None:  # the client went away before sending its body: nobody to answer
            return
        app = scope["app"]  # the Starlette/FastAPI app this middleware belongs to
        try:
            d = await debit_decision(app.state.tm, authorization, api_key, idempotency_key, raw)
        except MeterError as exc:  # rendered from the one table, as the route and the middleware do
            status, body, headers = error_parts(exc)
            observe("debit", str(body["error"]), start)
            await send_json(send, status, body, [*headers, process_time(start)])
            return
        except Exception as exc:
            response = await _handled(app, scope, exc)
            names = {name for name, _ in response.raw_headers}
            # as api.headers.PrivateHeaders adds to the route's answers (this layer runs before it)
            response.raw_headers.extend(h for h in PRIVATE_HEADERS if h[0] not in names)
            observe("debit", _error_code(response), start)
            await response(scope, receive, send)
            return
        status, content, headers = decision_parts(d, decision_body(d), app.state.tm.rt.meter.clock.now_ms())
        observe("debit", d.reason, start)
        await send_json(send, status, content, [*headers, process_time(start)])


def _route_path(scope: Scope) -> str:
    """The path the app's router matches: without the root path the app is mounted under."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root):len(root) + 1] in ("/", ""):
        return path[len(root):]
    return path


async def _body(receive: Receive) -> bytes | None:
    """The request body; reading stops once it is past MAX_BODY_BYTES (the rest is not buffered;
    the size check itself is debit_decision's, so the route answers alike)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        chunks.append(chunk)
        if not message.get("more_body", False) or size > MAX_BODY_BYTES:
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _handled(app: Any, scope: Scope, exc: Exception) -> Response:
    """The response the app's exception handlers give for `exc` (re-raised when none applies,
    exactly as Starlette's ExceptionMiddleware would)."""
    handlers = app.exception_handlers
    for cls in type(exc).__mro__:
        handler = handlers.get(cls)
        if handler is not None:
            response = handler(Request(scope), exc)
            if inspect.isawaitable(response):
                response = await response
            return cast(Response, response)
    raise exc


def _error_code(response: Response) -> str:
    """The `error` word of our JSON error bodies, for the outcome label."""
    try:
        return str(json.loads(bytes(response.body)).get("error", response.status_code))
    except (ValueError, AttributeError):
        return str(response.status_code)
