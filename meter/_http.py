"""The meter's HTTP contract, once: a decision or a meter fault → (status, body, headers), and
the raw-ASGI JSON sender. Used by the FastAPI routes, the debit fast path, the project runner
(api/) and the ASGI middleware (meter/asgi.py); no web framework is imported here, so the
middleware loads with the `meter` package alone.

Headers are lists of lowercase `(bytes, bytes)` pairs, as ASGI wants them, in one order for
every answer: content-type, content-length, the private headers, the metering headers,
Retry-After, X-Process-Time. The RateLimit reset is taken from the meter's clock (the clock
the script counted the day in), passed in as `now_ms`.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from typing import Any

from meter import _errors as errors
from meter._clock import DAY_MS, month_end_ms, month_index
from meter._types import Decision

__all__ = [
    "NOSNIFF",
    "NO_STORE",
    "OUTCOME_UNKNOWN_ADVICE",
    "PACKAGES_URL",
    "PRIVATE_HEADERS",
    "Header",
    "ceil_s",
    "decision_headers",
    "decision_parts",
    "denial_body",
    "encode_json",
    "error_body",
    "error_parts",
    "field_names",
    "go_duration",
    "insufficient_body",
    "process_time",
    "send_json",
]

Header = tuple[bytes, bytes]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

PACKAGES_URL = "/api/v1/tokens/packages"
OUTCOME_UNKNOWN_ADVICE = ("the request reached the token store but its answer was lost: it may have been "
                          "applied; retry with the same Idempotency-Key (a retry without one may be charged twice)")

NOSNIFF: Header = (b"x-content-type-options", b"nosniff")
NO_STORE: Header = (b"cache-control", b"no-store")
PRIVATE_HEADERS: tuple[Header, Header] = (NOSNIFF, NO_STORE)  # a user's balance is never cached or sniffed
_JSON: Header = (b"content-type", b"application/json")
_RETRY_SOON: Header = (b"retry-after", b"1")  # an outage: come back in a second


def ceil_s(ms: int) -> int:
    """Milliseconds rounded up to whole seconds (Retry-After, RateLimit-Reset, the 429 message)."""
    return -(-ms // 1000)


def process_time(start: float) -> Header:
    """X-Process-Time: milliseconds since `start` (a time.perf_counter() reading), 3 decimals."""
    return b"x-process-time", b"%.3f" % ((time.perf_counter() - start) * 1000)


def error_body(error: str, message: str, **details: Any) -> dict[str, Any]:
    return {"error": error, "message": message, **details}


@contextlib.contextmanager
def field_names(**names: str) -> Iterator[None]:
    """Report the meter's InvalidInput under the name the HTTP caller used for that field
    (e.g. the meter's request_id is the Idempotency-Key header)."""
    try:
        yield
    except errors.InvalidInput as exc:
        if exc.field in names:
            raise errors.InvalidInput(names[exc.field], exc.message) from exc
        raise


def error_parts(exc: errors.MeterError) -> tuple[int, dict[str, Any], list[Header]]:
    """(status, body, headers) of a meter fault: 422, 404, 409, or 503 with Retry-After."""
    if isinstance(exc, errors.InvalidInput):
        return 422, error_body("invalid_input", f"{exc.field}: {exc.message}", field=exc.field), []
    if isinstance(exc, errors.UnknownAccount):
        return 404, error_body("unknown_account", str(exc), account_id=exc.account_id), []
    if isinstance(exc, errors.UnknownHold):
        return 404, error_body("unknown_hold", str(exc), hold_id=exc.hold_id), []
    if isinstance(exc, errors.IdempotencyConflict):
        return 409, error_body("idempotency_conflict", str(exc), idempotency_key=exc.request_id), []
    if isinstance(exc, errors.OutcomeUnknown):  # sent, answer lost: maybe charged; retry with the same key
        body = error_body("outcome_unknown", f"{OUTCOME_UNKNOWN_ADVICE} ({exc})")
    elif isinstance(exc, errors.StoreUnavailable):
        body = error_body("store_unavailable", f"token store unavailable: {exc}")
    elif isinstance(exc, errors.LedgerUnavailable):
        body = error_body("ledger_unavailable", str(exc))
    else:
        # An unexpected store reply: we cannot tell what was charged, so fail closed.
        body = error_body("meter_error", str(exc))
    return 503, body, [_RETRY_SOON]


def insufficient_body(required: int, available: int, packages_url: str = PACKAGES_URL) -> dict[str, object]:
    """The brief's 402 body."""
    return {"error": "Insufficient tokens",
            "message": f"Need {required - available} more tokens. Current balance: {available}",
            "required": required, "available": available, "shortage": required - available,
            "packages_url": packages_url}


def denial_body(d: Decision, packages_url: str = PACKAGES_URL) -> dict[str, object]:
    """The brief's error bodies: insufficient tokens, or a cap with when to come back."""
    if d.reason == "insufficient":
        return insufficient_body(d.tokens, d.remaining, packages_url)
    what = "Daily request limit reached" if d.reason == "daily_cap" else "Rate limit exceeded"
    return {"error": what, "message": f"{what}; retry after {ceil_s(d.retry_after_ms)} s",
            "reason": d.reason, "daily_request_limit": d.daily_request_limit,
            "requests_today": d.requests_today, "retry_after_ms": d.retry_after_ms}


_month_span = (0, 0)  # [start, end) of the month last asked about: the hot path skips the calendar


def _month_end(now_ms: int) -> int:
    """The first millisecond of the UTC month after the one of `now_ms`."""
    global _month_span
    start, end = _month_span
    if not start <= now_ms < end:
        month = month_index(now_ms)
        start, end = month_end_ms(month - 1), month_end_ms(month)
        _month_span = (start, end)
    return end


def go_duration(ms: int) -> bytes:
    """A duration as OpenAI's x-ratelimit-reset-* spell it: 20ms, 1s, 6m0s, 3h2m1s."""
    if ms < 1000:
        return b"%dms" % max(ms, 0)
    s = ceil_s(ms)
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    if h:
        return b"%dh%dm%ds" % (h, m, s)
    return b"%dm%ds" % (m, s) if m else b"%ds" % s


def decision_headers(d: Decision, now_ms: int) -> list[Header]:
    """The X-Tokens headers; the rate-limit headers a gateway can pass through, for the token
    balance (limit = the balance when asked, reset = the next monthly allowance) and, when the plan
    has one, the daily request cap (reset at the next UTC midnight of `now_ms`, the meter's
    clock): OpenAI's x-ratelimit-*-{requests,tokens}, the IETF draft's RateLimit-Policy and
    RateLimit, and its older RateLimit-Limit/-Remaining/-Reset; Retry-After when capped."""
    remaining = d.remaining
    headers = [(b"x-tokens-remaining", b"%d" % remaining), (b"x-tokens-used-today", b"%d" % d.tokens_used_today),
               (b"x-requests-today", b"%d" % d.requests_today)]
    balance = remaining + d.tokens if d.allowed else remaining
    month_ms = _month_end(now_ms) - now_ms
    policy = b'"tokens";q=%d;w=%d' % (balance, ceil_s(month_ms))
    state = b'"tokens";r=%d;t=%d' % (remaining, ceil_s(month_ms))
    limit = d.daily_request_limit
    if limit:
        left = max(limit - d.requests_today, 0)
        day_ms = DAY_MS - now_ms % DAY_MS
        day_s = b"%d" % ceil_s(day_ms)
        headers += [(b"x-ratelimit-limit-requests", b"%d" % limit), (b"x-ratelimit-remaining-requests", b"%d" % left),
                    (b"x-ratelimit-reset-requests", go_duration(day_ms))]
        policy = b'"daily";q=%d;w=86400, ' % limit + policy
        state = b'"daily";r=%d;t=%s, ' % (left, day_s) + state
        legacy = [(b"ratelimit-limit", b"%d" % limit), (b"ratelimit-remaining", b"%d" % left),
                  (b"ratelimit-reset", day_s)]
    else:
        legacy = []
    headers += [(b"x-ratelimit-limit-tokens", b"%d" % balance), (b"x-ratelimit-remaining-tokens", b"%d" % remaining),
                (b"x-ratelimit-reset-tokens", go_duration(month_ms)),
                (b"ratelimit-policy", policy), (b"ratelimit", state), *legacy]
    if not d.allowed and d.reason != "insufficient":  # daily_cap | rate_limited
        headers.append((b"retry-after", b"%d" % ceil_s(d.retry_after_ms)))
    return headers


def decision_parts(d: Decision, body: dict[str, object], now_ms: int, packages_url: str = PACKAGES_URL
                   ) -> tuple[int, dict[str, object], list[Header]]:
    """(status, body, headers): 200 with `body` when allowed; 402 or 429 with `body` and the
    denial's fields when denied."""
    headers = decision_headers(d, now_ms)
    if d.allowed:
        return 200, body, headers
    return (402 if d.reason == "insufficient" else 429), {**body, **denial_body(d, packages_url)}, headers


def encode_json(body: dict[str, Any], headers: list[Header] | tuple[Header, ...]) -> tuple[bytes, list[Header]]:
    """The compact JSON payload and the full header list of a private JSON answer."""
    payload = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
    return payload, [_JSON, (b"content-length", b"%d" % len(payload)), *PRIVATE_HEADERS, *headers]


async def send_json(send: Send, status: int, body: dict[str, Any], headers: list[Header]) -> None:
    """A complete JSON answer as two ASGI messages: no Response object on the hot path."""
    payload, all_headers = encode_json(body, headers)
    await send({"type": "http.response.start", "status": status, "headers": all_headers})
    await send({"type": "http.response.body", "body": payload})
