"""The dashboard: one page at `/` and its assets under `/static`, every file shipped inside the
package (api/static: hand-written HTML, CSS and JavaScript, no build step, no CDN), so it works
with no internet. The page talks only to this service's own JSON API with the user's token.

Every answer here carries a strict Content-Security-Policy (this origin only, no inline script
or style): the user token lives in the page's sessionStorage, so no other script may run there.
Mounted after the API routes, which are matched first (the hot path is not touched)."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["CSP", "STATIC_DIR", "install_dashboard"]

STATIC_DIR = Path(__file__).resolve().parent / "static"

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
PAGE_HEADERS = {
    "Content-Security-Policy": CSP,
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",  # revalidated (ETag): a new release's assets are picked up at once
}
_RAW_HEADERS = [(k.lower().encode(), v.encode()) for k, v in PAGE_HEADERS.items()]


class _WithPageHeaders:
    """Pure ASGI: adds the page headers to every answer of the wrapped app (the static files)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), *_RAW_HEADERS]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def install_dashboard(app: FastAPI) -> None:
    """`GET /` (the page) and `/static/*` (its assets). Call after the API routers."""
    index = STATIC_DIR / "index.html"

    async def page() -> FileResponse:
        return FileResponse(index, media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)

    app.add_api_route("/", page, methods=["GET", "HEAD"], include_in_schema=False)
    app.mount("/static", _WithPageHeaders(StaticFiles(directory=STATIC_DIR)), name="static")
