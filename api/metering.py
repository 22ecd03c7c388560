"""Turning decisions into HTTP for the FastAPI side: the meter's contract is meter/_http.py
(status, body, headers; shared with the fast path and the ASGI middleware); here it becomes a
Starlette Response, and each answered meter request is counted for /metrics."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import Counter, Histogram
from starlette.responses import Response

from meter import Decision, Meter
from meter._http import PACKAGES_URL, Header, decision_parts, denial_body, encode_json, process_time

__all__ = ["PACKAGES_URL", "decision_response", "denial_body", "json_response", "metered_headers", "observe"]

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
                    start: float) -> list[Header]:
    """The X-Tokens headers of a balance figure (settle, release, balance), then X-Process-Time."""
    h = []
    if remaining is not None:
        h.append((b"x-tokens-remaining", b"%d" % remaining))
    if used_today is not None:
        h.append((b"x-tokens-used-today", b"%d" % used_today))
    if requests_today is not None:
        h.append((b"x-requests-today", b"%d" % requests_today))
    return [*h, process_time(start)]


def json_response(status: int, body: dict[str, Any], headers: list[Header]) -> Response:
    """A Starlette Response with exactly the bytes `meter._http.send_json` sends."""
    payload, raw_headers = encode_json(body, headers)
    response = Response(payload, status_code=status)
    response.raw_headers = raw_headers
    return response


def decision_response(meter: Meter, d: Decision, body: dict[str, object], start: float) -> Response:
    """200, 402 or 429 (with Retry-After); the RateLimit reset on the meter's clock."""
    status, content, headers = decision_parts(d, body, meter.clock.now_ms())
    return json_response(status, content, [*headers, process_time(start)])
