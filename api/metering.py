"""Turning decisions into HTTP: the brief's 402 body, 429 with Retry-After, metering headers.
Shared by the meter endpoints, the project runner and the ASGI middleware."""

from __future__ import annotations

import time

from fastapi.responses import JSONResponse

from meter import Decision
from meter._clock import DAY_MS

__all__ = ["PACKAGES_URL", "decision_response", "denial_body", "metered_headers"]

PACKAGES_URL = "/api/v1/tokens/packages"


def metered_headers(remaining: int | None, used_today: int | None, requests_today: int | None,
                    start: float) -> dict[str, str]:
    h = {"X-Process-Time": f"{(time.perf_counter() - start) * 1000:.3f}"}
    if remaining is not None:
        h["X-Tokens-Remaining"] = str(remaining)
    if used_today is not None:
        h["X-Tokens-Used-Today"] = str(used_today)
    if requests_today is not None:
        h["X-Requests-Today"] = str(requests_today)
    return h


def denial_body(d: Decision) -> dict[str, object]:
    """The brief's error bodies: insufficient tokens, or a cap with when to come back."""
    if d.reason == "insufficient":
        return {"error": "Insufficient tokens",
                "message": f"Need {d.shortage} more tokens. Current balance: {d.remaining}",
                "required": d.tokens, "available": d.remaining, "shortage": d.shortage,
                "packages_url": PACKAGES_URL}
    what = "Daily request limit reached" if d.reason == "daily_cap" else "Rate limit exceeded"
    return {"error": what, "message": f"{what}; retry after {-(-d.retry_after_ms // 1000)} s",
            "reason": d.reason, "daily_request_limit": d.daily_request_limit,
            "requests_today": d.requests_today, "retry_after_ms": d.retry_after_ms}


def decision_response(d: Decision, body: dict[str, object], start: float) -> JSONResponse:
    """200 when allowed, 402 or 429 (with Retry-After) when denied; the RateLimit headers
    describe the plan's daily window (reset at the next UTC midnight), as the middleware's do."""
    headers = metered_headers(d.remaining, d.tokens_used_today, d.requests_today, start)
    if d.daily_request_limit:
        headers["RateLimit-Limit"] = str(d.daily_request_limit)
        headers["RateLimit-Remaining"] = str(max(d.daily_request_limit - d.requests_today, 0))
        headers["RateLimit-Reset"] = str(-(-(DAY_MS - time.time_ns() // 1_000_000 % DAY_MS) // 1000))
    if d.allowed:
        return JSONResponse(body, headers=headers)
    if d.reason == "insufficient":
        return JSONResponse({**body, **denial_body(d)}, status_code=402, headers=headers)
    headers["Retry-After"] = str(-(-d.retry_after_ms // 1000))
    return JSONResponse({**body, **denial_body(d)}, status_code=429, headers=headers)
