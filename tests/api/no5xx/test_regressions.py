"""Regressions: one narrow test per fault the fuzzing found, on the package's live app."""

from __future__ import annotations

import json
import urllib.parse
import uuid
from typing import Any

import pytest

from api.security import issue_token
from tests.api.conftest import MASTER_KEY
from tests.api.no5xx.asgi import Reply, Req
from tests.api.no5xx.checks import Findings
from tests.api.no5xx.live import Live

pytestmark = [pytest.mark.redis, pytest.mark.slow]
def _call(live: Live, method: str, url: str, body: bytes = b"", **headers: str) -> Reply:
    return live.call(Req(method, url, {k.replace("_", "-").lower(): v for k, v in headers.items()}, body))


def _expect_clear_4xx(reply: Reply, status: int | tuple[int, ...]) -> dict[str, Any]:
    assert reply.error is None, reply.show()
    want = status if isinstance(status, tuple) else (status,)
    assert reply.status in want, reply.show()
    body = reply.json()
    assert isinstance(body, dict) and body.get("error") and body.get("message"), body
    return body


def test_a_transactions_cursor_past_64_bits_is_a_422(live: Live) -> None:
    """Found by the fuzzing: ?cursor=2**63 reached SQLite, and OverflowError gave a 500."""
    assert live.known is not None
    for cursor in (2**63, 2**64, 10**30):
        reply = _call(live, "GET", f"/api/v1/tokens/transactions?cursor={cursor}", authorization=live.known.user_auth)
        assert _expect_clear_4xx(reply, 422)["field"] == "cursor"


def test_a_promo_code_cap_past_64_bits_is_a_422(live: Live) -> None:
    """Found by the fuzzing: max_redemptions=2**63 reached SQLite, and OverflowError gave a 500."""
    for i, cap in enumerate((2**63, 2**64)):
        body = json.dumps({"code": f"HUGECAP{i}", "bonus_tokens": 5, "max_redemptions": cap}).encode()
        reply = _call(live, "POST", "/api/v1/admin/promo-codes", body, authorization=f"Bearer {MASTER_KEY}",
                      content_type="application/json")
        assert _expect_clear_4xx(reply, 422)["field"] == "max_redemptions"


def test_a_body_that_is_not_json_is_named_as_the_body(live: Live) -> None:
    """Found by the fuzzing: for a JSON decode error the 422 named the character offset
    ("field": "0", message "0: JSON decode error"), not the body."""
    for raw in (b"\x00", b"{", b'{"account_id": "fuzz-1", "tokens": 1}]'):
        reply = _call(live, "POST", "/api/v1/meter/debit", raw, authorization=f"Bearer {MASTER_KEY}",
                      content_type="application/json")
        assert _expect_clear_4xx(reply, (400, 422)).get("field", "body") == "body", reply.show()


def test_a_bad_idempotency_key_is_named_as_such(live: Live) -> None:
    """Found by the fuzzing: a non-printable Idempotency-Key got a 422 naming "request_id", which
    is no field or header of the request."""
    reply = _call(live, "POST", "/api/v1/meter/debit", b'{"account_id": "fuzz-1", "tokens": 1}',
                  authorization=f"Bearer {MASTER_KEY}", content_type="application/json", idempotency_key="a\tb")
    assert _expect_clear_4xx(reply, 422)["field"].lower() == "idempotency-key"


def test_a_bad_grant_reason_is_named_as_such(live: Live) -> None:
    """Found by the fuzzing: a grant reason with a control character got a 422 naming "note",
    the meter's name for it, not the request's "reason"."""
    reply = _call(live, "POST", "/api/v1/admin/accounts/fuzz-1/grants", b'{"tokens": 5, "reason": "a\\nb"}',
                  authorization=f"Bearer {MASTER_KEY}", content_type="application/json")
    assert _expect_clear_4xx(reply, 422)["field"] == "reason"


