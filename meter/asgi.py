"""`TokenMeterMiddleware`: per-request token metering for any ASGI app, as pure ASGI.

    from meter.asgi import TokenMeterMiddleware
    app = TokenMeterMiddleware(app, meter="redis://127.0.0.1:6379/0", account="x-user-id", paths=("/api",))

Needs only the `meter` package (no web framework is imported). Each metered HTTP request costs
one `meter.debit(...)` (one Redis script) before the app runs:

- allowed → the app runs; its `http.response.start` gets `X-Tokens-Remaining`,
  `X-Tokens-Used-Today`, `X-Requests-Today`, `X-Process-Time` and, when the plan has a daily cap,
  `RateLimit-Limit` / `RateLimit-Remaining` / `RateLimit-Reset` (seconds to the next UTC midnight);
- insufficient → 402 with the brief's body; daily cap or per-minute limit → 429 with
  `Retry-After`; the app is not called;
- bad input → 422, unknown account → 404, reused Idempotency-Key with other parameters → 409;
- Redis down → 503 `store_unavailable` (fail closed; nothing was charged), or `outcome_unknown`
  when the debit was sent and its answer lost (it may have been charged: retry with the same
  Idempotency-Key), or, with `fail_open=True`, the app runs un-metered and the
  response says `X-Tokens-Metering: unavailable` (plain rate limiting only, never for billing);
- the `account` (or `tokens`) callable raises → `on_error_status` (401, or 400), one log line.

The answers are the HTTP API's own (meter/_http.py renders both). Pure ASGI on purpose (never
BaseHTTPMiddleware): headers are added by wrapping `send` and editing the start message, so
bodies stream through untouched and nothing is buffered.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from meter._errors import MeterError, StoreUnavailable
from meter._http import (
    PACKAGES_URL,
    Header,
    decision_headers,
    denial_body,
    error_body,
    error_parts,
    field_names,
    process_time,
    send_json,
)
from meter._meter import Meter

__all__ = ["AccountOf", "TokenMeterMiddleware", "TokensOf", "headers_of"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
AccountOf = Callable[[Scope], str | None]
TokensOf = Callable[[Scope], int]

log = logging.getLogger("meter.asgi")

_IDEMPOTENCY_KEY = b"idempotency-key"
_UNAVAILABLE: Header = (b"x-tokens-metering", b"unavailable")
_ERROR_CODES = {400: "bad_request", 401: "unauthorized"}


def headers_of(scope: Scope) -> dict[str, str]:
    """The request headers as {lowercase name: value} (the first of a repeated header wins),
    for an `account` or `tokens` callable: `headers_of(scope).get("x-user-id")`."""
    headers: dict[str, str] = {}
    for name, value in scope["headers"]:
        headers.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))
    return headers


def _header_reader(name: str) -> AccountOf:
    wanted = name.lower().encode("latin-1")

    def account_of(scope: Scope) -> str | None:
        for key, value in scope["headers"]:
            if key == wanted:
                return value.decode("latin-1") or None  # an empty header: not metered, as a missing one
        return None

    return account_of


class TokenMeterMiddleware:
    """Charge `tokens` to the request's account on every HTTP request under `paths`.

    `meter` is a Meter, or a Redis URL connected (by `Meter.connect`) on the first metered
    request. `account` is a request header's name (its value is the account id) or a callable
    `account(scope)` returning the account id, or None to let the request through un-metered;
    `headers_of(scope)` gives a callable the headers as a dict. `tokens` is an int or
    `tokens(scope) -> int`. `paths` is a tuple of path prefixes matched on segment boundaries
    ("/api" meters "/api" and "/api/x", not "/apiary"); None meters every path. The
    `Idempotency-Key` request header becomes the debit's request id, so a retry is charged once.
    `packages_url` is where the 402 body sends the user to buy tokens. When `account` or
    `tokens` raises, the request is answered `on_error_status` (401 or 400) and logged.
    """

    __slots__ = ("_account", "_agent", "_connecting", "_exact", "_fail_open", "_meter", "_model",
                 "_on_error_status", "_packages_url", "_prefixes", "_tokens", "_tokens_of", "_url", "app")

    def __init__(
        self,
        app: ASGIApp,
        *,
        meter: Meter | str,
        account: AccountOf | str,
        tokens: int | TokensOf = 1,
        agent: str | None = None,
        model: str | None = None,
        fail_open: bool = False,
        paths: tuple[str, ...] | None = None,
        packages_url: str = PACKAGES_URL,
        on_error_status: int = 401,
    ) -> None:
        # Configuration mistakes fail at start-up, not as a 422 on every request.
        if isinstance(account, str):
            if not account:
                raise ValueError("account must name a request header, or be a callable(scope)")
            account = _header_reader(account)
        if not callable(account):
            raise TypeError("account must be a header name or a callable(scope) -> account id or None")
        self._tokens_of: TokensOf | None = None
        self._tokens = 0
        if callable(tokens):
            self._tokens_of = tokens
        elif isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
            raise ValueError(f"tokens must be a positive int or a callable(scope) -> int, got {tokens!r}")
        else:
            self._tokens = tokens
        if isinstance(paths, str):  # ("/api") is a str, not a tuple: a classic slip
            raise TypeError("paths must be a tuple of path prefixes, not a str")
        if paths is None:
            self._exact: frozenset[str] | None = None
            self._prefixes: tuple[str, ...] = ()
        else:
            # Precomputed so a request costs one set lookup and one str.startswith(tuple).
            stripped = [p.rstrip("/") for p in paths]
            self._exact = frozenset(stripped)
            self._prefixes = tuple(p + "/" for p in stripped)
        if on_error_status not in _ERROR_CODES:
            raise ValueError(f"on_error_status must be 401 or 400, got {on_error_status!r}")
        self._url: str | None = None
        self._meter: Meter | None = None
        if isinstance(meter, str):
            self._url = meter
        elif isinstance(meter, Meter):
            self._meter = meter
        else:
            raise TypeError("meter must be a Meter or a Redis URL")
        self._connecting = asyncio.Lock()
        self.app = app
        self._account: AccountOf = account
        self._agent = agent
        self._model = model
        self._fail_open = fail_open
        self._packages_url = packages_url
        self._on_error_status = on_error_status

    async def meter(self) -> Meter:
        """The meter: the one given, or the one connected to the URL on first use."""
        if self._meter is None:
            async with self._connecting:
                if self._meter is None:
                    assert self._url is not None
                    self._meter = await Meter.connect(self._url)
        return self._meter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Lifespan and websocket scopes are not requests to charge: pass them through untouched
        # (but for closing, at shutdown, the meter this middleware connected itself).
        if scope["type"] != "http":
            owned = scope["type"] == "lifespan" and self._url is not None
            await self.app(scope, receive, self._closing(send) if owned else send)
            return
        exact = self._exact
        if exact is not None:
            path = scope["path"]
            if path not in exact and not path.startswith(self._prefixes):
                await self.app(scope, receive, send)
                return
        start = time.perf_counter()
        try:
            account_id = self._account(scope)
            tokens = self._tokens if self._tokens_of is None or account_id is None else self._tokens_of(scope)
        except Exception as exc:  # the user's callable: its bug or its refusal, never a 500
            status = self._on_error_status
            log.warning("TokenMeterMiddleware: the account/tokens callable raised %s on %s %s; answering %d",
                        type(exc).__name__, scope.get("method"), scope.get("path"), status, exc_info=True)
            await send_json(send, status, error_body(
                _ERROR_CODES[status], "the account of this request could not be determined"),
                [process_time(start)])
            return
        if account_id is None:
            await self.app(scope, receive, send)
            return
        request_id = None
        for name, value in scope["headers"]:
            if name == _IDEMPOTENCY_KEY:
                request_id = value.decode("latin-1")  # ASGI header values are latin-1 bytes
                break

        try:
            meter = await self.meter()
            with field_names(request_id="Idempotency-Key"):
                d = await meter.debit(account_id, tokens, agent=self._agent, model=self._model,
                                      request_id=request_id)
        except MeterError as exc:
            if self._fail_open and isinstance(exc, StoreUnavailable):
                # Availability over accuracy, as configured: serve un-metered and say so.
                await self.app(scope, receive, _with_headers(send, [_UNAVAILABLE], start))
                return
            # (fail_open covers an unreachable store, never a misbehaving one: MeterError is 503)
            status, body, headers = error_parts(exc)
            await send_json(send, status, body, [*headers, process_time(start)])
            return

        headers = decision_headers(d, meter.clock.now_ms())
        if d.allowed:
            await self.app(scope, receive, _with_headers(send, headers, start))
        else:
            await send_json(send, 402 if d.reason == "insufficient" else 429,
                            denial_body(d, self._packages_url), [*headers, process_time(start)])


    def _closing(self, send: Send) -> Send:
        async def send_then_close(message: Message) -> None:
            await send(message)
            if message["type"] == "lifespan.shutdown.complete" and self._meter is not None:
                meter, self._meter = self._meter, None
                await meter.close()

        return send_then_close


def _with_headers(send: Send, headers: list[Header], start: float) -> Send:
    """`send` that appends `headers` (and X-Process-Time) to the response start message only."""

    async def send_with_headers(message: Message) -> None:
        if message["type"] == "http.response.start":
            # X-Process-Time is taken here, as late as it can be without buffering the body.
            message["headers"] = [*message.get("headers", ()), *headers, process_time(start)]
        await send(message)

    return send_with_headers
