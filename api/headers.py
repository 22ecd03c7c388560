"""Response headers of private answers (a user's, an admin's, a gateway's): never sniffed into
another content type, never stored by a shared cache or the browser. Pure ASGI: it only adds two
headers to the response's start message, nothing is buffered.

The header pairs live once, in meter/_http.py: its JSON sender (the debit fast path, the meter
routes, the ASGI middleware) sends them itself, so this middleware finds them and adds nothing."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from meter._http import NO_STORE, NOSNIFF, PRIVATE_HEADERS  # defined with the JSON sender that sends them

__all__ = ["NOSNIFF", "NO_STORE", "PRIVATE_HEADERS", "PUBLIC_PATHS", "PrivateHeaders"]

PRIVATE_PREFIX = "/api/v1/"
PUBLIC_PATHS = frozenset({"/api/v1/tokens/packages"})  # the price list: the same for everyone


class PrivateHeaders:
    """Adds nosniff to every HTTP answer, and `Cache-Control: no-store` to those under /api/v1/
    (but the public price list) that did not choose a Cache-Control of their own."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        private = path.startswith(PRIVATE_PREFIX) and path not in PUBLIC_PATHS

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                names = {name.lower() for name, _ in headers}
                if NOSNIFF[0] not in names:
                    headers.append(NOSNIFF)
                if private and NO_STORE[0] not in names:
                    headers.append(NO_STORE)
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)
