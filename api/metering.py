"""Turning decisions into HTTP: the brief's 402 body, 429 with Retry-After, metering headers.
Shared by the meter endpoints, the project runner and the ASGI middleware."""

from __future__ import annotations

import time

from fastapi.responses import JSONResponse
from prometheus_client import Counter, Histogram

from meter import Decision
from meter._clock import DAY_MS

__all__ = ["PACKAGES_URL", "decision_parts", "decision_response", "denial_body", "metered_headers", "observe"]

PACKAGES_URL = "/api/v1/tokens/packages"

DECISIONS = Counter("tokenmeter_decisions_total", "Meter requests answered, by operation and outcome "
                    "(ok, insufficient, daily_cap, rate_limited, or the error code)", ["op", "outcome"])
DECISION_SECONDS = Histogram("tokenmeter_decision_seconds", "Server-side time to answer a meter request",
                             ["op"], buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1,
                                              0.25, 0.5, 1.0))
_children: dict[tuple[str, str], tuple[Counter, Histogram]] = {}


def observe(op: str, outcome: str, start: float) -> None:
    """Count one answered meter request and its latency (label children cached: ~1 µs)."""
    pair = _children.get((op, outcome))
    if pair is None:
        pair = _children[(op, outcome)] = (DECISIONS.labels(op, outcome), DECISION_SECONDS.labels(op))
    pair[0].inc()
    pair[1].observe(time.perf_counter() - start)


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


def decision_parts(d: Decision, body: dict[str, object], start: float
                   ) -> tuple[int, dict[str, object], dict[str, str]]:
    """(status, body, headers): 200 when allowed, 402 or 429 (with Retry-After) when denied; the
    RateLimit headers describe the plan's daily window (reset at the next UTC midnight), as the
    middleware's do."""
    headers = metered_headers(d.remaining, d.tokens_used_today, d.requests_today, start)
    if d.daily_request_limit:
        headers["RateLimit-Limit"] = str(d.daily_request_limit)
        headers["RateLimit-Remaining"] = str(max(d.daily_request_limit - d.requests_today, 0))
        headers["RateLimit-Reset"] = str(-(-(DAY_MS - time.time_ns() // 1_000_000 % DAY_MS) // 1000))
    if d.allowed:
        return 200, body, headers
    if d.reason == "insufficient":
        return 402, {**body, **denial_body(d)}, headers
    headers["Retry-After"] = str(-(-d.retry_after_ms // 1000))
    return 429, {**body, **denial_body(d)}, headers


def decision_response(d: Decision, body: dict[str, object], start: float) -> JSONResponse:
    status, content, headers = decision_parts(d, body, start)
    return JSONResponse(content, status_code=status, headers=headers)
