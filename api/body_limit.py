"""`BodySizeLimit`: one request-size cap for every route, as pure ASGI (never BaseHTTPMiddleware).

A declared Content-Length over the cap is answered 413 before the app runs and before one byte of
the body is read. A body without one (chunked) is counted as the app reads it: the read that
passes the cap raises `PayloadTooLarge` (an HTTPException, so FastAPI's body parsing lets it
through and the app's handler renders it), and nothing more is read. Without this, FastAPI read
any body in full: a 64 MiB unauthenticated POST to /auth/register cost ~60 MB of RSS.
Routes with a smaller cap of their own keep it (the debit: 16 KiB).
"""

from __future__ import annotations

import json

from fastapi import HTTPException  # its detail may be a JSON body (a subclass of Starlette's)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import error_body

__all__ = ["BodySizeLimit", "PayloadTooLarge"]

_CONTENT_LENGTH = b"content-length"


class PayloadTooLarge(HTTPException):
    """The request body passed the cap; the rest of it is not read."""

    def __init__(self, max_bytes: int) -> None:
        # Connection: close: the server stops reading the rest instead of draining it to reuse the connection
        super().__init__(413, detail=_body(max_bytes), headers={"Connection": "close"})


def _body(max_bytes: int) -> dict[str, object]:
    return error_body("payload_too_large", f"a request body is at most {max_bytes} bytes", field="body")


class BodySizeLimit:
    """Refuse request bodies over `max_bytes` with 413 `payload_too_large`."""

    def __init__(self, app: ASGIApp, max_bytes: int, larger: dict[str, int] | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.larger = tuple((larger or {}).items())  # (path prefix, cap): routes that take bigger bodies

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        max_bytes = self.max_bytes
        for prefix, cap in self.larger:
            if scope["path"].startswith(prefix):
                max_bytes = max(max_bytes, cap)
                break
        for name, value in scope["headers"]:
            if name == _CONTENT_LENGTH:
                if value.isdigit() and int(value) > max_bytes:
                    await _send_413(send, max_bytes)
                    return
                break
        received = 0
        started = False

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > max_bytes:
                    raise PayloadTooLarge(max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, tracking_send)
        except PayloadTooLarge:
            # Raised where no handler renders it (outside FastAPI's routing, e.g. the fast path's
            # own reader): answer here, unless a response is already on its way.
            if not started:
                await _send_413(send, max_bytes)


async def _send_413(send: Send, max_bytes: int) -> None:
    payload = json.dumps(_body(max_bytes), separators=(",", ":")).encode()
    # Connection: close: the unread rest of the body must not be parsed as the next request.
    await send({"type": "http.response.start", "status": 413, "headers": [
        (b"content-type", b"application/json"), (b"content-length", b"%d" % len(payload)),
        (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": payload})
