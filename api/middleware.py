"""`TokenMeterMiddleware`: per-request token metering for any ASGI app, as pure ASGI.

    app = TokenMeterMiddleware(app, meter=meter, account=account_of, tokens=1, paths=("/api",))

Each metered HTTP request costs one `meter.debit(...)` (one Redis script) before the app runs:

- allowed → the app runs; its `http.response.start` gets `X-Tokens-Remaining`,
  `X-Tokens-Used-Today`, `X-Requests-Today`, `X-Process-Time` and, when the plan has a daily cap,
  `RateLimit-Limit` / `RateLimit-Remaining` / `RateLimit-Reset` (seconds to the next UTC midnight);
- insufficient → 402 with the brief's body; daily cap or per-minute limit → 429 with
  `Retry-After`; the app is not called;
- bad input → 422, unknown account → 404, reused Idempotency-Key with other parameters → 409;
- Redis down → 503 `store_unavailable` (fail closed; nothing was charged), or `outcome_unknown`
  when the debit was sent and its answer lost (it may have been charged: retry with the same
  Idempotency-Key), or, with `fail_open=True`, the app runs un-metered and the
  response says `X-Tokens-Metering: unavailable` (plain rate limiting only, never for billing).

Pure ASGI on purpose (never BaseHTTPMiddleware): headers are added by wrapping `send` and
editing the start message, so bodies stream through untouched and nothing is buffered.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import OUTCOME_UNKNOWN_ADVICE, error_body
from api.metering import denial_body
from meter import (
    Decision,
    IdempotencyConflict,
    InvalidInput,
    LedgerUnavailable,
    Meter,
    MeterError,
    OutcomeUnknown,
    StoreUnavailable,
    UnknownAccount,
)
from meter._clock import DAY_MS

__all__ = ["TokenMeterMiddleware"]

AccountOf = Callable[[Scope], str | None]
TokensOf = Callable[[Scope], int]

# Header names are module constants: ASGI wants lowercase bytes, and building them once keeps
# the per-request work to the values alone.
_IDEMPOTENCY_KEY = b"idempotency-key"
_REMAINING = b"x-tokens-remaining"
_USED_TODAY = b"x-tokens-used-today"
_REQUESTS_TODAY = b"x-requests-today"
_PROCESS_TIME = b"x-process-time"
_LIMIT = b"ratelimit-limit"
_LIMIT_REMAINING = b"ratelimit-remaining"
_LIMIT_RESET = b"ratelimit-reset"
_RETRY_AFTER = b"retry-after"
_JSON = (b"content-type", b"application/json")
_UNAVAILABLE = (b"x-tokens-metering", b"unavailable")
_RETRY_SOON = (_RETRY_AFTER, b"1")  # an outage: come back in a second, as the HTTP API says


def _process_time(start: float) -> tuple[bytes, bytes]:
    return _PROCESS_TIME, b"%.3f" % ((time.perf_counter() - start) * 1000)


def _ceil_s(ms: int) -> int:
    return -(-ms // 1000)


class TokenMeterMiddleware:
    """Charge `tokens` to `account(scope)` on every HTTP request under `paths`.

    `account(scope)` returns the account id, or None to let the request through un-metered.
    `tokens` is an int or `tokens(scope) -> int`. `paths` is a tuple of path prefixes matched on
    segment boundaries ("/api" meters "/api" and "/api/x", not "/apiary"); None meters every path.
    The `Idempotency-Key` request header becomes the debit's request id, so a retry is charged once.
    """

    __slots__ = ("_account", "_agent", "_exact", "_fail_open", "_meter", "_model", "_prefixes",
                 "_tokens", "_tokens_of", "app")

    def __init__(
        self,
        app: ASGIApp,
        *,
        meter: Meter,
        account: AccountOf,
        tokens: int | TokensOf = 1,
        agent: str | None = None,
        model: str | None = None,
        fail_open: bool = False,
        paths: tuple[str, ...] | None = None,
    ) -> None:
        # Configuration mistakes fail at start-up, not as a 422 on every request.
        if not callable(account):
            raise TypeError("account must be a callable(scope) -> account id or None")
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
        self.app = app
        self._meter = meter
        self._account = account
        self._agent = agent
        self._model = model
        self._fail_open = fail_open

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Lifespan and websocket scopes are not requests to charge: pass them through untouched.
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        exact = self._exact
        if exact is not None:
            path = scope["path"]
            if path not in exact and not path.startswith(self._prefixes):
                await self.app(scope, receive, send)
                return
        start = time.perf_counter()
        account_id = self._account(scope)
        if account_id is None:
            await self.app(scope, receive, send)
            return
        tokens = self._tokens if self._tokens_of is None else self._tokens_of(scope)
        request_id = None
        for name, value in scope["headers"]:
            if name == _IDEMPOTENCY_KEY:
                request_id = value.decode("latin-1")  # ASGI header values are latin-1 bytes
                break

        try:
            d = await self._meter.debit(account_id, tokens, agent=self._agent, model=self._model,
                                        request_id=request_id)
        except StoreUnavailable as exc:
            if self._fail_open:
                # Availability over accuracy, as configured: serve un-metered and say so.
                await self.app(scope, receive, _with_headers(send, [_UNAVAILABLE], start))
                return
            if isinstance(exc, OutcomeUnknown):  # sent, answer lost: maybe charged; retry with the same key
                body = error_body("outcome_unknown", f"{OUTCOME_UNKNOWN_ADVICE} ({exc})")
            else:
                body = error_body("store_unavailable", f"token store unavailable: {exc}")
            await _json(send, 503, body, [_RETRY_SOON], start)
            return
        except InvalidInput as exc:
            await _json(send, 422, error_body("invalid_input", f"{exc.field}: {exc.message}", field=exc.field),
                        [], start)
            return
        except UnknownAccount as exc:
            await _json(send, 404, error_body("unknown_account", str(exc), account_id=exc.account_id), [], start)
            return
        except IdempotencyConflict as exc:
            await _json(send, 409, error_body("idempotency_conflict", str(exc), idempotency_key=exc.request_id),
                        [], start)
            return
        except LedgerUnavailable as exc:
            await _json(send, 503, error_body("ledger_unavailable", str(exc)), [_RETRY_SOON], start)
            return
        except MeterError as exc:
            # An unexpected store reply: we cannot tell what was charged, so fail closed (never
            # fail open here: fail_open covers an unreachable store, not a misbehaving one).
            await _json(send, 503, error_body("meter_error", str(exc)), [_RETRY_SOON], start)
            return

        headers = self._headers(d)
        if d.allowed:
            await self.app(scope, receive, _with_headers(send, headers, start))
        elif d.reason == "insufficient":
            await _json(send, 402, denial_body(d), headers, start)
        else:  # daily_cap | rate_limited
            headers.append((_RETRY_AFTER, b"%d" % _ceil_s(d.retry_after_ms)))
            await _json(send, 429, denial_body(d), headers, start)

    def _headers(self, d: Decision) -> list[tuple[bytes, bytes]]:
        """The X-Tokens headers, plus the RateLimit headers of the daily cap when the plan has one."""
        headers = [(_REMAINING, b"%d" % d.remaining), (_USED_TODAY, b"%d" % d.tokens_used_today),
                   (_REQUESTS_TODAY, b"%d" % d.requests_today)]
        limit = d.daily_request_limit
        if limit:
            # The daily window resets at UTC midnight. The meter's clock (not time.time) so this
            # agrees with the day the script counted in, and with an injected test clock.
            left_ms = DAY_MS - self._meter.clock.now_ms() % DAY_MS
            headers += [(_LIMIT, b"%d" % limit), (_LIMIT_REMAINING, b"%d" % max(limit - d.requests_today, 0)),
                        (_LIMIT_RESET, b"%d" % _ceil_s(left_ms))]
        return headers


def _with_headers(send: Send, headers: list[tuple[bytes, bytes]], start: float) -> Send:
    """`send` that appends `headers` (and X-Process-Time) to the response start message only."""

    async def send_with_headers(message: Message) -> None:
        if message["type"] == "http.response.start":
            # X-Process-Time is taken here, as late as it can be without buffering the body.
            message["headers"] = [*message.get("headers", ()), *headers, _process_time(start)]
        await send(message)

    return send_with_headers


async def _json(send: Send, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]],
                start: float) -> None:
    """A complete JSON response, sent directly: no Response object on the denial path."""
    payload = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [_JSON, (b"content-length", b"%d" % len(payload)), *headers, _process_time(start)]})
    await send({"type": "http.response.body", "body": payload})