def _fresh_user(live: Live) -> str:
    """A user of its own (no failed promo attempts counted against it), without the slow hash."""
    assert live.api is not None
    account = f"u_{uuid.uuid4().hex[:16]}"
    live.run(live.api.state.rt.meter.open_account(account))
    live.run(live.api.add_account_row(account))
    return "Bearer " + issue_token(live.api.state.jwt_secret, account, 3600)


def _no_5xx(live: Live, requests_: list[Req]) -> None:
    findings = Findings()
    for req in requests_:
        findings.check(f"{req.method} {req.url.split('?')[0]}", req, live.call(req))
    findings.assert_none()


def test_nul_characters_are_a_4xx_not_a_500(live: Live) -> None:
    """Found by the fuzzing on Postgres, which refuses NUL in text ("invalid byte sequence for
    encoding UTF8: 0x00"): stored or looked up, a NUL gave a 500. (SQLite accepts it.)"""
    assert live.known is not None
    user = {"authorization": live.known.user_auth}
    svc = {"authorization": f"Bearer {MASTER_KEY}"}
    js = {"content-type": "application/json"}
    _no_5xx(live, [
        Req("POST", "/api/v1/projects", {**user, **js}, b'{"title": "a\\u0000b"}'),
        Req("POST", "/api/v1/projects/%00/execute", user),
        Req("GET", "/api/v1/tokens/transactions?type=%00", user),
        Req("GET", "/api/v1/tokens/purchases/%00", user),
        Req("POST", "/api/v1/tokens/redeem-code", {"authorization": _fresh_user(live), **js},
            b'{"promo_code": "A\\u0000B"}'),
        Req("POST", "/api/v1/auth/register", js, b'{"email": "nul\\u0000@example.com", "password": "long-enough-1"}'),
        Req("POST", "/api/v1/auth/login", js, b'{"email": "nul\\u0000@example.com", "password": "long-enough-1"}'),
        Req("POST", "/api/v1/admin/api-keys", {**svc, **js}, b'{"name": "a\\u0000b", "scopes": ["meter"]}'),
        Req("DELETE", "/api/v1/admin/api-keys/%00", svc),
        Req("DELETE", "/api/v1/admin/promo-codes/%00", svc),
        Req("GET", "/api/v1/admin/accounts?q=%00", svc),
    ])


def test_dates_outside_the_databases_range_are_a_4xx_not_a_500(live: Live) -> None:
    """Found by the fuzzing on Postgres: a date of 9999-12-31T23:59:59-23:59 (year 10000 in UTC)
    or 0001-01-01T00:00:00+23:59 (year 0) gave a 500 "date value out of range": since/until of
    the history and analytics, starts_at/ends_at of a promo code."""
    assert live.known is not None
    user = {"authorization": live.known.user_auth}
    svc = {"authorization": f"Bearer {MASTER_KEY}", "content-type": "application/json"}
    reqs = []
    for value in ("9999-12-31T23:59:59-23:59", "0001-01-01T00:00:00+23:59"):
        for path in ("/api/v1/tokens/analytics", "/api/v1/tokens/transactions"):
            for name in ("since", "until"):
                reqs.append(Req("GET", f"{path}?{urllib.parse.urlencode({name: value})}", user))
        for name in ("starts_at", "ends_at"):
            body = {"code": f"DATE_{uuid.uuid4().hex[:8].upper()}", "bonus_tokens": 5, name: value}
            reqs.append(Req("POST", "/api/v1/admin/promo-codes", svc, json.dumps(body).encode()))
    _no_5xx(live, reqs)


def test_a_webhook_for_an_unconfigured_provider_is_not_a_5xx(live: Live) -> None:
    """Found by the fuzzing: POST /api/v1/payments/webhook/razorpay on a server without Razorpay
    settings answers 503 provider_not_configured. No input may get a 5xx: a provider this server
    does not run is unknown to it (404), whoever calls."""
    reply = _call(live, "POST", "/api/v1/payments/webhook/razorpay", b'{"event": "payment.captured"}',
                  content_type="application/json", x_razorpay_signature="00")
    _expect_clear_4xx(reply, (400, 404))
